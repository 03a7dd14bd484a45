"""The draft tree sized from what a step costs on this device (a GPU or the CPU).

A bigger tree accepts more tokens per step but costs more per step, and where the balance lies
depends on the card, the backbone and the engine (on an H200 a 65-node step of SmolLM2 costs
1.4 to 1.7 one-token steps, and about 1.5 on an 8B-shaped model). For a few candidate trees (a chain, and the
calibrated best-first trees of 4 to 128 nodes) graft knows the expected new tokens per step from
the heads' per-rank accuracy (`graft.tree.expected_tokens`). It measures, once per backbone
shape, head shape, card, dtype and engine, the wall time of a decoding step with each, and keeps
the tree with the most expected tokens per millisecond. Where no tree beats decoding without
drafts, it decodes without drafts: drafting never makes decoding slower than not drafting, as far
as the calibration is right.

The CPU is measured the same way (fewer and shorter generations).

The heads' accuracy comes from training's held-out text; on text unlike it the drafts land less
often. The decoder therefore keeps count of the tokens its drafts actually added against what the
fit expected (`scale`, below), and sizes later trees with that; within a generation it stops
drafting where the drafts stop paying (graft.speculative).

Measured costs are cached in `$GRAFT_CACHE/step-cost.json` (default `~/.cache/graft`).
"""
from __future__ import annotations

import json
import os

import torch

from .config import cache_dir, write_json
from .tree import Tree, build_tree, chain, expected_tokens

SIZES = {"cuda": (4, 8, 16, 32, 64, 128), "cpu": (2, 4, 8, 16, 32)}  # trees of N nodes besides the root
# the measuring generation: prompt tokens, new tokens (fewer on a CPU, where a step takes tens of ms)
CONTEXT, NEW = {"cuda": 256, "cpu": 64}, {"cuda": 32, "cpu": 8}
STEP_VERSION = 4  # raised when graft's step changes what it costs, so that cached costs are measured again


def cache_path() -> str:
    return os.path.join(cache_dir(), "step-cost.json")


def _key(dec, engine: str) -> str:
    bb, spec = dec.bb, dec.config.heads
    ident = bb.identity
    where = (torch.cuda.get_device_name(bb.device) if bb.device.type == "cuda"
             else f"{_cpu_name()} x{torch.get_num_threads()}")
    return "|".join([f"{ident.model_type} d{ident.hidden_size} L{ident.num_layers} V{ident.vocab_size}",
                     json.dumps(spec.__dict__, sort_keys=True), where,
                     str(bb.dtype).removeprefix("torch.") + (" 4-bit" if bb.quantized else ""), engine,
                     f"torch {torch.__version__}", f"steps v{STEP_VERSION}"])


def _cpu_name() -> str:
    """The processor's model name (Linux), else the platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return "cpu " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return "cpu " + (platform.processor() or platform.machine())


def _load() -> dict:
    try:
        with open(cache_path()) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measure again


def _kind(dec) -> str:
    return "cuda" if dec.bb.device.type == "cuda" else "cpu"


def _shape(tree) -> str:
    return "none" if tree is None else f"{tree.n}x{tree.max_depth}"


def step_costs(dec, engine: str) -> tuple[list[Tree], dict]:
    """The candidate trees and the milliseconds of a step with each ("none": without drafts),
    measured once per device and shape (cached on disk) and kept in the decoder's `fitted`."""
    if engine in dec.fitted:
        return dec.fitted[engine]
    acc = dec.accuracies()
    candidates = [Tree(chain(dec.heads.num_heads))] + [Tree(build_tree(acc, s)) for s in SIZES[_kind(dec)]]
    key = _key(dec, engine)
    table = _load()
    costs = dict(table.get(key, {}))
    todo = [t for t in [None] + candidates if _shape(t) not in costs]
    if todo:
        kind = _kind(dec)
        costs.update({_shape(t): ms for t, ms in zip(todo, dec.step_costs(engine, todo, CONTEXT[kind], NEW[kind]))})
        table = _load()  # another process may have written meanwhile
        table[key] = costs
        try:
            os.makedirs(os.path.dirname(cache_path()), exist_ok=True)
            write_json(cache_path(), table)
        except OSError:
            pass  # a read-only home: measure again next time
    dec.fitted[engine] = (candidates, costs)
    return dec.fitted[engine]


def break_even(dec, engine: str, tree: Tree) -> float:
    """Tokens per step that a step with `tree` must yield to beat decoding without drafts."""
    costs = step_costs(dec, engine)[1]
    return costs[_shape(tree)] / costs["none"]


def fit_tree(dec, engine: str, scale: float = 1.0) -> tuple[Tree | None, str]:
    """The tree with the most expected tokens per millisecond, or None where none pays. `dec` is
    the decoder (graft.speculative.SpeculativeDecoder): its heads' accuracy, its memo of measured
    costs (`fitted`) and its step-cost seam (`step_costs`). `scale`: the drafts' tokens seen in
    decoding over those expected (1: none seen yet), which scales every tree's expected drafts."""
    acc = dec.accuracies()
    candidates, costs = step_costs(dec, engine)
    base = costs["none"]
    best, rate = None, 1.0 / base
    for tree in candidates:
        r = (1 + scale * (expected_tokens(acc, tree.paths) - 1)) / costs[_shape(tree)]
        if r > rate:
            best, rate = tree, r
    where = "card" if _kind(dec) == "cuda" else "CPU"
    seen = "" if scale == 1.0 else f", the drafts landing {scale:.2f}x as often as expected in decoding so far"
    if best is None:
        note = (f"no tree pays on this {where} (a step without drafts: {base:.2f} ms, the cheapest tree's "
                f"{min(costs[_shape(t)] for t in candidates):.2f} ms{seen}): decoding without drafts")
    else:
        e = 1 + scale * (expected_tokens(acc, best.paths) - 1)
        note = (f"{best.n - 1} nodes fit this {where}: {e:.2f} tokens expected per {costs[_shape(best)]:.2f} ms step, "
                f"{rate * base:.2f}x a step without drafts, from the heads' accuracy on held-out training text"
                + (seen or " (lower on text unlike it)"))
    return best, note
