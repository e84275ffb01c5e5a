"""Bad input: one-line errors that name the fix, and nothing already written is lost."""
import json
import os

import pytest

from steer_heal.cli import main
from steer_heal.config import ConfigError, load_config
from steer_heal.models import ModelLoadError, resolve_model_path
from steer_heal.presets import available, load_preset


def test_unknown_model_offline():
    with pytest.raises(ModelLoadError, match="fix: pass a local folder"):
        resolve_model_path("no-such-org/no-such-model-xyz")


def test_config_unknown_key_and_bad_type():
    with pytest.raises(ConfigError, match="unknown config key 'heal.lamb'.*fix"):
        load_config(None, ["heal.lamb=0.3"])
    with pytest.raises(ConfigError, match="heal.epochs"):
        load_config(None, ["heal.epochs=lots"])
    cfg = load_config("recipes/configs/demo.yaml", ["heal.kl_beta=0.7", "steer.alphas=[0.5,1.0]", "rounds=5"])
    assert cfg.heal.kl_beta == 0.7 and cfg.steer.alphas == [0.5, 1.0] and cfg.rounds == 5


def _cli(args, capsys):
    """Run the CLI; return its exit code and its error line(s) (progress bars on stderr are dropped)."""
    rc = main(args)
    raw = capsys.readouterr().err
    assert "Traceback" not in raw
    return rc, "\n".join(x for x in raw.replace("\r", "\n").splitlines() if x.startswith("error:"))


@pytest.mark.parametrize("override,needle", [
    (["persona_pos=", "persona_neg=x"], "empty persona"),
    (["persona_pos=Same one", "persona_neg=same one"], "identical"),
    (["steer.layers=[0,7]"], "outside the model"),
    (["model.model=/nonexistent/folder/model"], "not found locally"),
])
def test_cli_bad_input_one_line(tiny_cfg, capsys, override, needle):
    rc, err = _cli(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
                    f"run_dir={tiny_cfg.run_dir}", *override], capsys)
    assert rc == 2
    assert len(err.splitlines()) == 1 and needle in err and "fix" in err, err


def test_unwritable_run_dir(tiny_cfg, capsys, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    if os.access(ro, os.W_OK):  # root ignores permissions: use a path under a regular file instead
        (tmp_path / "file").write_text("x")
        target = tmp_path / "file" / "run"
    else:
        target = ro / "run"
    rc, err = _cli(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
                    f"run_dir={target}"], capsys)
    assert rc == 2 and "not writable" in err and "fix" in err and len(err.splitlines()) == 1


def test_filter_kept_too_few_keeps_run_dir_intact(tiny_cfg, capsys):
    args = ["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
            f"run_dir={tiny_cfg.run_dir}", "rounds=1"]
    assert main(args) == 0
    before = (open(f"{tiny_cfg.run_dir}/rounds.jsonl").read(), open(f"{tiny_cfg.run_dir}/config.yaml").read())
    rc, err = _cli(["run", "--resume", tiny_cfg.run_dir, "rounds=2", "min_train=1000"], capsys)
    # min_train changes the fingerprint: refused as another config, nothing touched
    assert rc == 2 and "another config" in err
    assert (open(f"{tiny_cfg.run_dir}/rounds.jsonl").read(), open(f"{tiny_cfg.run_dir}/config.yaml").read()) == before


def test_filter_empty_error(tiny_cfg, capsys):
    rc, err = _cli(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
                    f"run_dir={tiny_cfg.run_dir}", "reward.max_tail_nll=0.01"], capsys)
    assert rc == 2 and "filter kept 0/" in err and "fix" in err and len(err.splitlines()) == 1
    events = [json.loads(x) for x in open(f"{tiny_cfg.run_dir}/events.jsonl")]
    assert events[-1]["event"] == "filter_empty"


def test_filter_starved_after_training_stops_the_run(tiny_cfg, capsys, monkeypatch):
    """After round 0 a starved filter is an outcome (the trained student's text fails it), not bad
    input: the run stops cleanly with the rounds it has and logs why."""
    import steer_heal.loop as loop

    real = loop.collect

    def starved(ctx, v, kappa, r):
        samples = real(ctx, v, kappa, r)
        for x in samples:
            x["kept"] = x["kept"] and r == 0
        return samples

    monkeypatch.setattr(loop, "collect", starved)
    rc = main(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
               f"run_dir={tiny_cfg.run_dir}", "rounds=3", "min_train=1"])
    assert rc == 0 and "stopping: round 1: the filter kept 0/" in capsys.readouterr().out
    assert len(open(f"{tiny_cfg.run_dir}/rounds.jsonl").read().splitlines()) == 1
    events = [json.loads(x) for x in open(f"{tiny_cfg.run_dir}/events.jsonl")]
    stop = [e for e in events if e["event"] == "stop_filter_starved"]
    assert len(stop) == 1 and stop[0]["round"] == 1 and stop[0]["kept"] == 0


def test_nan_loss_stops_and_keeps_last_good_round(tiny_cfg, capsys, monkeypatch):
    import steer_heal.heal.train as train

    real = train.heal_terms

    def poisoned(student, batch, cfg, ref_ctx):
        nll, D, bar, k, kl = real(student, batch, cfg, ref_ctx)
        return (nll * float("nan") if student.n_bakes >= 1 else nll), D, bar, k, kl

    monkeypatch.setattr(train, "heal_terms", poisoned)
    rc, err = _cli(["run", "--config", "recipes/configs/smoke.yaml", f"model.model={tiny_cfg.model.model}",
                    f"run_dir={tiny_cfg.run_dir}", "rounds=2"], capsys)
    assert rc == 2 and "heal loss is nan" in err and len(err.splitlines()) == 1
    rows = [json.loads(x) for x in open(f"{tiny_cfg.run_dir}/rounds.jsonl")]
    assert [r["round"] for r in rows] == [0]  # round 0 complete and intact
    assert (tiny_cfg and os.path.exists(f"{tiny_cfg.run_dir}/round_00/cumulative/adapter_model.safetensors"))


def test_every_shipped_config_loads():
    from pathlib import Path

    from steer_heal.presets import available, load_preset

    for f in sorted(Path("recipes/configs").glob("*.yaml")):
        if f.name.startswith("grpo_"):  # TrlParser configs of the online recipe: tests/test_grpo_online.py
            continue
        cfg = load_config(f)
        p = load_preset(cfg.preset)
        assert p.persona_pos and p.persona_neg, f
    for name in available():
        p = load_preset(name)
        assert len(set(p.contexts)) >= 128 and len(set(p.prompts)) >= 32 and p.eval_prompts
        assert not set(p.eval_prompts) & set(p.prompts)  # fixed eval prompts are never trained on


@pytest.mark.parametrize("name", available())
def test_eval_prompts_are_no_near_copies_of_what_runs_see(name):
    """Every dev and test prompt stays under the topic-word overlap threshold with every extraction context,
    training prompt and persona demonstration; test has >= 32 prompts and shares none with dev."""
    from steer_heal.presets import NEAR_DUPLICATE, near_duplicates, overlap

    p = load_preset(name)
    assert near_duplicates(p) == []
    assert len(set(p.test_prompts)) >= 32 and not set(p.test_prompts) & set(p.dev_prompts)
    assert max(overlap(t, d) for t in p.test_prompts for d in p.dev_prompts) < NEAR_DUPLICATE
    # the measure itself: a known near copy from an earlier prompt set is caught, two topics are not
    assert overlap("Describe the crowd leaving a football match.", "Describe the crowd at a football match.") >= 0.35
    assert overlap("How do you feel about strangers?", "How do you feel about children?") == 0.0
    with pytest.raises(ValueError, match="fix: dev or test"):
        p.split("train")


def test_train_prompts_replace_only_the_training_prompts(tmp_path, mfv_dir):
    """train_prompts swaps the preset's training prompts; the vector's contexts and the held-out prompts stay;
    the shipped forced-choice set is no near copy of a held-out prompt or of any MFV vignette."""
    from steer_heal.config import RunConfig
    from steer_heal.evals.mfv_data import load_vignettes
    from steer_heal.presets import NEAR_DUPLICATE, load_prompt_set, overlap
    from steer_heal.stages import run_preset

    plain = run_preset(RunConfig(preset="love-of-humanity"))
    swapped = run_preset(RunConfig(preset="love-of-humanity", train_prompts="forced-choice"))
    assert swapped.prompts != plain.prompts and len(swapped.prompts) >= 32
    assert (swapped.contexts, swapped.dev_prompts, swapped.test_prompts) == \
        (plain.contexts, plain.dev_prompts, plain.test_prompts)
    vignettes = [r["text"] for r in load_vignettes(mfv_dir, "classic", "other_violate")]
    assert max(overlap(a, v) for a in swapped.prompts for v in vignettes) < NEAR_DUPLICATE
    near = tmp_path / "near.yaml"
    near.write_text('prompts: ["Describe the people on the night bus heading home after work."]\n')
    with pytest.raises(ValueError, match="nearly copies the held-out prompt .*fix: reword or drop it"):
        load_prompt_set(str(near), plain)
    with pytest.raises(ValueError, match="unknown prompt set 'nope'; fix: use one of"):
        load_prompt_set("nope", plain)
