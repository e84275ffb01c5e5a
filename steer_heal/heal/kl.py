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


def _chunk_stats(h_s, tgt, head_fn, h_refs, reverses, want_entropy: bool):
    ls = head_fn(h_s)
    lps = torch.log_softmax(ls, -1)
    kls = []
    for h_r, rev in zip(h_refs, reverses):
        with torch.no_grad():
            lpr = torch.log_softmax(head_fn(h_r), -1)
        if rev:  # KL(student || ref)
            kls.append((lps.exp() * (lps - lpr)).sum(-1))
        else:  # KL(ref || student)
            kls.append((lpr.exp() * (lpr - lps)).sum(-1))
    lp = lps.gather(-1, tgt[:, None])[:, 0]
    if want_entropy:
        with torch.no_grad():
            ent = -(lps.exp() * lps).sum(-1)
        return (lp, ent, *kls)
    return (lp, *kls)


def chunked_token_stats(h_student: torch.Tensor, targets: torch.Tensor, head_fn, refs=(), chunk: int = 256,
                        entropy: bool = False, use_checkpoint: bool = True):
    """Everything the losses read from one pass over the student's vocabulary logits, chunked.

    `refs` is a list of (h_ref [N, d], reverse): per row KL(student || ref) when reverse, else
    KL(ref || student) (teacher distillation). Returns (log p(target) [N], entropy [N] or None,
    [KL [N] per ref]). Only `chunk` rows of [N, vocab] logits exist at once; with `use_checkpoint`
    the backward pass recomputes a chunk's logits instead of keeping them (memory O(chunk * vocab)).
    """
    h_refs = [r[0].detach() for r in refs]
    revs = [bool(r[1]) for r in refs]
    parts = []
    for i in range(0, h_student.shape[0], chunk):
        args = (h_student[i:i + chunk], targets[i:i + chunk], head_fn, [h[i:i + chunk] for h in h_refs], revs, entropy)
        if use_checkpoint and h_student.requires_grad:
            parts.append(checkpoint(_chunk_stats, *args, use_reentrant=False))
        else:
            parts.append(_chunk_stats(*args))
    n_out = 1 + int(entropy) + len(refs)
    if not parts:
        z = h_student.new_zeros(0, dtype=torch.float32)
        cols = [z] * n_out
    else:
        cols = [torch.cat([p[j] for p in parts]) for j in range(n_out)]
    lp = cols[0]
    ent = cols[1] if entropy else None
    return lp, ent, cols[1 + int(entropy):]


def chunked_kl_and_logp(h_student: torch.Tensor, h_ref: torch.Tensor, targets: torch.Tensor, head_fn,
                        chunk: int, reverse: bool = True, use_checkpoint: bool = True):
    """Per-row KL to one reference and student log p(target) from final hidden rows [N, d]."""
    lp, _, (kl,) = chunked_token_stats(h_student, targets, head_fn, [(h_ref, reverse)], chunk,
                                       use_checkpoint=use_checkpoint)
    return kl, lp


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
