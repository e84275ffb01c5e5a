"""Write each committed study's numbers into README.md and docs/studies/<study>/README.md, from the
study's own files (docs/studies/<study>/compare.md and verdicts.json), never by hand.

    python recipes/study_readme.py           # rewrite the generated blocks
    python recipes/study_readme.py --check   # exit 1 if a block is out of date (the docs test runs this)

A study's files come from `steer-heal compare --config <its config> --report-only docs/studies/<study>`,
after copying compare.jsonl and judges.json from its run directory.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STUDIES = {"smollm2_cpu": "recipes/compare/smollm2_cpu.yaml",  # committed study -> its config
           "smollm2_drift": "recipes/compare/smollm2_drift.yaml",
           "smollm2_leash": "recipes/compare/smollm2_leash.yaml",
           "smollm2_leash_confirm": "recipes/compare/smollm2_leash_confirm.yaml",
           "smollm2_reward": "recipes/compare/smollm2_reward.yaml",
           "smollm2_reward_confirm": "recipes/compare/smollm2_reward_confirm.yaml",
           "smollm2_matched": "recipes/compare/smollm2_matched.yaml"}


def _section(md: str, head: str) -> str:
    """The body of a `## head` section of compare.md (up to the next `## `)."""
    i = md.index(f"## {head}")
    j = md.find("\n## ", i + 1)
    return md[md.index("\n", i) + 1:j if j >= 0 else len(md)].strip()


def primary_lines(study: str) -> list[str]:
    v = json.loads((ROOT / "docs/studies" / study / "verdicts.json").read_text())
    return [x["line"] for x in v if x.get("family") == "primary"]


def answer_lines(study: str) -> list[str]:
    """One line per question (Q1-Q3 of the seed, P the prompting baseline), every steered arm with its interval."""
    f = ROOT / "docs/studies" / study / "answers.json"
    by_q: dict[str, list[dict]] = {}
    for x in json.loads(f.read_text()) if f.exists() else []:
        by_q.setdefault(x["line"].split(":")[0], []).append(x)
    order = sorted(by_q, key=lambda q: (q.startswith("P"), q))  # Q1-Q3, then the prompting baseline
    return [f"{q}: " + "; ".join(x["line"].split(": ", 1)[1] for x in by_q[q]) for q in order]


def readme_block(study: str) -> str:
    v = json.loads((ROOT / "docs/studies" / study / "verdicts.json").read_text())
    n_expl = sum(x.get("family") != "primary" for x in v)
    lines = primary_lines(study)
    body = "\n".join(f"    {x}" for x in lines) if lines else "    (no primary question declared)"
    ans = answer_lines(study)
    lead = ("The seed's questions, per steered arm (mean [95% interval] over seeds; generated from "
            f"[answers.json](docs/studies/{study}/answers.json)):\n\n" + "\n".join(f"- {x}" for x in ans) + "\n\n"
            if ans else "")
    return (f"{lead}Primary verdicts of `{study}` (declared before the run, Holm-adjusted; generated from "
            f"[docs/studies/{study}/verdicts.json](docs/studies/{study}/verdicts.json) by "
            "`recipes/study_readme.py`):\n\n"
            f"{body}\n\n{n_expl} exploratory lines (unadjusted) and every arm's table: "
            f"[docs/studies/{study}/README.md](docs/studies/{study}/README.md).\n")


def study_page(study: str, intro: str) -> str:
    d = ROOT / "docs/studies" / study
    md = (d / "compare.md").read_text()
    figs = [f for f in ("lead.png", "frontier.png", "dose_sweep.png", "drift.png") if (d / f).exists()]
    return (f"{intro.strip()}\n\n<!-- generated:{study} -->\n## Arms (mean over seeds, 95% interval)\n\n"
            f"{_section(md, 'Arms')}\n\n## Verdicts\n\n{_section(md, 'Verdicts')}\n\n"
            + "".join(f"![{f[:-4]}]({f})\n\n" for f in figs)
            + f"Everything else (paired differences, judges, notes): [compare.md](compare.md). Regenerate: "
              f"`steer-heal compare --config {STUDIES[study]} --report-only docs/studies/{study}`, then "
              f"`python recipes/study_readme.py`.\n<!-- /generated:{study} -->\n")


def _replace(text: str, study: str, block: str, tag: str) -> str:
    a, b = f"<!-- {tag}:{study} -->", f"<!-- /{tag}:{study} -->"
    if a not in text or b not in text:
        raise SystemExit(f"error: markers {a} ... {b} not found; fix: add them where the block belongs")
    i, j = text.index(a) + len(a), text.index(b)
    return text[:i] + "\n" + block + text[j:]


def render() -> dict[Path, str]:
    """The files as they should read: README.md and each study page."""
    out = {}
    readme = ROOT / "README.md"
    text = readme.read_text()
    for study in STUDIES:
        if (ROOT / "docs/studies" / study / "verdicts.json").exists():
            if primary_lines(study):  # a dev stage (it chooses, no verdict) has its page only
                text = _replace(text, study, readme_block(study), "study")
            page = ROOT / "docs/studies" / study / "README.md"
            old = page.read_text() if page.exists() else f"# {study}\n"
            intro = old.split(f"<!-- generated:{study} -->")[0]
            out[page] = study_page(study, intro)
    out[readme] = text
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated block is out of date")
    args = ap.parse_args(argv)
    stale = [p for p, t in render().items() if not p.exists() or p.read_text() != t]
    if args.check:
        for p in stale:
            print(f"out of date: {p.relative_to(ROOT)}; fix: python recipes/study_readme.py")
        return 1 if stale else 0
    for p, t in render().items():
        p.write_text(t)
    return 0


if __name__ == "__main__":
    sys.exit(main())
