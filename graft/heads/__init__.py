"""The head families, one module each (registered in `graft.registry.FAMILIES`), and the
interface they share (`graft.heads.base`).

Depth k (1..K; index k-1 in lists of heads) at position i predicts token i+k+1: the backbone
itself predicts i+1.
"""
from __future__ import annotations

from ..config import HeadSpec
from ..registry import FAMILIES, resolve
from .base import (AccumulatingLinear, ChainedHeads, Heads, ParallelHeads, constant, copy_last_layer, last_row,
                   positions, rms_eps)


def family(name: str) -> type[Heads]:
    """The heads class registered as `name`."""
    return resolve(FAMILIES, name, "head family")


def check_spec(spec: HeadSpec) -> None:
    """The family exists and takes the options given (cheap: before a backbone is loaded)."""
    family(spec.family).check_spec(spec)


def build_heads(spec: HeadSpec, bb) -> Heads:
    check_spec(spec)
    heads = family(spec.family)(spec, bb)
    return heads.to(bb.device).eval()  # graft train switches to train mode (dropout, where a layer has it)


__all__ = ["AccumulatingLinear", "ChainedHeads", "Heads", "ParallelHeads", "build_heads", "check_spec", "constant",
           "copy_last_layer", "family", "last_row", "positions", "rms_eps"]
