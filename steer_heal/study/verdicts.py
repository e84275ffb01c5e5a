"""Verdicts: the declared primary questions (Holm within each family, with the seeds-only t test beside each as a
sensitivity check), then one exploratory line per (arm, reference, measure)."""
from __future__ import annotations

import math

from steer_heal import stats
from steer_heal.study.analysis import Study
from steer_heal.study.measures import BY_NAME, VERDICT_MEASURES, VERDICTS, against_expectation


def _holm_by_family(ps: list[float], groups: list[str]) -> list[float]:
    adj = [1.0] * len(ps)
    for g in dict.fromkeys(groups):
        idx = [i for i, x in enumerate(groups) if x == g]
        for i, q in zip(idx, stats.holm([ps[i] if math.isfinite(ps[i]) else 1.0 for i in idx])):
            adj[i] = q
    return adj


def verdicts(s: Study) -> list[dict]:
    """The primary family (declared in the config; Holm-adjusted), then one exploratory line per (arm, reference,
    measure): the difference, its interval, p, and better | worse | not distinguishable. A judge under
    min_auroc is listed but gives no verdict; a trained side under 3 seeds gives none either."""
    # the family is every declared question: one not evaluated yet (or without a usable p) counts as p = 1, so
    # the adjustment never shrinks because part of the study has not run
    prim = [tuple(q[:3]) for q in s.primary]
    groups = [q[3] if len(q) > 3 else "" for q in s.primary]  # a named family: its own Holm adjustment
    roles = {(a, b): role for a, b, role in s.questions()}
    ds = [s.diff(a, b, m) if a in s.by_arm and b in s.by_arm else None for a, b, m in prim]
    ps = [d.p() if d is not None and s.trusted(m) and not 0 < d.n_seeds < stats.MIN_SEEDS else 1.0
          for d, (_, _, m) in zip(ds, prim)]
    adj = _holm_by_family(ps, groups)
    # the same family by a seeds-only t test (df S-1, Holm the same way): a verdict the two methods disagree on
    # is fragile, and its line says so
    dt = [s.seed_diff(a, b, m) if d is not None else None for (a, b, m), d in zip(prim, ds)]
    pt = [x.p() if x is not None and math.isfinite(x.p()) and s.trusted(m) else 1.0 for x, (_, _, m) in zip(dt, prim)]
    adj_t = _holm_by_family(pt, groups)
    expects = [q[4] if len(q) > 4 else "" for q in s.primary]
    out = [line(s, a, b, roles.get((a, b), g or "primary"), m, d, "primary", p_holm, group=g, expect=x,
                seeds_t=(t, pth))
           for (a, b, m), d, p_holm, g, x, t, pth in zip(prim, ds, adj, groups, expects, dt, adj_t) if d is not None]
    declared = set(prim)
    for a, b, role in s.questions():
        for m in VERDICT_MEASURES:
            d = s.diff(a, b, m)
            if d is not None and (a, b, m) not in declared:
                out.append(line(s, a, b, role, m, d, "exploratory"))
    return out


def _verdict(s: Study, a: str, b: str, m: str, d: stats.Interval, p_holm) -> str:
    meas = BY_NAME[m]
    c = s.constant(a, b, m)
    if c is not None:  # e.g. a penalty that never fired: 'not distinguishable' would read as a measured null
        return f"untestable ({meas.label} = {c:g} on every item of both arms)"
    if s.trusted(m):
        return stats.verdict(d, meas.higher_is_better, p_adjusted=p_holm)
    return f"not used (judge AUROC < {s.min_auroc})"


def line(s: Study, a: str, b: str, role: str, m: str, d: stats.Interval, family: str, p_holm=None,
         group: str = "", expect: str = "", seeds_t: tuple | None = None) -> dict:
    """One verdict: its record for verdicts.json and its line for compare.md."""
    meas = BY_NAME[m]
    p_holm = p_holm if family == "primary" else None
    v = _verdict(s, a, b, m, d, p_holm)
    signed = meas.fmt.replace("{:", "{:+").replace("++", "+")
    p = d.p()
    ps = f" p={p:.3g}" if math.isfinite(p) else ""
    if p_holm is not None and math.isfinite(p_holm):
        ps += f" p_holm={p_holm:.3g}"
    tag = f"{family}:{group}" if group else family
    text = f"[{tag}] {a} vs {b} ({role}), {meas.label}: {d.fmt(signed)}{ps} -> {v}"
    if m.startswith("trait_nats") and s.pmass_flag(a):
        text += "  [pmass fell >25%: format shift?]"
    if d.dropped:
        text += f"  [{d.dropped} of {s.n_boot} bootstrap replicates non-finite, left out]"
    out = dict(a=a, b=b, role=role, measure=m, family=family, group=group, value=d.value, lo=d.lo, hi=d.hi,
               se=d.se, df=d.df, p=p, p_holm=p_holm, n_seeds=d.n_seeds, verdict=v, line=text)
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
