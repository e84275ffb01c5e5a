"""Exact full-vocabulary KL per completion position, chunked, and its per-sequence aggregation.

One implementation for the iterative heal and the online GRPO penalty.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

AGGS = ("mean", "rmse", "p95", "max")


def kl_from_logits(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row over the last dim, computed in float32."""
    lp = torch.log_softmax(logits_p.float(), -1)
    lq = torch.log_softmax(logits_q.float(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def _chunk_stats(h_s, h_r, tgt, head_fn, reverse: bool):
    ls = head_fn(h_s)
    with torch.no_grad():
        lr = head_fn(h_r)
    lps = torch.log_softmax(ls, -1)
    lpr = torch.log_softmax(lr, -1)
    if reverse:  # KL(student || ref)
        kl = (lps.exp() * (lps - lpr)).sum(-1)
    else:  # KL(ref || student)
        kl = (lpr.exp() * (lpr - lps)).sum(-1)
    return kl, lps.gather(-1, tgt[:, None])[:, 0]


def chunked_kl_and_logp(h_student: torch.Tensor, h_ref: torch.Tensor, targets: torch.Tensor, head_fn,
                        chunk: int, reverse: bool = True, use_checkpoint: bool = True):
    """Per-row KL and student log p(target) from final hidden rows [N, d].

    Only `chunk` rows of [N, vocab] logits exist at once; with `use_checkpoint` the backward pass
    recomputes a chunk's logits instead of keeping them, so memory is O(chunk * vocab) not O(N * vocab).
    """
    kls, lps = [], []
    for i in range(0, h_student.shape[0], chunk):
        args = (h_student[i:i + chunk], h_ref[i:i + chunk].detach(), targets[i:i + chunk])
        if use_checkpoint and h_student.requires_grad:
            kl, lp = checkpoint(_chunk_stats, *args, head_fn, reverse, use_reentrant=False)
        else:
            kl, lp = _chunk_stats(*args, head_fn, reverse)
        kls.append(kl)
        lps.append(lp)
    if not kls:
        z = h_student.new_zeros(0, dtype=torch.float32)
        return z, z
    return torch.cat(kls), torch.cat(lps)


def aggregate(kl: torch.Tensor, seq: torch.Tensor, n_seq: int, agg: str = "rmse", eps: float = 1e-8) -> torch.Tensor:
    """Per-sequence aggregate D of per-position KL `kl` [N] with sequence ids `seq` [N] -> [n_seq].

    rmse = sqrt(mean_t KL_t^2 + eps): eps keeps the gradient finite when every KL_t is 0 (step 0).
    """
    if agg not in AGGS:
        raise ValueError(f"unknown KL aggregate '{agg}'; fix: use one of {AGGS}")
    counts = torch.zeros(n_seq, dtype=kl.dtype, device=kl.device).index_add_(0, seq, torch.ones_like(kl)).clamp_min(1)
    if agg == "mean":
        return torch.zeros(n_seq, dtype=kl.dtype, device=kl.device).index_add_(0, seq, kl) / counts
    if agg == "rmse":
        ms = torch.zeros(n_seq, dtype=kl.dtype, device=kl.device).index_add_(0, seq, kl * kl) / counts
        return torch.sqrt(ms + eps)
    out = []
    for i in range(n_seq):
        k = kl[seq == i]
        if k.numel() == 0:
            out.append(kl.new_zeros(()))
        elif agg == "max":
            out.append(k.max())
        else:  # p95, linear interpolation (numpy's default)
            out.append(torch.quantile(k, 0.95))
    return torch.stack(out)


def barrier(D: torch.Tensor, tau: float) -> torch.Tensor:
    """relu(D - tau), per sequence."""
    return torch.relu(D - tau)
