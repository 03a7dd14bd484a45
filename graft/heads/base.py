"""The interface every head family implements (`Heads`), its two kinds (parallel and chained),
and the helpers the families share.

Depth k (1..K; index k-1 in lists of heads) at position i predicts token i+k+1: the backbone
itself predicts i+1.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..backbone import dense_weight
from ..config import GraftError, HeadSpec
from ..modeling import linear
from ..optim import HALF


# HeadSpec fields that only some families take (`Heads.options`), with HeadSpec's defaults
FAMILY_OPTIONS = {f.name: f.default for f in dataclasses.fields(HeadSpec)
                  if f.name in ("shared_lm_head", "lm_head_dtype", "aux_layers")}


class Heads(nn.Module):
    """What every head family implements.

    Training: `hidden(bb, trunk, final, ids)` -> K per-head representations (B, T, d), and
    `logits(bb, k, h)` -> vocabulary logits, so losses can be computed in vocabulary chunks.

    Decoding (graft.speculative): draft -> verify -> accept -> commit, one interface for all:
    - `new_state(bb, max_len)`: preallocated decoding state. Commits write into it in place, so
      that the steps captured as CUDA graphs keep reading the same memory.
    - `commit(...)`: the backbone states of newly accepted positions.
    - `draft(...)`: the tokens of a draft tree's nodes, depth by depth; a chain is a tree.

    Both take positions as Python ints (exact shapes: prefill, the eager engine) or as 0-d
    device tensors with fixed shapes (the static engines, captured in graphs).
    """

    family = ""
    half_storage: tuple[str, ...] = ()  # submodules kept in a half dtype when the rest trains in float32
    features = None  # backbone layers whose inputs the heads read as `trunk` (None: the last one's)
    min_prompt = 1  # prompt tokens needed before the heads can draft
    options: tuple[str, ...] = ()  # the HeadSpec fields of FAMILY_OPTIONS this family takes
    dynamic_trees = False  # whether the heads shape EAGLE-2's dynamic tree (`draft_dynamic`)

    @classmethod
    def check_spec(cls, spec: HeadSpec) -> None:
        """Refuse the options of other families (one line naming the option); a family with options
        of its own checks them too."""
        for name, default in FAMILY_OPTIONS.items():
            if name not in cls.options and getattr(spec, name) != default:
                raise GraftError(f"--{name.replace('_', '-')} is not an option of {cls.family} heads: leave it out")

    def __init__(self, spec: HeadSpec, bb):
        super().__init__()
        self.spec = spec
        self.num_heads = spec.num_heads
        if spec.draft_vocab:
            if spec.draft_vocab > bb.vocab_size:
                raise GraftError(f"--draft-vocab {spec.draft_vocab} exceeds the vocabulary ({bb.vocab_size} tokens)")
            # FR-Spec: the token ids drafts are scored over; training's data sets them (set_draft_vocab)
            self.register_buffer("draft_ids", torch.arange(spec.draft_vocab))
        else:
            self.draft_ids = None

    def hidden(self, bb, trunk, final, ids) -> list[torch.Tensor]:
        raise NotImplementedError

    def cast(self, dtype: torch.dtype) -> "Heads":
        """To `dtype`, but the submodules in `half_storage` are never widened: training casts the
        heads to float32 and keeps those (large unembedding copies) as they are stored."""
        keep = self.half_storage if dtype == torch.float32 else ()
        for name, child in self.named_children():
            if name not in keep:
                child.to(dtype=dtype)
        for t in list(self._parameters.values()) + list(self._buffers.values()):
            if t is not None and t.is_floating_point():
                t.data = t.data.to(dtype)
        return self

    def storage_state(self) -> dict[str, torch.Tensor]:
        """The state dict as files hold it: float32, but `half_storage` in its own dtype."""
        keep = tuple(f"{name}." for name in self.half_storage)
        return {k: v if not v.is_floating_point() or k.startswith(keep) else v.float()
                for k, v in self.state_dict().items()}

    def logits(self, bb, k: int, h: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of depth k: the product `unembed` describes."""
        x, w = self.unembed(bb, k, h)
        if w.requires_grad and torch.is_grad_enabled() and w.dtype in HALF:
            return AccumulatingLinear.apply(x.to(w.dtype), w).float()  # a trained half-precision unembedding
        return linear(x.to(w.dtype), w).float()

    def unembed(self, bb, k: int, h: torch.Tensor):
        """(the unembedding's input, its (V, d) weight) for depth k. Default: the backbone's
        shared final norm and unembedding."""
        return bb.final_norm(h.to(bb.dtype)), bb.lm_head.weight

    def draft_logits(self, bb, k: int, h: torch.Tensor) -> torch.Tensor:
        """What drafting scores: `logits`, or with a draft vocabulary only its N tokens (..., N)."""
        if self.draft_ids is None:
            return self.logits(bb, k, h)
        x, w = self.unembed(bb, k, h)
        if w.requires_grad and torch.is_grad_enabled():  # training the unembedding (medusa's own LM heads)
            return torch.nn.functional.linear(x.to(w.dtype), w.index_select(0, self.draft_ids)).float()
        # the subset's rows, kept while neither the weight nor the subset changes (decoding)
        key = (w.data_ptr(), w._version, self.draft_ids._version, w.dtype)
        cache = self.__dict__.setdefault("_draft_rows", {})
        if cache.get(k, (None,))[0] != key:
            cache[k] = (key, w.detach().index_select(0, self.draft_ids))
        return linear(x.to(w.dtype), cache[k][1]).float()

    def to_vocab(self, idx: torch.Tensor) -> torch.Tensor:
        """Indices into draft logits -> token ids of the whole vocabulary."""
        return idx if self.draft_ids is None else self.draft_ids[idx]

    def pick(self, choose, depth: int, logits: torch.Tensor, width: int) -> torch.Tensor:
        """`choose` over draft logits, as token ids of the whole vocabulary."""
        return self.to_vocab(choose(depth, logits, width))

    @torch.no_grad()
    def set_draft_vocab(self, counts: torch.Tensor) -> None:
        """The N most frequent tokens (counts over the vocabulary), in id order."""
        n = self.draft_ids.numel()
        self.draft_ids.copy_(counts.topk(n).indices.sort().values.to(self.draft_ids.device))

    def new_state(self, bb, max_len: int) -> dict:
        return {}

    def scratch(self, tree) -> int:
        """Cache slots past the committed length that one step over `tree` may write, in the
        backbone's cache and the heads' own: the verified nodes and the accepted path. The KV
        cache is sized by it, and attention in the fixed-shape steps reads the cache in buckets of
        an eighth of it, so it is kept tight."""
        return tree.n + tree.max_depth + 1

    def commit(self, bb, state, trunk, final, next_tokens, start, count) -> None:
        """Positions start..start+A-1 hold the accepted tokens, of which the first `count` are
        real (the rest pad to a fixed shape and may be overwritten later). trunk, final: (1, A, d)
        the backbone's states there; next_tokens (A,): the token after each position."""
        raise NotImplementedError

    def draft(self, bb, state, tree, n, choose) -> torch.Tensor:
        """(N,) tokens of `tree`'s nodes on the device (node 0 left for the caller: the root, the
        last known token, at position n). `choose(d, logits (B, V), R) -> (B, R)` picks each row's
        candidates (greedy: the top R; sampling: a chain, one draw per row, rows in order): the
        rows of the B nodes of depth d-1 that have children, or (parallel families) one row per
        depth from d on."""
        raise NotImplementedError


class AccumulatingLinear(torch.autograd.Function):
    """x @ w.T whose backward adds its share of dL/dw into w.grad in place, one matmul into the
    existing buffer, instead of returning a (V, d) gradient for autograd to add: the loss runs in
    chunks, and for a trained LM head at a 128k vocabulary each chunk's temporary would be a
    whole matrix (1 GB in bfloat16). x and w share a dtype; autocast does not apply."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        with torch.autocast(x.device.type, enabled=False):
            return torch.nn.functional.linear(x, w)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        g = g.to(w.dtype)
        g2, x2 = g.reshape(-1, g.shape[-1]).t(), x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            if w.grad is None:
                w.grad = g2.mm(x2)
            else:
                w.grad.addmm_(g2, x2)
        return (g.matmul(w) if ctx.needs_input_grad[0] else None), None


class ParallelHeads(Heads):
    """Heads that draft every depth at once from the last accepted position (blockwise, medusa,
    meta-mtp): depth d's candidates are head d's, the same under every parent, so a tree is
    each depth's top-R arranged as Medusa's sparse tree (section 2.1.2)."""

    def new_state(self, bb, max_len):
        """Default: the backbone's final state at the last accepted position, which heads on top of
        it (blockwise, medusa) draft from."""
        return {"final": torch.zeros(bb.hidden_size, dtype=bb.dtype, device=bb.device)}

    def commit(self, bb, state, trunk, final, next_tokens, start, count):
        state["final"].copy_(last_row(final, count)[0, 0])

    def last_hidden(self, bb, state) -> torch.Tensor:
        """(K, d) each head's representation at the last accepted position."""
        raise NotImplementedError

    def all_logits(self, bb, h) -> torch.Tensor:
        """(K, ..., d) -> (K, ..., V)."""
        return torch.stack([self.logits(bb, k, h[k]) for k in range(self.num_heads)])

    def draft(self, bb, state, tree, n, choose):
        """Depth d's candidates are head d's whatever the parent, so one `choose` over the heads'
        rows draws every depth's at once (on a GPU a top-k over the vocabulary launches several
        kernels however many rows it has), and each node takes its depth's candidate of its rank."""
        h = self.last_hidden(bb, state)  # (K, d)
        if self.draft_ids is None:
            logits = self.all_logits(bb, h)  # (K, V)
        else:
            logits = torch.stack([self.draft_logits(bb, k, h[k]) for k in range(self.num_heads)])  # (K, N)
        width, index = tree.by_rank(logits.device)
        top = self.pick(choose, 1, logits[:tree.max_depth], width)  # (D, R)
        return torch.cat([top.new_zeros(1), top.flatten()[index]])


class ChainedHeads(Heads):
    """Heads that draft depth by depth, each depth continuing the one before (eagle,
    deepseek-mtp). A fixed tree and EAGLE-2's dynamic tree are drafted by the same two steps of
    the family's (`draft_root`, `draft_expand`); the loops over depths are here."""

    dynamic_trees = True

    def draft_root(self, bb, state, tree, n):
        """Depth 1 from the root: (its draft logits (1, V), what the root hands its children: a
        tuple of (1, ...) tensors)."""
        raise NotImplementedError

    def draft_expand(self, bb, state, tree, n, d, carry, paths):
        """Depth d for B nodes of depth d-1 at once, the tree's parents of depth-d nodes (B is
        paths' first dimension; they take tail slots tree.tail_offsets[d] ...). carry: what each
        one's parent handed on (a tuple of (B, ...) tensors); paths (B, d-1): the tokens on each
        one's path below the root, its own last. Returns (draft logits (B, V), what each hands its
        children)."""
        raise NotImplementedError

    def draft(self, bb, state, tree, n, choose):
        """A fixed tree, depth by depth: the nodes of depth d-1 with children expand at once, each
        continuing what its parent handed on, and `choose` picks their children's tokens."""
        logits, carry = self.draft_root(bb, state, tree, n)
        out = torch.zeros(tree.n, dtype=torch.long, device=logits.device)
        for lv in tree.levels(logits.device):
            if lv.depth > 1:
                carry = tuple(c[lv.up] for c in carry)
                logits, carry = self.draft_expand(bb, state, tree, n, lv.depth, carry, out[lv.lines])
            top = self.pick(choose, lv.depth, logits, lv.width)  # (B, R)
            out[lv.nodes] = top.flatten()[lv.flat]
        return out

    def draft_dynamic(self, bb, state, tree, n):
        """An EAGLE-2 tree: (tokens, parents, depths), each (N+1,) on the device, node 0 the root
        (its token left for the caller), every parent before its children.

        Depth 1 takes the root's `width` best tokens. At every further depth the `width`
        candidates of highest cumulative log-probability (the frontier) are expanded at once,
        each adding its `width` best children to the pool. The N candidates of highest
        cumulative log-probability in the pool are verified. Each depth costs a child at least
        1e-3 nats (a token of probability 0.999 or more counts as 0.999), so a child always
        scores below its parent and the N best form a tree."""
        k, D = tree.width, tree.max_depth
        logits, carry = self.draft_root(bb, state, tree, n)
        plan = tree.plan(logits.device)
        top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)
        tok, score = self.to_vocab(top.indices[0]), top.values[0].clamp(max=-1e-3)
        toks, scores, fronts = [tok], [score], [plan["first"]]  # fronts: each depth's frontier, as pool indices
        front_score, paths = score, tok[:, None]
        carry = tuple(c.expand(k, *c.shape[1:]) for c in carry)
        for d in range(2, D + 1):
            logits, carry = self.draft_expand(bb, state, tree, n, d, carry, paths)
            top = torch.log_softmax(logits, dim=-1).topk(k, dim=-1)  # (k, k): each frontier node's children
            tok = self.to_vocab(top.indices).flatten()
            score = (front_score[:, None] + top.values.clamp(max=-1e-3)).flatten()
            toks.append(tok)
            scores.append(score)
            if d == D:
                break
            best = score.topk(k).indices  # the next frontier, as rows of the k x k candidates
            rows = best.div(k, rounding_mode="floor")
            fronts.append(best + (k + (d - 2) * k * k))
            front_score = score[best]
            paths = torch.cat([paths[rows], tok[best][:, None]], dim=1)
            carry = tuple(c[rows] for c in carry)
        tok, score = torch.cat(toks), torch.cat(scores)
        parent = torch.cat(fronts + [plan["root"]])[plan["up"]]  # (P,) pool indices, the root as P
        chosen = score.topk(tree.size).indices.sort().values  # pool order: parents first
        node = torch.zeros(tree.pool + 1, dtype=torch.long, device=tok.device).index_copy_(0, chosen, plan["number"])
        zero = plan["zero"]
        return (torch.cat([zero, tok[chosen]]), torch.cat([zero, node[parent[chosen]]]),
                torch.cat([zero, plan["depth"][chosen]]))


def constant(heads: nn.Module, key, build) -> torch.Tensor:
    """A tensor that depends only on `key` (shapes, device, dtype), built once per heads object:
    mask tables and index ranges that a captured step would otherwise rebuild at every replay."""
    cache = heads.__dict__.setdefault("_constants", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def last_row(x: torch.Tensor, count) -> torch.Tensor:
    """x (1, A, ...) -> (1, 1, ...): the row of the last real position, count-1."""
    if isinstance(count, int):
        return x[:, count - 1:count]
    return x.index_select(1, (count - 1).reshape(1))


def positions(start, A: int, device) -> torch.Tensor:
    """(A,) positions start..start+A-1, for an int or a 0-d tensor start."""
    return torch.arange(A, device=device) + start


def copy_last_layer(bb, init: str) -> nn.Module:
    """A trainable full-precision layer of the backbone's own architecture.

    init="copy" copies the backbone's last decoder layer (dequantizing 4-bit weights);
    init="random" draws it with the backbone's own initializer.
    """
    src = bb.layers[-1]
    layer = type(src)(bb.config, len(bb.layers) - 1)
    if init == "random":
        layer.apply(bb.hf._init_weights)
    else:
        src_modules = dict(src.named_modules())
        with torch.no_grad():
            for name, mod in layer.named_modules():
                own = dict(mod.named_parameters(recurse=False))
                if "weight" in own:
                    mod.weight.copy_(dense_weight(src_modules[name]).view_as(mod.weight))
                if "bias" in own:
                    mod.bias.copy_(src_modules[name].bias.detach().float())
    return layer.float().train().requires_grad_(True)


def rms_eps(bb) -> float:
    return float(getattr(bb.config, "rms_norm_eps", None) or getattr(bb.config, "layer_norm_epsilon", 1e-6))
