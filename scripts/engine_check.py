"""Check graft's decoding engines against plain greedy decoding, and time them.

For each head family (fresh heads, slightly perturbed so drafts are sometimes wrong and the KV
compaction is exercised) and each engine, greedy output is compared token by token with
transformers' `generate`; then the loop without drafting is timed per engine.

  python scripts/engine_check.py smollm2-135m --dtype float32 --engines eager,static,graph

--sweep times one verification step (with the heads' drafting inside it, and the copy of its
results to the host) against the tree size, and the KV compaction after it, per engine:
  python scripts/engine_check.py smollm2-135m --dtype bfloat16 --engines graph --sweep
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from graft.backbone import load_backbone
from graft.bench import sync
from graft.config import HEAD_FAMILIES
from graft.model import add_heads, encode_prompt
from graft.engine import Step
from graft.speculative import DecodeConfig, SpeculativeDecoder, Tree, build_tree, default_accuracies

PROMPTS = ["Write a haiku about the sea.", "What is 17 times 23? Explain step by step.",
           "List three uses of a paperclip.", "Translate 'good morning' into French and Spanish."]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="auto")
    p.add_argument("--engines", default="eager,static,graph")
    p.add_argument("--families", default=",".join(HEAD_FAMILIES))
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--sweep", action="store_true", help="time the step against the tree size instead")
    p.add_argument("--sizes", default="0,1,2,4,8,16,32,64", help="tree sizes (nodes besides the root) to sweep")
    p.add_argument("--profile", type=int, default=0, metavar="SIZE",
                   help="with --sweep: also profile one generation with a tree of SIZE nodes (torch.profiler)")
    a = p.parse_args(argv)
    engines = a.engines.split(",")
    bb = load_backbone(a.model, dtype=a.dtype, device=a.device)
    if a.sweep:
        return sweep(bb, engines, [int(x) for x in a.sizes.split(",")], a.profile)
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


@torch.inference_mode()
def sweep(bb, engines, sizes, profile=0, context=300, reps=20):
    """ms per verification step (drafting inside for the static engines), per KV compaction, and
    per iteration of the whole decoding loop (step, acceptance, compaction, bookkeeping)."""
    m = add_heads(bb, heads="medusa", num_heads=4)
    m.heads.to(bb.dtype)
    heads = m.heads
    dec = SpeculativeDecoder(m)
    prompt = encode_prompt(bb.tokenizer, PROMPTS[1], True)
    print(f"{'engine':<9}{'tree nodes':>11}{'step ms':>9}{'compaction ms':>15}{'loop ms':>9}", flush=True)
    for eng in engines:
        for size in sizes:
            tree = Tree(build_tree(default_accuracies(4), size))
            cache = bb.new_cache(1024)
            state = heads.new_state(bb, 1024)
            ranks = tree.max_rank if size and eng != "eager" else 0
            step = Step(bb, cache, tree.anc, tree.depths, mode=eng, heads=heads, head_state=state, ranks=ranks)
            tokens = [1] * tree.n
            for _ in range(3):
                out = step(tokens, context)
            sync(bb.device)
            t = time.perf_counter()
            for _ in range(reps):
                _, _, target, top = step(tokens, context)
                (top if top is not None else target).tolist()  # the one copy to the host a step makes
            per_step = (time.perf_counter() - t) / reps * 1e3
            path = torch.tensor([0] + [i for i in range(1, tree.n) if tree.depths[i] <= 4][-1:], device=bb.device)
            t = time.perf_counter()
            for _ in range(reps):
                cache.keep(context, path)
            sync(bb.device)
            per_keep = (time.perf_counter() - t) / reps * 1e3
            del out, step, cache, state
            cfg = DecodeConfig(max_new_tokens=128, engine=eng, draft=size > 0, tree_size=size, eos=False)
            dec.generate(prompt, cfg)  # warm-up: the decoder's own cache and step
            g = dec.generate(prompt, cfg)
            per_loop = g.decode_s / g.steps * 1e3
            print(f"{eng:<9}{tree.n:>11}{per_step:>9.2f}{per_keep:>15.2f}{per_loop:>9.2f}", flush=True)
        if profile:
            from torch.profiler import ProfilerActivity, profile as prof

            cfg = DecodeConfig(max_new_tokens=64, engine=eng, tree_size=profile, eos=False)
            dec.generate(prompt, cfg)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if bb.device.type == "cuda" else [])
            with prof(activities=acts) as pr:
                g = dec.generate(prompt, cfg)
            print(f"profile: {eng}, tree of {profile + 1} nodes, {g.steps} steps, "
                  f"{g.decode_s / g.steps * 1e3:.2f} ms/step (slower under the profiler)")
            for key in ("self_cpu_time_total",) + (("self_device_time_total",) if bb.device.type == "cuda" else ()):
                print(pr.key_averages().table(sort_by=key, row_limit=25, max_name_column_width=60))
        dec._pool.clear()
    return 0


if __name__ == "__main__":
    sys.exit(main())
