import json, sys
from graft.backbone import load_backbone
bb = load_backbone(sys.argv[1], device="cpu")
tok, ctx = bb.tokenizer, bb.max_positions or 2048
text = " ".join(json.loads(l)["prompt"] for l in open(sys.argv[2]))
ids = tok(text)["input_ids"]
with open(sys.argv[3], "w") as f:
    for short in (40, 150, 300, 600):
        f.write(json.dumps({"prompt": tok.decode(ids[:ctx - short]), "category": f"ctx-{short}"}) + "\n")
