"""Training arms: each seed of each trained arm is its own process through the arm's normal entry point
(`steer-heal run` or `recipes/grpo_heal.py`), into <study dir>/<arm>-s<seed>/, stopped at the first round / bake at
or past the study's budget; a finished arm is skipped, a killed one resumes. What an arm ran with is read back
from its own run directory."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from steer_heal.rundir import RECORD_FILES, read_jsonl, read_records, write_atomic
from steer_heal.study.config import Arm, CompareConfig, CompareError, arm_setting, cli_value

ROOT = Path(__file__).resolve().parents[2]


def run_key(cfg: CompareConfig, arm: Arm, seed: int | None) -> str:
    """`<arm>-s<seed>` for every trained run, so a run of a subset of the seeds (`seeds=[42]`) lands where
    the full study looks for it; a bare `<arm>` only for untrained arms and for a single-seed study
    written before this naming (kept so it resumes)."""
    if seed is None:
        return arm.name
    if len(cfg.seeds) == 1 and ((cfg.dir / arm.name).is_dir() or (cfg.dir / "eval" / f"{arm.name}.json").exists()):
        return arm.name
    return f"{arm.name}-s{seed}"


def arm_dir(cfg: CompareConfig, arm: Arm, seed: int) -> Path:
    return cfg.dir / run_key(cfg, arm, seed)


def _latest_checkpoint(d: Path) -> Path | None:
    cks = sorted(d.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    return cks[-1] if cks else None


def train_command(cfg: CompareConfig, arm: Arm, seed: int) -> list[str]:
    """The arm's normal entry point, pointed at its directory, seed and budget (resuming if it was killed)."""
    d = arm_dir(cfg, arm, seed)
    if arm.kind == "iterative":
        if (d / "rounds.jsonl").exists() and (d / "config.yaml").exists():
            return [sys.executable, "-m", "steer_heal.cli", "run", "--resume", str(d)]
        ov = {"model.model": cfg.model, "preset": cfg.preset, "seed": seed, "budget_tokens": cfg.budget_tokens,
              "rounds": 1000, "run_dir": str(d), "eval.mfv": cfg.arm_eval} | dict(arm.overrides)
        return [sys.executable, "-m", "steer_heal.cli", "run", "--config", arm.config] + [
            f"{k}={cli_value(v)}" for k, v in ov.items()
        ]
    bake_every = int(arm_setting(arm, "bake_every", 4))
    # max_steps stays the config's (it shapes the lr schedule): it must reach the budget (checked after the run)
    ov = {"model": cfg.model, "preset": cfg.preset, "seed": seed, "budget_tokens": cfg.budget_tokens,
          "output_dir": str(d), "save_strategy": "steps", "save_steps": bake_every,
          "mfv": cfg.arm_eval, "mfv_n": cfg.eval.mfv_n, "think_tokens": cfg.eval.think_tokens} | dict(arm.overrides)
    head = [sys.executable]
    if arm.launcher:
        head = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", arm.launcher]
    cmd = head + [str(ROOT / "recipes/grpo_heal.py"), "--config", arm.config]
    for k, v in ov.items():  # a list is one value per word (argparse nargs="+")
        cmd += [f"--{k}", *map(str, v)] if isinstance(v, list) and v else [f"--{k}", cli_value(v)]
    ck = _latest_checkpoint(d)
    if ck is not None:
        cmd += ["--resume_from_checkpoint", str(ck)]
    return cmd


def train_arm(cfg: CompareConfig, arm: Arm, seed: int) -> dict:
    """Run (or resume) one training arm to its budget; a finished arm is skipped."""
    d = arm_dir(cfg, arm, seed)
    done = d / "arm_done.json"
    if done.exists():
        return json.loads(done.read_text()) | dict(skipped=True)
    d.mkdir(parents=True, exist_ok=True)
    cmd = train_command(cfg, arm, seed)
    print(f"[compare] {arm.name} (seed {seed}): {' '.join(cmd[1:4])} ... -> {d}/train.log", flush=True)
    t0 = time.perf_counter()
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONPATH": str(ROOT)}
    with open(d / "train.log", "a") as log:
        rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise CompareError(f"arm '{arm.name}' (seed {seed}) exited with {rc}; see {d}/train.log, fix the cause and "
                           "run compare again: it resumes this arm")
    recs = read_records(d)
    # seconds: the arm's own per-round / per-bake times (they survive a kill and resume), plus this
    # attempt's wall time for the record
    info = dict(arm=arm.name, seed=seed, seconds=sum(r.seconds for r in recs),
                last_attempt_wall_s=time.perf_counter() - t0, gen_tokens=(recs[-1].gen_tokens or 0) if recs else 0,
                n_rows=len(recs)) | realised(d)
    if info["gen_tokens"] < cfg.budget_tokens and not arm.control:  # a control spends nothing on calibration
        print(f"warning: arm '{arm.name}' ended at {info['gen_tokens']} generated tokens, under budget_tokens "
              f"{cfg.budget_tokens} (its max_steps / rounds ran out first); its row is not at the matched budget",
              flush=True)
    write_atomic(done, json.dumps(info))
    return info


def realised(d: Path) -> dict:
    """What the arm actually ran with, from its own run directory: the rollout engine, and the generation doses
    per round / bake as the run logged them (its records' `doses`). A run from before records carried doses gets
    alpha x kappa from its config.yaml (steer.alphas for the loop, online.rollout_alphas for the online run),
    and `doses_logged` false says so."""
    f = d / "config.yaml"
    rc = (yaml.safe_load(f.read_text()) or {}) if f.exists() else {}
    recs = read_records(d)
    if recs and all(r.doses is not None for r in recs):
        return dict(engine=rc.get("engine", "hf"), doses=[[round(float(x), 4) for x in r.doses] for r in recs],
                    doses_logged=True)
    if (d / "bakes.jsonl").exists():  # multi-strength rollouts: rollout j of a group at rollout_alphas[j % len]
        alphas = (rc.get("online") or {}).get("rollout_alphas") or [1.0]
    else:
        alphas = rc.get("steer", {}).get("alphas") or [1.0]
    doses = [[round(float(a) * float(r.kappa or 0.0), 4) for a in alphas] for r in recs]
    return dict(engine=rc.get("engine", "hf"), doses=doses, doses_logged=False)


# a run's own events that end it before its rounds / max_steps: (event, what the line says)
EARLY_STOPS = {"stop_filter_starved": "the filter kept fewer than min_train", "stop_coherence_floor":
               "healed coherence under coherence_floor", "heal_diverged": "the heal diverged"}


def stop_reason(d: Path) -> str:
    """Why the run ended before its rounds / max_steps, from its own events.jsonl ('' when it did not: it ran to
    its end or to the study's budget)."""
    f = d / "events.jsonl"
    last = ""
    for line in f.read_text().splitlines() if f.exists() else []:
        e = json.loads(line)
        if e.get("event") in EARLY_STOPS:
            at = e.get("round", e.get("step"))
            last = EARLY_STOPS[e["event"]] + (f" at round {at}" if at is not None else "")
    return last


def arm_rows(d: Path) -> list[dict]:
    """The rows the run appended (rounds.jsonl or bakes.jsonl, whichever driver wrote them), as written."""
    return next((read_jsonl(d / f) for f in RECORD_FILES if (d / f).exists()), [])


def study_rows(d: Path) -> list[dict]:
    """The run's rows as compare.jsonl keeps them: their scalars and their `record`, so the study reads the record
    the run wrote (Record.of) rather than the column mapping kept for rows written before records."""
    return [{k: v for k, v in r.items() if isinstance(v, (int, float)) or v is None or k == "record"}
            for r in arm_rows(d)]


def final_adapter(d: Path) -> Path:
    recs = read_records(d)
    if not recs:
        raise RuntimeError(f"{d} holds no completed round or bake; fix: raise budget_tokens or check {d}/train.log")
    return d / recs[-1].adapter


def trajectory(d: Path) -> list[dict]:
    """(coherence lost, trait gained, tokens) per round / bake, from the run's records and its base evaluation
    (empty measures when the arm ran without its own evaluations)."""
    be = json.loads((d / "base_eval.json").read_text()) if (d / "base_eval.json").exists() else {}
    b_inc = be.get("incoherence")
    nan = float("nan")
    return [dict(x=(r.incoherence if r.incoherence is not None else nan) - b_inc if b_inc is not None else nan,
                 y=r.d_trait_nats if r.d_trait_nats is not None else nan, gen_tokens=r.gen_tokens or 0)
            for r in read_records(d)]
