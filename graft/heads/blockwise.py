"""Blockwise parallel decoding heads (Stern et al. 2018, section 3).

A shared FFN h -> 4h, then per head an FFN 4h -> h added back to the hidden state (residual),
then the backbone's own unembedding. The output projection starts at zero, so a fresh head
predicts exactly what the backbone predicts at the same position.
"""
from __future__ import annotations

import torch
from torch import nn

from . import Heads


class BlockwiseHeads(Heads):
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
        z = self.shared(normed)
        return [normed + out(z) for out in self.out]

    def hidden(self, bb, trunk, final, ids):
        return self._apply_heads(bb.norm(final).float())

    def logits(self, bb, k, h):
        return bb.lm_head(h.to(bb.dtype)).float()  # h is already normalised

    def _all_logits(self, bb, final):
        """final (..., d) -> (K, ..., V): one product reads the unembedding once for all heads."""
        hs = self._apply_heads(bb.norm(final).to(self.out[0].weight.dtype))
        return self.logits(bb, 0, torch.stack(hs))

    def tree_logits(self, bb, state, trunk, final, positions, start, mask):
        return self._all_logits(bb, final[0])

    def draft(self, bb, state, pick):
        return list(self._all_logits(bb, state["final"][0, -1]).unbind(0))
