"""The steering dose, in one place: iso-KL calibration (the starting dose), walk-C (the iterative
loop lowers it until a probe batch passes the filter) and the online dose controller (per batch).
"""
from __future__ import annotations

import math

import torch

from steer_heal.engine.base import Sampling
from steer_heal.heal.kl import chunked_kl_and_logp
from steer_heal.logprobs import auto_chunk, final_hidden, lm_logits, pack
from steer_heal.models import causal_lm
from steer_heal.steering.core import Steering, SteeringVector
from steer_heal.steering.hooks import steer


@torch.no_grad()
def steered_kl(model, tok, engine, vec: SteeringVector, coeff: float, prompts: list[str], max_new_tokens: int = 24,
               q: float = 0.95) -> float:
    """q-quantile over completion tokens of KL(steered || unsteered), on a greedy steered rollout."""
    s = Steering(vec, coeff)
    ro = engine.generate(prompts, s, Sampling(max_new_tokens=max_new_tokens, temperature=0.0), logprobs=False)
    ro = [r for r in ro if r.completion_ids]
    if not ro:
        return 0.0
    device = next(model.parameters()).device
    batch = pack([r.prompt_ids for r in ro], [r.completion_ids for r in ro], tok.pad_token_id).to(device)
    b, p, tgt = batch.targets()
    with steer(model, s):
        h_s = final_hidden(model, batch.input_ids, batch.attention_mask)[b, p]
    h_u = final_hidden(model, batch.input_ids, batch.attention_mask)[b, p]
    vocab = causal_lm(model).get_output_embeddings().weight.shape[0]
    kl, _ = chunked_kl_and_logp(h_s, h_u, tgt, lambda x: lm_logits(model, x), auto_chunk(vocab))
    return float(torch.quantile(kl.float(), q))


def calibrate_coeff(model, tok, engine, vec: SteeringVector, prompts: list[str], target: float = 1.0,
                    max_new_tokens: int = 24, steps: int = 6, c0: float = 1.0, c_max: float = 1e4,
                    log=None) -> tuple[float, float]:
    """Bisection in log c for p95 KL = target. Returns (c*, its measured p95 KL)."""
    f = lambda c: steered_kl(model, tok, engine, vec, c, prompts, max_new_tokens)  # noqa: E731
    c, k = c0, f(c0)
    lo = hi = None
    while k < target and c < c_max:  # bracket from below
        lo, c = c, c * 2
        k = f(c)
    hi = c
    if lo is None:  # c0 already over target: bracket from above
        while k >= target and c > 1e-4:
            hi, c = c, c / 2
            k = f(c)
        lo = c
    best = (hi, f(hi) if hi != c else k)
    for _ in range(steps):
        mid = math.sqrt(lo * hi)
        km = f(mid)
        if log:
            log(dict(event="calibrate", coeff=mid, p95_kl=km))
        if abs(km - target) < abs(best[1] - target):
            best = (mid, km)
        lo, hi = (mid, hi) if km < target else (lo, mid)
    return best


def walk_c(pass_rate, kappa: float, kappa_min: float, target_rate: float, max_steps: int, log=None) -> float:
    """Walk-C: lower kappa by log bisection toward kappa_min until `pass_rate(kappa, step)` (the
    fraction of a probe batch the filter keeps) reaches target_rate."""
    for step in range(max_steps):
        rate = pass_rate(kappa, step)
        if log:
            log(dict(step=step, kappa=kappa, pass_rate=rate))
        if rate >= target_rate or kappa <= kappa_min * 1.0001:
            break
        kappa = max(kappa_min, math.sqrt(kappa_min * kappa))
    return kappa


class DoseController:
    """Online: lowers kappa when the batch's bad rate (incoherent or verbalising) is over the band,
    raises it slowly when under. Fed the scores the reward already computed; every rank sees the
    global rate (one all-reduce), so kappa stays identical across ranks."""

    def __init__(self, state, steer_cfg, scorer, all_sum):
        self.state, self.cfg, self.scorer, self.all_sum = state, steer_cfg, scorer, all_sum
        self.last_rate = float("nan")

    def observe(self, comp: dict) -> None:
        coherent = self.scorer.coherent(comp)
        bad = [not ok or v > self.scorer.cfg.max_verbalisation for ok, v in zip(coherent, comp["verbalisation"])]
        n_bad, n = self.all_sum([sum(bad), len(bad)])
        self.last_rate = n_bad / max(n, 1.0)
        lo, hi = self.cfg.dose_band
        k = self.state.kappa
        if self.last_rate > hi:
            k *= self.cfg.dose_down
        elif self.last_rate < lo:
            k *= self.cfg.dose_up
        self.state.kappa = min(self.cfg.kappa_max, max(self.cfg.kappa_min, k))
