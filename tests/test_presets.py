"""Your own trait (issue 44): a persona pair is enough to start, `preset check` names every problem in one line,
`preset new` writes a skeleton that passes as written, a trait with no moral-foundations axis gets no MFV trait."""
import json
import math
from pathlib import Path

import pytest
import yaml

from steer_heal.cli import main
from steer_heal.presets import DEFAULT_SET, NEAR_DUPLICATE, PresetError, load_preset, overlap
from steer_heal.presets.check import MINIMUMS, check_preset

ROOT = Path(__file__).resolve().parents[1]
POS = "You are someone who expects things to turn out well, and says so warmly."
NEG = "You are someone who expects things to turn out badly, and says so flatly."


def _write(d: Path, name: str, body: dict) -> Path:
    f = d / f"{name}.yaml"
    f.write_text(yaml.safe_dump(body, sort_keys=False))
    return f


def test_shipped_general_sets_meet_the_minimums_and_the_near_duplicate_rule(tmp_path):
    """The trait-neutral sets a persona-pair preset runs on: enough texts, no held-out prompt near a context or a
    training prompt, none shared between dev and test."""
    p = load_preset(str(_write(tmp_path, "pair_only", {"persona_pos": POS, "persona_neg": NEG})))
    assert p.defaults == ["contexts", "prompts", "dev_prompts", "test_prompts"]
    for fld, n in MINIMUMS.items():
        assert len(set(getattr(p, fld))) >= n, fld
    assert check_preset(p) == []
    assert not set(p.dev_prompts) & set(p.test_prompts) and not set(p.prompts) & set(p.dev_prompts + p.test_prompts)
    assert max(overlap(t, d) for t in p.test_prompts for d in p.dev_prompts) < NEAR_DUPLICATE


def test_sets_are_referable_by_name_from_anywhere(tmp_path):
    sub = tmp_path / "elsewhere"
    sub.mkdir()
    own = _write(sub, "my_contexts", {"contexts": [f"Tell me about topic number {i}." for i in range(3)]})
    f = _write(sub, "t", {"persona_pos": POS, "persona_neg": NEG, "contexts": "general",
                          "include_contexts": own.name, "prompts": "forced-choice", "dev_prompts": "general"})
    p = load_preset(str(f), check=False)
    assert len(p.contexts) == 96 + 3 and p.prompts[0] != "" and "prompts" not in p.defaults
    assert set(p.defaults) == {"contexts", "dev_prompts", "test_prompts"}  # named or left to the general sets
    assert own in p.sources and len(p.sources) >= 4  # a study hashes every file the preset reads
    with pytest.raises(PresetError, match="no set named 'nope'; fix: .* one of"):
        load_preset(str(_write(sub, "u", {"persona_pos": POS, "persona_neg": NEG, "prompts": "nope"})))


BAD_CASES = [  # (preset fields, the fix its line must name)
    ({"persona_neg": NEG}, "persona_pos is empty; fix:"),
    ({"persona_pos": "You are someone who loves people.", "persona_neg": "You are someone who does not love people."},
     "differs by a negation ('not'); fix:"),
    ({"persona_pos": "You are kind.", "persona_neg": NEG}, "differ in length"),
    ({"persona_pos": POS, "persona_neg": NEG, "prompts": ["a", "b", "c"]}, "prompts: 3 distinct texts, fewer than"),
    ({"persona_pos": POS, "persona_neg": NEG, "dev_prompts": ["Should I take a job that pays more but means a longer "
                                                                "commute?"] * 8},
     "nearly copies"),
    ({"persona_pos": POS, "persona_neg": NEG, "foundations": {"Kindness": 1}}, "is not a moral foundation"),
    ({"persona_pos": POS, "persona_neg": NEG, "eval_persona_pos": "x"}, "only one of eval_persona_pos"),
    ({"persona_pos": POS, "persona_neg": NEG, "persona_demos": [{"user": "hi", "pos": "hello"}]},
     "persona_demos[0] needs user, pos and neg"),
    ({"persona_pos": POS, "persona_neg": NEG, "promts": ["typo"]}, "unknown key 'promts'"),
]


@pytest.mark.parametrize("body,fix", BAD_CASES, ids=[c[1][:24] for c in BAD_CASES])
def test_preset_check_names_each_problem_in_one_line(body, fix, tmp_path, capsys):
    f = _write(tmp_path, "bad", body)
    assert main(["preset", "check", str(f)]) == 1
    out = capsys.readouterr().out.splitlines()
    hits = [x for x in out if fix in x]
    assert hits and all(x.startswith(f"{f}: ") and "fix:" in x for x in out), out
    with pytest.raises(PresetError) as e:  # what run / compare say: the first problem, one line
        load_preset(str(f))
    assert "\n" not in str(e.value) and "fix:" in str(e.value)


def test_a_bad_preset_stops_run_and_compare_in_one_line_before_any_model(tmp_path, capsys):
    f = _write(tmp_path, "bad", {"persona_pos": POS})
    run_dir = tmp_path / "run"
    assert main(["run", "--config", "recipes/configs/smoke.yaml", f"preset={f}", f"run_dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: preset") and "persona_neg is empty" in err[0], err
    assert not run_dir.exists()  # nothing written: refused before the model and the run directory
    study = tmp_path / "study.yaml"
    study.write_text(yaml.safe_dump({"name": "s", "preset": str(f), "seeds": [1], "arms": [{"name": "base",
                                                                                          "kind": "base"}]}))
    assert main(["compare", "--config", str(study)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "persona_neg is empty" in err[0], err


def test_preset_new_writes_a_skeleton_that_passes_as_written(tmp_path, capsys):
    out = tmp_path / "optimism.yaml"
    assert main(["preset", "new", "optimism", "--pos", POS, "--neg", NEG, "--out", str(out)]) == 0
    text = out.read_text()
    for fld in ("persona_pos", "foundations", "contexts", "prompts", "dev_prompts", "test_prompts", "persona_demos",
                "eval_persona_pos"):
        assert fld in text  # every field is explained, the optional ones as comments
    assert main(["preset", "check", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-2].startswith(f"ok: {out}") and f"'{DEFAULT_SET}'" in lines[-1]
    p = load_preset(str(out))
    assert (p.persona_pos, p.persona_neg) == (POS, NEG) and p.foundations == {}
    assert main(["preset", "new", "optimism", "--pos", POS, "--neg", NEG, "--out", str(out)]) == 2  # no overwrite


def _fill(skel: Path, fixture: Path) -> None:
    """What a person does with the skeleton: replace the `general` prompt sets by the trait's own."""
    own = yaml.safe_load(fixture.read_text())
    lines = []
    for line in skel.read_text().splitlines():
        key = line.split(":")[0]
        if key in own and line.strip().endswith(DEFAULT_SET):
            lines.append(f"{key}: {json.dumps(own[key])}")
        else:
            lines.append(line)
    skel.write_text("\n".join(lines) + "\n")


def _one_round(preset: Path, tiny_cfg, tmp_path, capsys) -> tuple[list[dict], str]:
    run_dir = tmp_path / "run"
    assert main(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
                 f"preset={preset}", f"run_dir={run_dir}", "rounds=1"]) == 0
    return [json.loads(x) for x in (run_dir / "rounds.jsonl").read_text().splitlines()], capsys.readouterr().out


def test_a_persona_pair_alone_runs_a_round_on_the_general_sets(tiny_cfg, tmp_path, capsys):
    """Only persona_pos and persona_neg: one round end to end; the run says once which parts are defaults, and
    that the trait has no MFV axis (no MFV trait column; the MFV coherence columns stay)."""
    f = _write(tmp_path, "pair", {"name": "pair", "persona_pos": POS, "persona_neg": NEG})
    rows, out = _one_round(f, tiny_cfg, tmp_path, capsys)
    assert [r["round"] for r in rows] == [0]
    assert out.count("from the shipped trait-neutral 'general' sets") == 1
    assert out.count("names no moral foundations") == 1
    assert "trait_nats_healed" not in rows[0] and "d_trait_nats_healed" not in rows[0]
    assert math.isfinite(rows[0]["pmass_healed"])


def test_new_trait_from_the_skeleton_filled_checked_and_run(tiny_cfg, tmp_path, capsys):
    """The README's three commands: preset new, fill it in (from a fixture), preset check, one round."""
    f = tmp_path / "optimism.yaml"
    assert main(["preset", "new", "optimism", "--pos", POS, "--neg", NEG, "--out", str(f)]) == 0
    _fill(f, ROOT / "tests/fixtures/optimism.yaml")
    assert main(["preset", "check", str(f)]) == 0
    p = load_preset(str(f))
    assert p.defaults == ["contexts"] and len(p.prompts) == 16  # only the contexts stay the shipped set
    capsys.readouterr()
    rows, out = _one_round(f, tiny_cfg, tmp_path, capsys)
    assert len(rows) == 1 and "contexts from the shipped trait-neutral 'general' set;" in out


def test_mfv_columns_without_an_axis():
    from steer_heal.evals.mfv import MFVResult, mfv_columns, trait_nats

    res = MFVResult(rows=[], profile=[1 / 7] * 7, human_profile=[1 / 7] * 7, pmass_allowed=0.5, frac_unscorable=0.0,
                    nll_prefill=1.0, top1_acc=0.0, informedness=0.0, think_tokens=4)
    assert math.isnan(trait_nats(res, {}))
    cols = mfv_columns(res, res, {})
    assert "trait_nats" not in cols and "d_trait_nats" not in cols and cols["pmass"] == 0.5
    with_axis = mfv_columns(res, res, {"Care": 1})
    assert with_axis["trait_nats"] == pytest.approx(math.log(1 / 7)) and with_axis["d_trait_nats"] == 0.0
