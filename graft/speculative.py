"""Self-speculative decoding: the heads draft, one backbone forward verifies, the longest
agreeing prefix is kept, and the backbone's own next token after it is emitted as a bonus.

- Greedy (temperature 0): parallel heads (blockwise, medusa, meta-mtp) propose a sparse tree of
  top-k candidates (Medusa, section 2.1.2) verified in one forward with a tree attention mask;
  deepseek-mtp drafts a tree of the same kind through its chain of modules, depth by depth
  (heads.draft_tree). A draft is kept only where it equals the backbone's argmax, so the output
  is the backbone's greedy output.
- Sampling: a single chain, accepted by speculative rejection sampling (Leviathan et al. 2023,
  Chen et al. 2023): keep draft x ~ q with probability min(1, p(x)/q(x)), else resample from
  norm(max(0, p - q)). The output is distributed exactly as the backbone's samples.

The KV cache is preallocated once; the prefix is never recomputed. After a tree step the
accepted path's KV entries are compacted in place and the rest is overwritten later.
"""
from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field

import torch

from .config import GraftError
from .engine import ENGINES, Step, resolve_engine
from .modeling import additive_mask, attention_backends, causal_allowed, device_ids


@dataclass
class DecodeConfig:
    """Options of `graft generate` and `GraftModel.generate`.

    max_new_tokens: stop after this many new tokens.
    temperature: 0 is greedy; > 0 samples (with top_p) by speculative rejection sampling.
    top_p: nucleus sampling threshold, as in transformers.
    seed: random seed for sampling.
    tree: "auto" uses the calibrated tree at temperature 0, "chain" one path (sampling: always).
    tree_size: nodes in the draft tree (0: the calibrated tree from graft.json, else a default).
    draft: False runs graft's own loop without drafting (one token per forward): a baseline.
    stop: strings that end generation once the generated text contains one.
    eos: stop at the tokenizer's end-of-sequence token(s).
    engine: how the verification step runs (see graft.engine): "auto" is "graph" (CUDA graphs)
        on a CUDA device with an unquantized backbone, else "eager"; "static" fixes all shapes
        without capturing a graph.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tree: str = "auto"
    tree_size: int = 0
    draft: bool = True
    stop: tuple = ()
    eos: bool = True
    engine: str = "auto"

    def __post_init__(self):
        if self.temperature < 0:
            raise GraftError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GraftError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise GraftError("--max-new-tokens must be at least 1")
        if self.tree not in ("auto", "chain"):
            raise GraftError(f"--tree must be auto or chain, got {self.tree!r}")
        if self.engine not in ENGINES:
            raise GraftError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.tree_size < 0:
            raise GraftError("--tree-size must be >= 0")
        self.stop = tuple(self.stop or ())


@dataclass
class Generation:
    prompt_ids: list
    ids: list  # new tokens only
    text: str | None = None
    steps: int = 0  # verification forwards (prefill excluded)
    step_tokens: int = 0  # tokens produced by verification forwards
    accepted: list = field(default_factory=list)  # per depth: drafts accepted
    proposed: list = field(default_factory=list)  # per depth: steps in which depth was drafted
    prefill_s: float = 0.0
    decode_s: float = 0.0
    stopped: str = ""  # eos, stop, length, context

    @property
    def tau(self) -> float:
        """Mean tokens per verification forward, bonus included (prefill excluded)."""
        return self.step_tokens / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        t = self.prefill_s + self.decode_s
        return len(self.ids) / t if t > 0 else 0.0

    def acceptance(self) -> list:
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]


def default_accuracies(num_heads: int, ranks: int = 8) -> list[list[float]]:
    """A prior for untrained heads: head k's rank-r candidate is right with 0.6^(k+1) * 0.5^r."""
    return [[0.6 ** (k + 1) * 0.5 ** r for r in range(ranks)] for k in range(num_heads)]


def build_tree(acc: list[list[float]], size: int) -> list[list[int]]:
    """The `size` draft paths of highest expected acceptance (Medusa, section 2.1.2).

    acc[k][r]: the measured chance that head k's rank-r candidate is the backbone's token. A path
    (r_1, ..., r_d) is worth prod_k acc[k][r_k]; children are never worth more than their parent,
    so taking the best paths from a frontier keeps the tree prefix-closed.
    """
    heap = [(-acc[0][r], (r,)) for r in range(len(acc[0]))]
    heapq.heapify(heap)
    paths = []
    while heap and len(paths) < size:
        negv, path = heapq.heappop(heap)
        paths.append(list(path))
        d = len(path)
        if d < len(acc):
            for r in range(len(acc[d])):
                heapq.heappush(heap, (negv * acc[d][r], path + (r,)))
    return sorted(paths, key=lambda p: (len(p), p))


class Tree:
    """Static structure of a draft tree: node 0 is the root (the last known token)."""

    def __init__(self, paths: list[list[int]]):
        paths = sorted((tuple(p) for p in paths), key=lambda p: (len(p), p))
        index = {(): 0}
        parent, depth, rank = [-1], [0], [0]
        for p in paths:
            if p[:-1] not in index:
                raise GraftError(f"draft tree path {list(p)} has no parent path: the tree must be prefix-closed")
            index[p] = len(parent)
            parent.append(index[p[:-1]])
            depth.append(len(p))
            rank.append(p[-1])
        n = len(parent)
        self.lineage = []  # node i's ancestors-or-self, root first
        for i in range(n):
            line, j = [], i
            while j >= 0:
                line.append(j)
                j = parent[j]
            self.lineage.append(line[::-1])
        self.children = [[] for _ in range(n)]  # in rank order
        for i in range(1, n):
            self.children[parent[i]].append(i)
        anc = torch.zeros(n, n, dtype=torch.bool)  # (n, n) ancestor-or-self, for the attention mask
        for i, line in enumerate(self.lineage):
            anc[i, line] = True
        self.n = n
        self.paths = paths
        self.parents, self.depths, self.ranks = parent, depth, rank
        self.anc = anc
        self.max_depth = max(depth)
        self.max_rank = max(rank) + 1

    def accept(self, tokens: list, target: list) -> tuple[list, list]:
        """Greedy acceptance: the deepest node whose whole lineage matches the backbone's argmax
        (the first such on ties). tokens[i]: node i's token; target[i]: the backbone's argmax
        after node i. Returns (the accepted nodes, root first; the new tokens, bonus included)."""
        good = [True] * self.n
        best = 0
        for i in range(1, self.n):  # parents come before children
            good[i] = good[self.parents[i]] and tokens[i] == target[self.parents[i]]
            if good[i] and self.depths[i] > self.depths[best]:
                best = i
        path = self.lineage[best]
        return path, [tokens[j] for j in path[1:]] + [target[best]]


def warp(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Logits -> the sampling distribution of transformers' temperature and top-p warpers."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sp, si = probs.sort(dim=-1)  # ascending, as TopPLogitsWarper
        cum = sp.cumsum(dim=-1)
        remove = cum <= (1 - top_p)
        remove[..., -1] = False
        probs = probs.scatter(-1, si, sp.masked_fill(remove, 0.0))
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def accept_sample(p: torch.Tensor, q: torch.Tensor, draft: int, gen) -> tuple[bool, int]:
    """One speculative rejection-sampling decision. p, q: (V,) target and draft distributions.

    Returns (accepted, token): the draft itself, or a token from norm(max(0, p - q)).
    """
    px, qx = p[draft].item(), q[draft].item()
    u = torch.rand((), generator=gen, device=p.device).item()
    if qx > 0 and u < min(1.0, px / qx):
        return True, draft
    residual = (p - q).clamp_min(0)
    s = residual.sum()
    if s.item() <= 0:  # p == q: any rejection is measure-zero; fall back to p itself
        residual, s = p, p.sum()
    return False, int(torch.multinomial(residual / s, 1, generator=gen).item())


def _count(out: Generation, tree: Tree, new: list) -> None:
    """Per-depth statistics of one step: every depth was drafted, len(new) - 1 were kept."""
    for d in range(tree.max_depth):
        out.proposed[d] += 1
    for d in range(len(new) - 1):
        out.accepted[d] += 1


class SpeculativeDecoder:
    """Decodes with a GraftModel. Reuse one decoder across calls: with the static and graph
    engines it keeps the KV cache and the captured steps between generations."""

    def __init__(self, model):
        self.model = model
        self.bb = model.backbone
        self.heads = model.heads
        self._pool = {}  # engine -> {"max_len", "cache", "state", "steps"} (static and graph)

    def _tree(self, cfg: DecodeConfig) -> Tree | None:
        K = self.heads.num_heads
        if not cfg.draft:
            return None
        chain = [[0] * d for d in range(1, K + 1)]
        if cfg.temperature > 0 or cfg.tree == "chain" or not self.heads.drafts_trees:
            return Tree(chain)
        if cfg.tree_size == 0 and self.model.config.tree:
            return Tree(self.model.config.tree)
        acc = (self.model.config.training or {}).get("rank_accuracy") or default_accuracies(K)
        return Tree(build_tree(acc, cfg.tree_size or 24))

    def _buffers(self, engine: str, need: int, drafting: bool):
        """KV cache, head state and a cache of Steps for one generation of up to `need` slots."""
        bb, heads = self.bb, self.heads
        if engine == "eager":
            return bb.new_cache(need), (heads.new_state(bb, need) if drafting else None), {}
        pool = self._pool.get(engine)
        if pool is None or pool["max_len"] < need:
            self._pool.pop(engine, None)  # free the old cache and graphs first
            max_len = max(256, 1 << (need - 1).bit_length())
            pool = {"max_len": max_len, "cache": bb.new_cache(max_len), "state": None, "steps": {}}
            self._pool[engine] = pool
        if drafting:
            # graphs capture parallel heads' state (meta-mtp's cache); chained heads start afresh
            if pool["state"] is None or not heads.parallel:
                pool["state"] = heads.new_state(bb, pool["max_len"])
        return pool["cache"], pool["state"], pool["steps"]

    def _eos_ids(self, cfg) -> set:
        if not cfg.eos:
            return set()
        ids = set()
        tok = self.bb.tokenizer
        gc = getattr(self.bb.hf, "generation_config", None)
        for src in (getattr(gc, "eos_token_id", None), getattr(tok, "eos_token_id", None) if tok else None):
            if isinstance(src, int):
                ids.add(src)
            elif src:
                ids.update(src)
        return ids

    @torch.inference_mode()
    def generate(self, prompt_ids, cfg: DecodeConfig, on_tokens=None) -> Generation:
        """Decode from `prompt_ids` (list or 1-D tensor). `on_tokens(list)` streams new tokens."""
        with attention_backends(self.bb.device, static=False):  # the static steps re-enable cuDNN
            return self._generate(prompt_ids, cfg, on_tokens)

    def _generate(self, prompt_ids, cfg: DecodeConfig, on_tokens=None) -> Generation:
        bb, heads = self.bb, self.heads
        dev = bb.device
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=dev).flatten()
        P = ids.numel()
        if P == 0:
            raise GraftError("the prompt is empty: give some text")
        ctx = bb.max_positions or (P + cfg.max_new_tokens + 1)
        if P >= ctx:
            raise GraftError(f"the prompt is {P} tokens, longer than the context window ({ctx}): shorten it")
        max_new = min(cfg.max_new_tokens, ctx - P)
        engine = resolve_engine(cfg.engine, bb)
        tree = self._tree(cfg)
        K = heads.num_heads if tree is not None else 0
        greedy = cfg.temperature == 0
        fast = greedy and tree is not None and heads.parallel  # drafts come out of the step itself
        chained = greedy and tree is not None and heads.chained_tree  # drafts from the chain, per node
        shape = tree or Tree([])  # without drafting: the root alone
        gen = torch.Generator(device=dev)
        if cfg.seed is not None:
            gen.manual_seed(cfg.seed)
        else:
            gen.seed()
        eos = self._eos_ids(cfg)
        out = Generation(prompt_ids=ids.tolist(), ids=[], accepted=[0] * K, proposed=[0] * K)

        t0 = time.perf_counter()
        cache, state, steps = self._buffers(engine, P + max_new + shape.n + 1, K > 0)
        # The static engines draft for every node inside the step (no second pass, no extra sync);
        # eager drafts only at the accepted node, after the step, which is cheaper on a CPU.
        ranks = shape.max_rank if fast and engine != "eager" else 0
        key = (tuple(shape.paths), ranks, greedy)
        if key not in steps:
            steps[key] = Step(bb, cache, shape.anc, shape.depths, mode=engine, heads=heads, head_state=state,
                              ranks=ranks, greedy=greedy)
        step = steps[key]
        mask = additive_mask(causal_allowed(P, 0, dev), bb.dtype)
        trunk, final = bb.forward(ids[None], torch.arange(P, device=dev)[None], cache, 0, mask)
        first = self._choose(bb.logits(final[0, -1]), cfg, gen)
        drafts = None
        if K:
            heads.commit(bb, state, trunk, final, torch.cat([ids[1:], ids.new_tensor([first])])[None], 0)
            if fast:
                drafts = self._drafts(state, tree.max_rank)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n = P  # positions in the cache; the last known token (not yet in the cache) is `last`
        last = first
        if self._emit(out, [first], eos, cfg, max_new, on_tokens):
            out.decode_s = time.perf_counter() - t0
            return self._finish(out)
        while True:
            if tree is None:
                _, final, target, _ = step([last], n)
                new = [int(target[0])] if greedy else [self._choose(bb.logits(final[0, -1]), cfg, gen)]
                a = 1
            elif fast:
                new, a, drafts = self._tree_step(tree, step, cache, state, n, last, drafts, out)
            elif chained:
                new, a = self._chained_tree_step(tree, step, cache, state, n, out)
            else:
                path, new, trunk, final = self._sample_step(tree, step, cfg, gen, state, cache, n, last, out)
                heads.commit(bb, state, trunk, final, device_ids([new], dev), n)
                a = path.numel()
            n += a
            last = new[-1]
            out.steps += 1
            out.step_tokens += len(new)
            if self._emit(out, new, eos, cfg, max_new, on_tokens):
                break
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out.decode_s = time.perf_counter() - t0
        return self._finish(out)

    def _drafts(self, state, ranks: int) -> list[list[int]]:
        """Each parallel head's top candidates after the last committed position."""
        return [lg.topk(ranks).indices.tolist() for lg in self.heads.draft(self.bb, state, lambda k, lg: 0)]

    def _tree_step(self, tree: Tree, step: Step, cache, state, n, last, drafts, out):
        """Greedy step with parallel heads: verify the tree built from `drafts` (per head, its
        top-R tokens), keep the longest matching path, and draft again at its end.

        With drafts computed inside the step, one device-to-host copy per step carries the
        backbone's argmax and the heads' candidates at every node. Returns (new tokens,
        accepted tree nodes, next drafts)."""
        N, R, K = tree.n, tree.max_rank, len(drafts)
        tokens = [last] + [drafts[tree.depths[i] - 1][tree.ranks[i]] for i in range(1, N)]
        trunk, final, target, top = step(tokens, n)
        if top is not None:
            host = top.tolist()
            target, top = host[:N], host[N:]
        else:
            target = target.tolist()
        path, new = tree.accept(tokens, target)
        best = path[-1]
        _count(out, tree, new)
        if top is None:
            self._commit_path(cache, state, n, path, new, trunk, final)
            return new, len(path), self._drafts(state, R)
        if best != len(path) - 1:  # the path's nodes are not already the first slots
            idx = device_ids(path, cache.k.device)
            cache.keep(n, idx)
            self.heads.keep(state, n, idx)  # the heads cached the whole tree too
        return new, len(path), [[top[(k * N + best) * R + r] for r in range(R)] for k in range(K)]

    def _commit_path(self, cache, state, n, path, new, trunk, final):
        """Compact the accepted path's KV entries to the first slots and feed it to the heads."""
        both = device_ids(path + new, cache.k.device)  # one copy for the path and its tokens
        idx, toks = both[:len(path)], both[len(path):]
        if path[-1] != len(path) - 1:  # the path's nodes are not already the first slots
            cache.keep(n, idx)
        self.heads.commit(self.bb, state, trunk[:, idx], final[:, idx], toks[None], n)

    def _chained_tree_step(self, tree: Tree, step: Step, cache, state, n, out):
        """Greedy step with chained heads (deepseek-mtp): draft the tree through the chain (its root
        is the last known token, which the heads' state holds), verify it, keep the longest
        matching path and commit it. Returns (new tokens, accepted nodes)."""
        tokens = self.heads.draft_tree(self.bb, state, tree)  # on the device: no copy to the host yet
        trunk, final, target, _ = step(tokens, n)
        host = torch.cat([tokens, target]).tolist()  # one copy for the drafts and the argmax
        path, new = tree.accept(host[:tree.n], host[tree.n:])
        _count(out, tree, new)
        self._commit_path(cache, state, n, path, new, trunk, final)
        return new, len(path)

    def _finish(self, out):
        if self.bb.tokenizer is not None:
            out.text = self.bb.tokenizer.decode(out.ids, skip_special_tokens=True)
        return out

    def _choose(self, logits, cfg, gen) -> int:
        if cfg.temperature == 0:
            return int(logits.argmax().item())
        return int(torch.multinomial(warp(logits, cfg.temperature, cfg.top_p), 1, generator=gen).item())

    def _emit(self, out, new, eos, cfg, max_new, on_tokens) -> bool:
        """Append new tokens, cutting exactly where plain decoding would stop. True when done."""
        done = False
        take = []
        for t in new:
            take.append(t)
            if t in eos:
                out.stopped, done = "eos", True
                break
            if len(out.ids) + len(take) >= max_new:
                out.stopped, done = ("length" if max_new == cfg.max_new_tokens else "context"), True
                break
            if cfg.stop and self._hit_stop(out.ids + take, cfg.stop):
                out.stopped, done = "stop", True
                break
        out.ids.extend(take)
        if on_tokens and take:
            on_tokens(take)
        return done

    def _hit_stop(self, ids, stops) -> bool:
        tail = self.bb.tokenizer.decode(ids[-64:], skip_special_tokens=False)
        return any(s in tail for s in stops)

    def _sample_step(self, tree: Tree, step: Step, cfg, gen, state, cache, n, last, out):
        """Sampling: draft a chain (every family), verify it, accept by rejection sampling.

        Returns (path node indices, new tokens, trunk and final states of the path nodes)."""
        bb, heads = self.bb, self.heads
        picked = []  # (token, q) per depth

        def pick(k, logits):
            q = warp(logits, cfg.temperature, cfg.top_p)
            tok = int(torch.multinomial(q, 1, generator=gen).item())
            picked.append((tok, q))
            return tok

        head_logits = heads.draft(bb, state, pick)
        if heads.parallel:  # parallel heads ignore `pick`: draw each depth from its head
            for k, lg in enumerate(head_logits):
                pick(k, lg)
        tokens = [last] + [t for t, _ in picked[:tree.n - 1]]
        trunk, final, _, _ = step(tokens, n)
        logits = bb.logits(final[0])  # (n, V)
        new, a = [], 0
        for d in range(tree.n - 1):  # chain: node d+1 holds draft d
            p = warp(logits[d], cfg.temperature, cfg.top_p)
            ok, tok = accept_sample(p, picked[d][1], picked[d][0], gen)
            new.append(tok)
            if not ok:
                break
            a += 1
        else:
            new.append(self._choose(logits[tree.n - 1], cfg, gen))
        path = list(range(a + 1))
        _count(out, tree, new)
        path = device_ids(path, bb.device)  # a chain's path is always its first nodes: no compaction
        return path, new, trunk[:, path], final[:, path]
