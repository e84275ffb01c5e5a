"""The docs: every relative link and image resolves, the README stays short, study numbers are generated
from committed files (and those files rebuild the same report), and the CLI answers without torch."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _targets(md: Path):
    for m in LINK.finditer(md.read_text()):
        t = m.group(1)
        if not re.match(r"[a-z]+:", t) and not t.startswith("#"):
            yield t.split("#")[0]


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_image_resolves(md):
    missing = [t for t in _targets(md) if not (md.parent / t).exists()]
    assert not missing, f"{md.relative_to(ROOT)}: {missing}"


def test_link_checker_sees_links_and_images():
    text = "see [a](docs/x.md#s) and ![f](img.png) and [w](https://example.org) and [h](#top)"
    assert [m.group(1) for m in LINK.finditer(text)] == ["docs/x.md#s", "img.png", "https://example.org", "#top"]


def test_readme_is_short_and_names_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 300
    assert "make demo" in text and "make test" in text and "docs/design.md" in text


def test_study_numbers_are_generated_not_typed():
    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import study_readme
    finally:
        sys.path.pop(0)
    assert study_readme.main(["--check"]) == 0  # README and study pages equal what the committed files give
    for study in study_readme.STUDIES:
        if (ROOT / "docs/studies" / study / "verdicts.json").exists():
            block = study_readme.readme_block(study)
            assert all(line in block for line in study_readme.primary_lines(study))


def _close(a, b) -> bool:
    """Equal structure and text; floats equal to 1e-9 relative."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=1e-9, abs=1e-15)
    return a == b


@pytest.mark.parametrize("study", sorted(p.parent.name for p in (ROOT / "docs/studies").glob("*/compare.jsonl")))
def test_committed_study_report_rebuilds_from_its_files(study, tmp_path):
    """`--report-only` on a copy of the study's compare.jsonl and judges.json writes the committed report."""
    from steer_heal.study.config import load_compare
    from steer_heal.study.driver import report_from

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import study_readme
    finally:
        sys.path.pop(0)
    src = ROOT / "docs/studies" / study
    for f in ("compare.jsonl", "judges.json"):
        (tmp_path / f).write_text((src / f).read_text())
    cfg = load_compare(str(ROOT / study_readme.STUDIES[study]))
    report_from(cfg, tmp_path)
    assert (tmp_path / "compare.md").read_text() == (src / "compare.md").read_text()
    # numbers to 1e-9 relative: the last digits of a t quantile or a sum move with the BLAS / numpy build
    got, want = (json.loads((d / "verdicts.json").read_text(), parse_constant=str) for d in (tmp_path, src))
    assert _close(got, want)
    fam = {v["family"] for v in json.loads((src / "verdicts.json").read_text())}
    assert fam <= {"primary", "exploratory"}
    if cfg.eval.split == "dev":  # a stage that chooses on the dev prompts gives no verdict
        assert not cfg.primary and fam == {"exploratory"}
    else:  # a study that reports on the test prompts declared its primary questions
        assert "primary" in fam


def test_cli_help_and_version_answer_without_torch():
    code = ("import sys; from steer_heal.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH' if 'torch' in sys.modules else 'NO-TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    assert out.strip().endswith("NO-TORCH")
    for cmd in ("run", "export", "eval", "score", "compare"):
        assert re.search(rf"^\s+{cmd}\s+\S", out, re.M), cmd  # the description names every subcommand
    ver = subprocess.run([sys.executable, "-m", "steer_heal.cli", "--version"], capture_output=True, text=True,
                         cwd=ROOT).stdout
    assert re.match(r"steer-heal \d+\.\d+\.\d+", ver)


# rows committed before realised() read rollout_alphas (issue 45): their alpha-2 dose is not in any committed file,
# so they are listed here, not corrected by recomputation; a new stale row fails the test below
STALE_DOSES = {("smollm2_cpu", "online_matched"), ("smollm2_cpu", "online_matched_half")}


@pytest.mark.parametrize("study", sorted(p.parent.name for p in (ROOT / "docs/studies").glob("*/compare.jsonl")))
def test_committed_rows_record_the_doses_and_tokens_their_configs_give(study):
    """Each trained row's recorded doses are its config's alphas (iterative: steer.alphas; online: rollout_alphas)
    x each round's / bake's kappa, one list per round; its generated tokens are its last round's and within 5%
    of the study's budget unless the arm itself sets a shorter run (max_steps / rounds)."""
    import yaml

    from steer_heal.config import load_config
    from steer_heal.study.config import cli_value, load_compare

    sys.path.insert(0, str(ROOT / "recipes"))
    try:
        import study_readme
    finally:
        sys.path.pop(0)
    cfg = load_compare(str(ROOT / study_readme.STUDIES[study]))
    arms = {a.name: a for a in cfg.arms}
    checked = 0
    for line in (ROOT / "docs/studies" / study / "compare.jsonl").read_text().splitlines():
        r = json.loads(line)
        a = arms[r["arm"]]
        if not a.trained:
            continue
        rounds = r["rounds"]
        assert r["gen_tokens"] == rounds[-1]["gen_tokens"], (r["arm"], r["seed"])
        if not ({"max_steps", "rounds"} & set(a.overrides)) and not a.control:
            assert r["gen_tokens"] >= 0.95 * cfg.budget_tokens, (r["arm"], r["seed"], r["gen_tokens"])
        if a.control or (study, a.name) in STALE_DOSES:
            continue
        if a.kind == "iterative":
            alphas = load_config(ROOT / a.config, [f"{k}={cli_value(v)}" for k, v in a.overrides.items()]).steer.alphas
        else:
            alphas = (yaml.safe_load((ROOT / a.config).read_text()) | a.overrides).get("rollout_alphas") or [1.0]
        want = [[round(x * k["kappa"], 4) for x in alphas] for k in rounds]
        assert r["doses"] == want or [sorted(set(d)) for d in r["doses"]] == [sorted(set(w)) for w in want], \
            (r["arm"], r["seed"], r["doses"], want)
        checked += 1
    assert checked, study


NUMBER = re.compile(r"(?<![\w.\-])[+-]?\d+\.\d+(?!\w|\.\d)")  # a sentence's closing full stop ends it


def _unsupported(prose: str, files: str) -> list[str]:
    """The decimal numbers of `prose` that no number of `files` gives at the precision the prose prints."""
    have = {float(x) for x in NUMBER.findall(files)}
    out = []
    for tok in NUMBER.findall(prose):
        dec, x = len(tok.split(".")[1]), float(tok)
        if tok not in files and not any(abs(round(h, dec) - x) < 1e-9 for h in have):
            out.append(tok)
    return out


def _study_files(d: Path) -> str:
    """What a reader is pointed to: the tables and verdicts (not compare.jsonl's per-item values, which hold
    nearly every 3-digit number)."""
    return "".join(p.read_text() for p in sorted(d.iterdir())
                   if p.suffix in (".md", ".json") and p.name != "README.md")


def _units(d: Path, cfg: dict) -> list[str]:
    """The pieces of a study that each speak of some arms: a line of its tables, one JSON object of its
    verdicts / answers, one arm of its config."""
    out = [json.dumps(a) for a in cfg["arms"]]

    def walk(o):
        if isinstance(o, dict):
            out.append(json.dumps(o))
            for v in o.values():
                walk(v)
        elif isinstance(o, list):
            for v in o:
                walk(v)

    for p in sorted(d.iterdir()):
        if p.suffix == ".md" and p.name != "README.md":
            out += p.read_text().splitlines()
        elif p.suffix == ".json":
            walk(json.loads(p.read_text()))
    return out


def _misplaced(prose: str, units: list[str], arms: list[str]) -> list[str]:
    """The numbers of each sentence that names arms (`in backticks`) that no line, verdict or config entry
    naming one of those arms gives: a number quoted for the wrong arm."""
    out = []
    for sent in re.split(r"(?<=[.;:])\s+|\n\n", prose):
        named = [a for a in arms if f"`{a}`" in sent]
        if named:
            near = "\n".join(u for u in units if any(re.search(rf"(?<!\w){re.escape(a)}(?!\w)", u) for a in named))
            out += _unsupported(" ".join(NUMBER.findall(sent)), near)
    return out


@pytest.mark.parametrize("study", sorted(p.parent.name for p in (ROOT / "docs/studies").glob("*/compare.jsonl")))
def test_every_number_in_a_study_pages_prose_is_in_its_files(study):
    """A study page's own words (before its generated block; an archived section, marked as copied from a run
    that was not kept, aside) quote only numbers the study's committed files hold, and a sentence that names
    arms quotes numbers the files give for those arms."""
    d = ROOT / "docs/studies" / study
    page = (d / "README.md").read_text()
    prose = page.split(f"<!-- generated:{study} -->")[0].split("\n## Archived")[0]
    assert _unsupported(prose, _study_files(d)) == []
    f = ROOT / "recipes/compare" / f"{study}.yaml"
    if not f.exists():  # a study kept from an older layout, with no config to name its arms
        return
    cfg = yaml.safe_load(f.read_text())
    arms = sorted({a["name"] for a in cfg["arms"]} | {a["name"] + "_placebo" for a in cfg["arms"]})
    units = _units(d, cfg)
    assert _misplaced(prose, units, arms) == []
    # the check can fail: a number the files hold, quoted for an arm whose rows do not give it
    a = cfg["arms"][-1]["name"]
    near = "\n".join(u for u in units if re.search(rf"(?<!\w){re.escape(a)}(?!\w)", u))
    other = next(t for t in NUMBER.findall("\n".join(units)) if len(t.split(".")[1]) == 3 and _unsupported(t, near))
    assert _misplaced(f"`{a}` scored {other}.", units, arms) == [other]


def test_every_number_in_the_readme_results_prose_is_in_a_study():
    text = (ROOT / "README.md").read_text()
    results = text[text.index("## Results"):text.index("\n## ", text.index("## Results") + 3)]
    prose = re.sub(r"<!-- study:(\w+) -->.*?<!-- /study:\1 -->", "", results, flags=re.S)
    files = "".join(_study_files(d) for d in sorted((ROOT / "docs/studies").iterdir()) if d.is_dir())
    assert _unsupported(prose, files) == []
    assert _unsupported("an invented +0.123456", files) == ["+0.123456"]  # the check can fail
