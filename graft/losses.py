"""Self-distillation losses, computed in chunks over positions so that K x T x V float32 logits
are never held at once (with a 128k vocabulary that alone exhausts a 24 GB card).

Head k (0-based) at position i is trained toward the backbone's distribution at position
i+k+1, i.e. the one for token i+k+2: the backbone itself already predicts token i+1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

RANKS = 8  # ranks tracked for the draft-tree calibration


def head_weights(K: int, decay: float) -> list[float]:
    w = [decay ** k for k in range(K)]
    s = sum(w)
    return [x / s for x in w]


def distill_step(bb, heads, hs, final, ids, *, loss: str = "kl", decay: float = 0.8, chunk: int = 1024,
                 backward: bool = True, autocast=None) -> dict:
    """Loss over all heads; backpropagates into the heads (and anything upstream of `hs`).

    Args:
        hs: K head representations (B, T, d) with autograd history.
        final: the backbone's pre-norm final hidden state (B, T, d), no grad.
        ids: (B, T) tokens (for loss="ce").
        chunk: rows per chunk of logits.

    Returns:
        dict with `loss` (float), per-head `loss_k`, and counts `n`, `top1`, `top5`, `rank` (K x RANKS).
    """
    import contextlib

    K = len(hs)
    B, T, d = final.shape
    w = head_weights(K, decay)
    ctx = autocast or contextlib.nullcontext()
    stats = {"loss": 0.0, "loss_k": [0.0] * K, "n": [0] * K, "top1": [0] * K, "top5": [0] * K,
             "rank": [[0] * RANKS for _ in range(K)]}
    with torch.no_grad():
        normed = bb.norm(final)
    grads, used = [], []
    for k, h in enumerate(hs):
        s = k + 1
        if T - s <= 0:
            continue
        rows_h = h[:, : T - s].reshape(-1, d)
        leaf = rows_h.detach().requires_grad_(backward and rows_h.requires_grad)
        tgt_h = normed[:, s:].reshape(-1, d)
        # actual token i+k+2 for ce; the last row of each sequence has none
        tok = torch.cat([ids[:, s + 1:], ids.new_full((B, 1), -100)], dim=1).reshape(-1)
        n_rows = leaf.shape[0] if loss == "kl" else int((tok != -100).sum())
        total = 0.0
        for r0 in range(0, leaf.shape[0], chunk):
            r1 = min(r0 + chunk, leaf.shape[0])
            with ctx:
                q_logits = heads.logits(bb, k, leaf[r0:r1]).float()
            with torch.no_grad():
                p_logits = bb.lm_head(tgt_h[r0:r1]).float()
            logq = F.log_softmax(q_logits, dim=-1)
            if loss == "kl":
                logp = F.log_softmax(p_logits, dim=-1)
                l_sum = (logp.exp() * (logp - logq)).sum()
            else:
                l_sum = F.nll_loss(logq, tok[r0:r1], ignore_index=-100, reduction="sum")
            l_k = l_sum / max(n_rows, 1)
            if leaf.requires_grad:
                (l_k * w[k]).backward()
            total += float(l_k.detach())
            with torch.no_grad():
                target = p_logits.argmax(-1)
                top = q_logits.topk(RANKS, dim=-1).indices
                hit = top == target[:, None]
                stats["top1"][k] += int(hit[:, 0].sum())
                stats["top5"][k] += int(hit[:, :5].any(-1).sum())
                for r, c in enumerate(hit.sum(0).tolist()):
                    stats["rank"][k][r] += c
                stats["n"][k] += r1 - r0
        stats["loss_k"][k] = total
        stats["loss"] += w[k] * total
        if leaf.requires_grad:
            grads.append(leaf.grad.view_as(h[:, : T - s]))
            used.append(h[:, : T - s])
    if used:
        torch.autograd.backward(used, grads)
    return stats
