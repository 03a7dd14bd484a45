"""Medusa heads (Cai et al. 2024, section 2.1.1).

Per head: L residual blocks x + SiLU(W x + b) on the backbone's last hidden state, then the
head's own LM head, initialised from the backbone's (or the backbone's itself with
shared_lm_head). W and b start at zero (Medusa zeroes only W, which leaves SiLU(b) != 0), so a
fresh head reproduces the backbone's next-token prediction exactly. The own LM heads, each a
(V, d) matrix, are stored in bfloat16 unless the spec or a float32 backbone says otherwise.
"""
from __future__ import annotations

import torch
from torch import nn

from ..backbone import dense_weight
from ..config import GraftError
from .base import ParallelHeads


def lm_head_dtype(spec, bb) -> torch.dtype:
    if spec.lm_head_dtype == "auto":
        return torch.float32 if bb.dtype == torch.float32 else torch.bfloat16
    return getattr(torch, spec.lm_head_dtype)


class ResBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.linear = nn.Linear(d, d)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)
        self.act = nn.SiLU()

    def forward(self, x):
        return x + self.act(self.linear(x))


class MedusaHeads(ParallelHeads):
    family = "medusa"
    options = ("shared_lm_head", "lm_head_dtype")

    @classmethod
    def check_spec(cls, spec):
        super().check_spec(spec)
        if spec.lm_head_dtype not in ("auto", "bfloat16", "float32"):
            raise GraftError(f"--lm-head-dtype must be auto, bfloat16 or float32, got {spec.lm_head_dtype!r}")
        if spec.lm_head_dtype != "auto" and spec.shared_lm_head:
            raise GraftError("--lm-head-dtype is for medusa heads with their own LM heads: leave it out")

    def __init__(self, spec, bb):

        super().__init__(spec, bb)
        d, V = bb.hidden_size, bb.vocab_size
        # Each block is built separately: `[ResBlock(d)] * L` would share one module's weights.
        self.blocks = nn.ModuleList(
            nn.Sequential(*[ResBlock(d) for _ in range(spec.head_layers)]) for _ in range(spec.num_heads)
        )
        if spec.shared_lm_head:
            self.lm_heads = None
        else:
            w = dense_weight(bb.lm_head)
            dtype = lm_head_dtype(spec, bb)
            if dtype != torch.float32:
                self.half_storage = ("lm_heads",)
            self.lm_heads = nn.ModuleList(nn.Linear(d, V, bias=False, dtype=dtype) for _ in range(spec.num_heads))
            with torch.no_grad():
                for lin in self.lm_heads:
                    lin.weight.copy_(w)

    def hidden(self, bb, trunk, final, ids):
        normed = bb.final_norm(final).float()
        return [blocks(normed) for blocks in self.blocks]

    def unembed(self, bb, k, h):
        w = bb.lm_head.weight if self.lm_heads is None else self.lm_heads[k].weight
        return h.to(w.dtype), w

    def all_logits(self, bb, h):
        if self.lm_heads is None:  # one product reads the shared unembedding once for all heads
            return self.logits(bb, 0, h)
        return super().all_logits(bb, h)

    def last_hidden(self, bb, state):
        normed = bb.final_norm(state["final"]).to(self.blocks[0][0].linear.weight.dtype)
        return torch.stack([blocks(normed) for blocks in self.blocks])
