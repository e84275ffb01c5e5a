"""Intervals and verdicts for `steer-heal compare`: a bootstrap over seeds x eval items.

Every measure of an arm is a statistic of per-item values (one value per held-out prompt, or one
7-vector of foundation probabilities per vignette), one row per seed:

    mean        the NaN-skipping mean over items (trait_llr, incoherence, coherent 0/1, KL, ...)
    trait_nats  tinymfv's profile (mean foundation probability over scorable vignettes), then the
                signed mean of its log over the preset's foundations (evals.mfv.trait_nats)

and the arm's value is the mean over its seeds. One bootstrap replicate draws the seeds with
replacement and the items with replacement; a paired difference uses the same item draw for both
arms (they answer the same prompts and vignettes) and the same seed draw when both arms ran the same
seeds (a trained arm and its placebo). The interval is the 2.5/97.5 percentile of the replicates.
With one seed (base, prompt, steer) it is the bootstrap over items alone. With 3 seeds the seed
draw has only 10 distinct outcomes, so the seed part of an interval is rough; more seeds narrow it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from steer_heal.evals.protocol import FOUNDATIONS

B_DEFAULT = 2000
LEVEL = 0.95


@dataclass
class Values:
    """One arm's per-item values for one measure: x [seeds, items] (mean) or [seeds, items, 7]
    (trait_nats, NaN rows = unscorable); `seeds` names the seeds (None: an untrained arm)."""
    x: np.ndarray
    kind: str = "mean"  # mean | trait_nats
    axis: dict | None = None  # trait_nats: foundation -> sign
    seeds: tuple | None = None

    @property
    def n_seeds(self) -> int:
        return self.x.shape[0]

    @property
    def n_items(self) -> int:
        return self.x.shape[1]


def axis_weights(axis: dict) -> np.ndarray:
    w = np.zeros(len(FOUNDATIONS))
    for f, s in axis.items():
        w[FOUNDATIONS.index(f)] = s / max(len(axis), 1)
    return w


def _reduce(v: Values, x: np.ndarray) -> np.ndarray:
    """The statistic over the items axis (-1 for mean, -2 for trait_nats), then the mean over seeds."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if v.kind == "mean":
            per_seed = _nanmean(x, -1)
        elif v.kind == "trait_nats":
            prof = _nanmean(x, -2)  # [..., seeds, 7]
            per_seed = np.log(np.maximum(prof, 1e-12)) @ axis_weights(v.axis)
        else:
            raise ValueError(f"unknown statistic '{v.kind}'")
    return _nanmean(per_seed, -1)


def _nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    n = np.sum(np.isfinite(x), axis=axis)
    s = np.sum(np.where(np.isfinite(x), x, 0.0), axis=axis)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def point(v: Values) -> float:
    return float(_reduce(v, v.x))


def draws(rng: np.random.Generator, n_boot: int, a: Values, b: Values | None = None):
    """Index draws of one bootstrap: items (shared), seeds of a, seeds of b (shared when paired)."""
    items = rng.integers(0, a.n_items, size=(n_boot, a.n_items))
    sa = rng.integers(0, a.n_seeds, size=(n_boot, a.n_seeds))
    sb = None
    if b is not None:
        paired = a.seeds is not None and a.seeds == b.seeds
        sb = sa if paired else rng.integers(0, b.n_seeds, size=(n_boot, b.n_seeds))
    return items, sa, sb


def replicates(v: Values, items: np.ndarray, seeds: np.ndarray, chunk: int = 250) -> np.ndarray:
    """The statistic on each replicate's resampled seeds x items: [n_boot]."""
    out = []
    for i in range(0, len(items), chunk):
        it, se = items[i:i + chunk], seeds[i:i + chunk]
        x = v.x[se[:, :, None], it[:, None, :]]  # [chunk, seeds, items(, 7)]
        out.append(_reduce(v, x))
    return np.concatenate(out) if out else np.zeros(0)


@dataclass
class Interval:
    value: float
    lo: float
    hi: float

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def fmt(self, f: str = "{:+.3f}") -> str:
        if not math.isfinite(self.value):
            return "-"
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return f"{f.format(self.value)} [n=1]"  # one seed: a value, not an interval
        return f"{f.format(self.value)} [{f.format(self.lo)}, {f.format(self.hi)}]"


def _pct(r: np.ndarray, value: float) -> Interval:
    r = r[np.isfinite(r)]
    if not len(r) or not math.isfinite(value):
        return Interval(value, float("nan"), float("nan"))
    a = (1 - LEVEL) / 2
    lo, hi = np.percentile(r, [100 * a, 100 * (1 - a)])
    return Interval(value, float(lo), float(hi))


def interval(v: Values, n_boot: int = B_DEFAULT, seed: int = 0) -> Interval:
    """The arm's value and its 95% bootstrap interval."""
    items, sa, _ = draws(np.random.default_rng(seed), n_boot, v)
    return _pct(replicates(v, items, sa), point(v))


def paired_diff(a: Values, b: Values, n_boot: int = B_DEFAULT, seed: int = 0) -> Interval:
    """a - b with a 95% bootstrap interval (same item draw for both; same seed draw when paired)."""
    if a.n_items != b.n_items:
        raise ValueError(f"paired difference over different items ({a.n_items} vs {b.n_items}); both arms must be "
                         "evaluated on the same prompts and vignettes")
    items, sa, sb = draws(np.random.default_rng(seed), n_boot, a, b)
    return _pct(replicates(a, items, sa) - replicates(b, items, sb), point(a) - point(b))


def verdict(d: Interval, higher_is_better: bool = True) -> str:
    """better | worse | not distinguishable, from the interval of a difference (a - b)."""
    if not (math.isfinite(d.lo) and math.isfinite(d.hi)):
        return "not distinguishable"
    if d.lo > 0:
        return "better" if higher_is_better else "worse"
    if d.hi < 0:
        return "worse" if higher_is_better else "better"
    return "not distinguishable"


# two-sided 97.5% quantiles of Student's t by degrees of freedom (1..30); the normal's beyond
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t_interval(xs: list[float]) -> Interval:
    """Mean and 95% t-interval over a few values (seeds); one value has no interval (nan bounds)."""
    n = len(xs)
    m = float(np.mean(xs))
    if n < 2:
        return Interval(m, float("nan"), float("nan"))
    h = (_T975[n - 2] if n - 1 <= len(_T975) else 1.96) * float(np.std(xs, ddof=1)) / math.sqrt(n)
    return Interval(m, m - h, m + h)
