"""Check graft's decoding engines against plain greedy decoding, and time them.

For each head family (fresh heads, slightly perturbed so drafts are sometimes wrong and the KV
compaction is exercised) and each engine, greedy output is compared token by token with
transformers' `generate`; then the loop without drafting is timed per engine.

  python benchmarks/engine_check.py smollm2-135m --dtype float32 --engines eager,static,graph

The step's cost against the tree size is benchmarks/step_cost.py's.
"""
from __future__ import annotations

import argparse
import sys

import torch

from graft.backbone import load_backbone
from graft.registry import FAMILIES
from graft.model import add_heads, encode_prompt
from graft.speculative import DecodeConfig, SpeculativeDecoder

PROMPTS = ["Write a haiku about the sea.", "What is 17 times 23? Explain step by step.",
           "List three uses of a paperclip.", "Translate 'good morning' into French and Spanish."]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--engines", default="eager,static,graph")
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--new", type=int, default=64)
    a = p.parse_args(argv)
    engines = a.engines.split(",")
    bb = load_backbone(a.model, dtype=a.dtype, device=a.device)
    prompts = [encode_prompt(bb.tokenizer, q, True) for q in PROMPTS]
    refs = []
    for ids in prompts:
        x = torch.tensor([ids], device=bb.device)
        out = bb.hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=a.new, do_sample=False,
                             pad_token_id=bb.tokenizer.eos_token_id)
        refs.append(out[0, len(ids):].tolist())
    bad = 0
    for fam in a.families.split(","):
        torch.manual_seed(0)
        m = add_heads(bb, heads=fam, num_heads=4)
        with torch.no_grad():
            for q in m.heads.parameters():
                q.add_(torch.randn_like(q) * 1e-3)
        m.heads.to(bb.dtype)
        dec = SpeculativeDecoder(m)
        for eng in engines:
            same, taus = 0, []
            for ids, ref in zip(prompts, refs):
                g = dec.generate(ids, DecodeConfig(max_new_tokens=a.new, engine=eng))
                n = min(len(ref), len(g.ids))
                same += g.ids[:n] == ref[:n]
                taus.append(g.tau)
            bad += same != len(prompts)
            print(f"{fam:<13} {eng:<7} identical {same}/{len(prompts)}  tau {sum(taus) / len(taus):.2f}", flush=True)
    m = add_heads(bb, heads="medusa", num_heads=4)
    m.heads.to(bb.dtype)
    dec = SpeculativeDecoder(m)
    for eng in engines:
        for draft in (False, True):
            cfg = DecodeConfig(max_new_tokens=128, engine=eng, draft=draft, eos=False)
            dec.generate(prompts[0], cfg)  # warm-up: cache, graphs
            t, n = 0.0, 0
            for ids in prompts:
                g = dec.generate(ids, cfg)
                t += g.decode_s + g.prefill_s
                n += len(g.ids)
            print(f"timing {eng:<7} draft={draft!s:<5} {n / t:8.1f} tok/s", flush=True)
    print("ALL IDENTICAL" if not bad else f"{bad} family/engine pairs differ")
    return 0


if __name__ == "__main__":
    sys.exit(main())
