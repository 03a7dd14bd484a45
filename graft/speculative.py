"""Self-speculative decoding: the heads draft, one backbone forward verifies, the longest
agreeing prefix is kept, and the backbone's own next token after it is emitted as a bonus.

- Greedy (temperature 0): the heads draft a sparse tree of top-k candidates (Medusa, section
  2.1.2; chained families depth by depth, as EAGLE-2), verified in one forward with a tree
  attention mask. A draft is kept only where it equals the backbone's argmax, so the output is
  the backbone's greedy output.
- Sampling: a single chain, accepted by speculative rejection sampling (Leviathan et al. 2023,
  Chen et al. 2023): keep draft x ~ q with probability min(1, p(x)/q(x)), else resample from
  norm(max(0, p - q)). The output is distributed exactly as the backbone's samples.

Each step reads as its phases: commit the last accepted path (compact its KV entries, feed the
heads), draft, verify, accept (graft.engine.Step holds the first three). The KV cache is
preallocated once and the prefix is never recomputed.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from .config import MAX_TREE, GraftError
from .engine import Step, resolve_engine, room
from .fit import break_even, fit_tree
from .registry import ENGINES, TREES
from .modeling import additive_mask, attention_backends, causal_allowed, fuse_projections
from .tree import DynamicTree, Tree, accept, build_tree, chain, default_accuracies, expected_tokens

# A fitted tree is watched over the last WINDOW steps: where they yield fewer tokens than its step
# costs in plain steps, the generation goes on without drafts. Later trees are sized with what the
# drafts yielded against what the fit expected, the fit's expectation weighing PRIOR extra tokens;
# where that says no tree pays, one generation in PROBE_EVERY drafts all the same, to notice text on
# which the drafts land again.
WINDOW, PRIOR, PROBE_EVERY = 16, 4.0, 8



@dataclass
class DecodeConfig:
    """Options of `graft generate` and `GraftModel.generate`.

    max_new_tokens: stop after this many new tokens.
    temperature: 0 is greedy; > 0 samples (with top_p) by speculative rejection sampling.
    top_p: nucleus sampling threshold, as in transformers.
    seed: random seed for sampling.
    tree: at temperature 0, "auto" sizes the tree from the step cost measured on this device
        (graft.fit: the size that maximises expected tokens per millisecond, a chain, or no
        drafting where none pays; untrained heads never draft); "calibrated" the tree in
        graft.json; "chain" one path; "dynamic" (eagle, deepseek-mtp) a tree the heads shape at
        every step by cumulative draft probability (EAGLE-2). Sampling drafts a chain (trained heads).
    tree_size: nodes in the draft tree besides the root (0: as `tree` says); overrides "auto".
    draft: False runs graft's own loop without drafting (one token per forward): a baseline.
    stop: strings that end generation once the generated text contains one.
    eos: stop at the tokenizer's end-of-sequence token(s).
    engine: how the verification step runs (see graft.engine): "auto" is "graph" (CUDA graphs)
        on a CUDA device (4-bit backbones included), else "eager"; "static" fixes all shapes
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
        if not 0 <= self.temperature < float("inf"):  # also refuses nan
            raise GraftError(f"--temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:  # also refuses nan
            raise GraftError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise GraftError("--max-new-tokens must be at least 1")
        if self.tree not in TREES:
            raise GraftError(f"--tree must be one of {', '.join(TREES)}, got {self.tree!r}")
        if self.engine not in ENGINES:
            raise GraftError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if not 0 <= self.tree_size <= MAX_TREE:
            raise GraftError(f"--tree-size must be between 0 and {MAX_TREE}, got {self.tree_size}")
        self.stop = tuple(self.stop or ())
        if not all(isinstance(x, str) and x for x in self.stop):
            raise GraftError("--stop takes non-empty strings: an empty one would stop at the first token")


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
    step_lengths: list = field(default_factory=list)  # new tokens of each verification step
    draft_nodes: int = 0  # nodes of the draft tree besides the root (0: no drafting)
    tree_note: str = ""  # how the tree was chosen
    drafted_steps: int = 0  # steps that drafted (all of them, unless drafting stopped paying)

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
    engines it keeps the KV cache, the heads' state and the captured steps between generations."""

    def __init__(self, model):
        self.config = model.config  # not the model: the model holds its decoder, and a cycle through it
        # would leave the decoder's captured graphs to Python's cycle collector (`engine.no_collection`)
        self.bb = model.backbone
        self.heads = model.heads
        self.bb.fuse_projections()
        for module in self.heads.modules():  # the heads' own decoder layers, where frozen (loaded to decode)
            fuse_projections(module)
        self._pool = {}  # engine -> {"max_len", "cache", "state", "steps"} (static and graph)
        self.fitted = {}  # engine -> (candidate trees, ms per step with each): graft.fit measures a device once
        self.seen = [0.0, 0.0]  # fitted trees' draft tokens kept, and expected by the fit (`_scale`)
        self.generations = 0

    def accuracies(self) -> list:
        """Per depth and rank, the chance that a draft is the backbone's token (calibrated in
        training's evaluation; a prior for untrained heads)."""
        K = self.heads.num_heads
        return (self.config.training or {}).get("rank_accuracy") or default_accuracies(K)

    def _tree(self, cfg: DecodeConfig, engine: str = "eager") -> tuple[Tree | None, str, bool]:
        """The draft tree for `cfg` (None: no drafting), how it was chosen, and whether the fit
        chose it (`--tree auto`, greedy): such a tree is watched and stopped where it does not pay."""
        K = self.heads.num_heads
        if not cfg.draft:
            return None, "drafting off", False
        if cfg.tree == "auto" and not cfg.tree_size and not (self.config.training or {}).get("rank_accuracy"):
            return None, ("untrained heads: decoding without drafts, which would only slow it down (train the "
                          "heads with `graft train`, or force a tree with --tree calibrated or --tree-size)"), False
        if cfg.temperature > 0 or cfg.tree == "chain":
            return Tree(chain(K)), "chain", False
        if cfg.tree == "dynamic":
            if not self.heads.dynamic_trees:
                raise GraftError(f"--tree dynamic is drafted by chained heads (eagle, deepseek-mtp); "
                                 f"{self.heads.family} heads draft the calibrated tree: use --tree auto")
            width = 8  # candidates per expanded node (EAGLE-2's top-k)
            size = cfg.tree_size or min(32 if self.bb.device.type == "cuda" else 16, DynamicTree.capacity(width, K))
            return DynamicTree(size, width, K), f"dynamic, EAGLE-2, {width} candidates per node", False
        if cfg.tree_size:
            return Tree(build_tree(self.accuracies(), cfg.tree_size)), "--tree-size", False
        if cfg.tree == "auto":
            scale = self._scale()
            tree, note = fit_tree(self, engine, scale)
            if tree is None and scale < 1 and self.generations % PROBE_EVERY == 0:
                tree, note = fit_tree(self, engine)
                note = f"{note}; drafting again after generations without it, to see whether it pays"
            return tree, note, tree is not None
        if self.config.tree:
            return Tree(self.config.tree), "calibrated", False
        return Tree(build_tree(self.accuracies(), 24)), "calibrated (24 nodes)", False

    def _scale(self) -> float:
        """The drafts' extra tokens seen in decoding over those the fit expected, with PRIOR
        expected tokens of weight for the fit's own expectation (1.0 before any decoding)."""
        kept, expected = self.seen
        return (kept + PRIOR) / (expected + PRIOR)

    def step_costs(self, engine: str, trees: list, context: int, new: int) -> list[float]:
        """Milliseconds per decoding step with each tree (None: no drafting), timed over a
        generation of `new` tokens after a random prompt of `context` tokens (fewer where the
        context window or the drafts' cache room needs it): the seam graft.fit sizes trees by."""
        g = torch.Generator().manual_seed(0)
        scratch = max((self.heads.scratch(t) for t in trees if t), default=0)  # the drafts' cache room
        room_left = (self.bb.max_positions or 2 * context) - new - 2 * scratch - 1
        ids = torch.randint(0, self.bb.vocab_size, (max(min(context, room_left), 16),), generator=g).tolist()
        cfg = DecodeConfig(max_new_tokens=new, eos=False, engine=engine)
        out = []
        kept = self._pool.pop(engine, None)  # the decoder's own cache and captured steps, back afterwards
        try:
            for tree in trees:
                # each tree with a cache of the size it decodes with: attention reads the cache in
                # buckets of an eighth of it, so one grown for the largest tree would slow later steps
                self._pool.pop(engine, None)
                self._generate(ids, cfg, tree=tree)  # warm-up: cache, captured step, first-call costs
                gen = self._generate(ids, cfg, tree=tree)
                out.append(gen.decode_s / max(gen.steps, 1) * 1e3)
        finally:
            self._pool.pop(engine, None)
            if kept is not None:
                self._pool[engine] = kept
        return out

    def _buffers(self, engine: str, need: int, drafting: bool):
        """KV cache, head state and a cache of Steps for one generation of up to `need` slots."""
        bb, heads = self.bb, self.heads
        if engine == "eager":
            return bb.new_cache(need), (heads.new_state(bb, need) if drafting else None), {}
        pool = self._pool.get(engine)
        max_len = max(256, 1 << (need - 1).bit_length())
        # A cache too small is grown; one four times too large (left by a long prompt) is shrunk:
        # the fixed-shape steps read it in buckets of an eighth of it, so its size is paid at every step.
        if pool is None or not max_len <= pool["max_len"] < 4 * max_len:
            self._pool.pop(engine, None)  # free the old cache and graphs first
            pool = {"max_len": max_len, "cache": bb.new_cache(max_len), "state": None, "steps": {}}
            self._pool[engine] = pool
        if drafting and pool["state"] is None:  # commits overwrite it from position 0 on
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

    def _generate(self, prompt_ids, cfg: DecodeConfig, on_tokens=None, tree="cfg") -> Generation:
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
        note, watched = "given", False
        if tree == "cfg":
            tree, note, watched = self._tree(cfg, engine)
            self.generations += 1
        if tree is not None and P < heads.min_prompt:
            tree, note = None, "prompt too short to draft from"
        K = tree.max_depth if tree is not None else 0
        greedy = cfg.temperature == 0
        shape = tree or Tree([])  # without drafting: the root alone
        gen = torch.Generator(device=dev)
        if cfg.seed is not None:
            gen.manual_seed(cfg.seed)
        else:
            gen.seed()
        eos = self._eos_ids(cfg)
        out = Generation(prompt_ids=ids.tolist(), ids=[], accepted=[0] * K, proposed=[0] * K,
                         draft_nodes=shape.n - 1, tree_note=note)

        t0 = time.perf_counter()
        drafter = heads if tree is not None else None
        need = P + max_new + room(drafter, shape) + 1  # the step's scratch past the last new token
        cache, state, steps = self._buffers(engine, need, tree is not None)
        step = self._step(steps, engine, cache, shape, drafter, state, greedy)
        step.prepare(P, P + max_new)
        if watched and tree is not None:  # the drafts must pay for their step (not if the prompt was too short)
            window, pays = deque(maxlen=WINDOW), break_even(self, engine, tree)
            expect = expected_tokens(self.accuracies(), tree.paths) - 1
        else:
            window = None
        mask = additive_mask(causal_allowed(P, 0, dev), bb.dtype)
        trunk, final = bb.forward(ids[None], torch.arange(P, device=dev)[None], cache, 0, mask, heads.features)
        first = self._choose(bb.logits(final[0, -1]), cfg, gen)
        if tree is not None:
            heads.commit(bb, state, trunk, final, torch.cat([ids[1:], ids.new_tensor([first])]), 0, P)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out.prefill_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        n, path, new = P, [0], [first]  # n: positions in the cache; new[-1] is the next root
        if self._emit(out, new, eos, cfg, max_new, on_tokens):
            out.decode_s = time.perf_counter() - t0
            return self._finish(out)
        while True:
            # the prefill's commit above stands in for the first step's (its accepted path: the
            # prompt's last position)
            step.load(n - len(path), path, new, n)
            if out.steps:
                step.commit()
            if greedy:
                path, new = self._greedy_step(step, shape)
            else:
                path, new = self._sample_step(step, shape, cfg, gen, state, n, new[-1])
            if tree is not None:
                _count(out, tree, new)
                out.drafted_steps += 1
            n += len(path)
            out.steps += 1
            out.step_tokens += len(new)
            out.step_lengths.append(len(new))
            if self._emit(out, new, eos, cfg, max_new, on_tokens):
                break
            if window is not None:
                window.append(len(new))
                self.seen[0] += len(new) - 1
                self.seen[1] += expect
                if len(window) == WINDOW and sum(window) < pays * WINDOW:
                    # plain steps from here: the tree's step commits its last accepted path, and
                    # the plain step goes on from the root it left
                    step.load(n - len(path), path, new, n)
                    step.commit()
                    out.tree_note += (f"; drafting stopped after {out.steps} steps: the last {WINDOW} gave "
                                      f"{sum(window) / WINDOW:.2f} tokens a step, and {pays:.2f} pay for its cost")
                    tree, shape, window, path, new = None, Tree([]), None, [0], new[-1:]
                    step = self._step(steps, engine, cache, shape, None, None, greedy)
                    step.prepare(n, P + max_new)  # the plain step touches no state of the generation's
        if dev.type == "cuda":
            torch.cuda.synchronize()
        out.decode_s = time.perf_counter() - t0
        return self._finish(out)

    def _step(self, steps: dict, engine: str, cache, shape: Tree, heads, state, greedy: bool) -> Step:
        """The step over `shape` with these heads (None: no drafting), made once per cache."""
        key = (tuple(shape.paths), greedy)
        if key not in steps:
            steps[key] = Step.make(engine, self.bb, cache, shape, heads=heads, state=state, drafts=greedy)
        return steps[key]

    def _greedy_step(self, step: Step, tree: Tree):
        """Draft and verify in the step; one copy brings the node tokens and the argmax back.
        Returns (the accepted nodes, root first; the new tokens, bonus included)."""
        _, _, packed = step.verify()
        host, n = packed.tolist(), tree.n
        return accept(host[:n], host[n:2 * n], host[2 * n:] if tree.dynamic else tree.parents)

    def _sample_step(self, step: Step, tree: Tree, cfg, gen, state, n, root):
        """Sampling: draft a chain, verify it, accept by rejection sampling (drafts are drawn
        outside the captured step: the sampler's generator stays on the host's side)."""
        bb = self.bb
        if tree.n == 1:
            _, final, _ = step.verify()
            return [0], [self._choose(bb.logits(final[0, -1]), cfg, gen)]
        picked = []  # (token, q over the whole vocabulary) per depth
        ids = self.heads.draft_ids  # a draft vocabulary: q is zero outside it, which keeps sampling exact

        def sample(depth, logits, width):  # one draw per row, rows in depth order
            toks = []
            for row in logits:
                q = warp(row, cfg.temperature, cfg.top_p)
                tok = torch.multinomial(q, 1, generator=gen)
                if ids is None:
                    picked.append((int(tok.item()), q))
                else:
                    full = torch.zeros(bb.vocab_size, device=q.device).index_copy_(0, ids, q)
                    picked.append((int(ids[tok].item()), full))
                toks.append(tok)
            return torch.stack(toks)

        self.heads.draft(bb, state, tree, n, sample)
        _, final, _ = step.verify([root] + [t for t, _ in picked])
        logits = bb.logits(final[0])  # (N, V)
        new = []
        for d in range(tree.n - 1):  # chain: node d+1 holds draft d
            p = warp(logits[d], cfg.temperature, cfg.top_p)
            ok, tok = accept_sample(p, picked[d][1], picked[d][0], gen)
            new.append(tok)
            if not ok:
                break
        else:
            new.append(self._choose(logits[tree.n - 1], cfg, gen))
        return list(range(len(new))), new

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
