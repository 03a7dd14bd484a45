"""DeepSeek-V3 multi-token prediction modules (DeepSeek-V3 technical report, section 2.2).

A causal chain of K modules. Module k (1-based) at position i takes the previous depth's hidden
state h^{k-1}_i (h^0: the backbone's final hidden state) and the embedding of token t_{i+k},
normalises both with RMSNorm, concatenates them, projects 2d -> d, runs one transformer layer
and predicts t_{i+k+1} through the backbone's shared final norm and unembedding. Embedding and
head are the backbone's, shared, never copied.

Decoding keeps each module's KV cache for the positions whose inputs are all real tokens
(module k: positions up to N-k when tokens t_0..t_N are known) and recomputes the short
draft-dependent tail (k-1 positions) at every step, so drafting sees exactly what training saw.

Greedy decoding drafts a tree (as EAGLE-2 does, but with the tree's shape fixed by calibration):
the chain runs depth by depth, module k once for all depth-(k-1) nodes that have children, in a
batch, and each such node's top candidates become its children. A chain is the tree of rank-0
nodes only, and drafts exactly what `draft` does.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modeling import KVCache, additive_mask, causal_allowed, device_ids
from . import Heads, copy_last_layer, rms_eps


class MTPModule(nn.Module):
    def __init__(self, spec, bb):
        super().__init__()
        d = bb.hidden_size
        self.norm_h = nn.RMSNorm(d, eps=rms_eps(bb))
        self.norm_e = nn.RMSNorm(d, eps=rms_eps(bb))
        self.proj = nn.Linear(2 * d, d, bias=False)
        with torch.no_grad():  # start from [I | 0]: the module first sees the normalised hidden state
            self.proj.weight.zero_()
            self.proj.weight[:, :d].copy_(torch.eye(d))
        self.layers = nn.ModuleList(copy_last_layer(bb, spec.init) for _ in range(spec.head_layers))

    def forward(self, bb, h, e, positions, cache=None, cache_base=0, start=0, mask=None):
        x = self.proj(torch.cat([self.norm_h(h), self.norm_e(e)], dim=-1))  # (B, T, 2d) -> (B, T, d)
        rope = bb.rope(x, positions)
        for j, layer in enumerate(self.layers):
            x = bb.layer_fn(layer, x, rope, cache=cache, cache_layer=cache_base + j, start=start, mask=mask)
        return x


class DeepSeekMTPHeads(Heads):
    family = "deepseek-mtp"
    parallel = False
    chained_tree = True

    def __init__(self, spec, bb):
        super().__init__(spec, bb)
        self.modules_ = nn.ModuleList(MTPModule(spec, bb) for _ in range(spec.num_heads))
        self._plans = {}  # (tree paths, device) -> per-depth index tensors for draft_tree

    @property
    def _dtype(self):
        return self.modules_[0].proj.weight.dtype

    def _emb(self, bb, ids):
        return bb.embed_tokens(ids).to(self._dtype)

    def hidden(self, bb, trunk, final, ids):
        B, T = ids.shape
        positions = torch.arange(T, device=ids.device).expand(B, T)
        h, out = final.to(self._dtype), []
        for k, module in enumerate(self.modules_, start=1):
            # token t_{i+k} at position i; the last k positions have no such token (and no target)
            shifted = torch.cat([ids[:, k:], ids[:, -1:].expand(B, min(k, T))], dim=1)[:, :T]
            h = module(bb, h, self._emb(bb, shifted), positions)
            out.append(h)
        return out

    def new_state(self, bb, max_len):
        L = self.spec.head_layers
        d = bb.hidden_size
        return {
            "cache": KVCache(self.num_heads * L, 1, bb.n_kv_heads, bb.head_dim, max_len, self._dtype, bb.device),
            # H[k][j]: depth-k hidden state at position j (H[0] = backbone final); tokens: t_0..t_N
            "H": torch.zeros(self.num_heads + 1, max_len, d, dtype=self._dtype, device=bb.device),
            "tokens": torch.zeros(max_len + 1, dtype=torch.long, device=bb.device),
            "n": 0,  # number of backbone positions with known hidden state; tokens known: n + 1
            "done": [0] * (self.num_heads + 1),  # committed positions per depth
        }

    def commit(self, bb, state, trunk, final, next_tokens, start):
        a = final.shape[1]
        H, tokens = state["H"], state["tokens"]
        H[0, start:start + a] = final[0].to(self._dtype)
        tokens[start + 1:start + a + 1] = next_tokens[0]
        state["n"] = n = start + a
        state["done"][0] = n
        L = self.spec.head_layers
        for k, module in enumerate(self.modules_, start=1):
            lo, hi = state["done"][k], min(n - k + 1, state["done"][k - 1])  # positions lo..hi-1
            if hi <= lo:
                continue
            pos = torch.arange(lo, hi, device=bb.device)
            mask = additive_mask(causal_allowed(hi - lo, lo, bb.device), self._dtype)
            h = module(bb, H[k - 1, lo:hi][None], self._emb(bb, tokens[lo + k:hi + k][None]), pos[None],
                       state["cache"], (k - 1) * L, lo, mask)
            H[k, lo:hi] = h[0]
            state["done"][k] = hi

    def _tail(self, state, k, prev, drafted):
        """Module k's inputs on its draft-dependent tail, positions lo..n-1 (lo = done[k] < n), for
        B paths at once: the depth k-1 states (committed ones from H, the rest from `prev`, (B, T', d)
        module k-1's states on each path's tail, None at k = 1) and the tokens t_{j+k} (known ones,
        then `drafted`, (B, m) each path's drafts so far). Returns (B, T, d) states, (B, T) tokens."""
        H, tokens, n = state["H"], state["tokens"], state["n"]
        lo = state["done"][k]
        T, c = n - lo, state["done"][k - 1] - lo  # tail length; depth k-1 states committed
        B = drafted.shape[0]
        parts = [H[k - 1, lo:lo + c][None].expand(B, c, -1)]
        if prev is not None and T > c:
            parts.append(prev[:, prev.shape[1] - (T - c):])
        known = tokens[lo + k:n + 1][None].expand(B, -1)
        return torch.cat(parts, dim=1), torch.cat([known, drafted], dim=1)[:, -T:]

    def draft(self, bb, state, pick):
        """Module k's draft for t_{N+k}: positions N-k+1..N-1 run on drafted tokens, uncommitted."""
        H, n = state["H"], state["n"]
        L = self.spec.head_layers
        logits, drafts = [], []
        prev = None  # depth k-1 hidden states on the draft tail, positions n-k+1..n-1
        for k, module in enumerate(self.modules_, start=1):
            lo = state["done"][k]  # first uncommitted position of depth k (n - k + 1 once warmed up)
            if lo >= n:
                h_last = H[k, n - 1]
                cur = H[k, n - 1:n][None]
            else:
                hin, toks = self._tail(state, k, prev, device_ids(drafts, bb.device)[None])
                pos = torch.arange(lo, n, device=bb.device)
                mask = additive_mask(causal_allowed(n - lo, lo, bb.device), self._dtype)
                cur = module(bb, hin, self._emb(bb, toks), pos[None], state["cache"], (k - 1) * L, lo, mask)
                h_last = cur[0, -1]
            lg = self.logits(bb, k - 1, h_last)
            logits.append(lg)
            drafts.append(int(pick(k - 1, lg)))
            prev = cur
        return logits

    def _plan(self, tree, dev) -> list:
        """Per depth d with children: (B parents, R, their children, the children's indices into
        the parents' flattened top-R, (B, d) each parent's path below the root, (B,) each parent's
        own parent's row in the depth before). Built once per tree, so that a step copies no index
        list to the device and gathers every parent's inputs in one pass."""
        key = (tuple(tree.paths), str(dev))
        if key not in self._plans:
            plan, rows = [], {}
            for d in range(self.num_heads):
                parents = [v for v in range(tree.n) if tree.depths[v] == d and tree.children[v]]
                if not parents:
                    break
                R = max(len(tree.children[v]) for v in parents)
                kids = [c for v in parents for c in tree.children[v]]
                flat = [b * R + tree.ranks[c] for b, v in enumerate(parents) for c in tree.children[v]]
                lines = torch.tensor([tree.lineage[v][1:] for v in parents], dtype=torch.long).view(len(parents), d)
                up = [rows.get(tree.parents[v], 0) for v in parents]
                rows = {v: b for b, v in enumerate(parents)}
                plan.append((len(parents), R, device_ids(kids, dev), device_ids(flat, dev), lines.to(dev),
                             device_ids(up, dev)))
            self._plans[key] = plan
        return self._plans[key]

    def draft_tree(self, bb, state, tree):
        """(N,) tokens of the tree's nodes, on the device, node 0 the last known token. Module k
        runs once, batched over the depth-(k-1) nodes with children, each on its own path (the
        draft-dependent tail recomputed per node, as in `draft`); the children of a node are its
        top candidates in rank order."""
        H, tokens, n = state["H"], state["tokens"], state["n"]
        L = self.spec.head_layers
        dev = bb.device
        node_tokens = torch.empty(tree.n, dtype=torch.long, device=dev)
        node_tokens[0] = tokens[n]
        prev = None  # the depth before: module states on each parent's path tail, (B', T', d)
        for d, (B, R, kids, flat, lines, up) in enumerate(self._plan(tree, dev)):
            k = d + 1
            module = self.modules_[d]
            lo = state["done"][k]
            if lo >= n:  # module 1 once warmed up: its state at n-1 is committed (the root only)
                cur = H[k, n - 1:n][None].expand(B, 1, -1)
            else:
                # every parent's path at once: its own parent's states from the depth before
                hin, toks = self._tail(state, k, None if prev is None else prev[up], node_tokens[lines])
                T = n - lo
                scratch = KVCache(L, B, bb.n_kv_heads, bb.head_dim, n, self._dtype, dev)
                cache = state["cache"]
                scratch.k[:, :, :, :lo] = cache.k[(k - 1) * L:k * L, :, :, :lo]
                scratch.v[:, :, :, :lo] = cache.v[(k - 1) * L:k * L, :, :, :lo]
                pos = torch.arange(lo, n, device=dev)[None].expand(B, T)
                mask = additive_mask(causal_allowed(T, lo, dev), self._dtype)
                cur = module(bb, hin, self._emb(bb, toks), pos, scratch, 0, lo, mask)
            prev = cur
            top = self.logits(bb, d, cur[:, -1]).topk(R, dim=-1).indices  # (B, R)
            node_tokens[kids] = top.flatten()[flat]
        return node_tokens
