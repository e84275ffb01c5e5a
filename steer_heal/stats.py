"""Intervals, p-values and verdicts for `steer-heal compare`, with the seed-to-seed spread carried.

Every measure of an arm is a statistic of per-item values (one value per held-out prompt, or one
7-vector of foundation probabilities per vignette), one row per seed:

    mean        the NaN-skipping mean over items (trait_llr, incoherence, coherent 0/1, KL, ...)
    trait_nats  tinymfv's profile (mean foundation probability over scorable vignettes), then the
                signed mean of its log over the preset's foundations (evals.mfv.trait_nats)

and the arm's value is the mean over its seeds. A trained arm's value varies with the seed (its
training run) and with the items (which prompts were drawn); an untrained arm (base, prompt, steer)
is evaluated greedily once, so only the items vary. The interval carries both:

    mean        a two-way random-effects decomposition of the seeds x items table (of the paired
                differences when both arms ran the same seeds, or when one arm is untrained):
                Var = Var(seed means) / S + (Var(item means) - MS_res / S) / n, the item part clipped
                at 0; the interval is value +- t(df) sqrt(Var), df by Satterthwaite (S-1 for the seed
                part, n-1 for the item part), so a seed-dominated difference gets Student's t at S-1.
    trait_nats  (not a mean over items) seed part: the variance of the per-seed statistic / S; item
                part: a bootstrap over items with the seeds held; the same t(df). The seed part also
                holds the within-seed item noise, so this errs wide.

A percentile bootstrap over seeds x items was used before: at 3 seeds it has 10 distinct seed draws
and shrinks the seed variance by (S-1)/S; on simulated nulls it covered 0.79 where 0.95 was asked
(tests/test_stats.py checks the coverage of this one at 3 and 5 seeds).

Verdicts: a difference whose trained side has fewer than 3 seeds gives no verdict (the line prints
the measurement). Primary questions (declared in the study config before the run) are one family,
adjusted by Holm's step-down rule; every other line is exploratory and unadjusted.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import t as student_t

from steer_heal.evals.protocol import FOUNDATIONS

B_DEFAULT = 2000
LEVEL = 0.95
MIN_SEEDS = 3  # a verdict about a trained arm needs at least this many seeds


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

    @property
    def trained(self) -> bool:
        return self.seeds is not None


def axis_weights(axis: dict) -> np.ndarray:
    w = np.zeros(len(FOUNDATIONS))
    for f, s in axis.items():
        w[FOUNDATIONS.index(f)] = s / max(len(axis), 1)
    return w


def _per_seed(v: Values, x: np.ndarray) -> np.ndarray:
    """The statistic over the items axis, per seed: [..., seeds]."""
    with np.errstate(invalid="ignore", divide="ignore"):
        if v.kind == "mean":
            return nanmean(x, -1)
        if v.kind == "trait_nats":
            prof = nanmean(x, -2)  # [..., seeds, 7]
            return np.log(np.maximum(prof, 1e-12)) @ axis_weights(v.axis)
    raise ValueError(f"unknown statistic '{v.kind}'")


def nanmean(x: np.ndarray, axis: int) -> np.ndarray:
    """Mean over `axis` of the finite entries (NaN where none is)."""
    n = np.sum(np.isfinite(x), axis=axis)
    s = np.sum(np.where(np.isfinite(x), x, 0.0), axis=axis)
    return np.where(n > 0, s / np.maximum(n, 1), np.nan)


def point(v: Values) -> float:
    return float(nanmean(_per_seed(v, v.x), -1))


@dataclass
class Interval:
    value: float
    lo: float
    hi: float
    se: float = float("nan")
    df: float = float("nan")
    n_seeds: int = 0  # seeds of the trained side (the fewest where both are trained); 0: no trained arm
    dropped: int = 0  # non-finite bootstrap replicates left out of the item part (said in the report)

    def excludes_zero(self) -> bool:
        return self.lo > 0 or self.hi < 0

    def p(self) -> float:
        """Two-sided p-value of 'the difference is 0' from the same t(df) as the interval."""
        if not (math.isfinite(self.value) and math.isfinite(self.se)):
            return float("nan")
        if self.se == 0:
            return 0.0 if self.value != 0 else 1.0
        return float(2 * student_t.sf(abs(self.value) / self.se, self.df))

    def fmt(self, f: str = "{:+.3f}") -> str:
        if not math.isfinite(self.value):
            return "-"
        if not (math.isfinite(self.lo) and math.isfinite(self.hi)):
            return f"{f.format(self.value)} [n=1]"  # one value: a measurement, not an interval
        return f"{f.format(self.value)} [{f.format(self.lo)}, {f.format(self.hi)}]"


def tq(df: float, level: float = LEVEL) -> float:
    """The two-sided `level` quantile of Student's t with `df` (not necessarily whole) degrees of freedom."""
    return float(student_t.ppf(0.5 + level / 2, df))


def _anova(x: np.ndarray) -> tuple[float, float]:
    """(Var(seed means) / S, MS_res) of a seeds x items table of a mean statistic (NaN cells skipped): the seed
    part of the grand mean's variance (seed effects plus the residual noise that moves each seed's mean) and the
    residual mean square. (0, 0) with one seed: there is nothing to estimate them from."""
    s = x.shape[0]
    if s < 2:
        return 0.0, 0.0
    ok = np.isfinite(x)
    r = nanmean(x, 1)  # seed means
    c = nanmean(x, 0)  # item means
    g = float(np.nanmean(r))
    n = float(np.mean(ok.sum(1)))  # items per seed
    res = np.where(ok & np.isfinite(c)[None, :], x - r[:, None] - c[None, :] + g, 0.0)
    ms_res = float(np.sum(res ** 2) / max((s - 1) * (n - 1), 1.0))
    return float(np.nanvar(r, ddof=1)) / s, ms_res


def _satterthwaite(terms: list[tuple[float, float]]) -> float:
    """Degrees of freedom of a sum of independent variance terms (value, its df)."""
    tot = sum(v for v, _ in terms)
    den = sum(v * v / d for v, d in terms if v > 0 and d > 0)
    return tot * tot / den if den > 0 else float("inf")


def _combine(v: Values, xa: np.ndarray, xb: np.ndarray | None, paired: bool, n_boot: int, seed: int):
    """(value, variance terms [(var, df)], dropped replicates) of stat(a) - stat(b) (b None: stat(a))."""
    sign_b = xb is not None
    value = float(nanmean(_per_seed(v, xa), -1)) - (float(nanmean(_per_seed(v, xb), -1)) if sign_b else 0.0)
    terms, dropped = [], 0
    n = xa.shape[1]
    if v.kind == "mean":
        # seed part: Var(seed means) / S (df S-1); item part: the item means' variance less the residual noise
        # the seed part already holds (df n-1). Unbiased for seeds + items + their interaction + noise.
        tables = [xa - xb] if (paired and sign_b) else [xa] + ([xb] if sign_b else [])
        cols = nanmean(tables[0], 0) - (nanmean(tables[1], 0) if len(tables) > 1 else 0.0)
        cols = cols[np.isfinite(cols)]
        k = len(cols)
        item = float(np.var(cols, ddof=1)) / k if k > 1 else float("nan")
        for x in tables:
            seed_part, ms_res = _anova(x)
            terms.append((seed_part, x.shape[0] - 1))
            item -= ms_res / (x.shape[0] * max(k, 1))
        terms.append((max(item, 0.0), k - 1))
        return value, terms, dropped
    # trait_nats: per-seed statistics for the seed part, a bootstrap over items (seeds held) for the item part
    ta = _per_seed(v, xa)
    if sign_b:
        tb = _per_seed(v, xb)
        if paired and len(ta) == len(tb):
            dd = ta - tb
            terms.append((float(np.var(dd, ddof=1)) / len(dd) if len(dd) > 1 else 0.0, len(dd) - 1))
        else:
            for t in (ta, tb):
                terms.append((float(np.var(t, ddof=1)) / len(t) if len(t) > 1 else 0.0, len(t) - 1))
    else:
        terms.append((float(np.var(ta, ddof=1)) / len(ta) if len(ta) > 1 else 0.0, len(ta) - 1))
    items = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    reps = item_replicates(v, xa, items) - (item_replicates(v, xb, items) if sign_b else 0.0)
    ok = np.isfinite(reps)
    dropped = int((~ok).sum())
    terms.append((float(np.var(reps[ok], ddof=1)) if ok.sum() > 1 else float("nan"), n - 1))
    return value, terms, dropped


def item_replicates(v: Values, x: np.ndarray, items: np.ndarray, chunk: int = 250) -> np.ndarray:
    """The arm's statistic (mean over its seeds) on each row of `items` (resampled item indices, the same for
    every seed): [n_boot]."""
    out = []
    for i in range(0, len(items), chunk):
        xs = x[:, items[i:i + chunk]]  # [seeds, chunk, items(, 7)]
        xs = np.moveaxis(xs, 1, 0)  # [chunk, seeds, items(, 7)]
        out.append(nanmean(_per_seed(v, xs), -1))
    return np.concatenate(out) if out else np.zeros(0)


def from_terms(value: float, terms, dropped: int, n_seeds: int) -> Interval:
    """A Student's t interval around `value` from variance terms [(variance, df)], Satterthwaite df."""
    var = sum(x for x, _ in terms)
    if not (math.isfinite(value) and math.isfinite(var)):
        return Interval(value, float("nan"), float("nan"), n_seeds=n_seeds, dropped=dropped)
    df = _satterthwaite(terms)
    se = math.sqrt(var)
    h = tq(df) * se if se > 0 else 0.0
    return Interval(value, value - h, value + h, se, df, n_seeds, dropped)


def interval(v: Values, n_boot: int = B_DEFAULT, seed: int = 0) -> Interval:
    """The arm's value and its 95% interval (seeds and items for a trained arm, items for an untrained one)."""
    value, terms, dropped = _combine(v, v.x, None, True, n_boot, seed)
    return from_terms(value, terms, dropped, v.n_seeds if v.trained else 0)


def paired_diff(a: Values, b: Values, n_boot: int = B_DEFAULT, seed: int = 0) -> Interval:
    """a - b with a 95% interval that carries each trained side's seed spread; items are paired (both arms
    answer the same prompts and vignettes), seeds are paired when both arms ran the same seed list."""
    if a.n_items != b.n_items:
        raise ValueError(f"paired difference over different items ({a.n_items} vs {b.n_items}); both arms must be "
                         "evaluated on the same prompts and vignettes")
    same_seeds = a.trained and b.trained and a.seeds == b.seeds
    one_untrained = not (a.trained and b.trained)
    value, terms, dropped = _combine(a, a.x, b.x, same_seeds or one_untrained, n_boot, seed)
    n = min([x.n_seeds for x in (a, b) if x.trained], default=0)
    return from_terms(value, terms, dropped, n)


def verdict(d: Interval, higher_is_better: bool = True, p_adjusted: float | None = None) -> str:
    """better | worse | not distinguishable from a difference (a - b): its interval excludes 0, or, for a primary
    question, its Holm-adjusted p is under 1 - LEVEL. A trained side with fewer than MIN_SEEDS seeds gives no
    verdict."""
    if 0 < d.n_seeds < MIN_SEEDS:
        return f"no verdict (n = {d.n_seeds} < {MIN_SEEDS} seeds)"
    sig = (p_adjusted < 1 - LEVEL) if p_adjusted is not None and math.isfinite(p_adjusted) else (
        math.isfinite(d.lo) and math.isfinite(d.hi) and d.excludes_zero())
    if not sig or not math.isfinite(d.value) or d.value == 0:
        return "not distinguishable"
    up = d.value > 0
    return "better" if up == higher_is_better else "worse"


def holm(ps: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error control, any dependence); NaN stays NaN and does not
    count toward the family size."""
    idx = [i for i, p in enumerate(ps) if math.isfinite(p)]
    m = len(idx)
    out = [float("nan")] * len(ps)
    run = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: ps[j])):
        run = max(run, min(1.0, (m - rank) * ps[i]))
        out[i] = run
    return out


def t_interval(xs: list[float]) -> Interval:
    """Mean and 95% t-interval over a few values (seeds); one value has no interval (nan bounds)."""
    n = len(xs)
    m = float(np.mean(xs))
    if n < 2:
        return Interval(m, float("nan"), float("nan"), n_seeds=n)
    se = float(np.std(xs, ddof=1)) / math.sqrt(n)
    h = tq(n - 1) * se
    return Interval(m, m - h, m + h, se, n - 1, n)


def seeds_t(a: Values, b: Values) -> Interval:
    """The simpler method beside `paired_diff`: a - b per seed (the statistic over items within each seed;
    seeds paired where both arms ran the same ones, an untrained side enters as its one value), then a t
    interval over those S numbers (df S - 1). It ignores the item spread; where it and the decomposition give
    different verdicts, the verdict is fragile."""
    ta = _per_seed(a, a.x)
    tb = _per_seed(b, b.x)
    if a.trained and b.trained:
        if a.seeds == b.seeds:
            dd = ta - tb
        else:  # unpaired seeds: Welch-free fallback, each seed of a against b's mean
            dd = ta - float(nanmean(tb, -1))
    elif a.trained:
        dd = ta - float(nanmean(tb, -1))
    elif b.trained:
        dd = float(nanmean(ta, -1)) - tb
    else:
        return Interval(float(np.mean(ta) - np.mean(tb)), float("nan"), float("nan"))
    dd = [float(x) for x in np.ravel(dd) if math.isfinite(x)]
    return t_interval(dd) if dd else Interval(float("nan"), float("nan"), float("nan"))
