"""DeepSeek-V3 multi-token prediction modules (DeepSeek-V3 technical report, section 2.2).

A causal chain of K modules. Module k (1-based) at position i takes the previous depth's hidden
state h^{k-1}_i (h^0: the backbone's final hidden state) and the embedding of token t_{i+k},
normalises both with RMSNorm, concatenates them, projects 2d -> d, runs one transformer layer
and predicts t_{i+k+1} through the backbone's shared final norm and unembedding. Embedding and
head are the backbone's, shared, never copied.

Decoding keeps each module's KV cache for the positions whose inputs are all real tokens
(module k: positions up to N-k when tokens t_0..t_N are known) and recomputes the short
draft-dependent tail (k-1 positions) at every step, so drafting sees exactly what training saw.

Drafting builds a tree (as EAGLE-2 does, with the tree's shape fixed by calibration): the chain
runs depth by depth, module k once for all depth-(k-1) nodes that have children, in a batch,
and each such node's top candidates become its children. A chain is the tree of rank-0 nodes.
Every shape is fixed by the tree, so the draft is captured in the decoding step's CUDA graph.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modeling import KVCache, additive_mask, cache_mask
from . import ChainedHeads, constant, copy_last_layer, positions, rms_eps


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

    def forward(self, bb, h, e, positions, cache=None, cache_base=0, start=0, mask=None, rope=None, kv_only=False):
        """`rope`: the rotary (cos, sin) at `positions`, where the caller has them already.
        kv_only: fill the cache and return None (a commit whose states nothing reads)."""
        x = self.proj(torch.cat([self.norm_h(h), self.norm_e(e)], dim=-1))  # (B, T, 2d) -> (B, T, d)
        rope = bb.rope(x, positions) if rope is None else rope
        last = len(self.layers) - 1
        for j, layer in enumerate(self.layers):
            x = bb.layer_fn(layer, x, rope, cache=cache, cache_layer=cache_base + j, start=start, mask=mask,
                            kv_only=kv_only and j == last)
        return x


class DeepSeekMTPHeads(ChainedHeads):
    family = "deepseek-mtp"

    def __init__(self, spec, bb):
        super().__init__(spec, bb)
        self.min_prompt = spec.num_heads  # commits assume module K has a committed position
        self.modules_ = nn.ModuleList(MTPModule(spec, bb) for _ in range(spec.num_heads))

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
            # H[k][j]: depth-k hidden state at position j (H[0] = backbone final; H[K] written only
            # where K = 1: `_unread`); tokens: t_0..t_N
            "H": torch.zeros(self.num_heads + 1, max_len, d, dtype=self._dtype, device=bb.device),
            "tokens": torch.zeros(max_len + 1, dtype=torch.long, device=bb.device),
        }

    def scratch(self, tree):
        # each depth's module reruns its path tails side by side after its committed prefix
        tails = tree.width * tree.max_depth if tree.dynamic else 0  # a dynamic tree's: width per depth
        return max(tree.n * (tree.max_depth + 1), tails)

    def commit(self, bb, state, trunk, final, next_tokens, start, count):
        """Module k commits the positions whose inputs all became known: with n = start + count
        positions accepted, positions up to n-k. Once the prefill has run (start >= K-1), that is
        start-k+1 .. start-k+A, the same A positions for every module, so shapes stay fixed.
        The last module's states are never read (drafting reads H[k-1] for module k, and module
        1's own at n-1), so with K >= 2 it only fills its cache."""
        A, dev = final.shape[1], final.device
        H, tokens, cache = state["H"], state["tokens"], state["cache"]
        pos = positions(start, A, dev)
        H[0].index_copy_(0, pos, final[0].to(self._dtype))
        tokens.index_copy_(0, pos + 1, next_tokens)
        L = self.spec.head_layers
        if not isinstance(start, int):
            return self._commit_fixed(bb, state, next_tokens, start, A)
        for k, module in enumerate(self.modules_, start=1):  # exact shapes: the prefill, or the eager engine
            lo, hi = max(start - k + 1, 0), start + A - k + 1
            if hi <= lo:
                continue
            p = torch.arange(lo, hi, device=dev)
            h = module(bb, H[k - 1, p][None], self._emb(bb, tokens[p + k][None]), p[None], cache, (k - 1) * L, p,
                       cache_mask(p, cache.max_len, self._dtype), kv_only=self._unread(k))
            if h is not None:
                H[k].index_copy_(0, p, h[0])

    def _commit_fixed(self, bb, state, next_tokens, start, A):
        """`commit` with fixed shapes. Module k's positions p = start-k+1 .. start-k+A read the
        tokens t_{p+k}: the A new ones for every module, embedded once. Their rotary angles are
        gathered once over the K+A-1 positions from start-K+1 on and sliced per module, and so
        are their masks (query j sees slots up to its position: column c of module k is column
        c+k-1 of one index row, gathered from a table built once)."""
        H, cache = state["H"], state["cache"]
        K, L, dev, S = self.num_heads, self.spec.head_layers, H.device, cache.max_len
        e = self._emb(bb, next_tokens[None])  # (1, A, d)
        ext = positions(start - (K - 1), A + K - 1, dev)
        rope = bb.rope(e, ext[None])  # None where positions are learned
        table = constant(self, ("commit", dev, A), lambda: additive_mask(
            torch.arange(A + 1, device=dev)[None, :] <= torch.arange(A, device=dev)[:, None], self._dtype)[0, 0])
        cols = constant(self, ("cols", dev, S + K - 1), lambda: torch.arange(S + K - 1, device=dev))
        idx = (cols - start).clamp(0, A)
        for k, module in enumerate(self.modules_, start=1):
            p = ext[K - k:K - k + A]
            h = module(bb, H[k - 1].index_select(0, p)[None], e, p[None], cache, (k - 1) * L, p,
                       table[:, idx[k - 1:k - 1 + S]][None, None],
                       None if rope is None else tuple(r[:, K - k:K - k + A] for r in rope), kv_only=self._unread(k))
            if h is not None:
                H[k].index_copy_(0, p, h[0])

    def _unread(self, k: int) -> bool:
        """Whether module k's committed states go unread: the last module's, where there are several."""
        return k == self.num_heads > 1

    def draft(self, bb, state, tree, n, choose):
        """Module k drafts depth k for the B nodes of depth k-1 with children, in one batch. Its
        prediction for t_{n+k} comes from position n-1, so it reruns positions n-k+1..n-1 on
        each parent's path (the draft-dependent tail, k-1 positions; module 1 has none): inputs
        the depth k-1 state (committed at n-k+1, else module k-1's output on the path's tail)
        and the path's drafted tokens (`_tails`)."""
        H = state["H"]
        out = torch.zeros(tree.n, dtype=torch.long, device=H.device)
        prev = None  # the depth before: module outputs on each parent's tail, (B', k-2, d)
        for lv in tree.levels(H.device):
            k, B = lv.depth, len(lv.parents)
            if k == 1:  # module 1's state at n-1 is committed
                cur = _rows(H[1], n - 1)[None]
            else:
                base = n - (k - 1)  # the first position module k has not committed
                hin = _rows(H[k - 1], base)[None].expand(B, 1, -1)
                if k > 2:
                    hin = torch.cat([hin, prev[lv.up]], dim=1)  # (B, k-1, d)
                cur = self._tails(bb, state, k, base, hin, out[lv.lines])
            prev = cur
            top = self.pick(choose, k, self.draft_logits(bb, k - 1, cur[:, -1]), lv.width)  # (B, R)
            out[lv.nodes] = top.flatten()[lv.flat]
        return out

    def dynamic_root(self, bb, state, tree, n):
        """Module 1's committed state at n-1, and no tail to hand on."""
        h = _rows(state["H"][1], n - 1)
        return self.draft_logits(bb, 0, h), (h[None, :0],)

    def dynamic_expand(self, bb, state, tree, n, d, carry, paths):
        """Module d over the tails of the frontier's paths, continuing module d-1's outputs on
        the tails of their parents' paths (the carry)."""
        k = tree.width
        base = n - (d - 1)
        hin = torch.cat([_rows(state["H"][d - 1], base)[None].expand(k, 1, -1), carry[0]], dim=1)
        cur = self._tails(bb, state, d, base, hin, paths)
        return self.draft_logits(bb, d - 1, cur[:, -1]), (cur,)

    def _tails(self, bb, state, k, base, hin, toks):
        """Module k (>= 2) on B paths' tails: positions base = n-k+1 .. n-1 (T = k-1), inputs hin
        (B, T, d) and tokens (B, T) t_{n+1}..t_{n+k-1}. The B tails go to the module's cache side
        by side after its committed prefix, each seeing the prefix and its own earlier positions
        (a block-diagonal causal mask, from a table built once per shape). Returns (B, T, d)."""
        cache = state["cache"]
        B, T = toks.shape
        dev = cache.k.device
        table = constant(self, ("tails", dev, B, T), lambda: _tail_table(B, T, self._dtype, dev))
        cols = constant(self, ("cols+1", dev, cache.max_len), lambda: torch.arange(1, cache.max_len + 1, device=dev))
        i = constant(self, ("i", dev, B, T), lambda: torch.arange(B * T, device=dev))
        j = constant(self, ("i%T", dev, B, T), lambda: torch.arange(B * T, device=dev) % T)
        mask = table[:, (cols - base).clamp(0, B * T + 1)][None, None]
        x = self.modules_[k - 1](bb, hin.reshape(1, B * T, -1), self._emb(bb, toks.reshape(1, B * T)),
                                 (j + base)[None], cache, (k - 1) * self.spec.head_layers, i + base, mask)
        return x.view(B, T, -1)


def _tail_table(B: int, T: int, dtype, device) -> torch.Tensor:
    """(B*T, B*T + 2) additive mask by slot relative to the tails: column 0 the committed prefix
    (seen by all), 1 + b*T + j tail b's j-th position (seen by tail b's positions j and later),
    the last the slots past the tails (seen by none)."""
    q = torch.arange(B * T, device=device)
    allowed = torch.zeros(B * T, B * T + 2, dtype=torch.bool, device=device)
    allowed[:, 0] = True
    allowed[:, 1:-1] = (q[None, :] // T == q[:, None] // T) & (q[None, :] % T <= q[:, None] % T)
    return additive_mask(allowed, dtype)[0, 0]


def _rows(x, i):
    """x[i:i+1] for an int or a 0-d tensor i."""
    return x[i:i + 1] if isinstance(i, int) else x.index_select(0, i.reshape(1))
