"""The decoding step: commit the last accepted path, draft a tree, verify it in one backbone
forward, and read the backbone's argmax at every node. The computation is written once (`Step`,
the eager engine); the other engines wrap it: `static` fixes every shape, `graph` captures the
static step as CUDA graphs, `fused` captures it with the layers' elementwise runs compiled,
`compiled` compiles the whole step with torch.compile before capture.

In greedy decoding the heads draft inside the step, so with the captured engines the commit,
the draft (every family's, chained ones included) and the verification are all replayed from
CUDA graphs, and one copy to the host per step carries the tree's tokens and the argmax.
"""
from __future__ import annotations

import gc
import os
import shutil
from contextlib import contextmanager, nullcontext

import torch

from .config import GraftError
from .modeling import KVCache, additive_mask, attention_backends, device_ids, fused_pieces
from .tree import ancestors


@contextmanager
def no_collection():
    """Python's cycle collector held off while CUDA graphs are captured. Run inside a capture, it
    may free another captured graph that sits in a dead reference cycle; destroying a graph is
    not permitted while a stream captures, so the capture fails ("operation failed due to a
    previous error during capture") and leaves the CUDA generator mid-capture, which then fails
    every later random draw on the device ("Offset increment outside graph capture"). torch
    stopped collecting before each capture in 2.9 (pytorch/pytorch#161037 reports this)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class StepBoundsError(GraftError):
    """A step's inputs would index outside its cache, tree or vocabulary (`Step.check`)."""


def resolve_engine(engine: str, bb) -> str:
    if engine != "auto":
        if engine in ("graph", "fused", "compiled") and bb.device.type != "cuda":
            raise GraftError(f"--engine {engine} needs a CUDA device: use eager or static on CPU")
        return engine
    if bb.device.type != "cuda":
        return "eager"
    return "fused" if can_fuse() else "graph"  # bitsandbytes' 4-bit matmuls capture too


def can_fuse() -> bool:
    """Whether torch.compile can make the fused engine's kernels here: Triton, and a C compiler
    for the launchers Triton builds (it looks for $CC, then cc, gcc and clang)."""
    from torch.utils._triton import has_triton

    cc = os.environ.get("CC")
    return has_triton() and bool(shutil.which(cc) if cc else any(map(shutil.which, ("cc", "gcc", "clang"))))


def room(heads, tree) -> int:
    """Cache slots past the committed length that one step over `tree` writes: what the heads say
    (`Heads.scratch`), or the root alone without drafting (heads None)."""
    return tree.n if heads is None else heads.scratch(tree)


SPAN_UNIT = 256  # the narrowest bucket of cache slots a fixed-shape step's attention reads


def span_buckets(max_len: int) -> list[int]:
    """The cache lengths a fixed-shape step's attention may read, ascending: multiples of a unit
    (at least SPAN_UNIT, at most 8 buckets), the whole cache last. A step reads the narrowest that
    holds every slot it touches, so that attention reads the live prefix, not the whole cache."""
    unit = max(SPAN_UNIT, max_len // 8)
    return list(range(unit, max_len, unit)) + [max_len]


def greedy_choose(depth: int, logits: torch.Tensor, width: int) -> torch.Tensor:
    """Greedy drafting: each parent's children are its top candidates. (B, V) -> (B, R)."""
    return logits.topk(width, dim=-1).indices


class Step:
    """One decoding step over a fixed draft tree of N nodes: commit the previous step's
    accepted path, draft the tree, verify it in one backbone forward, and take the backbone's
    argmax at every node. This class is the eager engine; the others wrap the same computation
    (`_commit`, `_verify`) in fixed shapes (StaticStep), CUDA graphs (GraphStep) and
    torch.compile (CompiledStep). `Step.make` picks one by engine name.

    Node i holds a token at position n + depth[i] and sees the first n cache entries and its
    ancestors-or-self; its keys and values are written at cache slot n + i. The accepted path
    (at most A = depth + 1 nodes) is then compacted to slots n, n+1, ... and fed to the heads.
    """

    @staticmethod
    def make(engine: str, bb, cache: KVCache, tree, *, heads=None, state=None, drafts: bool = False) -> "Step":
        cls = {"eager": Step, "static": StaticStep, "graph": GraphStep, "fused": FusedStep,
               "compiled": CompiledStep}[engine]
        return cls(bb, cache, tree, heads=heads, state=state, drafts=drafts)

    def __init__(self, bb, cache: KVCache, tree, *, heads=None, state=None, drafts: bool = False):
        dev = bb.device
        self.bb, self.cache, self.tree = bb, cache, tree
        self.heads, self.state = heads, state
        self.drafts = drafts and heads is not None  # greedy: the heads draft inside the step
        self.N, self.A = tree.n, tree.max_depth + 1
        # what node i sees, by cache slot relative to the tree's first one (+1): column 0 the
        # committed slots, 1..N the tree's (ancestors-or-self), N+1 the slots past it
        self.sees = torch.zeros(self.N, self.N + 2, dtype=torch.bool, device=dev)
        self.sees[:, 0] = True
        self.anc = self.sees[:, 1:self.N + 1]  # a view: a dynamic tree's step writes its own here
        self.anc.copy_(tree.anc)
        self.depth = torch.tensor(tree.depths, device=dev)
        # Nodes past the context window only draft tokens that are never emitted; their positions
        # are clamped so that learned position tables (GPT-2) are never indexed out of range.
        self.last_pos = (bb.max_positions or 1 << 62) - 1
        self.room = room(heads, tree)  # cache slots past n that one step writes (`check`)
        self.vocab = bb.vocab_size
        self.last = None  # the previous verification's (trunk, final)
        self.args = None  # the loaded values as Python ints and lists

    # -- inputs --------------------------------------------------------------------------------
    def load(self, n_prev: int, path: list, new: list, n: int, tokens: list | None = None) -> None:
        """The previous step's accepted path (node indices) and new tokens (the last is the next
        root), the cache length before (n_prev) and after (n) it, and the node tokens when the
        caller drafted them itself (sampling, or no drafting)."""
        self.check(n_prev, path, new, n, tokens)
        self.args = (n_prev, path, new, n, tokens)

    def check(self, n_prev: int, path: list, new: list, n: int, tokens: list | None) -> None:
        """Everything a step may index, checked on the host before it runs: a captured step's
        kernels do not check their indices, and a wrong one would fault on the device (or write
        where it should not) instead of raising. Costs a few microseconds per step."""
        room = self.room
        bad = None
        if not 1 <= len(path) <= self.A or len(new) != len(path):
            bad = f"an accepted path of {len(path)} nodes with {len(new)} new tokens (at most {self.A})"
        elif any(not 0 <= p < self.N for p in path) or path[0] != 0:
            bad = f"accepted path {path} outside the tree's {self.N} nodes"
        elif n_prev != n - len(path) or n_prev < 0:
            bad = f"cache lengths {n_prev} -> {n} for a path of {len(path)}"
        elif n + room > self.cache.max_len:
            bad = f"cache slots up to {n + room - 1} for a cache of {self.cache.max_len}"
        elif any(not 0 <= t < self.vocab for t in new) or (
                tokens is not None and (len(tokens) > self.N or any(not 0 <= t < self.vocab for t in tokens))):
            bad = f"a token id outside the vocabulary of {self.vocab}"
        if bad:
            raise StepBoundsError(f"internal error: a decoding step was about to index {bad}; it was stopped "
                                  "before running. Please report it with the command that led here.")

    @contextmanager
    def _spanned(self, span: int):
        """Attention over the first `span` cache slots alone, in the backbone's cache and the
        heads' (they are as long), while the step runs; the whole cache again afterwards."""
        caches = [self.cache] + [v for v in (self.state or {}).values() if isinstance(v, KVCache)]
        for c in caches:
            c.span = span
        try:
            yield
        finally:
            for c in caches:
                c.span = c.max_len

    def _check_tokens(self, tokens: list) -> None:
        if len(tokens) != self.N or any(not 0 <= t < self.vocab for t in tokens):
            raise StepBoundsError(f"internal error: a decoding step was given {len(tokens)} node tokens for "
                                  f"{self.N} nodes, or one outside the vocabulary; it was stopped before running")

    def prepare(self, lo: int, hi: int) -> None:
        """Get ready for steps at cache lengths lo..hi, before a generation's prefill (GraphStep
        captures its buckets here); the eager step needs nothing."""

    # -- the phases ----------------------------------------------------------------------------
    def commit(self) -> None:
        """Compact the accepted path's KV entries and feed its states to the heads."""
        if self.heads is None:  # no drafting: the path is the root alone, already in place
            return
        n_prev, path, new, _, _ = self.args
        idx = device_ids(path + new, self.cache.k.device)
        idx, toks = idx[:len(path)], idx[len(path):]
        self._commit(n_prev, idx, toks, len(path), compact=path[-1] != len(path) - 1)

    def verify(self, tokens: list | None = None):
        """Run the tree. Returns (trunk, final, packed): packed (2N,) is the node tokens then
        the backbone's argmax after each node (then a dynamic tree's parents). In the static
        engines these live in buffers the next call overwrites. `tokens` replaces the loaded node
        tokens (sampling drafts)."""
        if tokens is not None:
            self._check_tokens(tokens)
            self.args = self.args[:4] + (tokens,)
        _, _, new, n, tokens = self.args
        root = torch.tensor(new[-1:], dtype=torch.long, device=self.depth.device)
        out = self._verify(n, root, None if tokens is None else device_ids(tokens, self.depth.device))
        self.last = out[:2]
        return out

    # -- the computation, written once ----------------------------------------------------------
    def _commit(self, n_prev, idx, toks, count, compact=True):
        trunk, final = self.last
        if compact:
            self.cache.keep(n_prev, idx)
        if self.heads is not None:
            self.heads.commit(self.bb, self.state, trunk.index_select(1, idx), final.index_select(1, idx), toks,
                              n_prev, count)

    def _verify(self, n, root, tokens):
        bb = self.bb
        parents = None
        if tokens is None:
            if self.drafts and self.tree.dynamic:  # the heads choose the tree's shape too
                drafted, parents, depths = self.heads.draft_dynamic(bb, self.state, self.tree, n)
                tokens = torch.cat([root, drafted[1:]])
                self.anc.copy_(ancestors(parents, self.tree.max_depth))
                self.depth.copy_(depths)
            elif self.drafts:
                drafted = self.heads.draft(bb, self.state, self.tree, n, greedy_choose)
                tokens = torch.cat([root, drafted[1:]])
            else:
                tokens = root
        else:
            tokens = torch.cat([root, tokens[1:]])
        mask, start = self._mask_and_slots(n)
        positions = (n + self.depth).clamp(max=self.last_pos)[None]
        trunk, final = bb.forward(tokens[None], positions, self.cache, start, mask,
                                  None if self.heads is None else self.heads.features)
        target = bb.logits(final[0]).argmax(dim=-1)  # (N,)
        if parents is not None:  # a dynamic tree: the host needs its shape for the acceptance
            return trunk, final, torch.cat([tokens, target, parents])
        return trunk, final, torch.cat([tokens, target])

    def _mask_and_slots(self, n):
        """Eager: n is an int, and attention reads the valid entries 0..n+N-1 alone."""
        allowed = torch.cat([torch.ones(self.N, n, dtype=torch.bool, device=self.anc.device), self.anc], dim=1)
        return additive_mask(allowed, self.bb.dtype), n


class StaticStep(Step):
    """Every shape fixed: the path and the new tokens are padded to A and travel with the
    positions in one small host-to-device copy (`load`); the heads draft inside the step, so one
    device-to-host copy per step carries the tree's tokens and the argmax. New keys and values go
    to cache slots given as a tensor; attention reads the narrowest bucket of cache lengths
    (`span_buckets`) that holds the step's slots, and the mask (built on the device from the
    cache length `n`) hides what is not yet valid."""

    bucketed = True  # False: attention always reads the whole cache (one shape to compile)

    def __init__(self, bb, cache, tree, **kw):
        super().__init__(bb, cache, tree, **kw)
        dev, A, N = bb.device, self.A, self.N
        # io: path (A), new tokens (A), n_prev, count, n, node tokens (N)
        self.io = torch.zeros(2 * A + 3 + N, dtype=torch.long, device=dev)
        self.host = torch.zeros(self.io.shape, dtype=torch.long, pin_memory=dev.type == "cuda")
        self.slot_offsets = torch.arange(N, device=dev)
        self.cols = torch.arange(cache.max_len, device=dev)
        self.spans = span_buckets(cache.max_len) if self.bucketed else [cache.max_len]
        self.live = cache.max_len  # the span of the loaded step

    def span(self, n: int) -> int:
        """The bucket a step at cache length n reads: its slots end before n + room."""
        return next(s for s in self.spans if s >= n + self.room)

    def load(self, n_prev, path, new, n, tokens=None):
        self.check(n_prev, path, new, n, tokens)
        self.live = self.span(n)
        A, N = self.A, self.N
        vals = (path + path[-1:] * (A - len(path)) + new + [0] * (A - len(new)) + [n_prev, len(path), n]
                + (list(tokens) + [0] * (N - len(tokens)) if tokens is not None else [0] * N))
        self.host.copy_(torch.tensor(vals, dtype=torch.long))
        self.io.copy_(self.host, non_blocking=True)

    def commit(self):
        if self.heads is not None:
            with self._spanned(self.live):
                self._commit_static()

    def verify(self, tokens=None):
        self._load_tokens(tokens)
        with attention_backends(self.cache.k.device, static=True), self._spanned(self.live):
            out = self._verify_static()
        self.last = out[:2]
        return out

    def _load_tokens(self, tokens):
        if tokens is not None:
            self._check_tokens(tokens)
            self.io[-self.N:].copy_(device_ids(tokens, self.io.device))

    def _commit_static(self):
        A, io = self.A, self.io
        self._commit(io[2 * A], io[:A], io[A:2 * A], io[2 * A + 1])

    def _verify_static(self):
        A, io = self.A, self.io
        root = io[A:2 * A].index_select(0, io[2 * A + 1].reshape(1) - 1)  # the last new token
        return self._verify(io[2 * A + 2], root, None if self.drafts else io[-self.N:])

    def _mask_and_slots(self, n):
        rel = (self.cols[:self.cache.span] - (n - 1)).clamp(0, self.N + 1)  # slot -> column of `sees`
        return additive_mask(self.sees[:, rel], self.bb.dtype), n + self.slot_offsets


class GraphStep(StaticStep):
    """StaticStep captured as CUDA graphs (verify, commit), one pair per bucket of cache lengths,
    and replayed. A small model at batch 1 is bound by kernel launches (hundreds per forward); a
    replay issues them all at once. `prepare` captures the buckets a generation will use before
    its prefill: a capture's warm-up runs the step, which would overwrite a generation's state."""

    compiled = False  # the whole step through torch.compile first (CompiledStep)
    pieces = False  # the layers' elementwise runs compiled (FusedStep)

    def __init__(self, bb, cache, tree, **kw):
        super().__init__(bb, cache, tree, **kw)
        self.graphs = {}  # span -> {"verify": graph, "commit": graph}
        self.outs = {}  # span -> the verify graph's output
        self.feats = None  # (trunk, final) of the last verification, whichever bucket ran it
        self.commit_state = {}

    def prepare(self, lo: int, hi: int) -> None:
        """Capture the buckets that steps at cache lengths lo..hi read (those not captured yet)."""
        for span in self.spans:
            if self.span(lo) <= span <= self.span(min(hi, self.cache.max_len - self.room)) and span not in self.graphs:
                self._capture(span)

    def commit(self):
        if self.heads is None:
            return
        self._graphs()["commit"].replay()
        # what the captured commit set in Python (deepseek-mtp's owed commits, which refer to
        # this step's inputs), restored: a replay runs no Python, and sampling drafts outside
        # the graph, after the prefill's exact commit reset it
        self.state.update(self.commit_state)

    def verify(self, tokens=None):
        self._load_tokens(tokens)
        self._graphs()["verify"].replay()
        return self.outs[self.live]

    def _graphs(self) -> dict:
        graphs = self.graphs.get(self.live)
        if graphs is None:
            raise StepBoundsError(f"internal error: no captured step reads {self.live} cache slots (captured: "
                                  f"{sorted(self.graphs)}); it was stopped before running. Please report it.")
        return graphs

    def _verify_shared(self, verify):
        """The verification, its trunk and final states copied to buffers that every bucket's
        graph shares: the next step's commit may run in another bucket than this verification."""
        out = verify()
        if self.heads is None:
            return out
        if self.feats is None:
            self.feats = (out[0].clone(), out[1].clone())
        self.feats[0].copy_(out[0])
        self.feats[1].copy_(out[1])
        return self.feats + (out[2],)

    def _capture(self, span: int):
        # Warm-up and capture write at slots near the end of the cache. That is harmless: no slot
        # at or past the cache length is read before the step that owns it has written it.
        safe = self.cache.max_len - self.room - 1
        StaticStep.load(self, safe - 1, [0], [0], safe, [0] * self.N)
        self.live = span
        graphs = {}
        # Locals, not attributes: a step that held its own bound methods would be a reference
        # cycle, freed (with its graphs) only by Python's cycle collector.
        verify, commit = self._verify_static, self._commit_static
        if self.compiled:
            verify, commit = (torch.compile(f, dynamic=False) for f in (verify, commit))
        # Warm-up and capture on one side stream: libraries that keep per-stream state (cuBLAS's
        # and cuDNN's workspaces, cuDNN's attention plans) then set it up before the capture, not
        # in it. "thread_local": another thread's CUDA calls (the caller's own work) cannot
        # invalidate the capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with attention_backends(self.cache.k.device, static=True), self._spanned(span), no_collection(), \
                fused_pieces() if self.pieces else nullcontext():
            with torch.cuda.stream(stream):
                for _ in range(3):
                    self.last = self._verify_shared(verify)[:2]
                    if self.heads is not None:
                        commit()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, stream=stream, capture_error_mode="thread_local"):
                self.outs[span] = self._verify_shared(verify)
            graphs["verify"] = g
            self.last = self.outs[span][:2]
            if self.heads is not None:
                g = torch.cuda.CUDAGraph()
                with torch.cuda.graph(g, stream=stream, capture_error_mode="thread_local"):
                    commit()
                graphs["commit"] = g
                self.commit_state = {k: v for k, v in self.state.items() if not torch.is_tensor(v)
                                     and not isinstance(v, KVCache)}
        torch.cuda.current_stream().wait_stream(stream)
        self.graphs[span] = graphs


class FusedStep(GraphStep):
    """GraphStep whose decoder layers run their elementwise runs (rotary embedding with the cache
    writes, residual sum with norm, gated activation) as kernels fused by torch.compile
    (`graft.modeling.fused_pieces`), compiled in seconds for every tree size: a Llama layer's 19
    operations become 10 pieces and operations."""

    pieces = True


class CompiledStep(GraphStep):
    """GraphStep with the step first compiled by torch.compile, which fuses the many small
    elementwise kernels (norms, rotary embedding, masks) before capture. Compiling takes a minute
    or more per tree shape; opt-in. Its attention reads the whole cache: one shape to compile."""

    compiled = True
    bucketed = False
