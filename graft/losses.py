"""Self-distillation losses, computed in chunks over positions so that K x T x V float32 logits
are never held at once (with a 128k vocabulary that alone exhausts a 24 GB card).

Depth k (1..K; index k-1 in lists of heads) at position i is trained toward the backbone's
distribution at position i+k, the one for token i+k+1: the backbone itself predicts token i+1.

With a draft vocabulary (FR-Spec; EAGLE-3's `d2t`) the heads score only its N tokens, and their
target is the backbone's distribution restricted to them and renormalised: the heads' logits,
their softmax and their backward shrink by V/N, which is most of a step's cost when K heads
unembed into a large vocabulary. Agreement is still counted against the backbone's argmax over
the whole vocabulary.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RANKS = 8  # ranks tracked for the draft-tree calibration
CHUNK_LOGITS = 1 << 26  # float32 logits in one chunk by default: 256 MiB a tensor


def chunk_rows(vocab_chunk: int, vocab: int) -> int:
    """Rows of logits per loss chunk: `vocab_chunk`, or by default as many as keep one chunk's
    float32 logits within CHUNK_LOGITS (1,365 rows at a 49k vocabulary, 523 at 128k), from 256
    to 8,192 rows. The loss holds a few such tensors at once."""
    return vocab_chunk or max(256, min(8192, CHUNK_LOGITS // vocab))


def head_weights(K: int, decay: float) -> list[float]:
    w = [decay ** k for k in range(K)]
    s = sum(w)
    return [x / s for x in w]


class _SoftKL(torch.autograd.Function):
    """sum over rows of KL(p || softmax(q)), with the backbone's p fixed; with `w` (rows,) each
    row's term weighted (the alignment mask: 0 or 1, no host synchronisation to select rows).

    KL = sum_v p log p - sum_v p q + logsumexp(q) (as sum_v p = 1), and d/dq = softmax(q) - p:
    a few passes over the (rows, V) logits instead of the dozen that log_softmax, exp, the
    difference and their autograd graph take; on a GPU that memory traffic is the loss's cost.

    With `mass` (rows,) p may hold more than one: a cross-entropy term over chosen tokens added
    to the KL (HASS's top-K term, `distill_step`), sum_v p log p - sum_v p q + mass logsumexp(q),
    and d/dq = mass softmax(q) - p.
    """

    @staticmethod
    def forward(ctx, q, p, plogp, w=None, mass=None):
        qf = q.float()
        lse = torch.logsumexp(qf, dim=-1)
        ctx.save_for_backward(q, p, lse, w, mass)
        kl = plogp - torch.linalg.vecdot(p, qf) + (lse if mass is None else lse * mass)
        return (kl if w is None else kl * w).sum()

    @staticmethod
    def backward(ctx, g):
        q, p, lse, w, mass = ctx.saved_tensors
        grad = (q.float() - lse.unsqueeze(-1)).exp_()
        if mass is not None:
            grad.mul_(mass.unsqueeze(-1))
        grad = grad.sub_(p).mul_(g)
        if w is not None:
            grad.mul_(w.unsqueeze(-1))
        return grad.to(q.dtype), None, None, None, None


def distill_step(bb, heads, hs, final, ids, *, loss: str = "kl", decay: float = 0.8, chunk: int = 1024,
                 backward: bool = True, autocast=None, ranks: bool = False, align: bool = False,
                 topk: int = 0, topk_weight: float = 1.0, count: torch.Tensor | None = None) -> dict:
    """Loss over all heads; backpropagates into the heads (and anything upstream of `hs`).

    The work is chunked over target positions: per chunk the backbone's log-distribution is
    computed once and serves every head (head k reads its hidden state k+1 positions earlier).
    Statistics stay on the device until the end: one synchronisation per call.

    Args:
        hs: K head representations (B, T, d) with autograd history.
        final: the backbone's pre-norm final hidden state (B, T, d), no grad.
        ids: (B, T) tokens (for loss="ce").
        chunk: rows (batch x positions) of logits per chunk.
        ranks: also count the rank of the backbone's token among each head's top RANKS (eval).
        align: GRIFFIN's token-alignment mask: depth k's loss counts only the rows where depths
            1..k-1 of the same row drafted the backbone's token (the contexts drafting reaches;
            elsewhere the depth's draft is never verified). Losses are still divided by all of a
            depth's rows, so a depth's weight shrinks with its reach.
        topk: HASS's harmonized objective (loss="kl"): add `topk_weight` times the cross-entropy
            over the backbone's `topk` likeliest tokens, -sum over them of p log q, to each row's
            KL, so that the heads rank the few tokens a draft tree holds. 0: off.
        count: (B, T) bool, the tokens whose drafts the counts (`n`, `top1`, `top5`, `rank`) take in;
            None: every one. The loss is over every row either way.

    Returns:
        dict with `loss` (float), per-head `loss_k`, and counts `n`, `top1`, `top5`, `rank` (K x RANKS;
        top5 and rank are zero unless `ranks`).
    """
    import contextlib

    K = len(hs)
    B, T, d = final.shape
    w = head_weights(K, decay)
    ctx = autocast or contextlib.nullcontext()
    dev = final.device
    sub = heads.draft_ids  # None, or the (N,) token ids of a draft vocabulary
    with torch.no_grad():
        normed = bb.final_norm(final)
    # head k's rows: positions 0..T-k-2, targets at positions k+1..T-1
    leaves = []
    for k, h in enumerate(hs):
        own = h[:, : max(T - k - 1, 0)]
        leaves.append(own.detach().requires_grad_(backward and own.requires_grad))
    # ce: the token after target position j is ids[:, j+1]; the last position has none
    nxt = torch.cat([ids[:, 1:], ids.new_full((B, 1), -100)], dim=1)
    if sub is not None:  # token ids -> draft-vocabulary indices; tokens outside it have no target
        where = torch.full((bb.vocab_size,), -100, dtype=torch.long, device=dev)
        where[sub] = torch.arange(sub.numel(), device=dev)
        nxt = torch.where(nxt < 0, nxt, where[nxt.clamp_min(0)])
    rows = [B * max(T - k - 1, 0) for k in range(K)]
    # target position j drafts token j+1: the counts take in the positions whose next token is counted
    # (the block's last drafts a token past it, counted as the last one is)
    count = torch.ones(B, T, dtype=torch.bool, device=dev) if count is None else count
    counted = torch.cat([count[:, 1:], count[:, -1:]], dim=1).to(dev)
    n_rows = rows if loss == "kl" else [int((nxt[:, k + 1:] != -100).sum()) for k in range(K)]
    loss_k = torch.zeros(K, device=dev)
    top1 = torch.zeros(K, dtype=torch.long, device=dev)
    hits = torch.zeros(K, RANKS, dtype=torch.long, device=dev)
    step = max(1, chunk // B)
    right = torch.zeros(K, B, T, dtype=torch.bool, device=dev) if align else None  # depth k right at row r
    for c0 in range(1, T, step):  # target positions c0..c1-1
        c1 = min(c0 + step, T)
        with torch.no_grad():
            p_logits = bb.lm_head(normed[:, c0:c1]).float()
            target = p_logits.argmax(-1)
            if sub is not None:
                p_logits = p_logits.index_select(-1, sub)
            logp = F.log_softmax(p_logits, dim=-1)
            del p_logits
            mass = None
            if loss == "kl":
                p = logp.exp()
                plogp = torch.linalg.vecdot(p, logp)  # (B, c): sum_v p log p, shared by all heads
                del logp
                if topk:  # the top-K cross-entropy folded into the target: p + w p_topK, of mass 1 + w P_topK
                    top = p.topk(min(topk, p.shape[-1]), dim=-1)
                    mass = 1 + topk_weight * top.values.sum(-1)
                    p.scatter_add_(-1, top.indices, topk_weight * top.values)
        for k in range(K):
            s = k + 1
            j0 = max(c0, s)
            if j0 >= c1:
                continue
            with ctx:
                q_logits = heads.draft_logits(bb, k, leaves[k][:, j0 - s:c1 - s])
            tgt = target[:, j0 - c0:]
            # rows j0-s..c1-s-1: the shallower depths' verdicts there are in (earlier chunks, or this one)
            keep = right[:k, :, j0 - s:c1 - s].all(0) if align and k else None
            if loss == "kl":
                l_sum = _SoftKL.apply(q_logits, p[:, j0 - c0:], plogp[:, j0 - c0:],
                                      None if keep is None else keep.to(p.dtype),
                                      None if mass is None else mass[:, j0 - c0:])
            else:
                logq = F.log_softmax(q_logits.float(), dim=-1)
                tk = nxt[:, j0:c1] if keep is None else nxt[:, j0:c1].masked_fill(~keep, -100)
                l_sum = F.nll_loss(logq.flatten(0, 1), tk.flatten(), ignore_index=-100, reduction="sum")
            l_chunk = l_sum / max(n_rows[k], 1)
            if leaves[k].requires_grad:
                (l_chunk * w[k]).backward()
            with torch.no_grad():
                loss_k[k] += l_chunk.detach()
                if align:
                    right[k, :, j0 - s:c1 - s] = heads.to_vocab(q_logits.argmax(-1)) == tgt
                seen = counted[:, j0:c1]
                if ranks:
                    hit = heads.to_vocab(q_logits.topk(RANKS, dim=-1).indices) == tgt[..., None]
                    hits[k] += (hit & seen[..., None]).flatten(0, 1).sum(0)
                else:
                    top1[k] += ((heads.to_vocab(q_logits.argmax(-1)) == tgt) & seen).sum()
    used = [(h[:, :leaf.shape[1]], leaf.grad) for h, leaf in zip(hs, leaves) if leaf.grad is not None]
    if used:
        torch.autograd.backward([u for u, _ in used], [g for _, g in used])
    if ranks:
        top1 = hits[:, 0]
    loss_k = loss_k.tolist()
    rank = hits.tolist()
    return {"loss": sum(wk * lk for wk, lk in zip(w, loss_k)), "loss_k": loss_k,
            "n": [int(counted[:, k + 1:].sum()) for k in range(K)], "top1": top1.tolist(),
            "top5": [sum(r[:5]) for r in rank], "rank": rank}
