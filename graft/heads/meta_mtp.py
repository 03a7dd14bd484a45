"""Multi-token prediction heads of Gloeckle et al. 2024 ("Better & Faster LLMs via MTP").

A shared trunk (the backbone up to, not including, its last decoder layer) feeds K independent
heads, each a full transformer layer of the backbone's own architecture, then the shared final
norm and unembedding. The paper treats the backbone's last layer as the next-token head, so each
new head starts as a copy of that layer on the same input: it first predicts the next token and
learns to look further ahead.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modeling import KVCache, additive_mask, causal_allowed
from . import Heads, copy_last_layer


class MetaMTPHeads(Heads):
    family = "meta-mtp"

    def __init__(self, spec, bb):
        super().__init__(spec, bb)
        self.layers = nn.ModuleList(
            nn.ModuleList(copy_last_layer(bb, spec.init) for _ in range(spec.head_layers))
            for _ in range(spec.num_heads)
        )

    @property
    def _dtype(self):
        return next(self.parameters()).dtype

    def _run(self, bb, k, h, positions, cache=None, start=0, mask=None):
        rope = bb.rope(h, positions)
        for j, layer in enumerate(self.layers[k]):
            h = bb.layer_fn(layer, h, rope, cache=cache, cache_layer=k * len(self.layers[k]) + j,
                            start=start, mask=mask)
        return h

    def hidden(self, bb, trunk, final, ids):
        B, T, _ = trunk.shape
        positions = torch.arange(T, device=trunk.device).expand(B, T)
        x = trunk.to(self._dtype)
        return [self._run(bb, k, x, positions) for k in range(self.num_heads)]

    def new_state(self, bb, max_len):
        n = self.num_heads * self.spec.head_layers
        cache = KVCache(n, 1, bb.n_kv_heads, bb.head_dim, max_len, self._dtype, bb.device)
        return {"cache": cache, "out": None}

    def commit(self, bb, state, trunk, final, next_tokens, start):
        a = trunk.shape[1]
        positions = torch.arange(start, start + a, device=trunk.device)[None]
        mask = additive_mask(causal_allowed(a, start, trunk.device), self._dtype)
        x = trunk.to(self._dtype)
        state["out"] = [self._run(bb, k, x, positions, state["cache"], start, mask)[:, -1]
                        for k in range(self.num_heads)]

    def tree_logits(self, bb, state, trunk, final, positions, start, mask):
        # Each head layer attends like the backbone: the accepted prefix and the node's ancestors.
        # Its keys go to the same slots as the backbone's; `keep` compacts them with the path.
        x, mask = trunk.to(self._dtype), mask.to(self._dtype)
        hs = torch.cat([self._run(bb, k, x, positions, state["cache"], start, mask) for k in range(self.num_heads)])
        return self.logits(bb, 0, hs)  # (K, N, V)

    def keep(self, state, start, path):
        state["cache"].keep(start, path)

    def draft(self, bb, state, pick):
        # one (K, d) x (d, V) product reads the shared unembedding once instead of K times
        return list(self.logits(bb, 0, torch.cat(state["out"], dim=0)).unbind(0))
