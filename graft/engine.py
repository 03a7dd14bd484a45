"""The verification step: one backbone forward over the draft tree, and what decoding reads of it.

Three engines run the same step:
- `eager`: attention reads only the valid cache prefix; shapes change every step. The default
  on CPU, where the extra work of fixed shapes costs more than it saves.
- `static`: every shape is fixed. New keys and values go to cache slots given as a tensor,
  attention reads the whole preallocated cache, and the mask (built on the device from the
  cache length `n`) hides what is not yet valid.
- `graph`: `static`, captured once as a CUDA graph and replayed. A small model at batch 1 is
  bound by kernel launches (hundreds per forward); a replay issues them all at once.
- `compiled`: `graph`, with the step first compiled by torch.compile, which fuses the many small
  elementwise kernels (norms, rotary embedding, masks) before capture. Compiling takes a minute
  or more per tree shape; opt-in.

For greedy decoding the step also returns, computed on the device, the backbone's argmax at every
tree node and, for parallel heads, each head's top-R candidates at every node, so that one copy to
the host (one synchronisation) gives the acceptance decision and the next tree's tokens.
"""
from __future__ import annotations

import torch

from .modeling import KVCache, additive_mask, attention_backends

ENGINES = ("auto", "eager", "static", "graph", "compiled")


def resolve_engine(engine: str, bb) -> str:
    if engine != "auto":
        if engine in ("graph", "compiled") and bb.device.type != "cuda":
            from .config import GraftError

            raise GraftError(f"--engine {engine} needs a CUDA device: use eager or static on CPU")
        return engine
    if bb.device.type == "cuda" and not bb.identity.load_in_4bit:
        return "graph"
    return "eager"


class Step:
    """One verification forward of a fixed tree of N nodes.

    Node i holds a token at position n + depth[i] and sees the first n cache entries and its
    ancestors-or-self (`anc`). Its keys and values are written at cache slot n + i.
    """

    def __init__(self, bb, cache: KVCache, anc: torch.Tensor, depth: list, *, mode: str,
                 heads=None, head_state=None, ranks: int = 0, greedy: bool = True):
        dev = bb.device
        self.bb, self.cache, self.mode = bb, cache, mode
        self.heads, self.head_state, self.ranks, self.greedy = heads, head_state, ranks, greedy
        self.N = anc.shape[0]
        self.anc = anc.to(dev)
        self.depth = torch.tensor(depth, device=dev)
        self.tokens = torch.zeros(self.N, dtype=torch.long, device=dev)
        self.n = torch.zeros((), dtype=torch.long, device=dev)
        self.graph = None
        self.out = None
        if mode != "eager":
            self.slot_offsets = torch.arange(self.N, device=dev)
            self.cols = torch.arange(cache.max_len, device=dev)
        if mode in ("graph", "compiled"):
            self._capture(torch.compile(self._compute, dynamic=False) if mode == "compiled" else self._compute)

    def _mask_and_slots(self, n):
        if self.mode == "eager":  # n is an int; attention reads entries 0..n+N-1
            allowed = torch.cat([torch.ones(self.N, n, dtype=torch.bool, device=self.anc.device), self.anc], dim=1)
            return additive_mask(allowed, self.bb.dtype), n
        rel = self.cols - n  # cache slot relative to the first tree slot
        in_tree = (rel >= 0) & (rel < self.N)
        allowed = (rel < 0)[None, :] | (in_tree[None, :] & self.anc[:, rel.clamp(0, self.N - 1)])
        return additive_mask(allowed, self.bb.dtype), n + self.slot_offsets

    def _compute(self, n):
        bb = self.bb
        mask, start = self._mask_and_slots(n)
        positions = (n + self.depth)[None]
        trunk, final = bb.forward(self.tokens[None], positions, self.cache, start, mask)
        target = top = None
        if self.greedy:
            target = bb.logits(final[0]).argmax(dim=-1)  # (N,)
            if self.ranks:
                lg = self.heads.tree_logits(bb, self.head_state, trunk, final, positions, start, mask)
                # (N + K*N*R,): the argmax, then every head's top-R at every node, for one copy out
                top = torch.cat([target, lg.topk(self.ranks, dim=-1).indices.flatten()])
        return trunk, final, target, top

    def _capture(self, fn):
        # Warm-up and capture write keys at the last N slots. That is harmless: no slot at or
        # past the cache length n is read before the step that owns it has written it.
        self.n.fill_(self.cache.max_len - self.N)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with attention_backends(self.cache.k.device, static=True):
            with torch.cuda.stream(stream):
                for _ in range(3):
                    fn(self.n)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = fn(self.n)

    def __call__(self, tokens, n: int):
        """tokens: N ids (list or tensor). Returns (trunk, final, target, top) for the N nodes:
        target (N,) the backbone's argmax; top, with drafting in the step, target followed by
        the heads' candidates (K, N, R) flattened.

        In the static and graph engines the results live in buffers the next call overwrites."""
        self.tokens.copy_(torch.as_tensor(tokens, dtype=torch.long), non_blocking=True)
        if self.mode == "eager":
            return self._compute(n)
        self.n.fill_(n)
        if self.graph is not None:
            self.graph.replay()
            return self.out
        with attention_backends(self.cache.k.device, static=True):
            return self._compute(self.n)
