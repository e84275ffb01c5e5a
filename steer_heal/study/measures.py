"""What a study measures: the catalogue of measures (name, label, per-item source, statistic, direction), which
of them the tables, differences and verdicts use, the notes the report prints, and the small helpers every
analysis shares (the dose-curve interpolation, a declared expectation read against a verdict)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Measure:
    name: str
    label: str
    source: str  # the per-item list in an evaluation's `items`
    stat: str = "mean"  # mean | trait_nats
    higher_is_better: bool | None = True  # None: no direction (a distance)
    fmt: str = "{:+.3f}"


MEASURES = [
    Measure("trait_nats", "trait_mfv", "mfv_p", "trait_nats"),
    Measure("trait_nats_answering", "trait_mfv_ans", "mfv_p", "trait_nats"),
    Measure("pmass", "pmass", "mfv_pmass", fmt="{:.3f}"),
    Measure("nll_prefill", "nll_pre", "mfv_nll_prefill", higher_is_better=False, fmt="{:.2f}"),
    Measure("trait_llr_heldout", "trait_llr*", "trait_llr_heldout"),
    Measure("trait_llr_reward_ctx", "trait_llr_rw", "trait_llr_reward_ctx"),
    Measure("projection", "proj_v0", "projection"),
    Measure("incoh_ctx", "incoh_ctx", "incoh_ctx", higher_is_better=False, fmt="{:.3f}"),
    Measure("incoherence", "dist_base", "incoherence", higher_is_better=False, fmt="{:.3f}"),
    Measure("tail_nll", "tail_nll", "tail_nll", higher_is_better=False, fmt="{:.2f}"),
    Measure("repetition", "rep", "repetition", higher_is_better=False, fmt="{:.3f}"),
    Measure("coherent", "coh", "coherent", fmt="{:.2f}"),
    Measure("verbalisation", "verb", "verbalisation", higher_is_better=False, fmt="{:.2f}"),
    Measure("refusal", "refus", "refusal", higher_is_better=False, fmt="{:.2f}"),
    Measure("kl_rmse", "kl_rmse", "kl_rmse", higher_is_better=None, fmt="{:.3f}"),
    Measure("kl_mean", "kl_mean", "kl_mean", higher_is_better=None, fmt="{:.3f}"),
    Measure("cap_nll", "cap_nll", "cap_nll", higher_is_better=False, fmt="{:.3f}"),
    Measure("cap_kl", "cap_kl", "cap_kl", higher_is_better=None, fmt="{:.4f}"),
]
BY_NAME = {m.name: m for m in MEASURES}
TABLE = ["trait_nats", "trait_nats_answering", "pmass", "trait_llr_heldout", "projection", "incoh_ctx", "incoherence",
         "coherent", "repetition", "verbalisation", "kl_rmse", "cap_nll", "cap_kl"]
DIFFS = ["trait_nats", "trait_nats_answering", "pmass", "trait_llr_heldout", "incoh_ctx", "incoherence", "coherent",
         "cap_nll"]
# trait (instrument, judge) and coherence: incoh_ctx, which does not read the trait (incoherence, scored under the
# base model with the plain prompt, is kept as a distance from base)
VERDICT_MEASURES = ["trait_nats", "trait_llr_heldout", "incoh_ctx"]
# a declared question may ask any measure with a direction (e.g. a reward ablation's verbalisation or refusal)
PRIMARY_MEASURES = [m.name for m in MEASURES if m.higher_is_better is not None]
EXPECTS = ("better", "worse", "not worse")  # a declared question's expected verdict (5th element of a primary entry)


def against_expectation(expect: str, verdict: str) -> str:
    """supported | not supported | contradicted: a declared expectation read against the verdict."""
    if verdict.startswith("untestable"):
        return "untestable"
    if verdict not in ("better", "worse", "not distinguishable"):
        return "no verdict"
    if expect == "not worse":  # no margin was declared: only a 'worse' verdict contradicts it
        return "contradicted" if verdict == "worse" else "supported"
    opposite = {"better": "worse", "worse": "better"}[expect]
    return "supported" if verdict == expect else "contradicted" if verdict == opposite else "not supported"


PMASS_DROP = 0.25  # an arm whose answer-token mass falls by more than this fraction vs base is flagged
INTERVAL_NOTE = ("Intervals: 95%, carrying the seed-to-seed spread: Student's t with Satterthwaite degrees of freedom "
                 "on a seeds x items variance decomposition (steer_heal/stats.py; items paired across arms, seeds "
                 "paired when both arms ran the same seeds). Untrained arms have one (greedy) evaluation, so their "
                 "interval is over items only. No verdict about a trained arm with fewer than 3 seeds.")
MULTIPLICITY_NOTE = ("Multiplicity: the primary questions were declared in the study config before the run and are one "
                     "family (or, where a question names one, one family per name: [primary:<name>]), adjusted by "
                     "Holm's step-down rule (p_holm; a verdict needs p_holm < 0.05). Every other "
                     "line is exploratory: unadjusted, a lead for a later study, not a claim.")


# drift measures: the drift table's column -> the Record field (steer_heal/rundir.py) it reads, either driver
DRIFT_KEYS = {
    "barrier_active_frac": "barrier_active_frac", "D_mean": "D_mean", "D_rmse": "D_rmse", "D_p95": "D_p95",
    "D_max": "D_max", "coherent": "coherence", "tail_nll": "tail_nll", "repetition": "repetition",
    "incoherence": "incoherence", "trait_heldout": "trait_heldout", "kappa": "kappa", "gen_tokens": "gen_tokens",
}


def on_curve(x: float, X: list[float], Y: list[float]) -> float:
    """y on the polyline (X[k], Y[k]) taken in order (the dose order), at the first segment whose x-range holds x;
    NaN where no segment does (outside the curve: no extrapolation)."""
    if not math.isfinite(x):
        return float("nan")
    for k in range(len(X) - 1):
        a, b = X[k], X[k + 1]
        if min(a, b) <= x <= max(a, b):
            t = (x - a) / (b - a) if b != a else 0.0
            return Y[k] + t * (Y[k + 1] - Y[k])
    return float("nan")


VERDICTS = ("better", "worse", "not distinguishable")  # real verdicts (not 'no verdict', 'untestable', 'not used')


@dataclass
class ArmInfo:
    name: str
    kind: str
    control: str = ""
    placebo_of: str = ""
    target_kl: float | None = None
