"""The MFV gap, text side: what the trained students think before they answer a vignette, next to the steered
model's and the base model's think traces on the same vignette and frame (issue 31).

Raw steering at the generation dose moves the MFV trait up with answer-token mass rising; the students
distilled from it move it down with mass falling. The answer side is in the study report (`## MFV transfer`,
`pmass`); this reads the think traces each evaluation keeps in its cache (RUN_DIR/eval/*.json, `mfv_think`)
and measures, per vignette (both frames), each arm minus base, with the report's intervals (seeds x items):

    vignette   share of the trace's content words that occur in the vignette: does it engage with the case?
    warm       share of its content words from the preset's own warm vocabulary (words of the positive
               persona demos, training and held-out, that no negative demo uses): does it talk in the trait's voice?
    like_steer Jaccard overlap of its content words with the steered model's trace on the same vignette and
               frame: does it think like the teacher it was distilled from?
    digit      share of traces that already name an option digit (0-6): does it commit to an answer while
               thinking, as the protocol's answer pass then reads?

    python recipes/mfv_gap.py --config recipes/compare/smollm2_cpu.yaml --steered steer_kl2 \\
        --arms online_kd,hyp_forced_choice,abl_no_verb --out docs/studies/smollm2_cpu/mfv_gap.md
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import numpy as np
import yaml

from steer_heal import stats
from steer_heal.evals.mfv_data import load_vignettes
from steer_heal.presets import HERE as PRESET_DIR
from steer_heal.presets import content_words
from steer_heal.study.cache import load_eval
from steer_heal.study.config import load_compare

MEASURES = ("vignette", "warm", "like_steer", "digit")


def words(text: str) -> set[str]:
    """The preset module's topic words (its near-duplicate check's), digits left out."""
    return {w for w in content_words(text) if not w.isdigit()}


def warm_lexicon(preset: str) -> set[str]:
    """Words of the preset's positive persona demos (training and held-out) that none of its negative demos uses."""
    p = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    demos = p.get("persona_demos", []) + p.get("eval_persona_demos", [])
    pos = {w for d in demos for w in words(d["pos"])}
    neg = {w for d in demos for w in words(d["neg"])}
    return pos - neg


def trace_measures(think: list[list[str]], vignettes: list[str], steered: list[list[str]] | None,
                   warm: set[str]) -> dict[str, list[float]]:
    """Per vignette (the mean of its two frames) each measure of one evaluation's think traces."""
    out: dict[str, list[float]] = {m: [] for m in MEASURES}
    for i, (frames, vig) in enumerate(zip(think, vignettes)):
        vw = set(words(vig))
        per: dict[str, list[float]] = {m: [] for m in MEASURES}
        for f, t in enumerate(frames):
            w = words(t)
            per["vignette"].append(np.mean([x in vw for x in w]) if w else np.nan)
            per["warm"].append(np.mean([x in warm for x in w]) if w else np.nan)
            per["digit"].append(float(bool(re.search(r"\b[0-6]\b", t))))
            if steered is not None:
                a, b = w, words(steered[i][f])
                per["like_steer"].append(len(a & b) / len(a | b) if a | b else np.nan)
        for m in MEASURES:
            out[m].append(float(np.nanmean(per[m])) if per[m] and np.isfinite(per[m]).any() else np.nan)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="the study's config (its compare_dir holds the caches)")
    ap.add_argument("--steered", default="steer_kl2", help="the raw-steering arm the students were distilled from")
    ap.add_argument("--arms", required=True, help="comma-separated trained arms to read")
    ap.add_argument("--mfv-dir", default=None, help="vignettes folder (default $STEER_HEAL_MFV_DIR, then the hub)")
    ap.add_argument("--out", required=True, help="markdown output")
    a = ap.parse_args(argv)
    cfg = load_compare(a.config)
    by_name = {x.name: x for x in cfg.arms}
    vignettes = [r["text"] for r in load_vignettes(a.mfv_dir)]
    warm = warm_lexicon(cfg.preset)

    def think_of(arm: str, seed) -> list[list[str]] | None:
        e = load_eval(cfg, by_name[arm], seed)
        return e.get("mfv_think") if e else None

    steered = think_of(a.steered, None)
    base = think_of("base", None)
    if not steered or not base:
        raise SystemExit(f"error: {cfg.dir}/eval has no think traces for base or {a.steered}; fix: evaluate them "
                         f"first (steer-heal compare --config {a.config} --arms base,{a.steered})")
    if len(vignettes) != len(base):
        raise SystemExit(f"error: {len(vignettes)} vignettes but {len(base)} traces; fix: pass the --mfv-dir the "
                         "study was evaluated on")

    def values(arm: str) -> tuple[dict[str, stats.Values], int]:
        seeds = [None] if not by_name[arm].trained else list(cfg.seeds)
        per = [(s, trace_measures(t, vignettes, steered, warm)) for s in seeds if (t := think_of(arm, s))]
        sd = tuple(s for s, _ in per) if by_name[arm].trained else None
        return {m: stats.Values(np.array([p[m] for _, p in per], dtype=float), seeds=sd) for m in MEASURES}, len(per)

    vb, _ = values("base")
    lines = [f"# The MFV gap, text side ({cfg.name})\n",
             f"`python recipes/mfv_gap.py --config {a.config} --steered {a.steered} --arms {a.arms}`\n",
             "Each arm's think traces (T tokens per vignette and frame) minus base's, per vignette, with 95% intervals "
             "that carry the seed-to-seed spread (steer_heal/stats.py). Read in recipes/mfv_gap.py's docstring.\n",
             f"Warm vocabulary ({len(warm)} words from the preset's positive demos): "
             f"{', '.join(sorted(warm)[:24])}{', ...' if len(warm) > 24 else ''}\n",
             "| arm | seeds | " + " | ".join(f"{m} (base {stats.point(vb[m]):.3f})" for m in MEASURES) + " |",
             "|---|---|" + "---|" * len(MEASURES)]
    for arm in [a.steered] + [x for x in a.arms.split(",") if x]:
        v, n = values(arm)
        if not n:
            lines.append(f"| {arm} | 0 | " + " | ".join("-" for _ in MEASURES) + " |")
            continue
        cells = []
        for m in MEASURES:
            if m == "like_steer" and arm == a.steered:
                cells.append("(itself)")
                continue
            d = stats.paired_diff(v[m], vb[m])
            cells.append(f"{stats.point(v[m]):.3f} ({d.fmt()})")
        lines.append(f"| {arm} | {n if by_name[arm].trained else '-'} | " + " | ".join(cells) + " |")
    lines += ["", "Cells: the arm's value (its difference from base [95% interval]).", "",
              "## One vignette's traces (forward frame)\n"]
    i = 0
    lines.append(f"Vignette: {vignettes[i][:300]}\n")
    for arm in ["base", a.steered] + [x for x in a.arms.split(",") if x]:
        seed = cfg.seeds[0] if by_name[arm].trained else None
        t = think_of(arm, seed)
        if t:
            lines.append(f"- **{arm}**{f' (seed {seed})' if seed is not None else ''}: "
                         f"{' '.join(t[i][0].split())!r}")
    Path(a.out).write_text("\n".join(lines) + "\n")
    print("\n".join(x for x in lines if x.startswith("|")))
    print(f"done: {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
