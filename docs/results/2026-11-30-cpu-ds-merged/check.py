# python check.py <graft folder: the deepseek-mtp heads> <bench.jsonl>
"""Trained deepseek-mtp heads (GPU, 13 min), float32 on CPU: eager (exact commits) vs static (owed commits run
with the draft tails): same tokens as plain greedy, same steps."""
import json, sys, time
from graft.model import load
from graft.speculative import DecodeConfig, SpeculativeDecoder
from graft.data import encode_chat
m = load(sys.argv[1], device="cpu", dtype="float32", verify_backbone=False)
tok = m.tokenizer
rows = [json.loads(l) for l in open(sys.argv[2])]
by = {}
for r in rows:
    by.setdefault(r.get("category"), []).append(r)
sel = [r for c in sorted(by) for r in by[c][:2]]
dec = SpeculativeDecoder(m)
for kw in [dict(tree_size=32), dict(tree="dynamic", tree_size=16)]:
    for r in sel:
        text = r.get("prompt") or r["turns"][0]
        ids = encode_chat(tok, [{"role": "user", "content": text}], True)
        ref = dec.generate(ids, DecodeConfig(max_new_tokens=48, draft=False, engine="eager")).ids
        out = {}
        for eng in ("eager", "static"):
            g = dec.generate(ids, DecodeConfig(max_new_tokens=48, engine=eng, **kw))
            out[eng] = (g.ids == ref, g.steps, round(g.tau, 3))
        print(kw, r.get("category"), out, flush=True)
