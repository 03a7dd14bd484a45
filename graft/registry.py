"""What graft offers, and where each piece lives: head families, export formats, decoding
engines and draft trees. Adding one is its own module plus one line here.

Entries name their implementation ("module:attribute") instead of importing it, so that this
module stays free of torch: the CLI builds its choices from it and `graft --help` stays fast.
"""
from __future__ import annotations

import importlib

from .config import GraftError

# head family -> its `graft.heads.base.Heads` subclass (which checks its own options and drafts)
FAMILIES = {
    "blockwise": "graft.heads.blockwise:BlockwiseHeads",
    "medusa": "graft.heads.medusa:MedusaHeads",
    "meta-mtp": "graft.heads.meta_mtp:MetaMTPHeads",
    "deepseek-mtp": "graft.heads.deepseek_mtp:DeepSeekMTPHeads",
    "eagle": "graft.heads.eagle:EagleHeads",
}

# `graft export --format` -> its `graft.export.formats.Format` (which families it takes, its checks, its writer)
FORMATS = {
    "graft": "graft.export.graft_format:FORMAT",
    "vllm-medusa": "graft.export.medusa:VLLM_MEDUSA",
    "eagle3": "graft.export.eagle3:EAGLE3",
    "sglang-eagle3": "graft.export.eagle3:SGLANG_EAGLE3",
}

# decoding engines (graft.engine: one step, run eagerly, with fixed shapes, captured or compiled)
ENGINES = ("auto", "eager", "static", "graph", "fused", "compiled")

# draft trees at temperature 0 (graft.speculative.DecodeConfig.tree)
TREES = ("auto", "calibrated", "chain", "dynamic")


def resolve(table: dict, name: str, what: str):
    """The object registered as `name` in `table`; an unknown name is one line listing the known."""
    if name not in table:
        raise GraftError(f"unknown {what} {name!r}: choose one of {', '.join(table)}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)
