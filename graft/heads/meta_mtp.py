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

from ..modeling import KVCache, cache_mask
from .base import ParallelHeads, copy_last_layer, last_row, positions


class MetaMTPHeads(ParallelHeads):
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
        return {"cache": cache, "out": torch.zeros(self.num_heads, bb.hidden_size, dtype=self._dtype, device=bb.device)}

    def commit(self, bb, state, trunk, final, next_tokens, start, count):
        # each head layer attends like the backbone's last layer, over its own cache of the
        # accepted positions (slot = position); padded rows write slots that later commits overwrite
        cache = state["cache"]
        pos = positions(start, trunk.shape[1], trunk.device)
        mask = cache_mask(pos, cache.span, self._dtype)
        x = trunk.to(self._dtype)
        outs = [last_row(self._run(bb, k, x, pos[None], cache, pos, mask), count)[0, 0] for k in range(self.num_heads)]
        state["out"].copy_(torch.stack(outs))

    def all_logits(self, bb, h):
        return self.logits(bb, 0, h)  # one (K, d) x (d, V) product reads the unembedding once

    def last_hidden(self, bb, state):
        return state["out"]
