import json, sys
from graft.backbone import load_backbone
bb = load_backbone(sys.argv[1], device="cpu")
tok, ctx = bb.tokenizer, bb.max_positions or 2048
text = " ".join(json.loads(l)["prompt"] for l in open(sys.argv[2]))
while len(tok(text)["input_ids"]) < ctx:
    text = text + "\n\n" + text
ids = tok(text)["input_ids"]
with open(sys.argv[3], "w") as f:
    for short in (40, 150, 300, 600):
        n = ctx - short
        while len(tok(tok.decode(ids[:n]))["input_ids"]) > ctx - short:
            n -= 8
        p = tok.decode(ids[:n])
        print(short, len(tok(p)["input_ids"]), ctx)
        f.write(json.dumps({"prompt": p, "category": f"ctx-{short}"}) + "\n")
