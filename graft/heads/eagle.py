"""EAGLE-3-style draft heads (Li et al. 2025, "EAGLE-3: Scaling up Inference Acceleration of Large
Language Models via Training-Time Test"; EAGLE-2 for the draft tree).

One decoder layer of the backbone's own architecture drafts autoregressively over features:
- Depth 1, at position i: the inputs of a low, a middle and a high backbone layer (`aux_layers`),
  concatenated and projected by `fc` (3d -> d), and the embedding of token t_{i+1}. The layer's
  attention reads [norm(embedding), norm(feature)] (its q/k/v projections are 2d wide, as in
  EAGLE-3's draft layer); its residual stream starts from the fused feature. Its output, through
  the backbone's final norm and unembedding, predicts t_{i+2}.
- Depth k >= 2: the layer's own previous output replaces the fused feature, with the next
  (drafted) token, one position further on; it attends to the committed positions and to its own
  earlier draft positions on the same path, through one KV cache.

Training unrolls the K depths (training-time test, EAGLE-3 section 3.2): step k at row i stands
for position i+k-1 and sees step 1's keys at rows <= i and steps 2..k at row i only, which is
exactly what it sees when drafting. Its loss is the KL to the backbone's distribution there.

The tensor names follow EAGLE-3's layout (`fc`, the decoder `layer`, `hidden_norm`), so that an
export to the serving formats is a renaming.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import GraftError
from ..modeling import additive_mask, cache_mask, KVCache, norm
from .base import ChainedHeads, constant, copy_last_layer, last_row, positions, rms_eps


def default_aux_layers(L: int) -> list[int]:
    """EAGLE-3's choice: the inputs of layers 2, L/2 and L-3; for shallow models, where those
    coincide, the embeddings, the middle and the last output (index L), so the ids stay
    distinct as the serving formats require."""
    ids = [2, L // 2, L - 3]
    return ids if len(set(ids)) == 3 and min(ids) >= 0 else sorted({0, L // 2, L})


def _widen(layer, d: int) -> None:
    """Make the attention's q, k and v projections read [embedding | feature] (2d): the feature
    half starts as the copied layer's weights, the embedding half at zero."""
    attn = getattr(layer, "self_attn", None)
    if attn is not None:  # Llama family
        for name in ("q_proj", "k_proj", "v_proj"):
            old = getattr(attn, name)
            new = nn.Linear(2 * d, old.out_features, bias=old.bias is not None)
            with torch.no_grad():
                new.weight.zero_()
                new.weight[:, d:].copy_(old.weight)
                if old.bias is not None:
                    new.bias.copy_(old.bias)
            setattr(attn, name, new)
        return
    from transformers.pytorch_utils import Conv1D  # GPT-2: one (nx, nf) projection for q, k, v

    old = layer.attn.c_attn
    new = Conv1D(old.nf, 2 * d)
    with torch.no_grad():
        new.weight.zero_()
        new.weight[d:].copy_(old.weight)
        new.bias.copy_(old.bias)
    layer.attn.c_attn = new


class _Stack:
    """A KV 'cache' for training-time test: each unrolled step appends its keys and values, and
    attention reads all steps so far (the mask says which of them each query sees)."""

    def __init__(self):
        self.k, self.v = [], []

    def update(self, layer, start, k, v):
        self.k.append(k)
        self.v.append(v)
        return torch.cat(self.k, dim=2), torch.cat(self.v, dim=2)


def ttt_mask(T: int, k: int, dtype, device) -> torch.Tensor:
    """(1, 1, T, k*T): step k's row i sees step 1's rows <= i and steps 2..k's row i."""
    rows = torch.arange(T, device=device)
    parts = [rows[None, :] <= rows[:, None]] + [rows[None, :] == rows[:, None]] * (k - 1)
    return additive_mask(torch.cat(parts, dim=1), dtype)


class EagleHeads(ChainedHeads):
    family = "eagle"
    options = ("aux_layers",)

    @classmethod
    def check_spec(cls, spec):
        super().check_spec(spec)
        if spec.head_layers != 1:
            raise GraftError("eagle drafts with one decoder layer: leave --head-layers at 1")
        aux = spec.aux_layers
        if aux is not None and (not isinstance(aux, (list, tuple)) or not aux or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in aux)):
            raise GraftError(f"--aux-layers must be non-negative layer indices, e.g. 2,15,27; got {aux!r}")

    def __init__(self, spec, bb):
        super().__init__(spec, bb)
        d, L = bb.hidden_size, len(bb.layers)
        aux = list(spec.aux_layers) if spec.aux_layers else default_aux_layers(L)
        if any(i > L for i in aux):
            raise GraftError(f"--aux-layers {','.join(map(str, aux))} names a layer past the backbone's {L}: "
                             f"use indices 0..{L}")
        self.features = tuple(aux)
        self.fc = nn.Linear(len(aux) * d, d, bias=False)
        with torch.no_grad():  # start from the highest feature alone
            self.fc.weight.zero_()
            hi = max(range(len(aux)), key=lambda j: aux[j])
            self.fc.weight[:, hi * d:(hi + 1) * d].copy_(torch.eye(d))
        self.hidden_norm = nn.RMSNorm(d, eps=rms_eps(bb))
        self.layer = copy_last_layer(bb, spec.init)
        _widen(self.layer, d)

    @property
    def _dtype(self):
        return self.fc.weight.dtype

    def _embed_norm(self):
        return getattr(self.layer, "input_layernorm", None) or self.layer.ln_1

    def _step(self, bb, h, ids, pos, cache=None, slots=None, mask=None):
        """One pass of the draft layer: h (B, T, d) its residual input, ids (B, T) the tokens."""
        e = bb.embed_tokens(ids).to(self._dtype)
        x = torch.cat([norm(self._embed_norm(), e), self.hidden_norm(h)], dim=-1)  # (B, T, 2d)
        return bb.layer_fn(self.layer, h, bb.rope(h, pos), cache=cache, start=slots, mask=mask, x=x)

    def hidden(self, bb, trunk, final, ids):
        B, T = ids.shape
        h = self.fc(trunk.to(self._dtype))
        stack, out = _Stack(), []
        for k in range(1, self.num_heads + 1):
            # token t_{i+k} at row i; rows past the end repeat the last token (they have no target)
            tok = torch.cat([ids[:, k:], ids[:, -1:].expand(B, min(k, T))], dim=1)[:, :T]
            pos = (torch.arange(T, device=ids.device) + (k - 1)).expand(B, T)
            h = self._step(bb, h, tok, pos, stack, mask=ttt_mask(T, k, self._dtype, ids.device))
            out.append(h)
        return out

    def new_state(self, bb, max_len):
        cache = KVCache(1, 1, bb.n_kv_heads, bb.head_dim, max_len, self._dtype, bb.device)
        return {"cache": cache, "g": torch.zeros(bb.hidden_size, dtype=self._dtype, device=bb.device)}

    def scratch(self, tree):
        return max(super().scratch(tree), tree.tail_size + 1)  # drafting writes its keys in the tail

    def commit(self, bb, state, trunk, final, next_tokens, start, count):
        """The draft layer runs on the accepted positions with the real features and tokens; its
        output at the last one drafts depth 1."""
        cache = state["cache"]
        pos = positions(start, trunk.shape[1], trunk.device)
        g = self._step(bb, self.fc(trunk.to(self._dtype)), next_tokens[None], pos[None], cache, pos,
                       cache_mask(pos, cache.span, self._dtype))
        state["g"].copy_(last_row(g, count)[0, 0])

    def draft_root(self, bb, state, tree, n):
        """The root's output at position n-1, and what its line sees of the tail: nothing.
        The tail: the slots from n on where the expanding nodes' keys go (`Tree.tail_offsets`).
        `seen` is an additive mask over columns: 0 stands for the committed slots, 1.. for the
        tail's, the last for those past it. Built here once per step for every depth (a depth
        then costs two small kernels besides its layer): `columns`, which column each cache
        slot reads, and `steps`, n + 0, 1, ...: the tail's slots and the depths' positions."""
        g = state["g"][None]
        cache, dev, dt, R = state["cache"], g.device, self._dtype, tree.tail_size
        seen = constant(self, ("root", dev, dt, R),
                        lambda: additive_mask(torch.arange(R + 2, device=dev)[None] == 0, dt)[0, 0])
        cols = constant(self, ("cols", dev, cache.span), lambda: torch.arange(cache.span, device=dev))
        count = constant(self, ("count", dev, R + tree.max_depth),
                         lambda: torch.arange(R + tree.max_depth, device=dev))
        state["columns"] = (cols - (n - 1)).clamp(0, R + 1)
        state["steps"] = count + n
        return self.draft_logits(bb, 0, g), (g, seen)

    def draft_expand(self, bb, state, tree, n, d, carry, paths):
        """Expanding node j runs the draft layer at position n+d-2, with its parent's output and
        its own token, writing its keys at tail slot tail_offsets[d] + j and seeing the committed
        slots and its ancestors' (EAGLE-2's tree attention)."""
        B, R, at, dt = paths.shape[0], tree.tail_size, tree.tail_offsets[d], self._dtype
        g, seen = carry
        own = constant(self, ("own", g.device, dt, R, at, B),
                       lambda: additive_mask(_marks(B, R + 2, 1 + at, g.device), dt)[0, 0])
        seen = torch.maximum(seen, own)  # its ancestors' columns, and its own
        steps = state["steps"]
        pos = steps[d - 2].expand(1, B)
        g = self._step(bb, g[None], paths[:, -1:].t(), pos, state["cache"], steps[at:at + B],
                       seen[:, state["columns"]][None, None])[0]
        return self.draft_logits(bb, d - 1, g), (g, seen)


def _marks(k: int, cols: int, first: int, device) -> torch.Tensor:
    """(k, cols) booleans, row j true at column first + j alone."""
    m = torch.zeros(k, cols, dtype=torch.bool, device=device)
    j = torch.arange(k, device=device)
    m[j, first + j] = True
    return m
