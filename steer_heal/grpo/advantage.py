"""What the online reward teaches: advantages from the reward components, the diagnostics that say
whether they carry anything, and the off-policy correction of the policy term. Plain tensors.

Rows come in groups of `G` consecutive rollouts of one prompt (TRL's layout). `rewards` is [N, K]:
one column per reward function, already signed and weighted (TRL's `rewards_per_func`).

    reward_norm sum       A = (R - mean_g R) / (sd_g R + 1e-4), R = sum_k r_k   (TRL's group advantage)
    reward_norm per_term  A = sum_k |w_k| z_k, z_k = r_k standardised within its group (sd 0: z = 0),
                          then scaled like TRL's (GDPO: a term with a small spread still ranks the group)

    is_correction none       -A * ratio, ratio = pi/pi.detach() = 1      (TRL at num_iterations 1)
                  truncated  -A * min(pi/mu, cap) * ratio, the weight held constant (TRL's token_truncate
                             vLLM correction: mu = the behaviour policy that sampled, here the steered one)
                  shaped     -A * f(r), r = pi/mu with gradient, f(r) = r / (r + gamma)  (LUFFY's policy
                             shaping; LUFFY takes mu = 1 for its off-policy traces, here mu is known)
"""
from __future__ import annotations

import math

import torch

REWARD_NORMS = ("sum", "per_term")
IS_CORRECTIONS = ("none", "truncated", "shaped")
EPS = 1e-4  # TRL's: advantages / (std + 1e-4)


def _groups(x: torch.Tensor, G: int) -> torch.Tensor:
    return x.reshape(-1, G, *x.shape[1:])


def centred(x: torch.Tensor, G: int) -> torch.Tensor:
    """x minus its group mean (rows in groups of G), same shape."""
    g = _groups(x.double(), G)
    return (g - g.mean(1, keepdim=True)).reshape(x.shape)


def group_sd(x: torch.Tensor, G: int) -> torch.Tensor:
    """Sample sd (n-1, as TRL's nanstd) of each row's group, repeated per row."""
    g = _groups(x.double(), G)
    sd = g.std(1, keepdim=True, unbiased=True) if G > 1 else torch.zeros_like(g[:, :1])
    return sd.expand_as(g).reshape(x.shape)


def advantage_parts(rewards: torch.Tensor, weights: list[float], G: int, norm: str = "sum") -> torch.Tensor:
    """The [N, K] columns whose row sum R the advantage centres and scales: the signed rewards under
    sum; each standardised within its group and weighed by |w| under per_term."""
    if norm not in REWARD_NORMS:
        raise ValueError(f"unknown reward_norm '{norm}'; fix: one of {', '.join(REWARD_NORMS)}")
    r = rewards.double()
    if norm == "sum":
        return r
    sd = group_sd(r, G)
    z = torch.where(sd > 1e-12, centred(r, G) / sd.clamp_min(1e-12), torch.zeros_like(r))
    return z * torch.tensor([abs(w) for w in weights], dtype=r.dtype)


def advantages(rewards: torch.Tensor, weights: list[float], G: int, norm: str = "sum", scale: bool = True):
    """Group advantages [N] from the per-function rewards [N, K] (see the module docstring)."""
    R = advantage_parts(rewards, weights, G, norm).sum(1)
    A = centred(R, G)
    if scale:
        A = A / (group_sd(R, G) + EPS)
    return A.to(rewards.dtype)


def reward_diagnostics(rewards: torch.Tensor, names: list[str], G: int,
                       parts: torch.Tensor | None = None) -> dict[str, float]:
    """Per component: batch mean and sd of its reward, and its share of the within-group variance of
    what the advantage sums (`parts`, advantage_parts; default the rewards themselves, reward_norm sum),
    cov_g(p_k, R) / var_g(R) over group-centred values, R = sum_k p_k (the shares sum to 1). Also the
    fraction of groups whose R has sd 0 (their advantage is 0)."""
    r = rewards.double()
    p = r if parts is None else parts.double()
    R = p.sum(1)
    rc, Rc = centred(p, G), centred(R, G)
    var = float((Rc * Rc).sum())
    out = {}
    for k, name in enumerate(names):
        out[f"{name}/mean"] = float(r[:, k].mean())
        out[f"{name}/sd"] = float(r[:, k].std(unbiased=False))
        out[f"{name}/share"] = float((rc[:, k] * Rc).sum()) / var if var > 0 else float("nan")
    sd = _groups(R, G).std(1, unbiased=False) if G > 1 else torch.zeros(len(R) // max(G, 1))
    out["groups_zero_sd"] = float((sd <= 1e-12).double().mean())
    return out


def dose_correlation(adv: torch.Tensor, dose: torch.Tensor, G: int) -> float:
    """Pearson correlation of advantage with dose inside groups (both centred within their group,
    then pooled); nan when no group spans two doses."""
    a, d = centred(adv.double(), G), centred(dose.double(), G)
    den = math.sqrt(float((a * a).sum()) * float((d * d).sum()))
    return float((a * d).sum()) / den if den > 0 else float("nan")


def policy_terms(lp: torch.Tensor, lp_behaviour: torch.Tensor, adv_tok: torch.Tensor, mode: str,
                 cap: float = 3.0, gamma: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token policy loss [N] and the importance ratio pi/mu [N] (detached) for flat completion
    tokens: learner log p `lp` (with gradient), behaviour log p `lp_behaviour`, advantage per token."""
    if mode not in IS_CORRECTIONS:
        raise ValueError(f"unknown is_correction '{mode}'; fix: one of {', '.join(IS_CORRECTIONS)}")
    log_r = lp - lp_behaviour.to(lp.dtype)
    ratio = torch.exp(log_r.detach())
    one = torch.exp(lp - lp.detach())  # 1 in value, d/dlp = 1: the REINFORCE term
    if mode == "none":
        return -adv_tok * one, ratio
    if mode == "truncated":
        return -adv_tok * ratio.clamp(max=cap) * one, ratio
    r = torch.exp(log_r)
    return -adv_tok * r / (r + gamma), ratio


def sequence_mean_loss(per_tok: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """TRL's loss_type grpo aggregation: token mean within each sequence, then mean over sequences."""
    s = torch.zeros(n_seq, dtype=per_tok.dtype, device=per_tok.device).index_add(0, seq, per_tok)
    n = torch.zeros(n_seq, dtype=per_tok.dtype, device=per_tok.device).index_add(0, seq, torch.ones_like(per_tok))
    return (s / n.clamp_min(1.0)).mean() if n_seq else per_tok.sum() * 0.0
