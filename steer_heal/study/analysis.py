"""One Study: the rows a comparison wrote (one per arm x seed, with the per-item values of every measure), and
the values, intervals and paired differences every table, verdict and figure is built from.

Reads only rows, so a report can be rebuilt, or tested, from committed files or fake rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from steer_heal import stats
from steer_heal.presets import load_preset
from steer_heal.rundir import Record
from steer_heal.study.measures import BY_NAME, DRIFT_KEYS, PMASS_DROP, ArmInfo

TRAINED = ("iterative", "online")


def load_preset_axis(preset: str) -> dict:
    return load_preset(preset).foundations


@dataclass
class Study:
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
    primary: list = field(default_factory=list)  # [a, b, measure(, family(, expected))]: the declared questions

    def __post_init__(self):
        self.arms = [a if isinstance(a, ArmInfo) else ArmInfo(a.name, a.kind, getattr(a, "control", ""),
                                                               getattr(a, "placebo_of", "")) for a in self.arms]
        by_arm = {a.name: [r for r in self.rows if r["arm"] == a.name] for a in self.arms}
        self.by_arm = {k: v for k, v in by_arm.items() if v}
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

    def seed_diff(self, a: str, b: str, measure: str) -> stats.Interval | None:
        """The same difference by a seeds-only t test (df S-1): the sensitivity check of a primary verdict."""
        va, vb = self.values(a, measure), self.values(b, measure)
        return None if va is None or vb is None else stats.seeds_t(va, vb)

    def seed_means(self, arm: str, measure: str, items=None) -> np.ndarray:
        x = self.values(arm, measure).x
        return stats.nanmean(x if items is None else x[:, items], -1)

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

    def placebo(self, arm: str) -> str | None:
        return next((x.name for x in self.arms if x.placebo_of == arm), None)

    def references(self, a: ArmInfo) -> list[tuple[str, str]]:
        """(role, arm) each arm is judged against: a trained arm against base, the persona prompt,
        prompt distillation (same kind first) and its own placebo; the prompt and steer baselines
        against base."""
        if a.kind in ("prompt", "steer"):  # the baselines themselves: do they move the trait at all?
            return [("base", "base")] if "base" in self.by_arm else []
        if a.kind not in TRAINED or a.control == "placebo":
            return []
        out = [("base", "base"), ("prompt", "prompt")]
        if a.control != "prompt_distil":
            pd = [x for x in self.arms if x.control == "prompt_distil"]
            pd = [x for x in pd if x.kind == a.kind] or pd
            if pd:
                out.append(("prompt_distil", pd[0].name))
        pl = self.placebo(a.name)
        if pl:
            out.append(("placebo", pl))
        return [(role, n) for role, n in out if n in self.by_arm and n != a.name]

    def questions(self) -> list[tuple[str, str, str]]:
        qs = [(a.name, ref, role) for a in self.arms for role, ref in self.references(a)]
        qs += [(x, y, "pair") for x, y in self.pairs if x in self.by_arm and y in self.by_arm]
        return qs

    def trained(self) -> list[ArmInfo]:
        return [a for a in self.arms if a.kind in TRAINED]

    def steered_trained(self) -> list[ArmInfo]:
        return [a for a in self.trained() if not a.control]

    # ------------------------------------------------------------ raw steering's dose curve, realised doses
    def sweep_arms(self) -> list[ArmInfo]:
        return sorted([a for a in self.arms if a.kind == "steer"], key=lambda a: a.target_kl or 0.0)

    def curve(self) -> list[ArmInfo]:
        """Raw steering's dose curve: base (dose 0), then each sweep arm by target."""
        base = self.arm("base")
        return ([base] if base else []) + self.sweep_arms()

    def doses(self, arm: str) -> list[float]:
        """Every generation dose the arm's seeds realised (per round / bake and alpha), from its rows."""
        return [d for r in self.by_arm.get(arm, []) for row in (r.get("doses") or []) for d in row]

    # ------------------------------------------------------------ per round / bake
    def drift_arms(self) -> list[ArmInfo]:
        """Training arms whose runs logged at least two rounds / bakes with their own evaluations."""
        return [a for a in self.trained() if all(len(r.get("rounds", [])) >= 2 for r in self.by_arm[a.name])]

    def round_values(self, arm: str, measure: str) -> list[list[float | None]]:
        """Per seed, the measure at each round / bake (None where that row lacks it)."""
        key = DRIFT_KEYS[measure]
        return [[getattr(Record.of(x), key) for x in r.get("rounds", [])] for r in self.by_arm.get(arm, [])]

    def drift_series(self, arm: str, measure: str) -> list[tuple[int, stats.Interval]]:
        """Per round / bake: the mean over seeds and its 95% t-interval (seeds that reached it)."""
        rs = self.round_values(arm, measure)
        out = []
        for k in range(max(len(x) for x in rs)):
            xs = [float(x[k]) for x in rs if len(x) > k and x[k] is not None and math.isfinite(float(x[k]))]
            if xs:
                out.append((k, stats.t_interval(xs)))
        return out

    def short_runs(self) -> list[tuple[str, object, int, int, str]]:
        """(arm, seed, rounds it has, rounds its arm's longest seed has, why it stopped) for each trained run that
        ended early: with a reason in its row (read from its own events), or with fewer rounds / bakes than
        another seed of its arm."""
        out = []
        for a in self.trained():
            rs = self.by_arm[a.name]
            most = max(len(r.get("rounds", [])) for r in rs)
            for r in rs:
                n = len(r.get("rounds", []))
                if n < most or r.get("stopped"):
                    out.append((a.name, r.get("seed"), n, most, r.get("stopped") or ""))
        return out

    def spend(self, arm: str) -> dict[str, float | None]:
        """What the arm's students were trained on, mean over seeds of each seed's total over its rounds / bakes:
        generated tokens, tokens the loss read, optimizer steps, summed learning rate (None where a run did not
        record it); and every dose it generated at."""
        rs = self.by_arm.get(arm, [])
        out: dict = dict(gen_tokens=float(np.mean([r.get("gen_tokens", 0) for r in rs])) if rs else None)
        for k in ("trained_tokens", "opt_steps", "lr_sum"):
            per = [[getattr(Record.of(x), k) for x in r.get("rounds", [])] for r in rs]
            out[k] = float(np.mean([sum(p) for p in per])) if per and all(p and None not in p for p in per) else None
        out["doses"] = sorted({round(x, 4) for x in self.doses(arm)})
        return out

    def spend_per_round(self, arm: str) -> list[dict[str, list]]:
        """Per round / bake index, each seed's value of what that round's student was trained on (generated tokens
        of that round alone, tokens the loss read, optimizer steps, lr sum, doses); [] where a run did not record
        them (rows written before 2026-12-07)."""
        rows = self.by_arm.get(arm, [])
        runs = [[Record.of(x) for x in r.get("rounds", [])] for r in rows]
        if not runs or any(not recs or None in [x.trained_tokens for x in recs] for recs in runs):
            return []
        out: list[dict[str, list]] = []
        for row, recs in zip(rows, runs):
            doses = row.get("doses") or []  # per round / bake, what the arm realised (arms.realised)
            prev = 0  # a record's gen_tokens is the run's running total
            for i, x in enumerate(recs):
                if i == len(out):
                    out.append({k: [] for k in ("gen_tokens", "trained_tokens", "opt_steps", "lr_sum", "doses")})
                gen = None if x.gen_tokens is None else x.gen_tokens - prev
                vals = dict(gen_tokens=gen, trained_tokens=x.trained_tokens, opt_steps=x.opt_steps,
                            lr_sum=x.lr_sum, doses=tuple(doses[i]) if i < len(doses) else ())
                prev = x.gen_tokens or 0
                for k, v in vals.items():
                    out[i][k].append(v)
        return out

    def trait_climb(self, arm: str, measure: str = "trait_heldout") -> stats.Interval | None:
        """Last round / bake minus the first, per seed (the arm's own per-round evaluation), t-interval over seeds:
        does the loop keep moving the trait?"""
        d = []
        for xs in self.round_values(arm, measure):
            xs = [float(v) for v in xs if v is not None and math.isfinite(float(v))]
            if len(xs) >= 2:
                d.append(xs[-1] - xs[0])
        return stats.t_interval(d) if d else None
