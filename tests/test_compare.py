"""`steer-heal compare` on the tiny model: arms train through their own entry points to a matched
budget, are evaluated by one function, resume, and are judged by a context the reward never saw."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, tiny_dir, budget=60, **extra):
    cfg = dict(name="tiny", compare_dir=str(tmp_path / "cmp"), model=str(tiny_dir["llama"]), budget_tokens=budget,
               dtype="float32", seeds=[1, 2], n_boot=300,
               eval=dict(eval_prompts=3, eval_max_new_tokens=8, mfv_n=7, think_tokens=4, mfv_batch_size=14),
               steer=dict(n_contexts=16), pairs=[["online", "iter"]],
               arms=[dict(name="base", kind="base"), dict(name="prompt", kind="prompt"),
                     dict(name="steer_lo", kind="steer", overrides=dict(target_kl=0.05)),
                     dict(name="steer_hi", kind="steer", overrides=dict(target_kl=1.0)),
                     dict(name="iter", kind="iterative", config=str(ROOT / "recipes/configs/smoke.yaml"), placebo=True),
                     dict(name="online", kind="online", config=str(ROOT / "recipes/configs/grpo_smoke.yaml"),
                          overrides={"online.bake_every": 2}),
                     dict(name="online_pd", kind="online", config=str(ROOT / "recipes/configs/grpo_smoke.yaml"),
                          overrides={"online.bake_every": 2, "control": "prompt_distil"})]) | extra
    p = tmp_path / "cmp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


@pytest.mark.slow
def test_comparison_controls_sweep_intervals_budget_and_resume(tiny_dir, mfv_dir, tmp_path):
    from steer_heal.cli import main
    from steer_heal.study.arms import arm_rows
    from steer_heal.study.config import load_compare

    path = _config(tmp_path, tiny_dir)
    d = tmp_path / "cmp"
    # first invocation stops after the first training arm (as if killed between arms)
    assert main(["compare", "--config", str(path), "--arms", "base,prompt,iter"]) == 0
    first = {(r["arm"], r["seed"]): r for r in map(json.loads, (d / "compare.jsonl").read_text().splitlines())}
    log_size = (d / "iter-s1" / "train.log").stat().st_size
    assert main(["compare", "--config", str(path)]) == 0
    assert (d / "iter-s1" / "train.log").stat().st_size == log_size  # the finished arm was skipped, not rerun
    rows = {(r["arm"], r["seed"]): r for r in map(json.loads, (d / "compare.jsonl").read_text().splitlines())}
    arms = list(dict.fromkeys(a for a, _ in rows))
    assert arms == ["base", "prompt", "steer_lo", "steer_hi", "iter", "iter_placebo", "online", "online_pd"]
    for k in first:
        assert rows[k] == first[k]  # the same rows after the resume
    assert rows[("base", None)]["d_trait_nats"] == 0.0 and rows[("base", None)]["kl_rmse"] < 1e-3
    assert rows[("iter", 1)]["engine"] == "hf" and rows[("base", None)]["engine"] == ""  # the arm's rollout engine
    assert rows[("prompt", None)]["kl_rmse"] > 1e-3  # the persona prompt moves the distribution
    # capability next to trait: base against itself is at KL 0 on the neutral answers; the prompt moves it
    assert rows[("base", None)]["cap_kl"] < 1e-5 < rows[("prompt", None)]["cap_kl"]
    assert rows[("base", None)]["cap_nll"] > 0 and "cap_nll" in (d / "compare.md").read_text()
    # the MFV think traces stay in the evaluation cache (both frames per vignette), not in compare.jsonl
    cache = json.loads((d / "eval" / "base.json").read_text())
    assert len(cache["mfv_think"]) == len(cache["items"]["mfv_p"]) and all(len(t) == 2 for t in cache["mfv_think"])
    assert "mfv_think" not in rows[("base", None)]
    # the sweep: a larger iso-KL target gives a larger dose and a larger KL to base
    lo, hi = rows[("steer_lo", None)], rows[("steer_hi", None)]
    assert lo["target_kl"] == 0.05 and hi["target_kl"] == 1.0 and lo["kappa"] < hi["kappa"]
    assert lo["kl_rmse"] < hi["kl_rmse"]
    # the placebo arm ran at dose 0 with the same seeds; the steered arm did not
    for s in (1, 2):
        assert all(r["kappa"] == 0.0 for r in arm_rows(d / f"iter_placebo-s{s}"))
        assert all(r["kappa"] > 0.0 for r in arm_rows(d / f"iter-s{s}"))
        assert rows[("iter_placebo", s)]["placebo_of"] == "iter"
    cfg = load_compare(str(path))
    for arm in ("iter-s1", "online-s2"):
        r = arm_rows(d / arm)
        used = r[-1]["gen_tokens"]
        step = used - (r[-2]["gen_tokens"] if len(r) > 1 else 0)  # the last round's / bake's own tokens
        assert used >= cfg.budget_tokens and used - cfg.budget_tokens < step, (arm, used, step)
    md = (d / "compare.md").read_text()
    assert "## Verdicts" in md and "iter vs iter_placebo (placebo), trait_mfv:" in md
    assert "| iter | iterative | hf | 2 |" in md and "| base | base | - | 1 |" in md
    assert "iter vs online_pd (prompt_distil)" in md and "online vs iter (pair)" in md and "AUROC" in md
    assert "## Steering dose sweep" in md and (d / "dose_sweep.md").exists() and (d / "dose_sweep.png").exists()
    verdicts = json.loads((d / "verdicts.json").read_text())
    for v in verdicts:
        assert v["lo"] <= v["value"] <= v["hi"], v
        if v["verdict"].startswith("not used"):
            continue
        if v["n_seeds"] == 2:  # a trained arm on 2 seeds: the measurement, never a verdict
            assert v["verdict"] == "no verdict (n = 2 < 3 seeds)", v
        else:  # untrained vs untrained: the verdict follows the interval's side of 0 and the measure's direction
            from steer_heal.study.measures import BY_NAME

            up = BY_NAME[v["measure"]].higher_is_better
            want = ("not distinguishable" if v["lo"] <= 0 <= v["hi"] else
                    "better" if (v["lo"] > 0) == up else "worse")
            assert v["verdict"] == want, v
    # each baseline's direction on the measures the tiny model moves without doubt: raw steering at the high
    # target is further from base than at the low one (KL to base, both greedy on the same prompts)
    assert rows[("steer_hi", None)]["kl_mean"] > rows[("steer_lo", None)]["kl_mean"]
    # the report is rebuilt from compare.jsonl and judges.json alone, to the same text
    md0, v0 = (d / "compare.md").read_text(), (d / "verdicts.json").read_text()
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("compare.jsonl", "judges.json"):
        (copy / f).write_text((d / f).read_text())
    assert main(["compare", "--config", str(path), "--report-only", str(copy)]) == 0
    assert (copy / "compare.md").read_text() == md0 and (copy / "verdicts.json").read_text() == v0
    done = json.loads((d / "iter-s1" / "arm_done.json").read_text())  # what the arm ran with, recorded
    assert done["engine"] == "hf" and len(done["doses"]) == len(arm_rows(d / "iter-s1"))
    assert all(x > 0 for row in done["doses"] for x in row)
    rc = yaml.safe_load((d / "iter-s1" / "config.yaml").read_text())  # read from the rows, equal to alpha x kappa
    assert done["doses_logged"] and done["doses"] == [[round(a * r["kappa"], 4) for a in rc["steer"]["alphas"]]
                                                      for r in arm_rows(d / "iter-s1")]
    # a changed study setting is refused in one line; adding an arm is not
    assert main(["compare", "--config", str(path), "budget_tokens=999", "--arms", "base"]) == 2
    page = (d / "frontier.html").read_text()  # the PNG embedded beside the numbers it draws, no script
    assert (d / "frontier.png").exists() and "data:image/png;base64," in page and "<script" not in page
    assert all(r["arm"] in page for r in (json.loads(x) for x in (d / "compare.jsonl").read_text().splitlines()))
    assert "prompt" in (d / "answers.html").read_text()


@pytest.mark.slow
def test_an_arm_killed_mid_run_resumes_to_the_uninterrupted_result(tiny_dir, mfv_dir, tmp_path):
    """An online arm stopped right after its first checkpoint (no evaluation cached anywhere), then resumed by the
    same command, ends with the same bakes and the same final evaluation as an arm that ran straight through."""
    from steer_heal.cli import main

    def cfg(d, budget=100, **ov):  # 64 generated tokens per bake: budget 100 ends at the second bake
        return _config(tmp_path / d, tiny_dir, budget=budget, seeds=[1], pairs=[], arms=[
            dict(name="base", kind="base"),
            dict(name="online", kind="online", config=str(ROOT / "recipes/configs/grpo_smoke.yaml"),
                 overrides={"online.bake_every": 2} | ov)])

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert main(["compare", "--config", str(cfg("a"))]) == 0
    assert main(["compare", "--config", str(cfg("b", **{"online.stop_after_step": 2}))]) == 2  # the arm exits mid-run
    b = tmp_path / "b" / "cmp"
    assert not (b / "eval").exists() and not (b / "online-s1" / "arm_done.json").exists()
    assert (b / "online-s1" / "checkpoint-2").exists()
    assert main(["compare", "--config", str(cfg("b"))]) == 0  # the same study: resumes from checkpoint-2
    a = tmp_path / "a" / "cmp"
    bakes = [[json.loads(x) for x in (d / "online-s1" / "bakes.jsonl").read_text().splitlines()] for d in (a, b)]
    assert [r["bake"] for r in bakes[1]] == [r["bake"] for r in bakes[0]] and len(bakes[0]) >= 2
    ea, eb = (json.loads((d / "eval" / "online-s1.json").read_text()) for d in (a, b))
    assert eb["texts"] == ea["texts"]
    for k, v in ea["items"].items():
        np.testing.assert_allclose(np.array(eb["items"][k], float), np.array(v, float), rtol=1e-4, atol=1e-6,
                                   equal_nan=True, err_msg=k)
    # killed right after the checkpoint of the bake that reached the budget: the resume trains nothing more
    (tmp_path / "c").mkdir()
    assert main(["compare", "--config", str(cfg("c", budget=60, **{"online.stop_after_step": 2}))]) == 2
    assert main(["compare", "--config", str(cfg("c", budget=60))]) == 0
    c = tmp_path / "c" / "cmp" / "online-s1"
    assert [json.loads(x)["bake"] for x in (c / "bakes.jsonl").read_text().splitlines()] == [0]
    assert "nothing left to train" in (c / "train.log").read_text()


@pytest.mark.slow
def test_failed_arm_stops_with_one_line_naming_its_log(tiny_dir, mfv_dir, tmp_path, capsys):
    from steer_heal.cli import main

    path = _config(tmp_path, tiny_dir, pairs=[], arms=[dict(name="base", kind="base"), dict(
        name="broken", kind="online", config=str(ROOT / "recipes/configs/grpo_smoke.yaml"),
        overrides=dict(use_vllm=True))])  # a TRL setting: passes compare's checks, the arm's process refuses it
    assert main(["compare", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "broken" in err[0] and "broken-s1/train.log" in err[0] and "Traceback" not in err[0]


def test_heldout_judge_differs_from_the_reward_context(tiny):
    from reward.components import heldout_scorer, preset_scorer
    from steer_heal.presets import available, load_preset

    for name in available():
        p = load_preset(name)
        reward = preset_scorer(tiny.model, tiny.tokenizer, p)
        judge = heldout_scorer(tiny.model, tiny.tokenizer, p)
        assert judge.personas != reward.personas and set(judge.personas).isdisjoint(reward.personas)
        assert judge.demos and not any(d in reward.demos for d in judge.demos)
        assert {d["user"] for d in judge.demos}.isdisjoint(p.prompts + p.eval_prompts)


def test_bad_compare_config_one_line(tmp_path):
    from steer_heal.study.config import CompareError, load_compare

    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="distill")])))
    with pytest.raises(CompareError, match="fix: one of"):
        load_compare(str(p))
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="online")])))
    with pytest.raises(CompareError, match="needs config"):
        load_compare(str(p))
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="prompt", placebo=True)])))
    with pytest.raises(CompareError, match="placebo: true needs a steered training arm"):
        load_compare(str(p))
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="online", config="x.yaml",
                                                overrides=dict(control="placbo"))])))
    with pytest.raises(CompareError, match="unknown control"):
        load_compare(str(p))
    with pytest.raises(CompareError, match="not found"):
        load_compare(str(tmp_path / "missing.yaml"))
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="online", config="x.yaml", placebo=True,
                                                overrides={"online.objective": "opd"})])))
    with pytest.raises(CompareError, match="fix: compare the arm with base"):
        load_compare(str(p))
    # a steer-heal setting is written by its path for both drivers: a flat name in an online arm is refused
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="online", config="x.yaml",
                                                overrides=dict(kl_tau=0.1))])))
    with pytest.raises(CompareError, match="override 'kl_tau' is a steer-heal setting; fix: write it as heal.kl_tau"):
        load_compare(str(p))
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="online", config="x.yaml", overrides={
        "heal.kl_tau": 0.1, "online.rollout_alphas": [0.0, 1.0], "learning_rate": 1e-3, "control": ""})])))
    # held as the flat names the online recipe's parser reads; TRL's and top-level keys unchanged
    assert load_compare(str(p)).arms[0].overrides == {"kl_tau": 0.1, "rollout_alphas": [0.0, 1.0],
                                                      "learning_rate": 1e-3, "control": ""}
    p.write_text(yaml.safe_dump(dict(arms=[dict(name="a", kind="base"), dict(name="b", kind="prompt")],
                                     primary=[["a", "b", "trait_llr_heldout", "f", "higher"]])))
    with pytest.raises(CompareError, match=r"expected one of \('better', 'worse', 'not worse'\)"):
        load_compare(str(p))


def test_a_run_of_one_seed_lands_where_the_full_study_looks(tmp_path, tiny_dir):
    """`seeds=[42]` (a pilot, or one seed resumed alone) writes <arm>-s42, the directory and evaluation
    the full study's seeds [42, 43] then reuse; a single-seed study written under the bare name still
    resumes there."""
    from steer_heal.study.arms import arm_dir
    from steer_heal.study.cache import _eval_path
    from steer_heal.study.config import load_compare

    path = _config(tmp_path, tiny_dir)
    one, full = load_compare(str(path), ["seeds=[42]"]), load_compare(str(path), ["seeds=[42, 43]"])
    arm = next(a for a in full.arms if a.name == "online")
    assert arm_dir(one, arm, 42) == arm_dir(full, arm, 42) == tmp_path / "cmp" / "online-s42"
    assert _eval_path(one, arm, 42) == _eval_path(full, arm, 42)
    assert _eval_path(full, next(a for a in full.arms if a.name == "base"), None).name == "base.json"
    (tmp_path / "cmp" / "online").mkdir(parents=True)  # a legacy single-seed study
    assert arm_dir(one, arm, 42) == tmp_path / "cmp" / "online"
    assert arm_dir(full, arm, 42) == tmp_path / "cmp" / "online-s42"


def test_shipped_studies_load_and_every_arm_parses():
    """Each arm's config plus its overrides is accepted by that arm's own entry point's parser."""
    from trl import GRPOConfig, TrlParser

    from steer_heal.config import load_config
    from steer_heal.grpo.online import OnlineConfig
    from steer_heal.study.arms import train_command
    from steer_heal.study.config import cli_value, load_compare

    files = sorted((ROOT / "recipes/compare").glob("*.yaml"))
    assert {f.stem for f in files} >= {"smollm2_cpu", "gemma3_4b", "smollm2_drift"}
    for f in files:
        cfg = load_compare(str(f))
        kinds = {a.kind for a in cfg.arms}
        if f.stem == "smollm2_drift":  # the long-horizon barrier study: training arms, >= 8 rounds / bakes
            assert kinds == {"base", "iterative", "online"} and len(cfg.seeds) >= 2
            for kind, agg, beta in (("iterative", "heal.kl_agg", "heal.kl_beta"), ("online", "kl_agg", "kl_beta")):
                arms = [a for a in cfg.arms if a.kind == kind]  # every aggregate and no barrier, on both engines
                assert {a.overrides.get(agg) for a in arms} >= {"rmse", "mean", "p95", "max"}, kind
                assert any(a.overrides.get(beta) == 0.0 for a in arms), kind
            assert {a.kind for a in cfg.arms if a.placebo_of} == {"iterative", "online"}  # drift from training alone
        elif f.stem == "smollm2_leash":  # issue 31's leash sweep, stage 1: chooses on the dev split, >= 8 rounds
            assert kinds == {"base", "steer", "iterative"} and cfg.eval.split == "dev"  # steer: the dose curve
            it = [a for a in cfg.arms if a.kind == "iterative"]
            assert all(a.overrides["rounds"] >= 8 for a in it)
            assert len({a.overrides["heal.kl_tau"] for a in it}) >= 3  # tau at >= 3 values
            assert {a.overrides["heal.kl_reference"] for a in it} == {"prev", "base"}
            assert any(a.overrides.get("heal.kl_beta_decay_power", 0) < 0 for a in it)  # the seed's decaying beta
        elif f.stem == "smollm2_leash_confirm":  # stage 2: fresh seeds, test prompts, every trained arm's placebo
            dev = load_compare(str(f.with_name("smollm2_leash.yaml")))
            assert kinds == {"base", "prompt", "steer", "iterative"} and cfg.eval.split == "test"
            assert len(cfg.seeds) >= 3 and not set(cfg.seeds) & set(dev.seeds) and cfg.primary
            trained = [a for a in cfg.arms if a.kind == "iterative" and not a.placebo_of]
            assert len(trained) == 2 and {f"{a.name}_placebo" for a in trained} <= {a.name for a in cfg.arms}
            chosen = {a.name: a.overrides for a in dev.arms}  # stage 2 runs the chosen settings unchanged
            assert all(a.overrides == chosen[a.name] for a in trained)
        elif f.stem == "smollm2_reward":  # issue 43's dev search: the reward alone teaches (objective grpo)
            assert kinds == {"base", "prompt", "steer", "online"} and cfg.eval.split == "dev" and not cfg.primary
            rw = [a for a in cfg.arms if a.kind == "online" and not a.placebo_of]
            assert all(a.overrides["objective"] in ("grpo", "grpo+nll") for a in rw)
            assert any(0.0 in a.overrides["rollout_alphas"] for a in rw)  # groups with the student's own reply
            assert any(min(a.overrides["rollout_alphas"]) > 0 for a in rw)  # and without
            seen = {k: {str(a.overrides.get(k)) for a in rw} for k in ("is_correction", "reward_norm", "w_incoh")}
            assert seen["is_correction"] >= {"None", "truncated", "shaped"} and "per_term" in seen["reward_norm"]
            assert len(seen["w_incoh"]) >= 2 and {a.overrides["objective"] for a in rw} == {"grpo", "grpo+nll"}
            assert any(a.placebo_of for a in cfg.arms)  # RL on the reward alone, steering off
        elif f.stem == "smollm2_matched":  # issue 45: matched on what each side trains on, by construction
            arms = {a.name: a for a in cfg.arms}
            it = load_config(ROOT / arms["iter_m"].config, [f"{k}={cli_value(v)}" for k, v in
                                                            arms["iter_m"].overrides.items()])
            on = yaml.safe_load((ROOT / arms["online_m"].config).read_text()) | arms["online_m"].overrides
            # the same doses, fixed: alphas x kappa, no calibration, no probes, no controller
            assert list(it.steer.alphas) == on["rollout_alphas"] and it.steer.kappa == on["kappa"] > 0
            assert it.steer.walk_max_steps == 0 and on["dose_down"] == on["dose_up"] == 1.0
            # generated per round / bake: replies x tokens
            per_round = it.gen.n_per_alpha * len(it.steer.alphas) * it.gen.max_new_tokens
            per_bake = on["bake_every"] * on["per_device_train_batch_size"] * on["max_completion_length"]
            assert per_round == per_bake and it.rounds * per_round == on["max_steps"] * per_bake // on["bake_every"]
            # each kept reply once, batches of 8, one step per batch: steps per round = per bake when >= 33 kept
            assert it.heal.epochs == 1 and it.heal.val_frac == 0 and it.heal.grad_accum == 1
            assert it.heal.batch_size == on["per_device_train_batch_size"]
            n_steps = math.ceil(33 / it.heal.batch_size)
            assert n_steps == on["bake_every"]
            # learning-rate sum per round / bake within 5%: cosine without warm-up over 5 steps vs constant
            cos_sum = sum(it.heal.lr * 0.5 * (1 + math.cos(math.pi * i / n_steps)) for i in range(n_steps))
            assert it.heal.warmup_ratio == 0 and on["lr_scheduler_type"] == "constant"
            assert cos_sum == pytest.approx(on["learning_rate"] * on["bake_every"], rel=0.05)
            # the same sampling, optimizer, LoRA and no barrier in either
            assert it.gen.top_p == on.get("top_p", 1.0) and it.gen.temperature == on["temperature"]
            assert list(it.heal.betas) == [0.9, on["adam_beta2"]] and it.engine == on["engine"]
            assert (it.heal.lora_r, it.heal.lora_alpha) == (on["lora_r"], on["lora_alpha"])
            assert it.heal.kl_beta == on["kl_beta"] == 0.0
            # the same arm, one bake
            assert arms["online_m_half"].overrides == arms["online_m"].overrides | {"max_steps": on["bake_every"]}
            declared = {tuple(q[:3]): (q[4] if len(q) > 4 else "") for q in cfg.primary}
            assert declared[("online_m_half", "iter_m", "trait_llr_heldout")] == "not worse"
            assert {("iter_m", "iter_m_placebo"), ("online_m", "online_m_placebo")} <= {k[:2] for k in declared}
            assert len(cfg.seeds) >= 3 and cfg.eval.split == "test"
        elif f.stem == "smollm2_reward_confirm":  # stage 2: the chosen regime, its placebo, online_nll, ablations
            dev = load_compare(str(f.with_name("smollm2_reward.yaml")))
            assert cfg.eval.split == "test" and len(cfg.seeds) >= 3 and not set(cfg.seeds) & set(dev.seeds)
            arms = {a.name: a for a in cfg.arms}
            chosen = {a.name: a.overrides for a in dev.arms}["rw_grpo_nll"]
            assert arms["rw_grpo_nll"].overrides == chosen and "rw_grpo_nll_placebo" in arms  # unchanged
            assert arms["online_nll"].overrides == chosen | {"objective": "nll"}  # the same run, no policy term
            assert arms["rw_no_trait"].overrides == chosen | {"reward_ablation": "trait_llr"}
            assert arms["rw_no_incoh"].overrides == chosen | {"reward_ablation": "incoherence"}
            declared = {(a, b, m): q[4] if len(q) > 4 else "" for q in cfg.primary for a, b, m in [q[:3]]}
            assert declared[("rw_no_trait", "rw_grpo_nll", "trait_llr_heldout")] == "worse"  # directions written first
            assert declared[("rw_no_incoh", "rw_grpo_nll", "incoh_ctx")] == "worse"
            refs = {b for a, b, _ in declared if a == "rw_grpo_nll"}
            assert refs >= {"rw_grpo_nll_placebo", "online_nll", "prompt"}
        else:
            assert kinds == {"base", "prompt", "steer", "iterative", "online"}, f
            assert len(cfg.seeds) >= 3 and cfg.eval.eval_prompts >= 24 and cfg.eval.mfv_n == 0, f
            assert any(a.placebo_of for a in cfg.arms) and any(a.control == "prompt_distil" for a in cfg.arms), f
        for arm in cfg.arms:
            if arm.kind == "iterative":
                load_config(ROOT / arm.config, [f"{k}={v}" for k, v in arm.overrides.items()])
            elif arm.kind == "online":
                cmd = train_command(cfg, arm, cfg.seeds[0])
                args = cmd[cmd.index("--config"):] + ["--bf16", "false", "--use_cpu", "true"]
                args[1] = str(ROOT / args[1])
                oc, ga = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config(args=args)
                assert oc.budget_tokens == cfg.budget_tokens and ga.save_steps == oc.bake_every
                # a list override reaches the parser whole (one word per value), and a placebo drops the
                # multi-strength rollouts its steered arm asks for (a control refuses them)
                assert oc.rollout_alphas == [float(x) for x in arm.overrides.get("rollout_alphas", [])]
                assert not (arm.control and oc.rollout_alphas)
        multi = [a for a in cfg.arms if a.overrides.get("rollout_alphas")]
        if f.stem == "smollm2_cpu":  # issue 32: a multi-strength arm with its placebo, and reward ablations
            assert multi and any(a.placebo_of == multi[0].name for a in cfg.arms)
            assert {a.overrides.get("reward_ablation") for a in cfg.arms} >= {"trait_llr", "incoherence",
                                                                              "verbalisation", "refusal"}


def test_kl_to_base_and_capability_nll_equal_a_float64_loop(tiny):
    """The evaluation's per-sequence KL(student || base) (mean and rmse over positions) and the student's NLL of the
    tokens (the capability measure), against a plain forward per sequence in float64; the student reads a persona
    system prompt, the base the plain prompt."""
    import math

    import torch

    from steer_heal.chat import encode_prompt, render_prompt
    from steer_heal.student import Student
    from steer_heal.study.evaluate import kl_to_base

    tok = tiny.tokenizer
    st = Student(tiny.model, tok, r=4, alpha=8, band=(0.0, 1.0))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in st.layers.values():
            m.lora_B["default"].weight.copy_(torch.randn(m.lora_B["default"].weight.shape, generator=g) * 0.3)
    qs = ["why is the sky blue?", "what is a prime number?"]
    ans = [tok(" light scatters in the air", add_special_tokens=False).input_ids + [tok.eos_token_id],
           tok(" a number with two divisors", add_special_tokens=False).input_ids, []]
    sp = [encode_prompt(tok, render_prompt(tok, q, system="You are terse.")) for q in qs] + [[1, 2]]
    bp = [encode_prompt(tok, render_prompt(tok, q)) for q in qs] + [[1, 2]]
    out = kl_to_base(st, tok, sp, ans, bp, None)
    assert all(math.isnan(out[k][2]) for k in ("rmse", "mean", "nll"))  # an empty answer: NaN, skipped by means
    for i in range(2):
        with torch.no_grad():
            ls = st.model(torch.tensor([sp[i] + ans[i]])).logits[0, len(sp[i]) - 1:-1].double().log_softmax(-1)
            with st.base():
                lb = st.model(torch.tensor([bp[i] + ans[i]])).logits[0, len(bp[i]) - 1:-1].double().log_softmax(-1)
        kl = (ls.exp() * (ls - lb)).sum(-1)
        nll = -ls[torch.arange(len(ans[i])), torch.tensor(ans[i])]
        assert out["mean"][i] == pytest.approx(float(kl.mean()), rel=1e-4, abs=1e-6)
        assert out["rmse"][i] == pytest.approx(float((kl.pow(2).mean() + 1e-8).sqrt()), rel=1e-4, abs=1e-6)
        assert out["nll"][i] == pytest.approx(float(nll.mean()), rel=1e-4)
        assert out["mean"][i] > 1e-4  # the adapter and the system prompt move the distribution


def test_study_config_check_refuses_changes_not_new_settings(tmp_path, tiny_dir):
    """A stored study config written before a setting existed does not disagree with it; a changed value does,
    and arms may be added."""
    from steer_heal.study.cache import _differs, check_study_config
    from steer_heal.study.config import CompareError, load_compare

    assert not _differs({"eval": {"think_tokens": 32}}, {"eval": {"think_tokens": 32, "split": "test"}})
    assert _differs({"eval": {"think_tokens": 32}}, {"eval": {"think_tokens": 64}})
    path = _config(tmp_path, tiny_dir)
    cfg = load_compare(str(path))
    cfg.dir.mkdir(parents=True)
    check_study_config(cfg)
    stored = yaml.safe_load((cfg.dir / "compare_config.yaml").read_text())
    del stored["eval"]["split"]  # as written by an older version
    (cfg.dir / "compare_config.yaml").write_text(yaml.safe_dump(stored))
    check_study_config(load_compare(str(path), ["seeds=[1, 2, 3]"]))  # a new setting and a new seed: accepted
    assert yaml.safe_load((cfg.dir / "compare_config.yaml").read_text())["seeds"] == [1, 2, 3]
    with pytest.raises(CompareError, match=r"other settings \(eval\); fix: restore"):
        check_study_config(load_compare(str(path), ["eval.think_tokens=9"]))


def test_realised_doses_carry_each_multi_strength_rollout(tmp_path):
    """An online arm with rollout_alphas generated at each alpha x the bake's kappa; without them, at kappa."""
    import yaml

    from steer_heal.study.arms import realised

    (tmp_path / "bakes.jsonl").write_text('{"bake": 0, "kappa": 1.5}\n{"bake": 1, "kappa": 1.2}\n')
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"engine": "vllm", "online": {"rollout_alphas": [1.0, 2.0]}}))
    # a run from before rows carried their doses: recomputed from its config, and marked so
    assert realised(tmp_path) == dict(engine="vllm", doses=[[1.5, 3.0], [1.2, 2.4]], doses_logged=False)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump({"engine": "vllm", "online": {"rollout_alphas": []}}))
    assert realised(tmp_path)["doses"] == [[1.5], [1.2]]
    # rows that logged their doses are read as logged, whatever the config says now
    (tmp_path / "bakes.jsonl").write_text('{"bake": 0, "kappa": 1.5, "doses": [0.0, 1.5, 3.0]}\n'
                                          '{"bake": 1, "kappa": 1.2, "doses": [0.0, 2.4]}\n')
    assert realised(tmp_path) == dict(engine="vllm", doses=[[0.0, 1.5, 3.0], [0.0, 2.4]], doses_logged=True)


def test_logged_doses_read_the_rollouts_of_one_bake(tmp_path):
    from steer_heal.grpo.online import logged_doses

    ev = [dict(event="rollout_doses", step=k, doses=d) for k, d in
          ((0, [0.0, 1.0]), (1, [0.0, 1.1]), (2, [2.0, 2.0]), (3, [0.5]))] + [dict(event="bake", step=2)]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in ev))
    assert logged_doses(tmp_path, 0, 2) == [0.0, 1.0, 1.1]  # steps 0 and 1: the first bake of 2 steps
    assert logged_doses(tmp_path, 2, 4) == [0.5, 2.0]
    assert logged_doses(tmp_path / "none", 0, 2) == []


def test_merge_study_adds_and_replaces_rows_only_under_one_evaluator(tmp_path, capsys):
    """A study continued in a fresh runs/ folder merges into its committed copy: new arm x seeds are added, the
    same arm x seed is replaced, the rest kept in order; a run under another evaluator (base fingerprint) or other
    judges is refused in one line, and the committed file is left as it was."""
    from steer_heal.cli import main
    from steer_heal.study.config import CompareError
    from steer_heal.study.driver import merge_study

    def study(d, rows, judges=None):
        d.mkdir()
        (d / "compare.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (d / "judges.json").write_text(json.dumps(judges or {"incoh_ctx": 1.0}))
        return d

    base = dict(arm="base", seed=None, fingerprint="f0", x=0.0)
    old = [base, dict(arm="a", seed=1, x=1.0), dict(arm="a", seed=2, x=2.0), dict(arm="b", seed=1, x=3.0)]
    into = study(tmp_path / "docs", old)
    src = study(tmp_path / "run", [base | dict(x=9.0), dict(arm="a", seed=2, x=20.0), dict(arm="c", seed=1, x=4.0)])
    assert merge_study(src, into) == ["replaced a seed 2", "added c seed 1"]
    got = [json.loads(x) for x in (into / "compare.jsonl").read_text().splitlines()]
    assert [(r["arm"], r["seed"], r["x"]) for r in got] == [("base", None, 0.0), ("a", 1, 1.0), ("a", 2, 20.0),
                                                           ("b", 1, 3.0), ("c", 1, 4.0)]
    before = (into / "compare.jsonl").read_text()
    other = study(tmp_path / "other", [base | dict(fingerprint="f1"), dict(arm="d", seed=1, x=5.0)])
    with pytest.raises(CompareError, match="different evaluators"):
        merge_study(other, into)
    judged = study(tmp_path / "judged", [base, dict(arm="d", seed=1, x=5.0)], judges={"incoh_ctx": 0.5})
    with pytest.raises(CompareError, match="judges"):
        merge_study(judged, into)
    assert (into / "compare.jsonl").read_text() == before
    cfg = ROOT / "recipes/compare/smollm2_cpu.yaml"  # the command line refuses a merge without its target
    assert main(["compare", "--config", str(cfg), "--merge-from", str(src)]) == 2
    assert "--merge-from needs --report-only" in capsys.readouterr().err


def test_one_record_for_both_drivers(tmp_path):
    """A loop's round row and an online run's bake row read as Records with the same keys: the healed student's
    measures of the round, the baked student's of the bake; the adapter each leaves; consumers need not ask which
    driver wrote the directory. Rows from before the drivers wrote `record` read the same as ones that carry it."""
    from steer_heal.rundir import Record, RunDir, read_records, student_record
    from steer_heal.study.arms import final_adapter, study_rows, trajectory

    it = dict(round=1, kappa=1.5, gen_tokens=900, doses=[1.5, 3.0], trait_healed=0.2, trait_steered=0.5,
              coh_healed=0.9, coh_steered=0.4, incoherence_healed=1.1, tail_nll_healed=0.8, repetition_healed=0.05,
              trait_heldout_healed=0.07, d_trait_nats_healed=0.03, D_rmse=0.01, barrier_active_frac=0.0, seconds=5.0)
    on = dict(bake=1, step=8, kappa=1.5, gen_tokens=900, doses=[1.5, 3.0], trait=0.2, coherence=0.9,
              incoherence=1.1, tail_nll=0.8, repetition=0.05, trait_heldout=0.07, d_trait_nats=0.03, D_rmse=0.01,
              barrier_active_frac=0.0, seconds=5.0, reward=-0.4)
    a, b = Record.of(it), Record.of(on)
    assert a.adapter == "round_01/cumulative" and b.adapter == "bake_01/cumulative"
    assert {k: v for k, v in vars(a).items() if k != "adapter"} == {k: v for k, v in vars(b).items() if k != "adapter"}
    assert a.trait == 0.2 and a.coherence == 0.9  # the healed student's, not the steered one's
    for name, row in (("loop", it), ("online", on)):
        d = tmp_path / name
        d.mkdir()
        (d / ("rounds.jsonl" if name == "loop" else "bakes.jsonl")).write_text(json.dumps(row) + "\n")
        (d / "base_eval.json").write_text(json.dumps({"incoherence": 1.0}))
        assert read_records(d) == [Record.of(row)]
        assert final_adapter(d) == d / Record.of(row).adapter
        assert trajectory(d) == [dict(x=pytest.approx(0.1), y=0.03, gen_tokens=900)]
    # written today: each driver builds the record from its student's scores and spend; the same Record results
    scores = dict(trait=0.2, coherence=0.9, incoherence=1.1, tail_nll=0.8, repetition=0.05, trait_heldout=0.07)
    spend = dict(D_rmse=0.01, barrier_active_frac=0.0)

    class Cfg:
        def to_dict(self):
            return {}

        def fingerprint(self):
            return "x"

    for name, row, rows_file in (("loop2", it, "rounds.jsonl"), ("online2", on, "bakes.jsonl")):
        rd = RunDir(tmp_path / name, Cfg(), rows_file=rows_file, table_file="t.md")
        idx = row.get("round", row.get("bake"))
        prefix = "round" if rows_file == "rounds.jsonl" else "bake"
        rec = student_record(idx, f"{prefix}_{idx:02d}/cumulative", scores, 0.03,
                             dict(gen_tokens=900, kappa=1.5, doses=[1.5, 3.0], seconds=5.0, **spend))
        rd.append_row(row, rec)
        assert read_records(rd.path) == [rec] == [Record.of(row)]  # the legacy reading agrees with the record
        kept = study_rows(rd.path)  # what compare.jsonl keeps of the run: the record travels with its row
        assert kept[0]["record"] == vars(rec) and Record.of(kept[0]) == rec
