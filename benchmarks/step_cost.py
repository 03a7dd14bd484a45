"""The cost of a decoding step against the draft tree's size: the figure that decides whether
drafting pays on a card.

For each head family (fresh heads: the acceptance is irrelevant here) and each tree size, one
generation of --new tokens with drafting forced at every step (EOS ignored) gives the wall time
per step of the whole loop: commit, draft, verify, the one copy to the host, acceptance. Size 0
is graft's loop without drafting. The ratio column divides by that.

  python benchmarks/step_cost.py smollm2-135m --dtype bfloat16 --engine graph
  python benchmarks/step_cost.py --random-llama 8b --engine graph     # random weights, no download
  python benchmarks/step_cost.py --random-llama smollm2 --engine fused --profile   # fused pieces: time, kernels
  python benchmarks/step_cost.py smollm2-135m --draft-vocab 8192     # drafts over 8192 tokens (FR-Spec)
  python benchmarks/step_cost.py --random-llama smollm2 --dtype float32 --ops --tree dynamic   # CPU: op counts
  python benchmarks/step_cost.py --random-llama 8b --matmuls 1,17,33,65     # the matmuls alone, per row count

--random-llama builds a Llama of that shape on the device from a config (smollm2:
SmolLM2-135M, 1b: Llama-3.2-1B, 8b: Llama-3-8B, all with a 49,152 vocabulary) and states the memory roofline of a one-token
step: the weights' bytes over the card's bandwidth (--bandwidth, default an H200's 4.8 TB/s).
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

SHAPES = {
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}


def random_llama(shape: str, dtype: torch.dtype):
    """A random-weight Llama built straight on the GPU (no download): cost figures only."""
    import transformers as tf

    from graft.backbone import Backbone

    cfg = tf.LlamaConfig(vocab_size=49152, max_position_embeddings=4096, rope_theta=500000.0, **SHAPES[shape])
    torch.set_default_dtype(dtype)
    try:
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # CPU: a dry run
            hf = tf.LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    return Backbone.from_hf(hf.eval(), None, source=f"random-llama-{shape}")


PHASES = ("draft", "verify", "logits", "commit", "compact")
CURRENT = ["other"]  # the phase running now (label_phases), for count_ops


def label_phases(dec):
    """Wrap the step's phases in profiler ranges (this script's own; the library has none):
    the heads' drafting and commit, the backbone's forward and unembedding, the KV compaction."""
    from torch.profiler import record_function

    from graft.modeling import KVCache

    def wrap(obj, name, label):
        f = getattr(obj, name)

        def timed(*a, **k):
            with record_function(label):
                CURRENT.append(label)
                try:
                    return f(*a, **k)
                finally:
                    CURRENT.pop()
        setattr(obj, name, timed)

    for obj, name, label in ((dec.heads, "draft", "draft"), (dec.heads, "draft_dynamic", "draft"),
                             (dec.heads, "commit", "commit"), (dec.bb, "forward", "verify"),
                             (dec.bb, "logits", "logits")):
        if hasattr(obj, name):
            wrap(obj, name, label)
    if not hasattr(KVCache.keep, "__wrapped_phase__"):
        keep = KVCache.keep

        def timed_keep(self, *a, **k):
            with record_function("compact"):
                CURRENT.append("compact")
                try:
                    return keep(self, *a, **k)
                finally:
                    CURRENT.pop()
        timed_keep.__wrapped_phase__ = True
        KVCache.keep = timed_keep


def launches(prof):
    """(op, its innermost enclosing phase range or None) for every CPU op that launched kernels."""
    for e in prof.events():
        if e.kernels:
            p = e
            while p is not None and p.name not in PHASES:
                p = p.cpu_parent
            yield e, p


def by_phase(prof, steps: int) -> dict:
    """Kernel count and kernel time (ms) per step for each phase: every CPU op's kernels go to
    its innermost enclosing phase ("other" outside them)."""
    out = {}
    for e, p in launches(prof):
        name = p.name if p is not None else "other"
        n, us = out.get(name, (0, 0.0))
        out[name] = (n + len(e.kernels), us + sum(k.duration for k in e.kernels))
    return {k: (n / steps, us / steps / 1e3) for k, (n, us) in out.items()}


def profile(dec, prompt, roof, size: int = 0, steps: int = 32, tree: str = "auto", pieces: bool = False):
    """Kernel time of a step (one token, or a tree of `size` nodes besides the root) against
    its wall time: what the card computes, and what is gaps and overhead; per phase (draft,
    verify, logits, commit, compact; prefill included once in 'verify'), then the kernels that
    take most of it. `pieces`: the layers' elementwise runs fused, as the fused engine runs them
    (its prefill too, which the count per step leaves out)."""
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile as torch_profile

    from graft.modeling import fused_pieces
    from graft.speculative import DecodeConfig

    if dec.bb.device.type != "cuda":
        print("--profile needs a CUDA device")
        return
    cfg = DecodeConfig(max_new_tokens=steps, engine="static", draft=size > 0, tree_size=size, eos=False, tree=tree)
    with fused_pieces() if pieces else nullcontext():
        dec.generate(prompt, cfg)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            out = dec.generate(prompt, cfg)
    # kernels only: the phases' ranges also show up as device events (GPU user annotations)
    events = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.key not in PHASES]
    total_us = sum(e.self_device_time_total for e in events) / out.steps
    count = sum(e.count for e in events) / out.steps
    what = f"{dec.heads.family} {size + 1}-node step" if size else "one-token step"
    engine = "static engine" + (" with fused pieces" if pieces else "")
    print(f"{what}, {engine}: {count:.0f} kernels, {total_us / 1e3:.2f} ms of kernels per step "
          f"({roof / (total_us / 1e3):.2f} of it is the weights' roofline); by phase:")
    phases = by_phase(prof, out.steps)
    for name, (n, ms) in sorted(phases.items(), key=lambda kv: -kv[1][1]):
        print(f"  {name:<8}{n:6.0f} kernels {ms:7.3f} ms")
    unowned = count - sum(n for n, _ in phases.values())
    if unowned >= 0.5:  # a Triton kernel launched from Python has no torch op to hang on
        print(f"  {'no op':<8}{unowned:6.0f} kernels {total_us / 1e3 - sum(ms for _, ms in phases.values()):7.3f} ms"
              " (graft's own Triton kernels, launched outside torch's ops)")
    print("  the kernels taking most of it:")
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:12]:
        print(f"  {e.self_device_time_total / out.steps / 1e3:7.3f} ms  {e.count // out.steps:4d}x  {e.key[:90]}")
    print("  the last step's verification, its first kernels in order (the op that launched each):")
    for op, kernel in verify_sequence(prof)[:LAYER_KERNELS]:
        print(f"    {op[:36]:<36} {kernel[:80]}")


LAYER_KERNELS = 28  # kernels of the verification's sequence to print: the embedding, then two layers


def verify_sequence(prof) -> list:
    """(op, kernel) in launch order within the profile's last 'verify' range: where each of a
    layer's kernels comes from (a memset, a copy) by the op that launched it."""
    ranges = {}
    for e, p in launches(prof):
        if p is not None and p.name == "verify":
            ranges.setdefault(p.time_range.start, []).extend(
                (e.time_range.start, i, e.name, k.name) for i, k in enumerate(e.kernels))
    if not ranges:
        return []
    return [(op, name) for _, _, op, name in sorted(ranges[max(ranges)])]


def projections(bb):
    """The weights a forward multiplies by, each once, as it multiplies: a fused group's one
    weight (fuse_projections) in place of its modules', and the unembedding."""
    from torch import nn

    from graft.modeling import _FUSED

    out, fused = [], set()
    for mod in bb.hf.modules():
        f = getattr(mod, _FUSED, None)
        if f is not None:
            out.append(f.weight)
            fused.update(id(getattr(mod, n)) for n in f.names)
    out += [m.weight for m in bb.hf.modules() if type(m) is nn.Linear and id(m) not in fused]
    return out


def matmul_cost(bb, rows, roof, reps: int = 20):
    """The matmuls of a forward alone, over `rows` rows each (every projection of every layer
    and the unembedding, one after another in one CUDA graph), with each BLAS library torch can
    call: whether a tree's verification costs more than one token's because its matmuls do."""
    import torch.nn.functional as F

    if bb.device.type != "cuda":
        print("--matmuls needs a CUDA device")
        return []
    bb.fuse_projections()  # as the decoder does
    ws = projections(bb)
    recs = []
    print(f"the forward's {len(ws)} matmuls alone, CUDA graph, {reps} replays; ms per forward "
          f"(share of the weights' roofline {roof:.2f} ms):")
    print(f"{'rows':>6}" + "".join(f"{lib:>18}" for lib in ("cublas", "cublaslt")))
    for m in rows:
        xs = {w.shape[1]: torch.randn(m, w.shape[1], dtype=w.dtype, device=bb.device) for w in ws}
        line = f"{m:>6}"
        for lib in ("cublas", "cublaslt"):
            prev = torch.backends.cuda.preferred_blas_library()
            torch.backends.cuda.preferred_blas_library(lib)
            try:
                for w in ws:  # warm-up outside the capture: the libraries' handles and heuristics
                    F.linear(xs[w.shape[1]], w)
                torch.cuda.synchronize()
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g):
                    for w in ws:
                        F.linear(xs[w.shape[1]], w)
            finally:
                torch.backends.cuda.preferred_blas_library(prev)
            g.replay()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(reps):
                g.replay()
            end.record()
            torch.cuda.synchronize()
            ms = start.elapsed_time(end) / reps
            line += f"{ms:>11.3f} ({roof / ms:.2f})"
            recs.append({"rows": m, "blas": lib, "ms_matmuls": ms, "roofline_ms": roof})
            del g
        print(line, flush=True)
    return recs


def count_ops(dec, prompt, size: int = 0, tree: str = "auto", steps: int = 16):
    """Operations dispatched per step, by phase, on any device: a stand-in for the kernel count
    where no GPU is at hand (views and no-op casts left out; on a GPU most operations are one
    kernel, a few several). A one-step generation's count is subtracted: the steps alone."""
    from collections import Counter

    from torch.utils._python_dispatch import TorchDispatchMode

    from graft.speculative import DecodeConfig

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.by_phase = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            noop = func.overloadpacket.__name__ == "to" and args and out is args[0]
            if not func.is_view and not noop and func.overloadpacket.__name__ not in ("detach", "lift_fresh"):
                self.by_phase[CURRENT[-1]] += 1
            return out

    def run(n):
        cfg = DecodeConfig(max_new_tokens=n, engine="static", draft=size > 0, tree_size=size, eos=False, tree=tree)
        with Count() as c:
            out = dec.generate(prompt, cfg)
        return c.by_phase, out.steps

    run(2)  # warm-up: the cache, the heads' tables
    (one, s1), (many, s2) = run(1), run(steps + 1)
    per = {k: (many[k] - one[k]) / (s2 - s1) for k in many}
    what = f"{dec.heads.family} {size + 1}-node {tree} step" if size else "one-token step"
    print(f"{what}, static engine: {sum(per.values()):.0f} operations per step: "
          + ", ".join(f"{k} {v:.0f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default="smollm2-135m")
    p.add_argument("--random-llama", choices=sorted(SHAPES), help="time a random-weight Llama of this shape")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--engine", default="graph")
    p.add_argument("--families", default="blockwise,deepseek-mtp,eagle")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--draft-vocab", type=int, default=None, help="draft over N tokens only (FR-Spec)")
    p.add_argument("--sizes", default="0,4,16,32,64", help="tree nodes besides the root (0: no drafting)")
    p.add_argument("--tree", choices=["auto", "dynamic"], default="auto",
                   help="dynamic: the chained families (eagle, deepseek-mtp) draft EAGLE-2's dynamic tree")
    p.add_argument("--context", type=int, default=300, help="prompt tokens before decoding")
    p.add_argument("--new", type=int, default=128)
    p.add_argument("--bandwidth", type=float, default=4.8e12, help="bytes/s for the roofline")
    p.add_argument("--sdpa", choices=["default", "efficient", "cudnn", "math", "flash"], default="default",
                   help="the attention kernel of the fixed-shape steps (default: torch's choice among all)")
    p.add_argument("--blas", choices=["default", "cublas", "cublaslt"], default="default",
                   help="the BLAS library torch calls for every matmul (default: torch's own choice)")
    p.add_argument("--matmuls", metavar="ROWS",
                   help="instead of decoding, time the forward's matmuls alone at these row counts (e.g. "
                        "1,17,33,65), with cuBLAS and with cuBLASLt (CUDA)")
    p.add_argument("--whole-cache", action="store_true",
                   help="the fixed-shape steps' attention reads the whole preallocated cache, as before it read "
                        "the narrowest bucket of cache lengths that holds the live prefix (graft.engine.span_buckets)")
    p.add_argument("--json", help="append one JSON line per figure")
    p.add_argument("--ops", action="store_true",
                   help="count the operations dispatched per step and phase (one-token step and each family's "
                        "largest tree; any device, CPU included) instead of timing")
    p.add_argument("--profile", action="store_true",
                   help="also profile the one-token step and each family's largest tree step (static engine, no "
                        "graph): GPU time per step summed over kernels, and the kernels that take most of it")
    p.add_argument("--no-kernels", action="store_true",
                   help="the fused engine without graft's own Triton kernels (graft/kernels.py): torch.compile's "
                        "pieces alone, for the figures against")
    a = p.parse_args(argv)
    if a.no_kernels:
        from graft import kernels
        kernels.enabled = False

    from graft.backbone import load_backbone
    from graft.bench import device_name
    from graft.heads import ChainedHeads
    from graft.model import add_heads
    from graft.speculative import DecodeConfig, SpeculativeDecoder

    dt = getattr(torch, a.dtype)
    if a.sdpa != "default":  # the static and graph engines' attention, forced to one kernel
        import graft.engine
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = getattr(SDPBackend, {"efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
                                       "flash": "FLASH_ATTENTION", "math": "MATH"}[a.sdpa])
        graft.engine.attention_backends = lambda device, static: sdpa_kernel([backend])  # only static steps ask
    if a.blas != "default":
        torch.backends.cuda.preferred_blas_library(a.blas)
    if a.whole_cache:
        import graft.engine

        graft.engine.SPAN_UNIT = 1 << 62  # one bucket: the whole cache
    torch.manual_seed(0)  # the same random weights every run
    bb = random_llama(a.random_llama, dt) if a.random_llama else load_backbone(a.model, dtype=a.dtype)
    name = f"random-llama-{a.random_llama}" if a.random_llama else a.model
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, bb.vocab_size - 10, (a.context,), generator=g).tolist()
    weights = sum(p.numel() * p.element_size() for p in bb.hf.parameters())
    roof = weights / a.bandwidth * 1e3
    print(f"{name} on {device_name(bb.device)} ({a.dtype}), engine {a.engine}, context {a.context}, {a.new} new, "
          f"attention reads {'the whole cache' if a.whole_cache else 'the live prefix'}: "
          f"weights {weights / 2**30:.2f} GiB, one-token roofline {roof:.2f} ms", flush=True)
    if a.matmuls:
        for rec in matmul_cost(bb, [int(r) for r in a.matmuls.split(",")], roof):
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps({"model": name, "device": device_name(bb.device), "dtype": a.dtype, **rec})
                            + "\n")
        return 0
    if not a.ops:
        print(f"{'family':<14}{'nodes':>6}{'ms/step':>9}{'x no-draft':>11}{'roofline share':>16}", flush=True)
    base = None
    families, sizes = a.families.split(","), [int(s) for s in a.sizes.split(",")]
    largest = max(sizes)
    for fam in families:
        torch.manual_seed(0)
        m = add_heads(bb, heads=fam, num_heads=a.num_heads, draft_vocab=a.draft_vocab)
        m.heads.to(bb.dtype).requires_grad_(False)  # frozen, as heads loaded to decode are (projections fuse)
        dec = SpeculativeDecoder(m)
        tree = a.tree if isinstance(m.heads, ChainedHeads) else "auto"  # dynamic trees are the chained families'
        if a.ops:
            label_phases(dec)
            if fam == families[0]:
                count_ops(dec, prompt)
            count_ops(dec, prompt, largest, tree)
            continue
        if a.profile:
            label_phases(dec)
            if base is None:
                profile(dec, prompt, roof, pieces=a.engine == "fused")
            profile(dec, prompt, roof, size=largest, tree=tree, pieces=a.engine == "fused")
        for size in sizes:
            if size == 0 and base is not None:
                continue  # the loop without drafting does not depend on the family
            cfg = DecodeConfig(max_new_tokens=a.new, engine=a.engine, draft=size > 0, tree_size=size, eos=False,
                               tree=tree)
            dec.generate(prompt, cfg)  # warm-up: cache, captured steps
            out = dec.generate(prompt, cfg)
            ms = out.decode_s / out.steps * 1e3
            if size == 0:
                base = ms
            rec = {"model": name, "device": device_name(bb.device), "dtype": a.dtype, "engine": a.engine,
                   "draft_vocab": a.draft_vocab, "sdpa": a.sdpa, "context": a.context, "new": a.new,
                   "cache_read": "whole" if a.whole_cache else "live prefix", "blas": a.blas, "tree": tree if size else "none",
                   "family": "none" if size == 0 else fam, "nodes": size + 1, "ms_per_step": ms,
                   "x_nodraft": ms / base, "roofline_ms": roof}
            label = rec["family"] + (" dyn" if size and tree == "dynamic" else "")
            print(f"{label:<14}{size + 1:>6}{ms:>9.2f}{ms / base:>11.2f}{roof / ms:>16.2f}", flush=True)
            if a.json:
                with open(a.json, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        del m, dec
        torch.cuda.empty_cache() if bb.device.type == "cuda" else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
