"""The study's markdown: compare.md (arms, paired differences, verdicts, dose sweep, heal gain, MFV transfer, the
seed's questions) and drift.md / dose_sweep.md, each section one function over a Study."""
from __future__ import annotations

import math

import numpy as np

from steer_heal import stats
from steer_heal.evals.protocol import FOUNDATIONS
from steer_heal.study.analysis import Study
from steer_heal.study.heal import answers, heal_gain, mfv_transfer, on_curve_note, retention
from steer_heal.study.measures import BY_NAME, DIFFS, DRIFT_KEYS, INTERVAL_NOTE, MULTIPLICITY_NOTE, TABLE, Measure
from steer_heal.study.verdicts import verdicts


def cell(iv: stats.Interval | None, m: Measure, signed: bool = False) -> str:
    f = m.fmt.replace("{:", "{:+") if signed and "+" not in m.fmt else m.fmt
    return "-" if iv is None else iv.fmt(f)


def _head(s: Study, m: Measure) -> str:
    a = s.judges.get(m.name)
    if a is None:
        return m.label
    mark = "" if s.trusted(m.name) else " (untrusted)"
    return f"{m.label} (AUROC {a:.2f}){mark}"


def _pmass(s: Study, arm: str) -> str:
    c = cell(s.interval(arm, "pmass"), BY_NAME["pmass"])
    return c + " **(-25%)**" if s.pmass_flag(arm) else c


def summary_markdown(s: Study) -> str:
    cols = [BY_NAME[m] for m in TABLE]
    lines = ["| arm | kind | engine | seeds | gen_tok | sec | " + " | ".join(_head(s, m) for m in cols) + " |",
             "|" + "---|" * (6 + len(cols))]
    for a in s.arms:
        rs = s.by_arm[a.name]
        tok = np.mean([r.get("gen_tokens", 0) for r in rs])
        sec = np.mean([r.get("seconds", 0.0) for r in rs])
        cells = [_pmass(s, a.name) if m.name == "pmass" else cell(s.interval(a.name, m.name), m) for m in cols]
        kind = a.kind + (f"/{a.control}" if a.control else "")
        engine = "/".join(sorted({r.get("engine") or "-" for r in rs}))
        lines.append(f"| {a.name} | {kind} | {engine} | {len(rs)} | {tok:.0f} | {sec:.0f} | " + " | ".join(cells)
                     + " |")
    return "\n".join(lines) + "\n"


def diffs_markdown(s: Study) -> str:
    cols = [BY_NAME[m] for m in DIFFS]
    lines = ["| arm | vs | role | " + " | ".join("d_" + m.label for m in cols) + " |",
             "|" + "---|" * (3 + len(cols))]
    for a, b, role in s.questions():
        cells = [cell(s.diff(a, b, m.name), m, signed=True) for m in cols]
        lines.append(f"| {a} | {b} | {role} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _measures_note(s: Study) -> str:
    return (("" if s.axis else "The preset names no moral foundations (`foundations`): no MFV trait column or "
             "verdict (a number on an axis the trait does not have); pmass and the other MFV columns stay.\n\n") +
            f"trait_mfv: MFV trait_nats (signed log-profile over {s.axis}); trait_mfv_ans: the same over the "
            f"vignettes the model still answers (pmass >= the base's median, {s.pmass_floor:.3f}); pmass: "
            "answer-token mass, **(-25%)** marks an arm more than 25% under base (its MFV trait may be a format "
            "shift); trait_llr*: trait under the held-out persona context; proj_v0: projection on the base vector; "
            "incoh_ctx: incoherence that does not read the trait (tail NLL under the base model, the lowest over the "
            "plain prompt and the held-out positive and negative persona contexts, + loop penalty; nats); dist_base: "
            "the same under the plain prompt only (a distance from base as much as incoherence); coh: coherent "
            "fraction; kl_*: KL(arm || base) on its greedy answers; cap_nll: mean NLL (nats/token) of 24 neutral "
            "reference answers (steer_heal/evals/capability.yaml, no arm trains on them), cap_kl: KL(arm || base) "
            "on those tokens (capability next to trait).\n")


def markdown(s: Study) -> str:
    """compare.md."""
    judges = ", ".join(f"{BY_NAME[k].label} {v:.2f}" for k, v in s.judges.items() if k in BY_NAME) or "none"
    untrusted = [BY_NAME[k].label for k in s.judges if k in BY_NAME and not s.trusted(k)]
    vs = verdicts(s)
    parts = [
        f"# {s.name}: {s.model}, {s.preset}, budget {s.budget} generated tokens per training arm\n",
        INTERVAL_NOTE + "\n",
        f"Judges' AUROC on the labelled replies (target label vs the rest; trait: enact-pos vs enact-neg): "
        f"{judges}. Under {s.min_auroc}: {', '.join(untrusted) or 'none'} (marked, not used in verdicts).\n",
        _measures_note(s),
        "## Arms (mean over seeds, 95% interval)\n", summary_markdown(s),
        "## Paired differences (arm - reference, 95% interval)\n", diffs_markdown(s),
        "## Verdicts\n", MULTIPLICITY_NOTE + "\n",
        "### Primary (declared before the run, Holm-adjusted)\n",
        "\n".join(f"- {v['line']}" for v in vs if v["family"] == "primary") or "none declared",
        "\n### Exploratory (unadjusted)\n",
        "\n".join(f"- {v['line']}" for v in vs if v["family"] != "primary") + "\n",
    ]
    extra = (short_runs_markdown(s), matched_markdown(s), dose_sweep_markdown(s), heal_markdown(s),
             mfv_transfer_markdown(s), answers_markdown(s))
    return "\n".join(parts + [x for x in extra if x])


def _residual(a, b) -> str:
    return "-" if a is None or b is None or not b else f"{100 * (a - b) / b:+.0f}%"


def matched_markdown(s: Study) -> str:
    """Each declared pair of trained arms (pairs, and the primary questions') side by side on what its students
    were trained on, with the residual of the first against the second: a matched comparison states its
    differences, measured."""
    trained = {a.name for a in s.trained()}
    named = [tuple(p) for p in s.pairs] + [tuple(q[:2]) for q in s.primary]  # the declared comparisons
    pairs = [(a, b) for a, b in dict.fromkeys(named) if a in trained and b in trained]
    if not pairs:
        return ""
    lines = ["## What each pair trained on (mean over seeds of each run's total)\n",
             "| pair | generated tokens | trained tokens | optimizer steps | lr sum | doses |",
             "|---|---|---|---|---|---|"]
    fmt = {"gen_tokens": "{:.0f}", "trained_tokens": "{:.0f}", "opt_steps": "{:.1f}", "lr_sum": "{:.3g}"}
    for a, b in pairs:
        x, y = s.spend(a), s.spend(b)
        cells = [(f"{fmt[k].format(x[k])} vs {fmt[k].format(y[k])} ({_residual(x[k], y[k])})"
                  if x[k] is not None and y[k] is not None else "-") for k in fmt]
        doses = f"{x['doses'] or '-'} vs {y['doses'] or '-'}"
        lines.append(f"| {a} vs {b} | " + " | ".join(cells) + f" | {doses} |")
    return "\n".join(lines + _per_round_lines(s, [x for p in pairs for x in p])) + "\n"


def _span(xs: list, fmt: str) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    lo, hi = fmt.format(min(xs)), fmt.format(max(xs))
    return lo if lo == hi else f"{lo}-{hi}"


def _per_round_lines(s: Study, arms: list[str]) -> list[str]:
    """Each paired arm's rounds / bakes one by one (range over seeds): a residual in the totals shows where it
    comes from. Only arms whose runs recorded what they trained on."""
    rows = []
    for a in dict.fromkeys(arms):
        for i, r in enumerate(s.spend_per_round(a)):
            doses = " / ".join(sorted({str(list(d)) for d in r["doses"] if d})) or "-"
            rows.append(f"| {a} | {i} | {_span(r['gen_tokens'], '{:.0f}')} | {_span(r['trained_tokens'], '{:.0f}')} | "
                        f"{_span(r['opt_steps'], '{:.0f}')} | {_span(r['lr_sum'], '{:.3g}')} | {doses} |")
    if not rows:
        return []
    return ["\nPer round / bake (range over seeds; generated tokens of that round / bake alone):\n",
            "| arm | round / bake | generated tokens | trained tokens | optimizer steps | lr sum | doses |",
            "|---|---|---|---|---|---|---|"] + rows


def short_runs_markdown(s: Study) -> str:
    runs = s.short_runs()
    if not runs:
        return ""
    lines = ["## Runs that stopped early\n",
             "A trained run with fewer rounds / bakes than another seed of its arm, or one whose own log says it "
             "stopped (its means and intervals use what it has).\n"]
    for arm, seed, n, most, why in runs:
        lines.append(f"- {arm} seed {seed}: {n} of {most} rounds / bakes; "
                     + (why or "the reason is not in its row (rows record it from 2026-12-07; see its events.jsonl)"))
    return "\n".join(lines) + "\n"


def dose_sweep_markdown(s: Study) -> str:
    arms = s.sweep_arms()
    if not arms or "base" not in s.by_arm:
        return ""
    prof = " | ".join(f"p_{f}" for f in FOUNDATIONS)
    lines = ["## Steering dose sweep (raw steering on the base vector vs base, 95% interval over items)\n",
             f"| arm | target_kl | kappa | d_trait_mfv | d_trait_mfv_ans | pmass | d_trait_llr* | d_incoh | coh | "
             f"kl_rmse | kl_mean | {prof} |", "|" + "---|" * (11 + len(FOUNDATIONS))]
    for a in [s.arm("base")] + arms:
        r = s.by_arm[a.name][0]
        ds = [cell(s.diff(a.name, "base", m), BY_NAME[m], signed=True) for m in ("trait_nats", "trait_nats_answering")]
        rest = [cell(s.diff(a.name, "base", "trait_llr_heldout"), BY_NAME["trait_llr_heldout"], True),
                cell(s.diff(a.name, "base", s.coh), BY_NAME[s.coh], True),
                cell(s.interval(a.name, "coherent"), BY_NAME["coherent"]),
                f"{r.get('kl_rmse', float('nan')):.3f}", f"{r.get('kl_mean', float('nan')):.3f}"]
        p = " | ".join(f"{x:.3f}" for x in r.get("profile", [float("nan")] * 7))
        t = "-" if a.target_kl is None else f"{a.target_kl:g}"
        k = r.get("kappa")
        lines.append(f"| {a.name} | {t} | {'-' if k is None else f'{k:.3g}'} | " + " | ".join(ds)
                     + f" | {_pmass(s, a.name)} | " + " | ".join(rest) + f" | {p} |")
    moved = [a.name for a in arms if (d := s.diff(a.name, "base", "trait_nats_answering")) and d.lo > 0]
    lines.append("")
    lines.append("Doses whose MFV trait (on the vignettes the model still answers) rises with an interval above 0: "
                 + (", ".join(moved) if moved else "none") + ".")
    return "\n".join(lines) + "\n"


def heal_markdown(s: Study) -> str:
    arms = s.trained()
    if len(s.curve()) < 2 or not arms:
        return ""
    lines = ["## Heal gain and retention (exploratory)\n",
             f"heal gain: the arm's trait_llr* minus raw steering's at the arm's own {s.coh}, on the dose curve "
             f"of base + {', '.join(a.name for a in s.sweep_arms())} (linear between points; '-' outside the "
             "curve). An arm heals where this sits above 0 with an interval that excludes 0. retention: "
             "(arm - base) / (raw steering at the arm's realised mean generation dose - base).\n",
             f"| arm | {s.coh} | trait_llr* | heal gain (trait_llr*) | realised dose (mean kappa) | retention "
             "trait_llr* |", "|---|---|---|---|---|---|"]
    for a in arms:
        hg, doses, ret = heal_gain(s, a.name), s.doses(a.name), retention(s, a.name)
        lines.append(f"| {a.name} | {cell(s.interval(a.name, s.coh), BY_NAME[s.coh])} | "
                     f"{cell(s.interval(a.name, 'trait_llr_heldout'), BY_NAME['trait_llr_heldout'])} | "
                     f"{'-' if hg is None else hg.fmt() + on_curve_note(s, a.name, 'Q1', hg)} | "
                     f"{f'{np.mean(doses):.3g}' if doses else '-'} | "
                     f"{f'{ret:.2f}' if math.isfinite(ret) else '-'} |")
    return "\n".join(lines) + "\n"


def mfv_transfer_markdown(s: Study) -> str:
    rows = [(a, t) for a in s.trained() if (t := mfv_transfer(s, a.name))]
    if not rows:
        return ""
    lines = ["## MFV transfer (exploratory)\n",
             "Per vignette, each arm's shift of its 7-way answer distribution from base (centred log-ratios), "
             "against raw steering's at the sweep point nearest the arm's realised dose. all: projection on "
             "steering's shift over all foundations (1 = the whole pattern, 0 = none); axis: mean shift on the "
             f"preset's foundations ({', '.join(f'{f} {x:+d}' for f, x in s.axis.items())}), steering's "
             "beside it. 95% t-intervals over seeds.\n",
             "| arm | steering ref | all | axis | steering's axis |", "|---|---|---|---|---|"]
    for a, t in rows:
        lines.append(f"| {a.name} | {t['ref']} | {t['all'].fmt()} | {t['axis'].fmt()} | {t['ref_axis']:+.3f} |")
    return "\n".join(lines) + "\n"


def answers_markdown(s: Study) -> str:
    ans = answers(s)
    if not ans:
        return ""
    return ("## The seed's questions (exploratory unless declared above; 95% intervals)\n\n"
            + "\n".join(f"- {x['line']}" for x in sorted(ans, key=lambda x: (x["question"] == "P", x["question"])))
            + "\n")


def drift_markdown(s: Study) -> str:
    arms = s.drift_arms()
    if not arms:
        return ""
    ms = list(DRIFT_KEYS)
    lines = ["## Drift over rounds / bakes (mean over seeds, 95% t-interval over seeds)\n",
             "| arm | round | seeds | " + " | ".join(ms) + " |", "|" + "---|" * (3 + len(ms))]
    for a in arms:
        series = {m: dict(s.drift_series(a.name, m)) for m in ms}
        n = max((len(r.get("rounds", [])) for r in s.by_arm[a.name]), default=0)
        for k in range(n):
            seeds = sum(len(r.get("rounds", [])) > k for r in s.by_arm[a.name])
            cells = [series[m][k].fmt("{:.3f}") if k in series[m] else "-" for m in ms]
            lines.append(f"| {a.name} | {k} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
