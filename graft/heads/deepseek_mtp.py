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

In the fixed-shape steps, module k >= 2 commits the accepted positions in the same forward as
its draft tails (one pass of the module per depth instead of two): the commit records what it
owes (`pending`) and the draft runs it, rows of commit and tails side by side.
"""
from __future__ import annotations

import torch
from torch import nn

from ..modeling import KVCache, additive_mask, cache_mask
from .base import ChainedHeads, constant, copy_last_layer, positions, rms_eps


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

    def forward(self, bb, h, e, positions, cache=None, cache_base=0, start=0, mask=None, kv_only=False):
        """kv_only: fill the cache and return None (a commit whose states nothing reads)."""
        x = self.proj(torch.cat([self.norm_h(h), self.norm_e(e)], dim=-1))  # (B, T, 2d) -> (B, T, d)
        rope = bb.rope(x, positions)
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
            # where K = 1: `_unread`); tokens: t_0..t_N; pending: what modules 2..K owe from the
            # last fixed-shape commit (`_commit_fixed`), None after an exact one
            "H": torch.zeros(self.num_heads + 1, max_len, d, dtype=self._dtype, device=bb.device),
            "tokens": torch.zeros(max_len + 1, dtype=torch.long, device=bb.device),
            "pending": None,
        }

    def scratch(self, tree):
        # module k >= 2 writes its A = depth+1 owed commit rows from start-k+1 on (start >= n-A),
        # then its tails: B paths of k-1 positions
        A = tree.max_depth + 1
        if tree.dynamic:
            tails = tree.width * (tree.max_depth - 1)
        else:
            tails = max(len(lv.parents) * (lv.depth - 1) for lv in tree.levels("cpu"))
        return max(super().scratch(tree), A + tails)

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
            return self._commit_fixed(bb, state, next_tokens, start, count, A)
        state["pending"] = None
        for k, module in enumerate(self.modules_, start=1):  # exact shapes: the prefill, or the eager engine
            lo, hi = max(start - k + 1, 0), start + A - k + 1
            if hi <= lo:
                continue
            p = torch.arange(lo, hi, device=dev)
            h = module(bb, H[k - 1, p][None], self._emb(bb, tokens[p + k][None]), p[None], cache, (k - 1) * L, p,
                       cache_mask(p, cache.span, self._dtype), kv_only=self._unread(k))
            if h is not None:
                H[k].index_copy_(0, p, h[0])

    def _commit_fixed(self, bb, state, next_tokens, start, count, A):
        """`commit` with fixed shapes: module 1 here (drafting starts from its state at n-1); the
        others owe positions start-k+1 .. start-k+A, which the draft runs with their tails
        (`_tails`). Drafting runs after every commit; a module deeper than the tree is never
        read in this generation, so what it owes may go unpaid."""
        H, cache = state["H"], state["cache"]
        p = positions(start, A, H.device)
        h = self.modules_[0](bb, H[0].index_select(0, p)[None], self._emb(bb, next_tokens[None]), p[None], cache, 0,
                             p, cache_mask(p, cache.span, self._dtype))
        H[1].index_copy_(0, p, h[0])
        state["pending"] = (start, count, next_tokens)

    def _unread(self, k: int) -> bool:
        """Whether module k's committed states go unread: the last module's, where there are several."""
        return k == self.num_heads > 1

    def draft_root(self, bb, state, tree, n):
        """Module 1's committed state at n-1, and no tail to hand on."""
        h = _rows(state["H"][1], n - 1)
        return self.draft_logits(bb, 0, h), (h[None, :0],)

    def draft_expand(self, bb, state, tree, n, d, carry, paths):
        """Module d drafts depth d for B paths at once. Its prediction for t_{n+d} comes from
        position n-1, so it reruns positions n-d+1..n-1 of each path (the draft-dependent tail,
        d-1 positions): inputs the depth d-1 state (committed at n-d+1, else module d-1's output
        on the tail of the parent's path: the carry) and the path's drafted tokens (`_tails`)."""
        base = n - (d - 1)  # the first position module d has not committed
        hin = torch.cat([_rows(state["H"][d - 1], base)[None].expand(paths.shape[0], 1, -1), carry[0]], dim=1)
        cur = self._tails(bb, state, d, base, hin, paths)
        return self.draft_logits(bb, d - 1, cur[:, -1]), (cur,)

    def _tails(self, bb, state, k, base, hin, toks):
        """Module k (>= 2) on B paths' tails: positions base = n-k+1 .. n-1 (T = k-1), inputs hin
        (B, T, d) and tokens (B, T) t_{n+1}..t_{n+k-1}. Returns (B, T, d).

        The module's forward also runs what its last commit owes (`pending`, A rows at positions
        s0 = start-k+1 ..., of which the first `count` are real; base = s0 + count), writing
        their states to H[k]. Cache slots: the A commit rows at s0.., then the B tails side by
        side. Each tail sees the committed prefix (the real commit rows included) and its own
        earlier positions; each commit row the prefix and the commit rows up to itself. The
        mask is gathered from a table built once per shape (`_tail_table`), by slot: the padded
        commit rows' slots are hidden from every row."""
        cache = state["cache"]
        B, T = toks.shape
        dev, S, d = cache.k.device, cache.span, hin.shape[-1]
        if state["pending"] is None:  # nothing owed (the eager engine commits in full)
            s0, count, new = base, 0, toks.new_zeros(0)
        else:
            start, count, new = state["pending"]
            s0 = start - (k - 1)
        A = new.shape[0]
        table = constant(self, ("tails", dev, A, B, T), lambda: _tail_table(A, B, T, self._dtype, dev))
        cols = constant(self, ("cols", dev, S), lambda: torch.arange(S, device=dev))
        i = constant(self, ("i", dev, A, B, T), lambda: torch.arange(A + B * T, device=dev))
        j = constant(self, ("i%T", dev, B, T), lambda: torch.arange(B * T, device=dev) % T)
        rel = cols - s0  # slot -> row of the commit block and tails; column rel+2 of the table
        col = (rel + 2).clamp(1, A + B * T + 2)
        if A:
            col = col.masked_fill((rel >= count) & (rel < A), 0)  # padded commit rows: seen by none
        mask = table[:, col][None, None]
        p = i[:A] + s0  # the commit rows' positions
        pos = torch.cat([p, j + base])
        emb = self._emb(bb, torch.cat([new, toks.reshape(B * T)]))
        h = torch.cat([state["H"][k - 1].index_select(0, p), hin.reshape(B * T, d)]) if A else hin.reshape(B * T, d)
        x = self.modules_[k - 1](bb, h[None], emb[None], pos[None], cache, (k - 1) * self.spec.head_layers,
                                 i + s0, mask)[0]
        if A and not self._unread(k):
            state["H"][k].index_copy_(0, p, x[:A])
        return x[A:].view(B, T, -1)


def _tail_table(A: int, B: int, T: int, dtype, device) -> torch.Tensor:
    """(A + B*T, A + B*T + 3) additive mask by column: 0 seen by none (padded commit rows), 1 the
    committed prefix (seen by all), 2 + r the r-th row of the block (A commit rows, then B tails
    of T), the last the slots past the block (seen by none). A commit row sees the commit rows up
    to itself, a tail all the commit rows and its own earlier positions."""
    R = A + B * T
    q = torch.arange(R, device=device)
    tail, pos = (q - A) // T, (q - A) % T
    commit = q < A
    allowed = torch.zeros(R, R + 3, dtype=torch.bool, device=device)
    allowed[:, 1] = True
    block = commit[:, None] & commit[None, :] & (q[None, :] <= q[:, None])  # commit rows
    block |= ~commit[:, None] & commit[None, :]  # tails see the (real) commit rows
    block |= ~commit[:, None] & ~commit[None, :] & (tail[None, :] == tail[:, None]) & (pos[None, :] <= pos[:, None])
    allowed[:, 2:R + 2] = block
    return additive_mask(allowed, dtype)[0, 0]


def _rows(x, i):
    """x[i:i+1] for an int or a 0-d tensor i."""
    return x[i:i + 1] if isinstance(i, int) else x.index_select(0, i.reshape(1))
