"""The optimizer of `graft train`: AdamW, with a memory-lean rule for half-precision matrices.

Medusa heads with their own LM heads hold a (V, d) copy of the unembedding per head: at a 128k
vocabulary and d = 4096, four heads are 2.1B parameters. In bfloat16 they take 4 GB; AdamW's two
float32 moments would add 17 GB. Matrices stored in a half-precision dtype therefore get:

- no first moment, and a factored second moment: exponential averages of the row and column
  means of g^2, whose outer product over their mean estimates g^2 (Adafactor, Shazeer & Stern
  2018, section 3): V + d numbers instead of V x d;
- the update g / sqrt(v), its RMS clipped to at most 1 (ibid., section 6), times the run's
  learning rate and schedule, with AdamW's decoupled weight decay;
- stochastic rounding back to bfloat16, so that updates smaller than half a bfloat16 step are
  applied in expectation instead of lost.

Every other parameter takes AdamW's update exactly (float32 moments). The matrices are worked
through in blocks of rows, so no float32 copy of a whole matrix is ever made.
"""
from __future__ import annotations

import math

import torch

BLOCK = 1 << 24  # elements of a matrix worked on at once (64 MB of float32 temporaries)
HALF = (torch.bfloat16, torch.float16)


def make_optimizer(params, lr: float, weight_decay: float, betas=(0.9, 0.95)) -> torch.optim.Optimizer:
    """torch's AdamW, or `HeadsAdamW` where some parameters are stored in a half dtype."""
    params = list(params)
    if any(p.dtype in HALF for p in params):
        return HeadsAdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay)


def adapt_state(opt: torch.optim.Optimizer) -> None:
    """Make restored per-parameter state fit the rule `opt` applies to each parameter: a run
    resumed where its LM heads' dtype resolves otherwise (a float32 checkpoint resumed on a bf16
    backbone, or the reverse) converts AdamW's second moment to its row and column means, or a
    factored one to its estimate (with a fresh first moment)."""
    factored = opt.factored if isinstance(opt, HeadsAdamW) else (lambda p: False)
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if not st:
                continue
            if factored(p) and "exp_avg_sq" in st:
                v = st["exp_avg_sq"].float()
                opt.state[p] = {"step": st["step"], "row": v.mean(1), "col": v.mean(0)}
            elif not factored(p) and "row" in st:
                v = torch.outer(st["row"], st["col"]) / st["row"].mean().clamp_min(1e-30)
                opt.state[p] = {"step": st["step"], "exp_avg": torch.zeros_like(v), "exp_avg_sq": v}


def round_into(p: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """p <- x (float32, consumed). Into bfloat16 the rounding is stochastic: x's upper 16 bits,
    rounded up with probability equal to the fraction the lower 16 bits hold."""
    if p.dtype == torch.bfloat16:
        bits = x.view(torch.int32)
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
        bits.add_(noise).bitwise_and_(-65536)  # now exactly a bfloat16
    p.copy_(x)


def _factored(p, g, st, lr, beta2, eps, wd, gen):
    rows, cols = p.shape
    st["step"] += 1
    t = int(st["step"])
    row, col = st["row"], st["col"]  # averages of g^2 over each row and each column
    block = max(1, BLOCK // cols)
    col_sum = torch.zeros_like(col)
    for r0 in range(0, rows, block):
        g2 = g[r0:r0 + block].float().square_()
        row[r0:r0 + block].lerp_(g2.mean(1), 1 - beta2)
        col_sum += g2.sum(0)
    col.lerp_(col_sum.div_(rows), 1 - beta2)
    # v_ij = row_i col_j / mean(row), bias-corrected once: both averages carry (1 - beta2^t)
    scale = 1 / (row.mean().clamp_min(1e-30) * (1 - beta2 ** t))
    col_scaled = col * scale

    def update(r0):  # computed twice a block (its RMS, then the step): no float32 copy of the matrix is held
        v = torch.outer(row[r0:r0 + block], col_scaled)
        return g[r0:r0 + block].float().div_(v.sqrt_().add_(eps))

    sq = sum(float(update(r0).square_().sum()) for r0 in range(0, rows, block))
    step = lr / max(1.0, math.sqrt(sq / p.numel()))  # RMS of the update clipped to 1
    for r0 in range(0, rows, block):
        x = p[r0:r0 + block].float().mul_(1 - lr * wd)
        round_into(p[r0:r0 + block], x.sub_(update(r0), alpha=step), gen)


def _adamw(p, g, st, lr, beta1, beta2, eps, wd, gen):
    """torch's AdamW (single-tensor path), in float32 whatever p's dtype."""
    st["step"] += 1
    t = int(st["step"])
    g = g.float()
    m, v = st["exp_avg"], st["exp_avg_sq"]
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    x = p.float() if p.dtype != torch.float32 else p
    x.mul_(1 - lr * wd)
    denom = (v.sqrt() / math.sqrt(1 - beta2 ** t)).add_(eps)
    x.addcdiv_(m, denom, value=-lr / (1 - beta1 ** t))
    if x is not p:
        round_into(p, x, gen)


class HeadsAdamW(torch.optim.Optimizer):
    """AdamW for float32 parameters; the factored, stochastically rounded rule above for
    half-precision matrices. Its state is tensors only, so graft's checkpoints save and restore
    it like AdamW's. The rounding's random bits come from the step count and the parameter's
    place, not the global random state: every process of a data-parallel run rounds its
    replica alike, and a resumed run rounds as the uninterrupted one."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @staticmethod
    def factored(p) -> bool:
        return p.dim() == 2 and p.dtype in HALF

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        gens = {}
        for gi, group in enumerate(self.param_groups):
            lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
            for pi, p in enumerate(group["params"]):
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.tensor(0.0)
                    if self.factored(p):
                        st["row"] = torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
                        st["col"] = torch.zeros(p.shape[1], dtype=torch.float32, device=p.device)
                    else:
                        st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                        st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                if p.device not in gens:
                    gens[p.device] = torch.Generator(p.device)
                gen = gens[p.device]
                gen.manual_seed((int(st["step"]) + 1) * 1_000_003 + gi * 10_007 + pi)
                if self.factored(p):
                    _factored(p, p.grad, st, lr, beta2, eps, wd, gen)
                else:
                    _adamw(p, p.grad, st, lr, beta1, beta2, eps, wd, gen)
        return loss
