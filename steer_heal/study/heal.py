"""What a trained arm kept of raw steering: its heal gain over the dose curve at equal coherence, its retention at
its realised dose, how much of steering's MFV answer pattern it carries, and the seed's questions (Q1-Q3, P)."""
from __future__ import annotations

import math
import warnings

import numpy as np

from steer_heal import stats
from steer_heal.evals.protocol import FOUNDATIONS
from steer_heal.study.analysis import Study
from steer_heal.study.measures import on_curve


def heal_gain(s: Study, arm: str, trait: str = "trait_llr_heldout") -> stats.Interval | None:
    """The arm's trait minus raw steering's trait at the arm's own coherence (interpolated on the dose curve of
    base + sweep arms; NaN outside it). Interval: seed part from the per-seed gains, item part from a bootstrap
    over items that resamples the sweep's evaluations with the arm's (the same items for all), Student's t."""
    curve = s.curve()
    if len(curve) < 2 or arm not in s.by_arm or any(s.values(a.name, m) is None for a in curve + [s.arm(arm)]
                                                     for m in (trait, s.coh)):
        return None

    def gains(items=None) -> np.ndarray:
        X = [float(s.seed_means(a.name, s.coh, items)[0]) for a in curve]
        Y = [float(s.seed_means(a.name, trait, items)[0]) for a in curve]
        xs, ys = s.seed_means(arm, s.coh, items), s.seed_means(arm, trait, items)
        return np.array([y - on_curve(x, X, Y) for x, y in zip(xs, ys)])

    # a seed whose coherence lies outside the curve has no gain: the rest carry the value and the seed part
    # (the count shows beside the line, so 2 of 3 seeds is not read as 3)
    g = gains()
    g = g[np.isfinite(g)]
    if not g.size:
        return None
    value = float(np.mean(g))
    n = s.values(arm, trait).n_items
    rng = np.random.default_rng(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a resample with every seed off the curve: NaN, dropped
        reps = np.array([np.nanmean(gains(rng.integers(0, n, n))) for _ in range(s.n_boot)])
    ok = np.isfinite(reps)
    S = len(g)
    terms = [(float(np.var(g, ddof=1)) / S if S > 1 else 0.0, S - 1),
             (float(np.var(reps[ok], ddof=1)) if ok.sum() > 1 else float("nan"), n - 1)]
    return stats.from_terms(value, terms, int((~ok).sum()), S if s.values(arm, trait).trained else 0)


def on_curve_note(s: Study, arm: str, q: str, iv: stats.Interval) -> str:
    S = len(s.by_arm.get(arm, []))
    return f" ({iv.n_seeds} of {S} seeds inside the dose curve)" if q.startswith("Q1") and iv.n_seeds < S else ""


def retention(s: Study, arm: str, measure: str = "trait_llr_heldout") -> float:
    """(arm - base) / (raw steering at the arm's realised generation dose - base): the share of raw steering's
    effect at the dose the arm generated with that the unsteered student keeps (point estimate; NaN where
    the dose lies outside the sweep or the arm recorded no dose)."""
    doses = s.doses(arm)
    curve = s.curve()
    if not doses or len(curve) < 2:
        return float("nan")
    K = [0.0] + [float(s.by_arm[a.name][0].get("kappa") or float("nan")) for a in curve[1:]]
    Y = [s.interval(a.name, measure).value for a in curve]
    at = on_curve(float(np.mean(doses)), K, Y)
    arm_v, base_v = s.interval(arm, measure).value, Y[0]
    return (arm_v - base_v) / (at - base_v) if math.isfinite(at) and at != base_v else float("nan")


def clr_shift(row: dict, base: np.ndarray) -> np.ndarray | None:
    """Per vignette, the centred log-ratio of the row's 7-way answer distribution minus the base's."""
    P = np.asarray(row.get("items", {}).get("mfv_p") or [], dtype=float)
    if P.shape != base.shape:
        return None
    clr = lambda Q: np.log(Q + 1e-12) - np.log(Q + 1e-12).mean(1, keepdims=True)  # noqa: E731
    return clr(P / P.sum(1, keepdims=True)) - clr(base / base.sum(1, keepdims=True))


def mfv_transfer(s: Study, arm: str) -> dict | None:
    """How much of raw steering's MFV answer pattern (the sweep arm nearest the arm's realised dose) a trained
    arm carries, per seed: `all`, the projection of its per-vignette shift (vs base, centred log-ratios, all 7
    foundations) on steering's; `axis`, its mean shift on the preset's foundations (signed), next to
    steering's. A student can copy the shape of the steered answers and still not move the trait's axis.
    A placebo is read against its steered arm's reference; an unsteered control without one has none."""
    a = s.arm(arm)
    doses, sweep = [d for d in s.doses(a.placebo_of or arm) if d > 0], s.sweep_arms()
    if not doses or not sweep or "base" not in s.by_arm:
        return None
    base = np.asarray(s.by_arm["base"][0].get("items", {}).get("mfv_p") or [], dtype=float)
    if base.ndim != 2 or base.shape[1] != 7:
        return None
    ks = [float(s.by_arm[x.name][0].get("kappa") or np.nan) for x in sweep]
    ref = sweep[int(np.nanargmin([abs(k - float(np.mean(doses))) for k in ks]))]
    ds = clr_shift(s.by_arm[ref.name][0], base)
    w = np.zeros(7)
    for f, sgn in s.axis.items():
        w[FOUNDATIONS.index(f)] = sgn / max(len(s.axis), 1)
    per = [d for r in s.by_arm[arm] if (d := clr_shift(r, base)) is not None]
    if ds is None or not per:
        return None
    return dict(ref=ref.name, all=stats.t_interval([float((d * ds).sum() / (ds * ds).sum()) for d in per]),
                axis=stats.t_interval([float((d @ w).mean()) for d in per]), ref_axis=float((ds @ w).mean()))


def answers(s: Study) -> list[dict]:
    """One line per steered trained arm for each of the seed's questions and the prompting baseline, each with
    its interval: Q1 heal gain over raw steering at equal coherence; Q2 incoh_ctx against the placebo; Q3 the
    held-out trait's climb from the first round / bake to the last; P trait_llr* against the persona prompt."""
    out = []
    for a in s.steered_trained():
        pl = s.placebo(a.name)
        qs = [("Q1 heals (heal gain, trait_llr* over raw steering at equal coherence)", heal_gain(s, a.name)),
              ("Q2 stays coherent (incoh_ctx vs its placebo; lower is better)",
               s.diff(a.name, pl, s.coh) if pl else None),
              ("Q3 keeps moving (held-out trait, last round / bake - first)", s.trait_climb(a.name)),
              ("P beats prompting (trait_llr* vs the persona prompt)",
               s.diff(a.name, "prompt", "trait_llr_heldout") if "prompt" in s.by_arm else None)]
        for q, iv in qs:
            if iv is not None and math.isfinite(iv.value):
                note = on_curve_note(s, a.name, q, iv)
                if iv.n_seeds == 1 and math.isfinite(iv.hi):  # one seed's interval carries the items alone
                    note += " (1 seed: items only)"
                out.append(dict(question=q.split()[0], arm=a.name, value=iv.value, lo=iv.lo, hi=iv.hi,
                                n_seeds=iv.n_seeds, line=f"{q}: {a.name} {iv.fmt()}{note}"))
    return out
