"""Blockwise parallel decoding heads (Stern et al. 2018, section 3).

A shared FFN h -> 4h, then per head an FFN 4h -> h added back to the hidden state (residual),
then the backbone's own unembedding. The output projection starts at zero, so a fresh head
predicts exactly what the backbone predicts at the same position.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modeling import project
from .base import ParallelHeads


class BlockwiseHeads(ParallelHeads):
    family = "blockwise"

    def __init__(self, spec, bb):
        super().__init__(spec, bb)
        d = bb.hidden_size
        self.shared = nn.Sequential(nn.Linear(d, 4 * d), nn.SiLU())
        self.out = nn.ModuleList(nn.Linear(4 * d, d) for _ in range(spec.num_heads))
        for lin in self.out:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _apply_heads(self, normed):
        z = self.shared[1](project(self.shared[0], normed))
        return [normed + project(out, z) for out in self.out]

    def hidden(self, bb, trunk, final, ids):
        return self._apply_heads(bb.final_norm(final).float())

    def unembed(self, bb, k, h):
        return h.to(bb.dtype), bb.lm_head.weight  # h is already normalised

    def all_logits(self, bb, h):
        return self.logits(bb, 0, h)  # one product reads the unembedding once for all heads

    def last_hidden(self, bb, state):
        return torch.stack(self._apply_heads(bb.final_norm(state["final"]).to(self.out[0].weight.dtype)))
