"""Prompts that fill the context window to 40-600 tokens short of its end, from a bench file's text
(repeated past the window when the file is short), for the GPU check's soak at the cache's last slots.

    python benchmarks/long_prompts.py MODEL BENCH OUT
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from graft.backbone import load_backbone  # noqa: E402

model, bench, out = sys.argv[1:4]
bb = load_backbone(model, device="cpu")
tok, ctx = bb.tokenizer, bb.max_positions or 2048
text = " ".join(json.loads(line)["prompt"] for line in open(bench) if line.strip())
ids = tok(text)["input_ids"]
ids = ids * (ctx // max(len(ids), 1) + 1)  # a short bench file: repeated past the window
with open(out, "w") as f:
    for short in (40, 150, 300, 600):
        if short >= ctx // 2:  # a small window: leave at least half of it to the prompt
            continue
        cut = ctx - short
        while cut > 0 and len(tok(tok.decode(ids[:cut]))["input_ids"]) > ctx - short:  # re-encoding may merge
            cut -= 8
        f.write(json.dumps({"prompt": tok.decode(ids[:cut]), "category": f"ctx-{short}"}) + "\n")
