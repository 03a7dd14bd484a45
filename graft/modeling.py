"""A functional decoder forward over a Hugging Face model's own modules.

graft runs the backbone's layers itself, calling the layer's submodules (projections, norms,
MLP) but owning the attention call, the KV cache and the mask. Two reasons: speculative
verification needs a tree attention mask and in-place KV compaction, and the layer-call
signatures of transformers change between releases (`past_key_values` in 5.17, `cache` in
5.24), while the submodules do not. Quantized (bitsandbytes) and LoRA-wrapped (peft)
projections are ordinary callables here, so they work unchanged.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import kernels

LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")
GPT2_LIKE = ("gpt2",)
GEMMA3_LIKE = ("gemma3_text",)
SUPPORTED = LLAMA_LIKE + GPT2_LIKE + GEMMA3_LIKE
LOCAL, GLOBAL = "sliding_attention", "full_attention"  # Gemma 3's layer types


class KVCache:
    """Preallocated keys and values for `n_layers` attention layers.

    Tensors are (L, B, H_kv, S, D), `k` and `v` views of one (2, L, B, H_kv, S, D) tensor `kv`, so
    that one operation writes or moves both. The caller tracks how many positions are valid.
    `span`: the slots that attention reads where keys are written at slots given as a tensor
    (fixed shapes): the whole cache, unless a fixed-shape step narrows it to the bucket of cache
    lengths it runs in (`graft.engine.spans`), so that attention reads the live prefix.
    """

    def __init__(self, n_layers, batch, n_kv_heads, head_dim, max_len, dtype, device):
        shape = (n_layers, batch, n_kv_heads, max_len, head_dim)
        self.kv = torch.zeros((2, *shape), dtype=dtype, device=device)
        self.k, self.v = self.kv[0], self.kv[1]  # indexing, not unpacking: views an in-place write may take
        self.max_len = self.span = max_len

    def update(self, layer: int, start, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, H_kv, T, D) and return the keys and values attention should read.

        `start` an int: write at start..start+T-1 and return the entries before start+T.
        `start` a (T,) tensor of slots: write there and return the first `span` slots, so that
        every shape is fixed (CUDA graphs); the caller's mask (as wide) hides those not yet valid.
        """
        if torch.is_tensor(start):
            self.k[layer].index_copy_(2, start, k)
            self.v[layer].index_copy_(2, start, v)
            return self.read(layer)
        end = start + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache overflow: {end} > {self.max_len}")
        self.k[layer, :, :, start:end] = k
        self.v[layer, :, :, start:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def read(self, layer: int):
        """The keys and values that a fixed-shape step's attention reads: the first `span` slots."""
        return self.k[layer, :, :, :self.span], self.v[layer, :, :, :self.span]

    def keep(self, start, offsets: torch.Tensor) -> None:
        """Move entries at `start + offsets` to `start, start+1, ...` (accepted tree path).
        `start` an int or a 0-d tensor (fixed shapes: padded offsets move junk past the path)."""
        src = start + offsets
        if isinstance(start, int):
            self.kv[:, :, :, :, start:start + offsets.numel()] = self.kv[:, :, :, :, src]
            return
        dst = start + torch.arange(offsets.numel(), device=offsets.device)
        self.kv.index_copy_(4, dst, self.kv.index_select(4, src))


def device_ids(values, device) -> torch.Tensor:
    """A list of ints as a long tensor on `device`. On CUDA it goes through pinned memory without
    blocking: a plain copy from pageable memory waits for the GPU to finish all queued work."""
    t = torch.tensor(values, dtype=torch.long)
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def additive_mask(allowed: torch.Tensor, dtype) -> torch.Tensor:
    """(q, kv) boolean -> (1, 1, q, kv) additive float mask for scaled_dot_product_attention."""
    m = torch.full(allowed.shape, torch.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return m.masked_fill_(allowed, 0.0)[None, None]  # two kernels: a step builds several masks


def cache_mask(q_pos: torch.Tensor, max_len: int, dtype) -> torch.Tensor:
    """(T,) query positions whose keys sit at slot = position -> (1, 1, T, max_len) additive mask
    over a whole preallocated cache: query i sees slots 0..q_pos[i]."""
    cols = torch.arange(max_len, device=q_pos.device)
    return additive_mask(cols[None, :] <= q_pos[:, None], dtype)


def causal_allowed(q: int, start: int, device) -> torch.Tensor:
    """Query i (at absolute position start+i) may see keys 0..start+i."""
    rows = torch.arange(q, device=device)[:, None] + start
    cols = torch.arange(start + q, device=device)[None, :]
    return cols <= rows


_PLAIN_RMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm")


def norm(module, x: torch.Tensor) -> torch.Tensor:
    """Apply a decoder norm. The Llama family's RMSNorm (weight * x / rms(x)) runs as torch's own
    fused rms_norm: one kernel where the module's code runs eight in bf16 (two casts, pow, mean,
    add, rsqrt, two products), and a small model's decoding step is bound by its kernel count.
    The same arithmetic in float32 (identical there); in bf16 it rounds once instead of twice.
    Other norms, and mixed dtypes, run as the module says."""
    w = _rms_weight(module, x.dtype)
    return module(x) if w is None else F.rms_norm(x, w.shape, w, module.variance_epsilon)


def _rms_weight(module, dtype):
    """The weight of a Llama-family RMSNorm in `dtype`, which torch's rms_norm computes exactly;
    None for any other norm (or dtype), which runs as its module says."""
    w = getattr(module, "weight", None)
    return w if type(module).__name__ in _PLAIN_RMS and w is not None and w.dtype == dtype else None


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The rotary sine with its first half negated: rotate_half(x) * sin, the rotation's second
    term (transformers' apply_rotary_pos_emb), is then swap_halves(x) * signed_sin, exactly (a
    product's sign moves freely), one kernel fewer per layer."""
    s1, s2 = sin.chunk(2, dim=-1)
    return torch.cat((-s1, s2), dim=-1)


def _swap_halves(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


def _rotary(q, k, cos, sin):
    """Queries and keys (B, H, T, D) rotated in one pass: (B, H + H_kv, T, D)."""
    qk = torch.cat([q, k], dim=1)
    return qk * cos + _swap_halves(qk) * sin


def _rotary_cache(q, k, v, cos, sin, kv, slots):
    """_rotary, the rotated keys and the values written to a cache layer's `slots` (kv: its keys
    and values, (2, B, H_kv, S, D)) in the same piece, as KVCache.update does with slots, one
    write for both; returns the rotated queries."""
    qk = _rotary(q, k, cos, sin)
    H = q.shape[1]
    kv.index_copy_(3, slots, torch.stack([qk[:, H:], v]))
    return qk[:, :H]


def _add_norm(h, a, weight, eps: float):
    """The residual sum h + a, and its RMS norm (the next sublayer's input)."""
    h = h + a
    return h, F.rms_norm(h, weight.shape, weight, eps)


def _silu_gate(gate, up):
    return F.silu(gate) * up


class _Pieces:
    """The elementwise runs of a decoder layer, each compiled by torch.compile into a kernel or
    a few (`fused_pieces`): the rotary embedding of queries and keys (five operations), with the
    write of keys and values to the cache where a step gives slots (one more: they share a tensor),
    the residual sum with the next norm (two; across layers too: `split_residuals`), the gated
    activation (two). A small model's step under CUDA graphs is bound by its kernel count: on an
    H100 these pieces took a SmolLM2-shaped layer from about 20 kernels to 12.6, and one write for
    keys and values to 11.6."""

    def __init__(self, backend: str):
        opts = dict(dynamic=None, fullgraph=True, backend=backend)
        self.rotary, self.rotary_cache, self.add_norm, self.silu_gate = (
            torch.compile(f, **opts) for f in (_rotary, _rotary_cache, _add_norm, _silu_gate))


_PIECES = {}  # backend -> _Pieces, made once
_PIECE_USE = [None]  # the _Pieces in use while `fused_pieces` is on; None: plain operations


@contextmanager
def fused_pieces(backend: str = "inductor"):
    """Decoder layers run their elementwise runs compiled (`_Pieces`) while this is on: around a
    CUDA graph's warm-up and capture (the `fused` engine), where a replay runs no Python. A piece
    compiles for the first shape it meets, then once more with the shapes that changed made
    symbolic (torch.compile's automatic dynamic shapes), which serves every later row count: a
    few seconds, not a whole step's minutes, and not one compile per tree size (deepseek-mtp's
    drafting alone meets more than 64 shapes). Outside it, plain operations."""
    import torch._dynamo

    if backend not in _PIECES:
        _PIECES[backend] = _Pieces(backend)
    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    limit, before = getattr(cfg, name), _PIECE_USE[0]
    setattr(cfg, name, max(limit, 64))  # room for the variants a piece's guards may still tell apart
    _PIECE_USE[0] = _PIECES[backend]
    try:
        yield
    finally:
        _PIECE_USE[0] = before
        setattr(cfg, name, limit)


def rotary(q, k, cos, sin):
    return (_PIECE_USE[0].rotary if _PIECE_USE[0] else _rotary)(q, k, cos, sin)


def add_norm(module, h, a):
    """h + a and the norm `module` of it: one fused piece where the norm is a plain RMSNorm."""
    w = _rms_weight(module, h.dtype) if _PIECE_USE[0] and a.dtype == h.dtype else None
    if w is not None:
        return _PIECE_USE[0].add_norm(h, a, w, float(module.variance_epsilon))
    h = h + a
    return h, norm(module, h)


_DYNAMIC = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)


def attention_backends(device, static: bool):
    """Where attention shapes change from call to call (decoding without a captured step, the
    heads' drafting), leave out cuDNN's attention: it builds an execution plan for every new
    shape, which measured about a quarter of a second per step on an H200. Fixed shapes keep it."""
    if torch.device(device).type != "cuda":
        return nullcontext()
    return sdpa_kernel(list(_DYNAMIC) + ([SDPBackend.CUDNN_ATTENTION] if static else []))


def group_rows(mask: torch.Tensor, rep: int) -> torch.Tensor:
    """A (.., T, S) mask for the grouped-query layout of `_sdpa`: row r*T + t is query t of the
    r-th query head of a key head's group. A forward repeats it once for all its layers."""
    return mask.repeat(1, 1, rep, 1)


def _sdpa(q, k, v, mask, scale, causal):
    """Attention of q (B, H, T, D) over k, v (B, H_kv, S, D) -> (B, T, H * D), the input of the
    output projection. The kernels may return any memory layout (CUDA's are (B, T, H, D)), so
    the result is only ever reshaped, never viewed."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    if Hkv == H:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale)
        return o.transpose(1, 2).reshape(B, T, H * D)
    rep = H // Hkv
    if causal:  # training without a cache: keys as long as the queries; repeat them per query head
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        return o.transpose(1, 2).reshape(B, T, H * D)
    # Grouped-query attention over a cache: the `rep` query heads that share a key head become
    # rows of one (B, H_kv, rep*T, D) query, so the cache is read as it is instead of being copied
    # `rep` times per layer and step (query heads j*rep..j*rep+rep-1 share key head j).
    if mask is not None and mask.shape[-2] == T > 1:  # one row broadcasts; rep*T rows came grouped
        mask = group_rows(mask, rep)
    o = F.scaled_dot_product_attention(q.reshape(B, Hkv, rep * T, D), k, v, attn_mask=mask, scale=scale)
    return o.unflatten(2, (rep, T)).permute(0, 3, 1, 2, 4).reshape(B, T, H * D)


_FUSED = "_graft_fused"  # the module attribute that holds a _Fused (fuse_projections)


class _Fused(NamedTuple):
    """Projections laid out as one: `weight` (and `bias`) the modules' rows side by side, `sizes`
    their output widths; `params`, the modules' weights (views of it) at fusing time, by name."""
    weight: torch.Tensor
    bias: torch.Tensor | None
    sizes: list
    names: tuple
    params: list


FEW_ROWS = 16  # rows of a product that `linear` computes the CPU's way (a decoding step's tokens)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T + bias, as F.linear. On the CPU in float32 without autograd, a product of at
    most FEW_ROWS rows (a decoding step's tokens) is computed as weight @ x.T instead: with the
    weight first, MKL streams it once without repacking it, which on a 2-core AMD EPYC read
    SmolLM2's weights 1.5x (one row, padded to two) to 3x (two to four rows) faster than
    F.linear. A decoding step on a CPU is bound by that read. Elsewhere: F.linear."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or not 0 < rows <= FEW_ROWS
            or torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return F.linear(x, weight, bias)
    x2 = x.reshape(rows, x.shape[-1])
    if rows == 1:  # a one-column product takes MKL's slower matrix-vector path
        x2 = torch.cat([x2, x2])
    y = torch.mm(weight, x2.T)[:, :rows].T.contiguous()
    if bias is not None:
        y += bias
    return y.view(*x.shape[:-1], weight.shape[0])


def project(module, x: torch.Tensor) -> torch.Tensor:
    """A projection module applied to x: a plain nn.Linear through `linear`, anything else
    (quantized, LoRA-wrapped) through its own forward."""
    return linear(x, module.weight, module.bias) if type(module) is nn.Linear else module(x)


def _fuse(owner, names) -> None:
    """Lay the nn.Linear projections `names` of `owner` out as one weight (their outputs side by
    side), the modules' own weights becoming views of it: no memory is added."""
    mods = [getattr(owner, n, None) for n in names]
    if not all(type(m) is nn.Linear for m in mods) or any(len({f(m) for m in mods}) > 1 for f in (
            lambda m: m.weight.dtype, lambda m: m.weight.device, lambda m: m.bias is None, lambda m: m.in_features)):
        return  # quantized, LoRA-wrapped or mixed projections run one by one
    if any(m.weight.requires_grad for m in mods):
        return  # trainable weights stay their own tensors (a checkpoint saves them one by one)
    with torch.no_grad():
        w = torch.cat([m.weight for m in mods])
        b = None if mods[0].bias is None else torch.cat([m.bias for m in mods])
        at = 0
        for m in mods:
            rows = m.out_features
            m.weight = nn.Parameter(w[at:at + rows], requires_grad=False)
            if b is not None:
                m.bias = nn.Parameter(b[at:at + rows], requires_grad=False)
            at += rows
    setattr(owner, _FUSED, _Fused(w, b, [m.out_features for m in mods], names, [m.weight for m in mods]))


def fuse_projections(layer) -> None:
    """Fuse a frozen Llama-family layer's query, key and value projections into one matmul, and
    its MLP's gate and up projections into another: three kernels fewer per layer and step,
    which took SmolLM2's one-token step on an H200 from 2.15 to 1.89 ms (a small model's step is
    bound by its kernel count), and wider matmuls for a large one. The weights are the same
    numbers; in float32 the results agree to rounding, which the identity tests check. GPT-2
    already fuses both."""
    attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    if attn is not None and not hasattr(attn, _FUSED):
        _fuse(attn, ("q_proj", "k_proj", "v_proj"))
    if mlp is not None and hasattr(mlp, "act_fn") and not hasattr(mlp, _FUSED):
        _fuse(mlp, ("gate_proj", "up_proj"))


def _fused(owner, x: torch.Tensor):
    """The outputs of `owner`'s fused projections for x, or None where they are not fused (or
    no longer are: the module was moved or cast, so the fused weight is not where x is, or it
    was given new weights). Checks torch.compile traces without a graph break."""
    f = getattr(owner, _FUSED, None)
    if f is None or f.weight.dtype != x.dtype or f.weight.device != x.device \
            or any(getattr(owner, n).weight is not p for n, p in zip(f.names, f.params)):
        return None
    return linear(x, f.weight, f.bias).split(f.sizes, dim=-1)


def _attend(attn, x, rope, cache, cache_layer, start, mask, kv_only):
    """The attention of a Llama-family or Gemma 3 layer on its input x (B, T, d): q, k and v in
    one matmul, per-head query and key norms where the layer has them (Qwen3, Gemma 3), one
    rotary pass, the cache, attention. Returns the output projection's result, or None with
    kv_only (keys and values written, nothing else computed)."""
    B, T, _ = x.shape
    hd = attn.head_dim
    qkv = _fused(attn, x) or (project(attn.q_proj, x), project(attn.k_proj, x), project(attn.v_proj, x))
    q, k, v = (t.view(B, T, -1, hd) for t in qkv)
    v = v.transpose(1, 2)
    if hasattr(attn, "q_norm"):
        q, k = norm(attn.q_norm, q), norm(attn.k_norm, k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)  # (B, H, T, D)
    cos, sin = rope  # sin: signed_sin
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    # one rotary pass over queries and keys together: the same arithmetic per element, four
    # kernels fewer per layer (a small model's step is bound by its number of kernels)
    H = q.shape[1]
    if _PIECE_USE[0] and isinstance(cache, KVCache) and torch.is_tensor(start):  # one piece: rotate, write
        kv = cache.kv[:, cache_layer]
        if kernels.fits(q, k, v, cos, sin, kv, start):  # the same, one kernel
            q = kernels.rotary_cache(q, k, v, cos, sin, kv, start)
        else:
            q = _PIECE_USE[0].rotary_cache(q, k, v, cos, sin, kv, start)
        if kv_only:
            return None
        k, v = cache.read(cache_layer)
    else:
        qk = rotary(q, k, cos, sin)
        q, k = qk[:, :H], qk[:, H:]
        if cache is not None:
            k, v = cache.update(cache_layer, start, k, v)
            if kv_only:
                return None
    return project(attn.o_proj, _sdpa(q, k, v, mask, attn.scaling, causal=mask is None and cache is None))


def _mlp(mlp, x):
    """A gated MLP, its gate and up projections in one matmul where they are fused."""
    gate_up = _fused(mlp, x)
    if gate_up is None:
        return mlp(x)
    gate, up = gate_up
    silu = _PIECE_USE[0] and type(mlp.act_fn).__name__ in ("SiLU", "SiLUActivation")
    act = _PIECE_USE[0].silu_gate(gate, up) if silu else mlp.act_fn(gate) * up
    return project(mlp.down_proj, act)


def llama_layer(layer, h, rope, cache=None, cache_layer=0, start=0, mask=None, x=None, kv_only=False,
                split=False):
    """One Llama-family decoder layer (Llama, Mistral, Qwen2, Qwen3). h: (B, T, d), the residual
    stream; x: the attention's input if not the normalised h (EAGLE-3's wider draft layer).
    kv_only: write the keys and values to the cache and stop there (returns None), for a layer
    whose output nothing reads. split: return the residual stream and the MLP's output unsummed,
    for the next layer to add in its norm's piece (`Backbone.forward` with fused pieces)."""
    if x is None:
        x = norm(layer.input_layernorm, h)
    a = _attend(layer.self_attn, x, rope, cache, cache_layer, start, mask, kv_only)
    if a is None:
        return None
    h, x = add_norm(layer.post_attention_layernorm, h, a)
    return (h, _mlp(layer.mlp, x)) if split else h + _mlp(layer.mlp, x)


def split_residuals(layer_fn) -> bool:
    """Whether a forward should hand each layer's last residual sum to the next layer's norm
    piece: while fused pieces are on, for Llama-family layers."""
    return _PIECE_USE[0] is not None and layer_fn is llama_layer


def gpt2_layer(layer, h, rope, cache=None, cache_layer=0, start=0, mask=None, x=None, kv_only=False):
    """One GPT-2 block. Positions enter GPT-2 through the input embedding, so `rope` is unused.
    x and kv_only: as in llama_layer."""
    attn = layer.attn
    B, T, _ = h.shape
    if x is None:
        x = layer.ln_1(h)
    q, k, v = attn.c_attn(x).split(attn.split_size, dim=2)
    q, k, v = (t.view(B, T, attn.num_heads, attn.head_dim).transpose(1, 2) for t in (q, k, v))
    scale = 1.0 / math.sqrt(attn.head_dim) if attn.scale_attn_weights else 1.0
    if attn.scale_attn_by_inverse_layer_idx:
        scale /= float(attn.layer_idx + 1)
    if cache is not None:
        k, v = cache.update(cache_layer, start, k, v)
        if kv_only:
            return None
    o = _sdpa(q, k, v, mask, scale, causal=mask is None and cache is None)
    h = h + attn.c_proj(o)
    return h + layer.mlp(layer.ln_2(h))


def layer_type(layer) -> str:
    """A Gemma 3 layer's attention: local (a sliding window) or global."""
    attn = layer.self_attn
    kind = getattr(attn, "layer_type", None)
    return kind if kind in (LOCAL, GLOBAL) else (LOCAL if getattr(attn, "is_sliding", False) else GLOBAL)


def gemma3_layer(layer, h, rope, cache=None, cache_layer=0, start=0, mask=None, x=None, kv_only=False):
    """One Gemma 3 decoder layer: queries and keys normalised per head, the attention's and the
    MLP's outputs normalised again before they join the residual stream (four norms), GeGLU.
    `rope` and `mask` may be dicts by layer type (the backbone's forward: local layers rotate
    with their own base and see a sliding window), or one value that every layer takes (the
    heads' own layers). x and kv_only: as in llama_layer."""
    kind = layer_type(layer)
    rope = rope[kind] if isinstance(rope, dict) else rope
    mask = mask[kind] if isinstance(mask, dict) else mask
    if x is None:
        x = norm(layer.input_layernorm, h)
    a = _attend(layer.self_attn, x, rope, cache, cache_layer, start, mask, kv_only)
    if a is None:
        return None
    h = h + norm(layer.post_attention_layernorm, a)
    return h + norm(layer.post_feedforward_layernorm, _mlp(layer.mlp, norm(layer.pre_feedforward_layernorm, h)))


def window_mask(mask, positions: torch.Tensor, slots: int, window: int, dtype) -> torch.Tensor:
    """A local layer's mask: `mask` (None: causal over `slots` keys at positions 0..slots-1, as
    booleans), and the keys at least `window` positions behind each query hidden. A key's slot
    stands for its position: the committed prefix sits at slot = position, and tree nodes, which
    sit past it, are all within the window of every node (a tree is never as deep as a window)."""
    q = positions[0][:, None]
    cols = torch.arange(slots, device=positions.device)[None, :]
    allowed = cols > q - window
    if mask is None:  # training: a boolean mask, whatever dtype autocast computes in
        return (allowed & (cols <= q))[None, None]
    return torch.minimum(mask, additive_mask(allowed, dtype))


LAYER_FNS = {**{t: llama_layer for t in LLAMA_LIKE}, **{t: gpt2_layer for t in GPT2_LIKE},
             **{t: gemma3_layer for t in GEMMA3_LIKE}}
