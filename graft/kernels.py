"""Triton kernels of graft's own, for the fused engine on a CUDA device; every one has a plain
torch twin that runs everywhere else, and `enabled` turns them off.

`rotary_cache`: a layer's queries and keys rotated, and its keys and values written to their
cache slots, in one launch. torch.compile makes two kernels of the same piece (the rotation, then
the cache write, a scatter it does not fuse with another output); a small model's step under CUDA
graphs is bound by its kernel count, one kernel a layer fewer."""
from __future__ import annotations

import functools

import torch

enabled = True  # benchmarks/step_cost.py --no-kernels turns them off, for the figures against


@functools.cache
def _triton():
    """The compiled kernel, or None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def rotary_cache_kernel(q, k, v, cos, sin, kv, slots, out,
                            sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sc_b, sc_t, ss_b, ss_t,
                            skv_w, skv_b, skv_h, skv_s, so_b, so_h, so_t,
                            T, H, HKV, D: tl.constexpr):
        # program (b * T + t, h): one row of D elements; h < H a query head, then HKV key heads,
        # then HKV value heads
        bt, h = tl.program_id(0), tl.program_id(1)
        b, t = bt // T, bt % T
        d = tl.arange(0, D)
        if h < H + HKV:
            c = tl.load(cos + b * sc_b + t * sc_t + d).to(tl.float32)
            s = tl.load(sin + b * ss_b + t * ss_t + d).to(tl.float32)
            if h < H:
                row = q + b * sq_b + h * sq_h + t * sq_t
            else:
                row = k + b * sk_b + (h - H) * sk_h + t * sk_t
            x = tl.load(row + d).to(tl.float32)
            swapped = tl.load(row + (d + D // 2) % D).to(tl.float32)  # the halves swapped
            y = x * c + swapped * s  # sin is signed: its first half negated
            if h < H:
                tl.store(out + b * so_b + h * so_h + t * so_t + d, y.to(out.dtype.element_ty))
            else:
                slot = tl.load(slots + t)
                tl.store(kv + b * skv_b + (h - H) * skv_h + slot * skv_s + d, y.to(kv.dtype.element_ty))
        else:
            j = h - H - HKV
            slot_v = tl.load(slots + t)
            value = tl.load(v + b * sv_b + j * sv_h + t * sv_t + d)  # a name of its own: Triton types
            tl.store(kv + skv_w + b * skv_b + j * skv_h + slot_v * skv_s + d, value.to(kv.dtype.element_ty))

    return rotary_cache_kernel


def fits(q: torch.Tensor, k, v, cos, sin, kv, slots) -> bool:
    """Whether `rotary_cache` takes these: tensors on a CUDA device, rows contiguous, a
    power-of-two head size, one slot a row."""
    D = q.shape[-1]
    return (enabled and q.is_cuda and _triton() is not None and q.dtype == k.dtype == kv.dtype and D & (D - 1) == 0
            and all(t.stride(-1) == 1 for t in (q, k, v, cos, sin, kv)) and slots.dim() == 1
            and slots.numel() == q.shape[2] and cos.shape[-1] == sin.shape[-1] == D)


def rotary_cache(q, k, v, cos, sin, kv, slots) -> torch.Tensor:
    """The rotated queries (B, H, T, D); the rotated keys and the values written to `kv` (a cache
    layer's keys and values, (2, B, H_kv, S, D)) at `slots` (T,). q, k, v: (B, H or H_kv, T, D);
    cos, sin: (B or 1, 1, T, D), sin signed (`modeling.signed_sin`). modeling._rotary_cache's
    arithmetic: products and the sum in float32, rounded once."""
    B, H, T, D = q.shape
    Hkv = k.shape[1]
    out = torch.empty((B, H, T, D), dtype=q.dtype, device=q.device)
    cos, sin = cos.expand(B, 1, T, D), sin.expand(B, 1, T, D)
    _triton()[(B * T, H + 2 * Hkv)](
        q, k, v, cos, sin, kv, slots, out,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), cos.stride(0), cos.stride(2), sin.stride(0), sin.stride(2),
        kv.stride(0), kv.stride(1), kv.stride(2), kv.stride(3), out.stride(0), out.stride(1), out.stride(2),
        T, H, Hkv, D=D)
    return out
