"""`steer-heal compare` on the tiny model: arms train through their own entry points to a matched
budget, are evaluated by one function, resume, and are judged by a context the reward never saw."""
import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, tiny_dir, budget=60):
    cfg = dict(name="tiny", compare_dir=str(tmp_path / "cmp"), model=str(tiny_dir["llama"]), budget_tokens=budget,
               dtype="float32", eval=dict(eval_prompts=3, eval_max_new_tokens=8, mfv_n=7, think_tokens=4,
                                          mfv_batch_size=14), steer=dict(n_contexts=16),
               arms=[dict(name="base", kind="base"), dict(name="prompt", kind="prompt"),
                     dict(name="iter", kind="iterative", config=str(ROOT / "recipes/configs/smoke.yaml")),
                     dict(name="online", kind="online", config=str(ROOT / "recipes/configs/grpo_smoke.yaml"),
                          overrides=dict(bake_every=2))])
    p = tmp_path / "cmp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.slow
def test_four_arm_comparison_table_budget_and_resume(tiny_dir, mfv_dir, tmp_path):
    from steer_heal.cli import main
    from steer_heal.compare import COLUMNS, arm_rows, load_compare

    path = _config(tmp_path, tiny_dir)
    d = tmp_path / "cmp"
    # first invocation stops after the first training arm (as if killed between arms)
    assert main(["compare", "--config", str(path), "--arms", "base,prompt,iter"]) == 0
    first = {json.loads(x)["arm"]: json.loads(x) for x in (d / "compare.jsonl").read_text().splitlines()}
    log_size = (d / "iter" / "train.log").stat().st_size
    assert main(["compare", "--config", str(path)]) == 0
    assert (d / "iter" / "train.log").stat().st_size == log_size  # the finished arm was skipped, not rerun
    rows = {json.loads(x)["arm"]: json.loads(x) for x in (d / "compare.jsonl").read_text().splitlines()}
    assert list(rows) == ["base", "prompt", "iter", "online"]
    for arm in ("base", "prompt", "iter"):
        assert rows[arm] == first[arm]  # the same rows after the resume
    table = (d / "compare.md").read_text()
    assert all(h in table for _, h, _ in COLUMNS)
    for k in ("d_trait_nats", "d_trait_llr_heldout", "projection", "d_incoherence", "kl_rmse", "pmass", "gen_tokens"):
        assert k in rows["online"] and k in rows["iter"], k
    assert rows["base"]["d_trait_nats"] == 0.0 and rows["base"]["kl_rmse"] < 1e-3  # base vs itself
    assert rows["prompt"]["kl_rmse"] > 1e-3  # the persona prompt moves the distribution
    cfg = load_compare(str(path))
    for arm, kind in (("iter", "iterative"), ("online", "online")):
        r = arm_rows(d / arm, kind)
        used = rows[arm]["gen_tokens"]
        step = used - (r[-2]["gen_tokens"] if len(r) > 1 else 0)  # the last round's / bake's own tokens
        assert used >= cfg.budget_tokens and used - cfg.budget_tokens < step, (arm, used, step)
    assert len(arm_rows(d / "iter", "iterative")) == 1 and [x["step"] for x in arm_rows(d / "online", "online")] == [2]
    assert (d / "frontier.png").exists() and "<canvas" in (d / "frontier.html").read_text()
    assert "prompt" in (d / "answers.html").read_text()


def test_heldout_judge_differs_from_the_reward_context(tiny):
    from reward.components import preset_scorer
    from steer_heal.compare import heldout_scorer
    from steer_heal.presets import available, load_preset

    for name in available():
        p = load_preset(name)
        reward = preset_scorer(tiny.model, tiny.tokenizer, p)
        judge = heldout_scorer(tiny.model, tiny.tokenizer, p)
        assert judge.personas != reward.personas and set(judge.personas).isdisjoint(reward.personas)
        assert judge.demos and not any(d in reward.demos for d in judge.demos)
        assert {d["user"] for d in judge.demos}.isdisjoint(p.prompts + p.eval_prompts)


def test_bad_compare_config_one_line(tmp_path):
    from steer_heal.compare import CompareError, load_compare

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="distill")])))
    with pytest.raises(CompareError, match="fix: one of"):
        load_compare(str(p))
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="online")])))
    with pytest.raises(CompareError, match="needs config"):
        load_compare(str(p))
    with pytest.raises(CompareError, match="not found"):
        load_compare(str(tmp_path / "missing.yaml"))


def test_shipped_studies_load_and_every_arm_parses():
    """Each arm's config plus its overrides is accepted by that arm's own entry point's parser."""
    from trl import GRPOConfig, TrlParser

    from steer_heal.compare import load_compare, train_command
    from steer_heal.config import load_config
    from steer_heal.grpo.online import OnlineConfig

    files = sorted((ROOT / "recipes/compare").glob("*.yaml"))
    assert {f.stem for f in files} >= {"smollm2_cpu", "gemma3_4b"}
    for f in files:
        cfg = load_compare(str(f))
        kinds = {a.kind for a in cfg.arms}
        assert kinds == {"base", "prompt", "steer", "iterative", "online"}, f
        for arm in cfg.arms:
            if arm.kind == "iterative":
                load_config(ROOT / arm.config, [f"{k}={v}" for k, v in arm.overrides.items()])
            elif arm.kind == "online":
                cmd = train_command(cfg, arm, cfg.seeds[0])
                args = cmd[cmd.index("--config"):] + ["--bf16", "false", "--use_cpu", "true"]
                args[1] = str(ROOT / args[1])
                oc, ga = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config(args=args)
                assert oc.budget_tokens == cfg.budget_tokens and ga.save_steps == oc.bake_every


def test_seeds_give_mean_and_spread():
    from steer_heal.compare import format_compare, summary_rows

    rows = [dict(arm="base", kind="base", gen_tokens=0, d_trait_nats=0.0),
            dict(arm="on", kind="online", seed=1, gen_tokens=100, d_trait_nats=0.1),
            dict(arm="on", kind="online", seed=2, gen_tokens=120, d_trait_nats=0.3)]
    s = {r["arm"]: r for r in summary_rows(rows)}
    assert s["on"]["d_trait_nats"] == pytest.approx(0.2) and s["on"]["d_trait_nats_sd"] == pytest.approx(
        0.1414, abs=1e-4
    )
    assert s["on"]["n_seeds"] == 2 and "d_trait_nats_sd" not in s["base"]
    line = next(x for x in format_compare(rows).splitlines() if x.startswith("| on "))
    assert "+0.200 ±0.141" in line and "110" in line
