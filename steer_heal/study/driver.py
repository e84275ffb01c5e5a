"""`steer-heal compare`: arms side by side at a matched generated-token budget, judged by one evaluation on
measures no arm trained on.

    train:    each training arm x seed its own process (steer_heal.study.arms), finished ones skipped
    evaluate: one Evaluator for every arm (steer_heal.study.evaluate), cached by fingerprint (.cache)
    report:   compare.jsonl + judges.json, the report's only inputs; from them compare.md, verdicts.json,
              answers.json, the dose sweep, drift and frontier figures (.tables, .figures), answers.html
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

from steer_heal.rundir import write_atomic
from steer_heal.study.analysis import Study, load_preset_axis
from steer_heal.study.arms import arm_dir, stop_reason, study_rows, train_arm, trajectory
from steer_heal.study.cache import cached_eval, check_study_config, current_eval
from steer_heal.study.config import Arm, CompareConfig, CompareError
from steer_heal.study.evaluate import Evaluator
from steer_heal.study.figures import answers_page, dose_sweep_figure, drift_figure, frontier, lead_figure
from steer_heal.study.heal import answers
from steer_heal.study.tables import dose_sweep_markdown, drift_markdown, markdown, summary_markdown
from steer_heal.study.verdicts import verdicts


def run_compare(cfg: CompareConfig, only: list[str] | None = None, train_only: bool = False) -> list[dict]:
    """Train the selected arms (each seed its own process; finished ones are skipped), evaluate
    them with one evaluator, then report every arm of the config that has an evaluation
    (`train_only`: stop after training)."""
    arms = [a for a in cfg.arms if not only or a.name in only]
    if only and len(arms) != len(only):
        raise CompareError(f"--arms {only}: unknown arm(s) {sorted(set(only) - {a.name for a in cfg.arms})}; "
                           f"fix: pick from {[a.name for a in cfg.arms]}")
    cfg.dir.mkdir(parents=True, exist_ok=True)
    check_study_config(cfg)
    jobs = [(arm, seed) for arm in arms if arm.trained for seed in cfg.seeds]  # train first, each its own process
    progress = Progress(len(jobs), "trained")
    for arm, seed in jobs:
        info = train_arm(cfg, arm, seed)
        progress.step(f"{arm.name} seed {seed}", skipped=info.get("skipped", False))
    if train_only:
        return []
    ev = Evaluator(cfg)
    judges = ev.judges()
    base, _ = cached_eval(cfg, ev, Arm("base", "base"), None)
    jobs = [(arm, seed) for arm in arms for seed in arm_seeds(cfg, arm)]
    progress = Progress(len(jobs), "evaluated")
    for arm, seed in jobs:
        _, cached = cached_eval(cfg, ev, arm, seed)
        progress.step(arm.name + (f" seed {seed}" if seed is not None else ""), skipped=cached)
    # every arm of the config with an evaluation made under today's evaluator and its own final weights
    evals = {a.name: {s: e for s in arm_seeds(cfg, a) if (e := current_eval(cfg, ev, a, s)) is not None}
             for a in cfg.arms}
    rows = [_row(cfg, a, s, e, base) for a in cfg.arms for s, e in evals.get(a.name, {}).items()]
    write_report(cfg, rows, judges)
    return rows


class Progress:
    """One line per finished arm x seed: n/N, elapsed, and what remains at the mean pace of the jobs that ran
    (skipped ones, already done, cost nothing and do not count toward the pace)."""

    def __init__(self, total: int, verb: str):
        self.total, self.verb, self.done, self.ran, self.t0 = total, verb, 0, 0, time.perf_counter()

    def step(self, what: str, skipped: bool = False) -> str:
        self.done += 1
        self.ran += not skipped
        el = time.perf_counter() - self.t0
        left = self.total - self.done
        eta = f"~{_hms(el / self.ran * left)} left" if self.ran and left else ("done" if not left else "pace unknown")
        line = (f"[compare] {self.verb} {self.done}/{self.total}: {what}" + (" (already done)" if skipped else "")
                + f" | elapsed {_hms(el)} | {eta}")
        print(line, flush=True)
        return line


def _hms(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def arm_seeds(cfg: CompareConfig, arm: Arm) -> list:
    return list(cfg.seeds) if arm.trained else [None]


def _row(cfg, arm: Arm, seed, res: dict, base: dict) -> dict:
    """One arm x seed: its scalars (compare.jsonl) plus the per-item values the report resamples."""
    info = {}
    if arm.trained:
        f = arm_dir(cfg, arm, seed) / "arm_done.json"
        info = json.loads(f.read_text()) if f.exists() else {}
    row = dict(arm=arm.name, kind=arm.kind, control=arm.control, placebo_of=arm.placebo_of, seed=seed,
               # what the arm ran with, from its own record (arm_done.json), not from today's config
               engine=info.get("engine", "?") if arm.trained else "", doses=info.get("doses"),
               gen_tokens=info.get("gen_tokens", 0), seconds=info.get("seconds", 0.0),
               **{k: v for k, v in res.items() if k not in ("texts", "prompts", "items", "mfv_think")})
    for k in ("trait_nats", "trait_llr_heldout", "incoherence"):
        if k in res and k in base:
            row[f"d_{k}"] = res[k] - base[k]
    if arm.trained:
        row["trajectory"] = trajectory(arm_dir(cfg, arm, seed))
        row["stopped"] = stop_reason(arm_dir(cfg, arm, seed))
        row["rounds"] = study_rows(arm_dir(cfg, arm, seed))
    row["texts"], row["prompts"], row["items"] = res["texts"], res["prompts"], res.get("items", {})
    return row


def _rounded(x, sig: int = 6):
    """Per-item values at 6 significant digits: the committed study files stay small; NaN stays NaN."""
    if isinstance(x, list):
        return [_rounded(v, sig) for v in x]
    return float(f"{x:.{sig}g}") if isinstance(x, float) and math.isfinite(x) else x


def write_report(cfg: CompareConfig, rows: list[dict], judges: dict, d: Path | None = None) -> None:
    """compare.jsonl (every arm x seed with its per-item values) and judges.json, the report's only inputs, then
    the report from them: `steer-heal compare --report-only DIR` rebuilds it from those two files alone."""
    d = d or cfg.dir
    with open(d / "compare.jsonl.tmp", "w") as f:
        for r in rows:
            row = {k: v for k, v in r.items() if k not in ("texts", "prompts")}
            row["items"] = {k: _rounded(v) for k, v in r.get("items", {}).items()}
            f.write(json.dumps(row) + "\n")
    os.replace(d / "compare.jsonl.tmp", d / "compare.jsonl")
    write_atomic(d / "judges.json", json.dumps(judges, indent=1))
    report_from(cfg, d)
    if any(r.get("texts") for r in rows):
        answers_page(d, rows)


def merge_study(src: Path, into: Path) -> list[str]:
    """Another run of the same study (src/compare.jsonl) merged into a study folder (into/compare.jsonl): each arm x
    seed in src replaces the same one in into, the rest of into is kept. Both must come from one evaluator (their base
    rows carry the same fingerprint: model, preset files, settings, evaluation code), else refused in one line. A study
    that spans checkouts (a fresh runs/ folder) adds its arms to the committed copy this way. Returns what changed."""
    def rows(d: Path) -> list[dict]:
        if not (d / "compare.jsonl").exists():
            raise CompareError(f"{d} has no compare.jsonl; fix: pass a study folder (a finished run's or its committed "
                               "copy under docs/studies/)")
        return [json.loads(x) for x in (d / "compare.jsonl").read_text().splitlines() if x.strip()]

    if not (into / "compare.jsonl").exists() and (src / "compare.jsonl").exists():  # a study's first import
        into.mkdir(parents=True, exist_ok=True)
        for j in ("compare.jsonl", "judges.json"):
            if (src / j).exists():
                shutil.copyfile(src / j, into / j)
        return [f"added {r['arm']} seed {r['seed']}" for r in rows(into) if r["arm"] != "base"]
    new, old = rows(src), rows(into)
    fp = {d: {r.get("fingerprint") for r in rs if r["arm"] == "base"} for d, rs in ((src, new), (into, old))}
    if not fp[src] or fp[src] != fp[into]:
        raise CompareError(f"{src} and {into} were evaluated under different evaluators (base fingerprints "
                           f"{sorted(map(str, fp[src]))} vs {sorted(map(str, fp[into]))}); fix: re-evaluate one of "
                           "them under today's settings (their arms' rows are not comparable)")
    for j in ("judges.json",):
        a, b = src / j, into / j
        if a.exists() and b.exists() and json.loads(a.read_text()) != json.loads(b.read_text()):
            raise CompareError(f"{a} and {b} differ (the judges were scored differently); fix: re-evaluate one study")
    key = lambda r: (r["arm"], r["seed"])  # noqa: E731
    incoming = {key(r): r for r in new if r["arm"] != "base"}  # base is the same evaluation on both sides
    kept = [incoming.pop(key(r), None) or r for r in old]
    changed = [f"replaced {a} seed {s}" for a, s in (key(r) for r in new if r["arm"] != "base")
               if any(key(o) == (a, s) for o in old)]
    changed += [f"added {a} seed {s}" for a, s in incoming]
    with open(into / "compare.jsonl.tmp", "w") as f:
        for r in kept + list(incoming.values()):
            f.write(json.dumps(r) + "\n")
    os.replace(into / "compare.jsonl.tmp", into / "compare.jsonl")
    return changed


def report_from(cfg: CompareConfig, d: Path) -> Study:
    """The report (compare.md, verdicts.json, answers.json, dose sweep, drift, frontier) from d/compare.jsonl and
    d/judges.json alone."""
    if not (d / "compare.jsonl").exists():
        raise CompareError(f"{d} has no compare.jsonl; fix: pass the folder of a finished study (or its committed "
                           "copy under docs/studies/)")
    rows = [json.loads(x) for x in (d / "compare.jsonl").read_text().splitlines() if x.strip()]
    judges = json.loads((d / "judges.json").read_text()) if (d / "judges.json").exists() else {}
    evals = {r["arm"] for r in rows}
    arms = [a for a in cfg.arms if a.name in evals]
    s = Study(cfg.name, cfg.model, cfg.preset, cfg.budget_tokens, arms, rows, load_preset_axis(cfg.preset), judges,
              cfg.pairs, cfg.n_boot, cfg.min_auroc, cfg.primary)
    vs = verdicts(s)
    write_atomic(d / "compare.md", markdown(s))
    write_atomic(d / "verdicts.json", json.dumps(vs, indent=1))
    write_atomic(d / "answers.json", json.dumps(answers(s), indent=1))
    sweep = dose_sweep_markdown(s)
    if sweep:
        write_atomic(d / "dose_sweep.md", sweep)
        dose_sweep_figure(s, d)
    drift = drift_markdown(s)
    if drift:
        write_atomic(d / "drift.md", drift)
        drift_figure(s, d)
    print(summary_markdown(s), flush=True)
    print("\n".join(v["line"] for v in vs), flush=True)
    frontier(s, d)
    lead_figure(s, d)
    return s
