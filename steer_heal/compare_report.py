"""The comparison's report: means with 95% intervals, paired differences against the controls,
verdicts computed from the intervals, the steering dose sweep, the frontier figure.

Reads only the rows `steer-heal compare` wrote (one per arm x seed, with the per-item values of
every measure), so it can be rebuilt, or tested, from fake rows.
"""
from __future__ import annotations

import html as H
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from steer_heal import stats
from steer_heal.evals.protocol import FOUNDATIONS
from steer_heal.presets import load_preset
from steer_heal.report import html_page
from steer_heal.rundir import write_atomic


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


# matplotlib's tab10, as hex so the HTML canvas and the PNG draw an arm in the same colour
TAB10 = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
# drift measures: (iterative round-row key, online bake-row key)
DRIFT_KEYS = {
    "barrier_active_frac": ("barrier_active_frac", "barrier_active_frac"),
    "D_mean": ("D_mean", "D_mean"), "D_rmse": ("D_rmse", "D_rmse"), "D_p95": ("D_p95", "D_p95"),
    "D_max": ("D_max", "D_max"),
    "coherent": ("coh_healed", "coherence"), "tail_nll": ("tail_nll_healed", "tail_nll"),
    "repetition": ("repetition_healed", "repetition"), "incoherence": ("incoherence_healed", "incoherence"),
    "trait_heldout": ("trait_heldout_healed", "trait_heldout"), "kappa": ("kappa", "kappa"),
    "gen_tokens": ("gen_tokens", "gen_tokens"),
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


def load_preset_axis(preset: str) -> dict:
    return load_preset(preset).foundations


@dataclass
class ArmInfo:
    name: str
    kind: str
    control: str = ""
    placebo_of: str = ""
    target_kl: float | None = None


@dataclass
class Report:
    name: str
    model: str
    preset: str
    budget: int
    arms: list  # Arm-like: name, kind, control, placebo_of
    rows: list[dict]  # one per arm x seed, with `items`
    axis: dict  # foundation -> sign
    judges: dict = field(default_factory=dict)  # measure -> AUROC on the labelled replies
    pairs: list = field(default_factory=list)
    n_boot: int = stats.B_DEFAULT
    min_auroc: float = 0.75
    primary: list = field(default_factory=list)  # [a, b, measure]: the declared family (Holm)

    def __post_init__(self):
        self.arms = [a if isinstance(a, ArmInfo) else ArmInfo(a.name, a.kind, getattr(a, "control", ""),
                                                               getattr(a, "placebo_of", "")) for a in self.arms]
        names = {a.name for a in self.arms}
        self.by_arm = {a.name: [r for r in self.rows if r["arm"] == a.name] for a in self.arms if a.name in names}
        self.by_arm = {k: v for k, v in self.by_arm.items() if v}
        self.arms = [a for a in self.arms if a.name in self.by_arm]
        for a in self.arms:
            if a.kind == "steer":
                a.target_kl = self.by_arm[a.name][0].get("target_kl")
        base = self.by_arm.get("base", [{}])[0].get("items", {})
        pm = [x for x in base.get("mfv_pmass", []) if math.isfinite(x)]
        # "the model still answers": a vignette whose digit mass is at or above the base's median
        self.pmass_floor = float(np.median(pm)) if pm else float("nan")
        self.answering = np.array(base.get("mfv_pmass", []), dtype=float) >= self.pmass_floor
        self._cache: dict = {}
        # the coherence measure of the tables and figures: incoh_ctx where the evaluations have it (older ones
        # only carry the distance from base)
        has_ctx = any("incoh_ctx" in r.get("items", {}) for r in self.rows)
        self.coh = "incoh_ctx" if has_ctx else "incoherence"

    # ------------------------------------------------------------ values and intervals
    def values(self, arm: str, measure: str) -> stats.Values | None:
        m = BY_NAME[measure]
        if m.stat == "trait_nats" and not self.axis:  # a trait with no moral-foundations axis has no MFV trait
            return None
        rs = self.by_arm.get(arm, [])
        xs = [r.get("items", {}).get(m.source) for r in rs]
        if not rs or any(x is None or len(x) == 0 for x in xs):
            return None
        x = np.array(xs, dtype=float)
        if measure == "trait_nats_answering":  # one subset for every arm, chosen on base: differences stay paired
            x = np.where(self.answering[None, :, None], x, np.nan)
        seeds = tuple(r.get("seed") for r in rs) if rs[0].get("seed") is not None else None
        return stats.Values(x, m.stat, self.axis if m.stat == "trait_nats" else None, seeds)

    def interval(self, arm: str, measure: str) -> stats.Interval | None:
        key = ("i", arm, measure)
        if key not in self._cache:
            v = self.values(arm, measure)
            self._cache[key] = None if v is None else stats.interval(v, self.n_boot)
        return self._cache[key]

    def diff(self, a: str, b: str, measure: str) -> stats.Interval | None:
        key = ("d", a, b, measure)
        if key not in self._cache:
            va, vb = self.values(a, measure), self.values(b, measure)
            self._cache[key] = None if va is None or vb is None else stats.paired_diff(va, vb, self.n_boot)
        return self._cache[key]

    def constant(self, a: str, b: str, measure: str) -> float | None:
        """The one value a measure takes on every finite item of both arms, or None: no variance, no question."""
        va, vb = self.values(a, measure), self.values(b, measure)
        if va is None or vb is None:
            return None
        x = np.concatenate([np.ravel(va.x), np.ravel(vb.x)])
        x = x[np.isfinite(x)]
        return float(x[0]) if x.size and np.all(x == x[0]) else None

    def trusted(self, measure: str) -> bool:
        a = self.judges.get(measure)
        return a is None or (isinstance(a, float) and math.isfinite(a) and a >= self.min_auroc)

    def pmass_flag(self, arm: str) -> bool:
        a, b = self.interval(arm, "pmass"), self.interval("base", "pmass")
        return bool(a and b and b.value > 0 and a.value < (1 - PMASS_DROP) * b.value)

    # ------------------------------------------------------------ who is compared with whom
    def arm(self, name: str) -> ArmInfo | None:
        return next((a for a in self.arms if a.name == name), None)

    def references(self, a: ArmInfo) -> list[tuple[str, str]]:
        """(role, arm) each arm is judged against: a trained arm against base, the persona prompt,
        prompt distillation (same kind first) and its own placebo; the prompt and steer baselines
        against base."""
        if a.kind in ("prompt", "steer"):  # the baselines themselves: do they move the trait at all?
            return [("base", "base")] if "base" in self.by_arm else []
        if a.kind not in ("iterative", "online") or a.control == "placebo":
            return []
        out = [("base", "base"), ("prompt", "prompt")]
        if a.control != "prompt_distil":
            pd = [x for x in self.arms if x.control == "prompt_distil"]
            pd = [x for x in pd if x.kind == a.kind] or pd
            if pd:
                out.append(("prompt_distil", pd[0].name))
        pl = next((x.name for x in self.arms if x.placebo_of == a.name), None)
        if pl:
            out.append(("placebo", pl))
        return [(role, n) for role, n in out if n in self.by_arm and n != a.name]

    def questions(self) -> list[tuple[str, str, str]]:
        qs = [(a.name, ref, role) for a in self.arms for role, ref in self.references(a)]
        qs += [(x, y, "pair") for x, y in self.pairs if x in self.by_arm and y in self.by_arm]
        return qs

    def verdicts(self) -> list[dict]:
        """The primary family (declared in the config; Holm-adjusted), then one exploratory line per (arm, reference,
        measure): the difference, its interval, p, and better | worse | not distinguishable. A judge under
        min_auroc is listed but gives no verdict; a trained side under 3 seeds gives none either."""
        # the family is every declared question: one not evaluated yet (or without a usable p) counts as p = 1, so
        # the adjustment never shrinks because part of the study has not run
        prim = [tuple(q[:3]) for q in self.primary]
        groups = [q[3] if len(q) > 3 else "" for q in self.primary]  # a named family: its own Holm adjustment
        roles = {(a, b): role for a, b, role in self.questions()}
        ds = [self.diff(a, b, m) if a in self.by_arm and b in self.by_arm else None for a, b, m in prim]
        ps = [d.p() if d is not None and self.trusted(m) and not 0 < d.n_seeds < stats.MIN_SEEDS else 1.0
              for d, (_, _, m) in zip(ds, prim)]
        adj = [1.0] * len(prim)
        for g in dict.fromkeys(groups):
            idx = [i for i, x in enumerate(groups) if x == g]
            for i, q in zip(idx, stats.holm([ps[i] if math.isfinite(ps[i]) else 1.0 for i in idx])):
                adj[i] = q
        # the same family by a seeds-only t test (df S-1, Holm the same way): a verdict the two methods disagree on
        # is fragile, and its line says so
        dt = [self.seed_diff(a, b, m) if d is not None else None for (a, b, m), d in zip(prim, ds)]
        pt = [x.p() if x is not None and math.isfinite(x.p()) and self.trusted(m) else 1.0
              for x, (_, _, m) in zip(dt, prim)]
        adj_t = [1.0] * len(prim)
        for g in dict.fromkeys(groups):
            idx = [i for i, x in enumerate(groups) if x == g]
            for i, q in zip(idx, stats.holm([pt[i] for i in idx])):
                adj_t[i] = q
        expects = [q[4] if len(q) > 4 else "" for q in self.primary]
        out = [self._line(a, b, roles.get((a, b), g or "primary"), m, d, "primary", p_holm, group=g, expect=x,
                          seeds_t=(t, pth))
               for (a, b, m), d, p_holm, g, x, t, pth in zip(prim, ds, adj, groups, expects, dt, adj_t)
               if d is not None]
        declared = set(prim)
        for a, b, role in self.questions():
            for m in VERDICT_MEASURES:
                d = self.diff(a, b, m)
                if d is not None and (a, b, m) not in declared:
                    out.append(self._line(a, b, role, m, d, "exploratory"))
        return out

    def seed_diff(self, a: str, b: str, measure: str) -> stats.Interval | None:
        va, vb = self.values(a, measure), self.values(b, measure)
        return None if va is None or vb is None else stats.seeds_t(va, vb)

    def _line(self, a: str, b: str, role: str, m: str, d: stats.Interval, family: str, p_holm=None,
              group: str = "", expect: str = "", seeds_t: tuple | None = None) -> dict:
        meas = BY_NAME[m]
        c = self.constant(a, b, m)
        if c is not None:  # e.g. a penalty that never fired: 'not distinguishable' would read as a measured null
            v = f"untestable ({meas.label} = {c:g} on every item of both arms)"
        elif self.trusted(m):
            v = stats.verdict(d, meas.higher_is_better, p_adjusted=p_holm if family == "primary" else None)
        else:
            v = f"not used (judge AUROC < {self.min_auroc})"
        signed = meas.fmt.replace("{:", "{:+").replace("++", "+")
        p = d.p()
        ps = f" p={p:.3g}" if math.isfinite(p) else ""
        if family == "primary" and p_holm is not None and math.isfinite(p_holm):
            ps += f" p_holm={p_holm:.3g}"
        tag = f"{family}:{group}" if group else family
        line = f"[{tag}] {a} vs {b} ({role}), {meas.label}: {d.fmt(signed)}{ps} -> {v}"
        if m.startswith("trait_nats") and self.pmass_flag(a):
            line += "  [pmass fell >25%: format shift?]"
        if d.dropped:
            line += f"  [{d.dropped} of {self.n_boot} bootstrap replicates non-finite, left out]"
        out = dict(a=a, b=b, role=role, measure=m, family=family, group=group, value=d.value, lo=d.lo, hi=d.hi,
                   se=d.se, df=d.df, p=p, p_holm=p_holm if family == "primary" else None, n_seeds=d.n_seeds,
                   verdict=v, line=line)
        if seeds_t is not None and seeds_t[0] is not None and math.isfinite(seeds_t[0].p()):
            t, pth = seeds_t
            vt = stats.verdict(t, meas.higher_is_better, p_adjusted=pth) if v in VERDICTS else v
            out.update(p_seeds=t.p(), p_holm_seeds=pth, verdict_seeds=vt, fragile=vt != v)
            out["line"] += f"  [seeds-only t: p={t.p():.3g} p_holm={pth:.3g} -> {vt}]"
            if vt != v:
                out["line"] += f"  FRAGILE: {v} by seeds x items, {vt} by seeds only"
        if expect:
            out.update(expect=expect, expect_result=against_expectation(expect, v))
            out["line"] += f"  (expected {expect}: {out['expect_result']})"
        return out

    # ------------------------------------------------------------ markdown
    def _cell(self, iv: stats.Interval | None, m: Measure, signed: bool = False) -> str:
        f = m.fmt.replace("{:", "{:+") if signed and "+" not in m.fmt else m.fmt
        return "-" if iv is None else iv.fmt(f)

    def _head(self, m: Measure) -> str:
        a = self.judges.get(m.name)
        if a is None:
            return m.label
        mark = "" if self.trusted(m.name) else " (untrusted)"
        return f"{m.label} (AUROC {a:.2f}){mark}"

    def summary_markdown(self) -> str:
        cols = [BY_NAME[m] for m in TABLE]
        lines = ["| arm | kind | engine | seeds | gen_tok | sec | " + " | ".join(self._head(m) for m in cols) + " |",
                 "|" + "---|" * (6 + len(cols))]
        for a in self.arms:
            rs = self.by_arm[a.name]
            tok = np.mean([r.get("gen_tokens", 0) for r in rs])
            sec = np.mean([r.get("seconds", 0.0) for r in rs])
            cells = []
            for m in cols:
                c = self._cell(self.interval(a.name, m.name), m)
                if m.name == "pmass" and self.pmass_flag(a.name):
                    c += " **(-25%)**"
                cells.append(c)
            kind = a.kind + (f"/{a.control}" if a.control else "")
            engine = "/".join(sorted({r.get("engine") or "-" for r in rs}))
            lines.append(f"| {a.name} | {kind} | {engine} | {len(rs)} | {tok:.0f} | {sec:.0f} | " + " | ".join(cells)
                         + " |")
        return "\n".join(lines) + "\n"

    def diffs_markdown(self) -> str:
        cols = [BY_NAME[m] for m in DIFFS]
        lines = ["| arm | vs | role | " + " | ".join("d_" + m.label for m in cols) + " |",
                 "|" + "---|" * (3 + len(cols))]
        for a, b, role in self.questions():
            cells = [self._cell(self.diff(a, b, m.name), m, signed=True) for m in cols]
            lines.append(f"| {a} | {b} | {role} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def markdown(self) -> str:
        judges = ", ".join(f"{BY_NAME[k].label} {v:.2f}" for k, v in self.judges.items() if k in BY_NAME) or "none"
        untrusted = [BY_NAME[k].label for k in self.judges if k in BY_NAME and not self.trusted(k)]
        verdicts = self.verdicts()
        parts = [
            f"# {self.name}: {self.model}, {self.preset}, budget {self.budget} generated tokens per training arm\n",
            INTERVAL_NOTE + "\n",
            f"Judges' AUROC on the labelled replies (target label vs the rest; trait: enact-pos vs enact-neg): "
            f"{judges}. Under {self.min_auroc}: {', '.join(untrusted) or 'none'} (marked, not used in verdicts).\n",
            ("" if self.axis else "The preset names no moral foundations (`foundations`): no MFV trait column or "
             "verdict (a number on an axis the trait does not have); pmass and the other MFV columns stay.\n\n") +
            f"trait_mfv: MFV trait_nats (signed log-profile over {self.axis}); trait_mfv_ans: the same over the "
            f"vignettes the model still answers (pmass >= the base's median, {self.pmass_floor:.3f}); pmass: "
            "answer-token mass, **(-25%)** marks an arm more than 25% under base (its MFV trait may be a format "
            "shift); trait_llr*: trait under the held-out persona context; proj_v0: projection on the base vector; "
            "incoh_ctx: incoherence that does not read the trait (tail NLL under the base model, the lowest over the "
            "plain prompt and the held-out positive and negative persona contexts, + loop penalty; nats); dist_base: "
            "the same under the plain prompt only (a distance from base as much as incoherence); coh: coherent "
            "fraction; kl_*: KL(arm || base) on its greedy answers; cap_nll: mean NLL (nats/token) of 24 neutral "
            "reference answers (steer_heal/evals/capability.yaml, no arm trains on them), cap_kl: KL(arm || base) "
            "on those tokens (capability next to trait).\n",
            "## Arms (mean over seeds, 95% interval)\n", self.summary_markdown(),
            "## Paired differences (arm - reference, 95% interval)\n", self.diffs_markdown(),
            "## Verdicts\n", MULTIPLICITY_NOTE + "\n",
            "### Primary (declared before the run, Holm-adjusted)\n",
            "\n".join(f"- {v['line']}" for v in verdicts if v["family"] == "primary") or "none declared",
            "\n### Exploratory (unadjusted)\n",
            "\n".join(f"- {v['line']}" for v in verdicts if v["family"] != "primary") + "\n",
        ]
        sweep = self.dose_sweep_markdown()
        if sweep:
            parts += [sweep]
        heal = self.heal_markdown()
        if heal:
            parts += [heal]
        for extra in (self.mfv_transfer_markdown(), self.answers_markdown()):
            if extra:
                parts += [extra]
        return "\n".join(parts)

    # ------------------------------------------------------------ dose sweep
    def sweep_arms(self) -> list[ArmInfo]:
        return sorted([a for a in self.arms if a.kind == "steer"], key=lambda a: a.target_kl or 0.0)

    def dose_sweep_markdown(self) -> str:
        arms = self.sweep_arms()
        if not arms or "base" not in self.by_arm:
            return ""
        prof = " | ".join(f"p_{f}" for f in FOUNDATIONS)
        lines = ["## Steering dose sweep (raw steering on the base vector vs base, 95% interval over items)\n",
                 f"| arm | target_kl | kappa | d_trait_mfv | d_trait_mfv_ans | pmass | d_trait_llr* | d_incoh | coh | "
                 f"kl_rmse | kl_mean | {prof} |", "|" + "---|" * (11 + len(FOUNDATIONS))]
        for a in [self.arm("base")] + arms:
            r = self.by_arm[a.name][0]
            ds = [self._cell(self.diff(a.name, "base", m), BY_NAME[m], signed=True) for m in
                  ("trait_nats", "trait_nats_answering")]
            pm = self._cell(self.interval(a.name, "pmass"), BY_NAME["pmass"])
            if self.pmass_flag(a.name):
                pm += " **(-25%)**"
            rest = [self._cell(self.diff(a.name, "base", "trait_llr_heldout"), BY_NAME["trait_llr_heldout"], True),
                    self._cell(self.diff(a.name, "base", self.coh), BY_NAME[self.coh], True),
                    self._cell(self.interval(a.name, "coherent"), BY_NAME["coherent"]),
                    f"{r.get('kl_rmse', float('nan')):.3f}", f"{r.get('kl_mean', float('nan')):.3f}"]
            p = " | ".join(f"{x:.3f}" for x in r.get("profile", [float("nan")] * 7))
            t = "-" if a.target_kl is None else f"{a.target_kl:g}"
            k = r.get("kappa")
            lines.append(f"| {a.name} | {t} | {'-' if k is None else f'{k:.3g}'} | " + " | ".join(ds) + f" | {pm} | "
                         + " | ".join(rest) + f" | {p} |")
        moved = [a.name for a in arms if (d := self.diff(a.name, "base", "trait_nats_answering")) and d.lo > 0]
        lines.append("")
        lines.append("Doses whose MFV trait (on the vignettes the model still answers) rises with an interval above 0: "
                     + (", ".join(moved) if moved else "none") + ".")
        return "\n".join(lines) + "\n"

    def dose_sweep_figure(self, d: Path) -> None:
        arms = self.sweep_arms()
        if not arms:
            return
        xs = [a.target_kl for a in arms]
        panels = [("trait_nats", "d MFV trait_nats"), ("trait_nats_answering", "d MFV trait (answering)"),
                  ("trait_llr_heldout", "d held-out trait_llr"), (self.coh, f"d {self.coh} (nats)")]
        data = {}
        for m, _ in panels:
            ivs = [self.diff(a.name, "base", m) for a in arms]
            data[m] = [(iv.value, iv.lo, iv.hi) if iv else (None, None, None) for iv in ivs]
        pm = [iv.value if (iv := self.interval(a.name, "pmass")) else None for a in arms]
        js = json.dumps(dict(x=xs, panels=[[m, t] for m, t in panels], data=data, pmass=pm)).replace("NaN", "null")
        write_atomic(d / "dose_sweep.html", html_page("dose sweep", f"""<h2>Raw steering: change vs base per iso-KL
target (95% interval over items)</h2><div id=p></div><script>const D={js};
D.panels.forEach(([m,t])=>{{const c=document.createElement('canvas');c.width=420;c.height=260;
document.getElementById('p').appendChild(c);const g=c.getContext('2d');const v=D.data[m];
const ys=v.flat().filter(q=>q!=null).concat([0]);const y0=Math.min(...ys),y1=Math.max(...ys);
const lx=D.x.map(Math.log),x0=Math.min(...lx),x1=Math.max(...lx);
const X=q=>40+(Math.log(q)-x0)/((x1-x0)||1)*360,Y=q=>230-(q-y0)/((y1-y0)||1)*200;
g.fillText(t,40,14);g.strokeStyle='#aaa';g.beginPath();g.moveTo(40,Y(0));g.lineTo(400,Y(0));g.stroke();
g.strokeStyle='#1f77b4';v.forEach(([y,lo,hi],i)=>{{if(y==null)return;g.beginPath();g.moveTo(X(D.x[i]),Y(lo));
g.lineTo(X(D.x[i]),Y(hi));g.stroke();g.beginPath();g.arc(X(D.x[i]),Y(y),3,0,7);g.fill();
g.fillText(D.x[i],X(D.x[i])-6,248)}})}});</script>"""))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, axs = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4))
        for ax, (m, title) in zip(axs, panels):
            v = [(x, *t) for x, t in zip(xs, data[m]) if t[0] is not None]
            if v:
                x, y, lo, hi = map(np.array, zip(*v))
                ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="o-", capsize=3)
                ax.set_xscale("log")
                ax.set_xticks(x, [f"{t:g}" for t in x])  # the targets themselves, no log minor labels
                ax.minorticks_off()
            ax.axhline(0, color="0.7", lw=1)
            ax.set_xlabel("iso-KL target (p95 nats)")
            ax.set_title(title, fontsize=10)
        fig.suptitle(f"{self.model.split('/')[-1]}, {self.preset}: raw steering vs base", fontsize=10)
        fig.tight_layout()
        fig.savefig(d / "dose_sweep.png", dpi=120)
        plt.close(fig)

    # ------------------------------------------------------------ heal gain and retention
    def _curve(self) -> list[ArmInfo]:
        """Raw steering's dose curve: base (dose 0), then each sweep arm by target."""
        base = self.arm("base")
        return ([base] if base else []) + self.sweep_arms()

    def _seed_means(self, arm: str, measure: str, items=None) -> np.ndarray:
        x = self.values(arm, measure).x
        return stats._nanmean(x if items is None else x[:, items], -1)

    def heal_gain(self, arm: str, trait: str = "trait_llr_heldout") -> stats.Interval | None:
        """The arm's trait minus raw steering's trait at the arm's own coherence (interpolated on the dose curve of
        base + sweep arms; NaN outside it). Interval: seed part from the per-seed gains, item part from a bootstrap
        over items that resamples the sweep's evaluations with the arm's (the same items for all), Student's t."""
        curve = self._curve()
        if len(curve) < 2 or arm not in self.by_arm or any(self.values(a.name, m) is None for a in curve + [
                self.arm(arm)] for m in (trait, self.coh)):
            return None

        def gains(items=None) -> np.ndarray:
            X = [float(self._seed_means(a.name, self.coh, items)[0]) for a in curve]
            Y = [float(self._seed_means(a.name, trait, items)[0]) for a in curve]
            xs, ys = self._seed_means(arm, self.coh, items), self._seed_means(arm, trait, items)
            return np.array([y - on_curve(x, X, Y) for x, y in zip(xs, ys)])

        # a seed whose coherence lies outside the curve has no gain: the rest carry the value and the seed part
        # (the count shows beside the line, so 2 of 3 seeds is not read as 3)
        g = gains()
        g = g[np.isfinite(g)]
        if not g.size:
            return None
        value = float(np.mean(g))
        n = self.values(arm, trait).n_items
        rng = np.random.default_rng(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a resample with every seed off the curve: NaN, dropped
            reps = np.array([np.nanmean(gains(rng.integers(0, n, n))) for _ in range(self.n_boot)])
        ok = np.isfinite(reps)
        S = len(g)
        terms = [(float(np.var(g, ddof=1)) / S if S > 1 else 0.0, S - 1),
                 (float(np.var(reps[ok], ddof=1)) if ok.sum() > 1 else float("nan"), n - 1)]
        return stats._interval(value, terms, int((~ok).sum()), S if self.values(arm, trait).trained else 0)

    def _on_curve_note(self, arm: str, q: str, iv: stats.Interval) -> str:
        S = len(self.by_arm.get(arm, []))
        return f" ({iv.n_seeds} of {S} seeds inside the dose curve)" if q.startswith("Q1") and iv.n_seeds < S else ""

    def _doses(self, arm: str) -> list[float]:
        """Every generation dose the arm's seeds realised (per round / bake and alpha), from arm_done.json."""
        return [d for r in self.by_arm.get(arm, []) for row in (r.get("doses") or []) for d in row]

    def retention(self, arm: str, measure: str = "trait_llr_heldout") -> float:
        """(arm - base) / (raw steering at the arm's realised generation dose - base): the share of raw steering's
        effect at the dose the arm generated with that the unsteered student keeps (point estimate; NaN where
        the dose lies outside the sweep or the arm recorded no dose)."""
        doses = self._doses(arm)
        curve = self._curve()
        if not doses or len(curve) < 2:
            return float("nan")
        K = [0.0] + [float(self.by_arm[a.name][0].get("kappa") or float("nan")) for a in curve[1:]]
        Y = [self.interval(a.name, measure).value for a in curve]
        at = on_curve(float(np.mean(doses)), K, Y)
        arm_v, base_v = self.interval(arm, measure).value, Y[0]
        return (arm_v - base_v) / (at - base_v) if math.isfinite(at) and at != base_v else float("nan")

    def heal_markdown(self) -> str:
        arms = [a for a in self.arms if a.kind in ("iterative", "online")]
        if len(self._curve()) < 2 or not arms:
            return ""
        lines = ["## Heal gain and retention (exploratory)\n",
                 f"heal gain: the arm's trait_llr* minus raw steering's at the arm's own {self.coh}, on the dose curve "
                 f"of base + {', '.join(a.name for a in self.sweep_arms())} (linear between points; '-' outside the "
                 "curve). An arm heals where this sits above 0 with an interval that excludes 0. retention: "
                 "(arm - base) / (raw steering at the arm's realised mean generation dose - base).\n",
                 f"| arm | {self.coh} | trait_llr* | heal gain (trait_llr*) | realised dose (mean kappa) | retention "
                 "trait_llr* |", "|---|---|---|---|---|---|"]
        for a in arms:
            hg, doses, ret = self.heal_gain(a.name), self._doses(a.name), self.retention(a.name)
            lines.append(f"| {a.name} | {self._cell(self.interval(a.name, self.coh), BY_NAME[self.coh])} | "
                         f"{self._cell(self.interval(a.name, 'trait_llr_heldout'), BY_NAME['trait_llr_heldout'])} | "
                         f"{'-' if hg is None else hg.fmt() + self._on_curve_note(a.name, 'Q1', hg)} | "
                         f"{f'{np.mean(doses):.3g}' if doses else '-'} | "
                         f"{f'{ret:.2f}' if math.isfinite(ret) else '-'} |")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ MFV transfer
    def _clr_shift(self, row: dict, base: np.ndarray) -> np.ndarray | None:
        """Per vignette, the centred log-ratio of the row's 7-way answer distribution minus the base's."""
        P = np.asarray(row.get("items", {}).get("mfv_p") or [], dtype=float)
        if P.shape != base.shape:
            return None
        clr = lambda Q: np.log(Q + 1e-12) - np.log(Q + 1e-12).mean(1, keepdims=True)  # noqa: E731
        return clr(P / P.sum(1, keepdims=True)) - clr(base / base.sum(1, keepdims=True))

    def mfv_transfer(self, arm: str) -> dict | None:
        """How much of raw steering's MFV answer pattern (the sweep arm nearest the arm's realised dose) a trained
        arm carries, per seed: `all`, the projection of its per-vignette shift (vs base, centred log-ratios, all 7
        foundations) on steering's; `axis`, its mean shift on the preset's foundations (signed), next to
        steering's. A student can copy the shape of the steered answers and still not move the trait's axis.
        A placebo is read against its steered arm's reference."""
        a = self.arm(arm)
        # a placebo is read against its steered arm's reference; an unsteered control without one has none
        doses, sweep = [d for d in self._doses(a.placebo_of or arm) if d > 0], self.sweep_arms()
        if not doses or not sweep or "base" not in self.by_arm:
            return None
        base = np.asarray(self.by_arm["base"][0].get("items", {}).get("mfv_p") or [], dtype=float)
        if base.ndim != 2 or base.shape[1] != 7:
            return None
        ks = [float(self.by_arm[a.name][0].get("kappa") or np.nan) for a in sweep]
        ref = sweep[int(np.nanargmin([abs(k - float(np.mean(doses))) for k in ks]))]
        ds = self._clr_shift(self.by_arm[ref.name][0], base)
        w = np.zeros(7)
        for f, sgn in self.axis.items():
            w[FOUNDATIONS.index(f)] = sgn / max(len(self.axis), 1)
        per = [d for r in self.by_arm[arm] if (d := self._clr_shift(r, base)) is not None]
        if ds is None or not per:
            return None
        return dict(ref=ref.name, all=stats.t_interval([float((d * ds).sum() / (ds * ds).sum()) for d in per]),
                    axis=stats.t_interval([float((d @ w).mean()) for d in per]), ref_axis=float((ds @ w).mean()))

    def mfv_transfer_markdown(self) -> str:
        rows = [(a, t) for a in self.arms if a.kind in ("iterative", "online") and (t := self.mfv_transfer(a.name))]
        if not rows:
            return ""
        lines = ["## MFV transfer (exploratory)\n",
                 "Per vignette, each arm's shift of its 7-way answer distribution from base (centred log-ratios), "
                 "against raw steering's at the sweep point nearest the arm's realised dose. all: projection on "
                 "steering's shift over all foundations (1 = the whole pattern, 0 = none); axis: mean shift on the "
                 f"preset's foundations ({', '.join(f'{f} {s:+d}' for f, s in self.axis.items())}), steering's "
                 "beside it. 95% t-intervals over seeds.\n",
                 "| arm | steering ref | all | axis | steering's axis |", "|---|---|---|---|---|"]
        for a, t in rows:
            lines.append(f"| {a.name} | {t['ref']} | {t['all'].fmt()} | {t['axis'].fmt()} | {t['ref_axis']:+.3f} |")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ the seed's questions
    def steered_trained(self) -> list[ArmInfo]:
        return [a for a in self.arms if a.kind in ("iterative", "online") and not a.control]

    def trait_climb(self, arm: str, measure: str = "trait_heldout") -> stats.Interval | None:
        """Last round / bake minus the first, per seed (the arm's own per-round evaluation), t-interval over seeds:
        does the loop keep moving the trait?"""
        key = DRIFT_KEYS[measure]
        d = []
        for r in self.by_arm.get(arm, []):
            xs = [x.get(key[0], x.get(key[1])) for x in r.get("rounds", [])]
            xs = [float(v) for v in xs if v is not None and math.isfinite(float(v))]
            if len(xs) >= 2:
                d.append(xs[-1] - xs[0])
        return stats.t_interval(d) if d else None

    def answers(self) -> list[dict]:
        """One line per steered trained arm for each of the seed's questions and the prompting baseline, each with
        its interval: Q1 heal gain over raw steering at equal coherence; Q2 incoh_ctx against the placebo; Q3 the
        held-out trait's climb from the first round / bake to the last; P trait_llr* against the persona prompt."""
        out = []
        for a in self.steered_trained():
            pl = next((x.name for x in self.arms if x.placebo_of == a.name), None)
            qs = [("Q1 heals (heal gain, trait_llr* over raw steering at equal coherence)", self.heal_gain(a.name)),
                  ("Q2 stays coherent (incoh_ctx vs its placebo; lower is better)",
                   self.diff(a.name, pl, self.coh) if pl else None),
                  ("Q3 keeps moving (held-out trait, last round / bake - first)", self.trait_climb(a.name)),
                  ("P beats prompting (trait_llr* vs the persona prompt)",
                   self.diff(a.name, "prompt", "trait_llr_heldout") if "prompt" in self.by_arm else None)]
            for q, iv in qs:
                if iv is not None and math.isfinite(iv.value):
                    note = self._on_curve_note(a.name, q, iv)
                    if iv.n_seeds == 1 and math.isfinite(iv.hi):  # one seed's interval carries the items alone
                        note += " (1 seed: items only)"
                    out.append(dict(question=q.split()[0], arm=a.name, value=iv.value, lo=iv.lo, hi=iv.hi,
                                    n_seeds=iv.n_seeds, line=f"{q}: {a.name} {iv.fmt()}{note}"))
        return out

    def answers_markdown(self) -> str:
        ans = self.answers()
        if not ans:
            return ""
        return ("## The seed's questions (exploratory unless declared above; 95% intervals)\n\n"
                + "\n".join(f"- {x['line']}" for x in sorted(ans, key=lambda x: (x["question"] == "P", x["question"])))
                + "\n")

    # ------------------------------------------------------------ drift over rounds / bakes
    def drift_arms(self) -> list[ArmInfo]:
        """Training arms whose runs logged at least two rounds / bakes with their own evaluations."""
        return [a for a in self.arms if a.kind in ("iterative", "online") and all(
            len(r.get("rounds", [])) >= 2 for r in self.by_arm[a.name])]

    def drift_series(self, arm: str, measure: str) -> list[tuple[int, stats.Interval]]:
        """Per round / bake: the mean over seeds and its 95% t-interval (seeds that reached it)."""
        rs = [r.get("rounds", []) for r in self.by_arm[arm]]
        out = []
        for k in range(max(len(x) for x in rs)):
            key = DRIFT_KEYS[measure]
            xs = [x[k].get(key[0], x[k].get(key[1])) for x in rs if len(x) > k]
            xs = [float(v) for v in xs if v is not None and math.isfinite(float(v))]
            if xs:
                out.append((k, stats.t_interval(xs)))
        return out

    def drift_markdown(self) -> str:
        arms = self.drift_arms()
        if not arms:
            return ""
        ms = list(DRIFT_KEYS)
        lines = ["## Drift over rounds / bakes (mean over seeds, 95% t-interval over seeds)\n",
                 "| arm | round | seeds | " + " | ".join(ms) + " |", "|" + "---|" * (3 + len(ms))]
        for a in arms:
            series = {m: dict(self.drift_series(a.name, m)) for m in ms}
            n = max((len(r.get("rounds", [])) for r in self.by_arm[a.name]), default=0)
            for k in range(n):
                seeds = sum(len(r.get("rounds", [])) > k for r in self.by_arm[a.name])
                cells = [series[m][k].fmt("{:.3f}") if k in series[m] else "-" for m in ms]
                lines.append(f"| {a.name} | {k} | {seeds} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    @staticmethod
    def drift_look(arms: list[ArmInfo]) -> dict[str, dict]:
        """One colour and dash per arm, shared by drift.png and drift.html: a placebo takes its arm's colour,
        dotted; online arms are dashed; so a dozen arms stay readable."""
        roots = list(dict.fromkeys(a.placebo_of or a.name for a in arms))
        return {a.name: dict(colour=TAB10[roots.index(a.placebo_of or a.name) % len(TAB10)],
                             dash=[2, 3] if a.control == "placebo" else [6, 4] if a.kind == "online" else [])
                for a in arms}

    def drift_figure(self, d: Path) -> None:
        arms = self.drift_arms()
        if not arms:
            return
        # coherence first (the loop-aware incoherence, the coherent fraction, repetition), then the barrier
        panels = ["incoherence", "coherent", "repetition", "trait_heldout", "barrier_active_frac", "D_mean", "D_rmse",
                  "tail_nll"]
        # a t-interval over 2-3 seeds is wide (t = 12.7 at 2): bands are cut at what the measure can take
        lo_ok = {m: 0.0 for m in ("incoherence", "coherent", "repetition", "barrier_active_frac", "D_mean", "D_rmse",
                                  "tail_nll")}
        hi_ok = {"coherent": 1.0, "repetition": 1.0, "barrier_active_frac": 1.0}
        # x: generated tokens at the round / bake (mean over seeds), so drivers of different step sizes (an
        # iterative round, an online bake) share one axis: the matched comparison's budget
        tokens = {a.name: {k: iv.value for k, iv in self.drift_series(a.name, "gen_tokens")} for a in arms}
        data = {a.name: {m: [(tokens[a.name].get(k, float(k)), iv.value, max(iv.lo, lo_ok.get(m, -math.inf)),
                              min(iv.hi, hi_ok.get(m, math.inf))) for k, iv in self.drift_series(a.name, m)]
                         for m in panels}
                for a in arms}
        look = self.drift_look(arms)
        js = json.dumps(dict(panels=panels, data=data, look=look)).replace("NaN", "null")
        write_atomic(d / "drift.html", html_page("drift", f"""<h2>Drift over generated tokens, a point per round / bake
(lines: mean over seeds;
bands: 95% t-interval; a placebo dotted in its arm's colour, online dashed)</h2><div id=p></div><script>const D={js};
D.panels.forEach(m=>{{const c=document.createElement('canvas');c.width=420;c.height=260;
document.getElementById('p').appendChild(c);const g=c.getContext('2d');const A=Object.keys(D.data);
const pts=A.flatMap(a=>D.data[a][m]);if(!pts.length)return;const ys=pts.flatMap(p=>[p[1],p[2],p[3]]).filter(v=>v!=null);
const xs=pts.map(p=>p[0]);const y0=Math.min(...ys),y1=Math.max(...ys),x1=Math.max(...xs,1);
const X=v=>40+v/x1*360,Y=v=>230-(v-y0)/((y1-y0)||1)*200;g.fillStyle='#000';g.fillText(m,40,14);
A.forEach((a,i)=>{{const s=D.data[a][m];if(!s.length)return;const b=s.filter(p=>p[2]!=null&&p[3]!=null);
const L=D.look[a];g.fillStyle=L.colour;
g.globalAlpha=.2;g.beginPath();b.forEach((p,j)=>j?g.lineTo(X(p[0]),Y(p[3])):g.moveTo(X(p[0]),Y(p[3])));
b.slice().reverse().forEach(p=>g.lineTo(X(p[0]),Y(p[2])));if(b.length)g.fill();g.globalAlpha=1;g.strokeStyle=L.colour;g.setLineDash(L.dash);
g.beginPath();s.forEach((p,j)=>j?g.lineTo(X(p[0]),Y(p[1])):g.moveTo(X(p[0]),Y(p[1])));g.stroke();g.setLineDash([]);
g.fillStyle=L.colour;g.fillText(a,330,30+12*i)}})}});
</script>"""))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        fig, axs = plt.subplots(2, 4, figsize=(17, 7.5))
        for ax, m in zip(axs.flat, panels):
            means = []
            for a in arms:
                s = data[a.name][m]
                if not s:
                    continue
                k, y, lo, hi = map(np.array, zip(*s))
                colour, dash = look[a.name]["colour"], look[a.name]["dash"]
                ax.plot(k, y, marker="o", ms=3, color=colour, label=a.name, linestyle=(0, dash) if dash else "-")
                ax.fill_between(k, lo, hi, color=colour, alpha=0.12)
                means += [v for v in y if math.isfinite(v)]
            if m.startswith("D_") and means and min(means) > 0:  # drift spans decades between arms
                ax.set_yscale("log")
                ax.set_ylim(min(means) / 2, max(means) * 2)
            elif means:  # the axis follows the means; a band wider than that is cut at the frame
                pad = 0.25 * ((max(means) - min(means)) or abs(max(means)) or 1.0)
                ax.set_ylim(max(min(means) - pad, lo_ok.get(m, -math.inf) - 0.02 * pad),
                            min(max(means) + pad, hi_ok.get(m, math.inf) + 0.02 * pad))
            ax.set_title(m + (" (log)" if ax.get_yscale() == "log" else ""), fontsize=10)
            ax.set_xlabel("generated tokens (round / bake)")
        handles = {lab: h for ax in axs.flat for h, lab in zip(*ax.get_legend_handles_labels())}
        if handles:
            fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(len(handles), 8), fontsize=8)
        fig.suptitle(f"{self.model.split('/')[-1]}, {self.preset}: drift per round / bake against generated tokens "
                     "(bands: 95% t-interval over seeds, cut at the frame)", fontsize=10)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        fig.savefig(d / "drift.png", dpi=110)
        plt.close(fig)

    # ------------------------------------------------------------ frontier
    def frontier(self, d: Path) -> None:
        """x: coherence lost (incoherence vs base), y: trait gained (MFV trait_nats vs base), a point
        per arm with its 95% intervals on both axes."""
        pts = []
        for a in self.arms:
            dx, dy = self.diff(a.name, "base", self.coh), self.diff(a.name, "base", "trait_nats")
            if dx is None or dy is None:
                continue
            pts.append(dict(arm=a.name, kind=a.kind, control=a.control, x=dx.value, xlo=dx.lo, xhi=dx.hi, y=dy.value,
                            ylo=dy.lo, yhi=dy.hi))
        rows = "".join(f"<tr><td>{H.escape(p['arm'])}</td><td>{p['kind']}</td><td>{p['x']:+.3f} [{p['xlo']:+.3f}, "
                       f"{p['xhi']:+.3f}]</td><td>{p['y']:+.3f} [{p['ylo']:+.3f}, {p['yhi']:+.3f}]</td></tr>"
                       for p in pts)
        data = json.dumps(pts).replace("NaN", "null")
        write_atomic(d / "frontier.html", html_page("frontier", f"""<h2>Trait gained vs coherence lost (a point per
arm, bars: 95% intervals)</h2><p>x: {self.coh} vs base (nats, lower is better); y: MFV trait_nats vs base.</p>
<canvas id=c width=760 height=520></canvas><table border=1 cellpadding=4><tr><th>arm</th><th>kind</th>
<th>d_incoherence</th><th>d_trait_nats</th></tr>{rows}</table><script>
const P={data};const c=document.getElementById('c').getContext('2d');const xs=[0],ys=[0];
P.forEach(p=>{{[p.x,p.xlo,p.xhi].forEach(v=>v!=null&&xs.push(v));[p.y,p.ylo,p.yhi].forEach(v=>v!=null&&ys.push(v))}});
const x0=Math.min(...xs),x1=Math.max(...xs),y0=Math.min(...ys),y1=Math.max(...ys);
const X=v=>60+(v-x0)/((x1-x0)||1)*660,Y=v=>480-(v-y0)/((y1-y0)||1)*440;
c.strokeStyle='#999';c.beginPath();c.moveTo(X(0),20);c.lineTo(X(0),480);c.moveTo(60,Y(0));c.lineTo(720,Y(0));c.stroke();
const K={{base:'#000',prompt:'#d62728',steer:'#ff7f0e',iterative:'#1f77b4',online:'#2ca02c'}};
const col=p=>p.control?'#888':K[p.kind];
P.forEach(p=>{{c.strokeStyle=col(p);c.fillStyle=col(p);c.beginPath();if(p.xlo!=null){{c.moveTo(X(p.xlo),Y(p.y));
c.lineTo(X(p.xhi),Y(p.y))}}if(p.ylo!=null){{c.moveTo(X(p.x),Y(p.ylo));c.lineTo(X(p.x),Y(p.yhi))}}c.stroke();
c.beginPath();c.arc(X(p.x),Y(p.y),4,0,7);c.fill();c.fillText(p.arm,X(p.x)+6,Y(p.y)-5)}});</script>"""))
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        colors = {"base": "k", "prompt": "tab:red", "steer": "tab:orange", "iterative": "tab:blue",
                  "online": "tab:green"}
        fig, ax = plt.subplots(figsize=(8.5, 6))
        ax.axhline(0, color="0.8", lw=1)
        ax.axvline(0, color="0.8", lw=1)
        for p in pts:
            c = "0.55" if p["control"] else colors.get(p["kind"], "0.4")
            ok = all(math.isfinite(p[k]) for k in ("xlo", "xhi", "ylo", "yhi"))
            err = dict(xerr=[[p["x"] - p["xlo"]], [p["xhi"] - p["x"]]],
                       yerr=[[p["y"] - p["ylo"]], [p["yhi"] - p["y"]]]) if ok else {}
            ax.errorbar([p["x"]], [p["y"]], fmt="o", color=c, capsize=2, lw=0.8, ms=5,
                        mfc="white" if p["control"] else c, **err)
            ax.annotate(p["arm"], (p["x"], p["y"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        ax.set_xlabel(f"coherence lost: {self.coh} vs base (nats, held-out greedy answers)")
        ax.set_ylabel("trait gained: MFV trait_nats vs base")
        ax.set_title("steer-heal compare (bars: 95% intervals over seeds and items; hollow: controls)", fontsize=10)
        fig.tight_layout()
        fig.savefig(d / "frontier.png", dpi=120)
        plt.close(fig)


def answers_page(d: Path, rows: list[dict], n: int = 6) -> None:
    seen, cols = set(), []
    for r in rows:
        if r["arm"] not in seen:
            seen.add(r["arm"])
            cols.append(r)
    prompts = next((r.get("prompts") for r in rows if r.get("prompts")), None) or []
    body = []
    for i in range(min(n, len(cols[0]["texts"]) if cols else 0)):
        body.append(f"<h3>{H.escape(prompts[i]) if i < len(prompts) else i}</h3><table border=1 cellpadding=4>")
        body += [f"<tr><td><b>{H.escape(r['arm'])}</b></td><td>{H.escape(r['texts'][i])}</td></tr>" for r in cols]
        body.append("</table>")
    write_atomic(d / "answers.html", html_page("answers", "<h2>Every arm's greedy answers to the same held-out "
                                                          "prompts (first seed)</h2>" + "".join(body)))
