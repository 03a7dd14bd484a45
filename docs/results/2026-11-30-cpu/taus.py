"""Tokens per step of deepseek-mtp heads with fixed and dynamic 32-node trees, and a fixed
64-node tree, on the first 4 prompts of each bench category (128 new tokens, greedy, eager).
python taus.py GRAFT_DIR bench.jsonl   (with graft on PYTHONPATH)"""
import sys, json, time, torch

from graft.model import load
from graft.bench import read_prompts
from graft.speculative import SpeculativeDecoder, DecodeConfig
from graft.tree import DynamicTree, Tree, build_tree
from graft.data import encode_chat
torch.set_num_threads(2)
m = load(sys.argv[1], device="cpu")
dec = SpeculativeDecoder(m)
rows = read_prompts(sys.argv[2], None, 4)
tok = m.tokenizer
enc = [encode_chat(tok, [{"role": "user", "content": r["turns"][0]}], True) for r in rows]
cfg = DecodeConfig(max_new_tokens=128, engine="eager")
trees = {"fixed-32": Tree(build_tree(dec.accuracies(), 32)), "dynamic-32-w8": DynamicTree(32, 8, 4),
         "dynamic-32-w4": DynamicTree(32, 4, 4), "fixed-64": Tree(build_tree(dec.accuracies(), 64))}
res = {}
for name, tree in trees.items():
    t0 = time.time(); steps = toks = 0; ids = []
    with torch.inference_mode():
        for e in enc:
            g = dec._generate(e, cfg, tree=tree)
            steps += g.steps; toks += g.step_tokens; ids.append(g.ids)
    res[name] = ids
    print(f"{name}: tau {toks / steps:.3f} over {len(enc)} prompts ({time.time() - t0:.0f} s)", flush=True)
print("identical outputs:", all(res[k] == res["fixed-32"] for k in res))
