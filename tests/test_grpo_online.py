"""The online GRPO run end to end on the tiny model: multi-process replicas, resume, configs."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _run(args, env_extra, tmp_path, launcher=None, timeout=600):
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", **env_extra}
    cmd = (launcher or [sys.executable]) + [str(ROOT / "recipes/grpo_heal.py"),
                                           "--config", str(ROOT / "recipes/configs/grpo_smoke.yaml"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def test_every_accelerate_config_loads():
    from accelerate.commands.config.config_args import load_config_from_file

    files = sorted((ROOT / "accelerate_configs").glob("*.yaml"))
    assert {f.stem for f in files} >= {"single_gpu", "multi_gpu", "deepspeed_zero2", "deepspeed_zero3", "cpu_2proc"}
    for f in files:
        cfg = load_config_from_file(str(f))
        assert cfg.num_processes >= 1 and cfg.distributed_type is not None, f
    assert (
        load_config_from_file(str(ROOT / "accelerate_configs/deepspeed_zero3.yaml")).deepspeed_config["zero_stage"] == 3
    )


def test_every_grpo_config_parses():
    from trl import GRPOConfig, TrlParser

    from steer_heal.grpo.online import OnlineConfig
    from steer_heal.presets import load_preset

    files = sorted((ROOT / "recipes/configs").glob("grpo_*.yaml")) + sorted(ROOT.glob("recipes/*/grpo/config_*.yaml"))
    assert len(files) >= 6
    for f in files:
        # GPU configs ask for bf16; parse them here as they would be on a CPU box
        cfg, args = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config(
            args=["--config", str(f), "--bf16", "false", "--use_cpu", "true"])
        assert args.beta == 0.0 and cfg.bake_every >= 1 and cfg.kl_agg == "rmse", f
        assert load_preset(cfg.preset).persona_pos


def _launch(config: str, out: Path, tiny_dir, mfv_dir, tmp_path, *extra):
    """4 steps on two CPU processes, one bake at step 3 (step 4 trains the fresh LoRA), each rank
    dumping its LoRA, history and student logits."""
    accel = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
             str(ROOT / "accelerate_configs" / config)]
    # the filter keeps every rollout, so the tiny random model's LoRA trains at every step
    keep_all = ["--max_tail_nll", "1e9", "--max_repetition", "1.0", "--max_verbalisation", "1.0", "--max_refusal",
                "1.0", "--min_tokens", "1"]
    return _run(["--model", str(tiny_dir["llama"]), "--output_dir", str(out), "--bake_every", "3",
                 "--dump_rank_weights", "true", *keep_all, *extra], {"STEER_HEAL_MFV_DIR": mfv_dir}, tmp_path,
                launcher=accel)


@pytest.fixture(scope="module")
def ddp_run(tiny_dir, mfv_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    r = _launch("cpu_2proc.yaml", tmp / "g2", tiny_dir, mfv_dir, tmp)
    assert r.returncode == 0, r.stderr[-3000:]
    return r, tmp / "g2"


def _rank_weights(out: Path):
    from safetensors.torch import load_file

    return load_file(str(out / "rank0_weights.safetensors")), load_file(str(out / "rank1_weights.safetensors"))


def test_two_process_cpu_run_keeps_ranks_identical(ddp_run):
    r, out = ddp_run
    assert r.stderr.count("importance-sampling correction") + r.stdout.count("importance-sampling correction") == 2
    rows = [json.loads(x) for x in (out / "bakes.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [3]  # 4 steps, one bake
    assert (out / "bakes.png").exists() and "bake" in (out / "bakes.html").read_text()
    assert (out / "bake_00" / "cumulative" / "adapter_model.safetensors").exists()
    a, b = _rank_weights(out)
    assert sorted(a) == sorted(b) and any(k.startswith("hist.") for k in a)
    for k in a:
        assert (a[k] == b[k]).all(), k
    # the dose controller moved kappa (smoke config: 2.0) on the all-reduced bad rate, identically on both ranks
    assert float(a["kappa"]) != 2.0 and 0.05 <= float(a["kappa"]) <= 8.0


def test_nan_on_one_rank_stops_every_rank(tiny_dir, mfv_dir, tmp_path):
    r = _launch("cpu_2proc.yaml", tmp_path / "nan", tiny_dir, mfv_dir, tmp_path, "--debug_nan_step", "2")
    msg = "error: GRPO loss is not finite on 1 of 2 rank(s) at step 1; fix: lower learning_rate"
    # both ranks raise the one-line error (the ranks' stderr lines may interleave with the progress bar)
    assert r.returncode != 0 and r.stderr.count(msg) == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("error: GRPO")[0]  # our processes print no trace before it


@pytest.mark.skipif(os.environ.get("STEER_HEAL_REQUIRE_DEEPSPEED") != "1" and
                    __import__("importlib").util.find_spec("deepspeed") is None, reason="deepspeed not installed")
def test_deepspeed_zero2_bake_matches_ddp(ddp_run, tiny_dir, mfv_dir, tmp_path):
    """ZeRO-2 steps fp32 master partitions: the bake must reach them, or step 4 (after the bake at 3)
    restores the baked LoRA and counts it twice."""
    _, ddp_out = ddp_run
    r = _launch("cpu_2proc_zero2.yaml", tmp_path / "z2", tiny_dir, mfv_dir, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ddp, (z0, z1) = _rank_weights(ddp_out)[0], _rank_weights(tmp_path / "z2")
    assert sorted(z0) == sorted(ddp)
    for k in ddp:
        assert torch.allclose(z0[k], z1[k], atol=1e-6), k
        assert torch.allclose(z0[k], ddp[k], atol=1e-5, rtol=1e-4), (k, float((z0[k] - ddp[k]).abs().max()))
    # steps 1-3 trained the baked LoRA and step 4 the fresh one (else the comparison would be vacuous)
    for part in ("lora_B", "hist."):
        keys = [k for k in ddp if part in k and (part != "hist." or k.endswith(".B"))]
        assert keys and max(float(ddp[k].abs().max()) for k in keys) > 1e-4, part


def test_killed_run_resumes_with_the_same_bake_row(tiny_dir, mfv_dir, tmp_path):
    common = ["--model", str(tiny_dir["llama"]), "--bake_every", "2", "--save_strategy", "steps", "--save_steps", "2"]
    env = {"STEER_HEAL_MFV_DIR": mfv_dir}
    full, part = tmp_path / "full", tmp_path / "part"
    r = _run(common + ["--output_dir", str(full)], env, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    r = _run(common + ["--output_dir", str(part), "--stop_after_step", "2"], env, tmp_path)
    assert r.returncode == 3, r.stderr[-3000:]  # "killed" right after the first bake's checkpoint
    assert [json.loads(x)["bake"] for x in (part / "bakes.jsonl").read_text().splitlines()] == [0]
    r = _run(
        common + ["--output_dir", str(part), "--resume_from_checkpoint", str(part / "checkpoint-2")], env, tmp_path
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a = [json.loads(x) for x in (full / "bakes.jsonl").read_text().splitlines()]
    b = [json.loads(x) for x in (part / "bakes.jsonl").read_text().splitlines()]
    assert [x["bake"] for x in b] == [0, 1]  # continued, no duplicates
    skip = {"seconds"}
    for x, y in zip(a, b):
        _close(x, y, skip)


def _close(x, y, skip):
    for k in x:
        if k in skip:
            continue
        if isinstance(x[k], dict):
            _close(x[k], y[k], skip)
        elif isinstance(x[k], float):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
        elif isinstance(x[k], list):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), k
        else:
            assert x[k] == y[k], k
    return True


@pytest.mark.parametrize("extra,needle", [(["--model", "no-such/model-xyz"], "not found locally"),
                                          (["--persona_pos", "Same", "--persona_neg", "same"], "identical")])
def test_recipe_bad_input_is_one_line(extra, needle, tmp_path, mfv_dir):
    r = _run(["--output_dir", str(tmp_path / "o"), *extra], {"STEER_HEAL_MFV_DIR": mfv_dir, "HF_HUB_OFFLINE": "1"},
             tmp_path)
    errs = [x for x in r.stderr.splitlines() if x.startswith("error:")]
    assert r.returncode == 2 and len(errs) == 1 and needle in errs[0] and "fix" in errs[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr


def test_bake_row_reads_its_own_step_and_counts_generated_tokens(tiny_dir, mfv_dir, tmp_path, capsys):
    """With bake_every 1 each bake row carries the metrics of the step it closes (logged after the
    bake), the student-side scores, and gen_tokens = the rollouts' completion tokens so far."""
    from trl import GRPOConfig, TrlParser

    from steer_heal.grpo.online import OnlineConfig, OnlineRun, logged_doses
    from steer_heal.rundir import Record

    cfg, args = TrlParser((OnlineConfig, GRPOConfig)).parse_args_and_config(
        args=["--config", str(ROOT / "recipes/configs/grpo_smoke.yaml"), "--model", str(tiny_dir["llama"]),
              "--output_dir", str(tmp_path / "run"), "--max_steps", "3", "--bake_every", "1", "--mfv", "false",
              "--disable_tqdm", "true"])
    run = OnlineRun(cfg, args, seed=args.seed)
    run.setup()
    tr = run.trainer()
    tr.train()
    rows = run.rd.rows()
    logs = {h["step"]: h for h in tr.state.log_history if "reward" in h}
    assert [r["step"] for r in rows] == [1, 2, 3]
    total = 0
    for r in rows:
        h = logs[r["step"]]
        assert r["reward"] == pytest.approx(h["reward"]) and r["kl_rmse"] == pytest.approx(h["kl_rmse"])
        assert r["keep_frac"] == pytest.approx(h["keep_frac"])
        total += round(h["completions/mean_length"] * args.per_device_train_batch_size)
        assert r["gen_tokens"] == total
        assert {"trait", "incoherence", "coherence", "verbalisation", "refusal"} <= set(r)
        # the shared record: the baked student's scores as student.json saved them, the doses its rollouts logged
        sc = json.loads((tmp_path / "run" / f"bake_{r['bake']:02d}" / "student.json").read_text())
        rec = Record.of(r)
        assert "record" in r and (rec.index, rec.gen_tokens) == (r["bake"], total)
        assert (rec.trait, rec.coherence, rec.incoherence) == (sc["trait"], sc["coherence"], sc["incoherence"])
        assert rec.doses == logged_doses(tmp_path / "run", r["step"] - 1, r["step"]) and rec.doses
        assert (tmp_path / "run" / rec.adapter / "adapter_model.safetensors").exists()
    assert rows[-1]["kl_rmse"] > 0
    # export reads the same record: bake 1's cumulative adapter merged, against PEFT's loader of that folder
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from steer_heal.cli import main

    assert main(["export", str(tmp_path / "run"), "--round", "1", "--out", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m"), dtype=torch.float32)
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_dir["llama"]), dtype=torch.float32),
                                    str(tmp_path / "run" / "bake_01" / "cumulative"))
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, ref(input_ids=ids).logits, atol=1e-4)
    assert main(["export", str(tmp_path / "run"), "--round", "9"]) == 2
    assert "no round / bake 9; fix: pass --round in [0, 1, 2]" in capsys.readouterr().err
    base = json.loads((tmp_path / "run" / "base_eval.json").read_text())
    assert len(base["texts"]) == min(cfg.eval_prompts, 8) and "trait" in base
