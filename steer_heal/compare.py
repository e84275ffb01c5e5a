"""`steer-heal compare`: arms side by side at a matched generated-token budget, judged by one
evaluation on measures no arm trained on.

    arms (kinds): base | prompt (persona as system prompt) | steer (raw steering, iso-KL dose)
                  | iterative (`steer-heal run`) | online (`recipes/grpo_heal.py`)
    train:    each training arm is its own process through its normal entry point, into
              <compare_dir>/<arm>/, stopped at the first round / bake at or past budget_tokens;
              a finished arm is skipped, a killed one resumes (rounds.jsonl / checkpoint-N)
    evaluate: one function for every arm (final_eval): MFV trait and coherence, trait_llr under a
              held-out persona context (never the reward's), projection on the round-0 vector,
              free-generation coherence, KL(student || base) on held-out greedy answers
    report:   compare.md / compare.jsonl, frontier.png / frontier.html, answers.html
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import yaml

from reward.components import heldout_scorer
from reward.validation import DATA as LABELLED
from reward.validation import load_labelled, score_labelled, trait_gap
from reward.validation import report as validation_report
from steer_heal import stages
from steer_heal.chat import encode_prompt, render_prompt
from steer_heal.compare_report import EXPECTS, PRIMARY_MEASURES, Report, answers_page, load_preset_axis
from steer_heal.config import (
    CONTROLS,
    ONLINE,
    ConfigError,
    EvalConfig,
    ModelConfig,
    RunConfig,
    SteerConfig,
    apply_dict,
    check_control,
    flat_name,
    from_flat,
    leaves,
    load_config,
    setting,
)
from steer_heal.engine import Sampling
from steer_heal.evals.mfv import evaluate_mfv, nanmean, trait_nats
from steer_heal.evals.mfv_data import is_labelled
from steer_heal.evals.student import SCORED
from steer_heal.heal.kl import aggregate, chunked_kl_and_logp
from steer_heal.logprobs import auto_chunk, final_hidden, lm_logits, pack
from steer_heal.models import causal_lm
from steer_heal.presets import load_preset
from steer_heal.rundir import write_atomic
from steer_heal.setting import SettingError, read_yaml
from steer_heal.steering import Steering, SteeringVector
from steer_heal.steering.hooks import steer

ROOT = Path(__file__).resolve().parents[1]
ONLINE_KEYS = {flat_name(path) for path, _, _ in leaves(ONLINE)}  # steer-heal's flat keys (the rest are TRL's)
KINDS = ("base", "prompt", "steer", "iterative", "online")


class CompareError(ValueError):
    """A bad comparison config; the message names the fix."""


@dataclass
class Arm:
    name: str = setting("", "the arm's name (its directory under compare_dir)")
    kind: str = setting("", "base | prompt (persona as system prompt) | steer | iterative | online")
    config: str = setting("", "the arm's own run config (iterative: a run YAML; online: a grpo YAML)")
    overrides: dict = setting({}, "iterative: section.key -> value; online: flat key -> value")
    launcher: str = setting("", "online: an accelerate config; the arm then runs under `accelerate launch`")
    placebo: bool = setting(False, "also run <name>_placebo: the same arm with steering off (control: placebo)")
    placebo_of: str = setting("", "set on a generated placebo arm: the arm it controls")

    @property
    def control(self) -> str:
        """'' (a steered arm) | placebo | prompt_distil: the run config's `control` setting."""
        return str(self.overrides.get("control", ""))

    @property
    def trained(self) -> bool:
        return self.kind in ("iterative", "online")


def _evaluator_steer() -> SteerConfig:
    # the steer baseline's vector and iso-KL dose, as the online run calibrates
    return SteerConfig(n_contexts=64, calib_tokens=16, calib_steps=3)


def _evaluator_eval() -> EvalConfig:
    # every test prompt (held out from training and from every choice of setting) and every classic vignette
    return EvalConfig(eval_prompts=32, split="test", mfv_n=0, think_tokens=32, mfv_batch_size=32)


@dataclass
class CompareConfig:
    name: str = setting("compare", "the comparison's name")
    compare_dir: str = setting("", "output folder; default runs/compare-<name>")
    model: str = setting("HuggingFaceTB/SmolLM2-135M-Instruct", "every arm's model")
    preset: str = setting("care-over-authority", "every arm's preset")
    budget_tokens: int = setting(8000, "generated tokens per training arm (rollouts, walk-C probes, calibration)")
    seeds: list[int] = setting([42, 43, 44], "each training arm runs once per seed; the report shows means and 95% "
                                             "intervals over seeds x eval items")
    pairs: list[list[str]] = setting([], "extra verdicts, [a, b] per line: e.g. online vs iterative, rmse vs mean")
    primary: list[list[str]] = setting([], "the study's primary questions, declared before it runs: [a, b, measure] "
                                           "or [a, b, measure, family] or [a, b, measure, family, expected] per "
                                           "line (expected: better | worse | not worse, written before the run; "
                                           "the report says whether the verdict supports it); Holm-adjusted "
                                           "within each family (unnamed: one), every other line is exploratory")
    n_boot: int = setting(2000, "bootstrap replicates of every interval")
    min_auroc: float = setting(0.75, "a judge under this AUROC on the labelled replies is marked and not used in "
                                     "verdicts")
    arm_eval: bool = setting(False, "keep the per-round / per-bake evaluations inside training arms (off: the "
                                    "comparison's final evaluation alone judges them, and the arms run faster)")
    dtype: str = setting("auto", "dtype of the evaluator's model")
    # the one evaluation and the baselines' vector: the run config's own sections (steer_heal/config.py)
    steer: SteerConfig = field(default_factory=_evaluator_steer)
    eval: EvalConfig = field(default_factory=_evaluator_eval)
    arms: list[Arm] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return Path(self.compare_dir or f"runs/compare-{self.name}")

    def run_config(self) -> RunConfig:
        """The evaluator as a run config, so it is built by the same stages as the runs."""
        rc = RunConfig(preset=self.preset, model=ModelConfig(model=self.model, dtype=self.dtype),
                       steer=copy.deepcopy(self.steer), eval=copy.deepcopy(self.eval))
        # every layer carries a LoRA slot, so any arm's cumulative adapter (whatever its band) loads
        rc.heal.lora_r, rc.heal.lora_alpha, rc.heal.lora_band = 4, 4, (0.0, 1.0)
        rc.gen.batch_size = self.eval.eval_prompts
        return rc


def check_arm_settings(arm: "Arm") -> None:
    """A training arm's run config plus its overrides against every setting's allowed values, before anything
    runs (an iterative arm: its nested keys; an online arm: the flat keys steer-heal declares, TRL's own are
    checked by TRL when the arm starts)."""
    try:
        if arm.kind == "iterative":
            load_config(arm.config, [f"{k}={_s(v)}" for k, v in arm.overrides.items()])
        else:
            flat = read_yaml(arm.config) | dict(arm.overrides)
            from_flat({k: v for k, v in flat.items() if k in ONLINE_KEYS})
    except SettingError as e:
        raise CompareError(f"arm '{arm.name}': {e}") from None


def load_compare(path: str, overrides: list[str] = ()) -> CompareConfig:
    p = Path(path)
    if not p.exists():
        raise CompareError(f"comparison config '{path}' not found; fix: pass e.g. recipes/compare/smollm2_cpu.yaml")
    d = read_yaml(p)
    for it in overrides:
        if "=" not in it:
            raise CompareError(f"override '{it}' is not key=value; fix: write e.g. budget_tokens=4000")
        k, v = it.split("=", 1)
        node = d
        *parents, leaf = k.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(v)
    arms = d.pop("arms", [])
    sections = {k: d.pop(k) for k in ("steer", "eval") if k in d}
    known = {f for f in CompareConfig.__dataclass_fields__ if f != "arms"}
    bad = sorted(set(d) - known)
    if bad:
        raise CompareError(f"unknown comparison key(s) {bad}; fix: use one of {sorted(known)}")
    cfg = CompareConfig(**d)
    for k, v in sections.items():
        apply_dict(getattr(cfg, k), v, prefix=f"{k}.")
    for a in arms:
        arm = Arm(**a)
        if arm.kind not in KINDS:
            raise CompareError(f"arm '{arm.name}': unknown kind '{arm.kind}'; fix: one of {KINDS}")
        if arm.trained and not arm.config:
            raise CompareError(f"arm '{arm.name}' ({arm.kind}) needs config:; fix: point it at the arm's run config")
        if arm.control not in CONTROLS:
            raise CompareError(f"arm '{arm.name}': unknown control '{arm.control}'; fix: one of {CONTROLS[1:]}")
        if arm.kind == "online":
            for control in {arm.control, "placebo" if arm.placebo else ""}:
                try:
                    check_control(control, str(_arm_setting(arm, "objective", "")))
                except ConfigError as e:
                    raise CompareError(f"arm '{arm.name}': {e}") from None
        if arm.control and not arm.trained:
            raise CompareError(f"arm '{arm.name}': control '{arm.control}' needs a training arm; fix: kind "
                               "iterative or online")
        if arm.trained and Path(arm.config).is_file():
            check_arm_settings(arm)
        if arm.kind == "steer" and set(arm.overrides) - {"target_kl"}:
            raise CompareError(f"arm '{arm.name}': a steer arm takes only target_kl in overrides; fix: remove "
                               f"{sorted(set(arm.overrides) - {'target_kl'})}")
        cfg.arms.append(arm)
        if arm.placebo:
            if not arm.trained or arm.control:
                raise CompareError(f"arm '{arm.name}': placebo: true needs a steered training arm; fix: remove it")
            # an unsteered rollout is the same at every multiplier (and a control refuses rollout_alphas)
            ov = {k: v for k, v in arm.overrides.items() if k != "rollout_alphas"} | {"control": "placebo"}
            cfg.arms.append(Arm(f"{arm.name}_placebo", arm.kind, arm.config, ov, arm.launcher, placebo_of=arm.name))
    try:  # the preset, before anything runs: one line at its first problem
        load_preset(cfg.preset)
    except (SettingError, ValueError) as e:
        raise CompareError(str(e)) from None
    names = [a.name for a in cfg.arms]
    if len(set(names)) != len(names):
        raise CompareError(f"arm names repeat in {names}; fix: give every arm its own name")
    for pair in cfg.pairs:
        if len(pair) != 2 or not set(pair) <= set(names):
            raise CompareError(f"pairs entry {pair} must name two arms of the config; fix: pick from {names}")
    for q in cfg.primary:
        if (len(q) not in (3, 4, 5) or not set(q[:2]) <= set(names) or q[2] not in PRIMARY_MEASURES
                or (len(q) == 5 and q[4] not in EXPECTS)):
            raise CompareError(f"primary entry {q} must be [arm, arm, measure], [arm, arm, measure, family] or [arm, "
                               f"arm, measure, family, expected] with arms of the config, a measure in "
                               f"{PRIMARY_MEASURES} and expected one of {EXPECTS}; fix: e.g. [iter_rmse, "
                               "iter_rmse_placebo, trait_llr_heldout]")
    return cfg


# ------------------------------------------------------------------ training arms
def _arm_setting(arm: Arm, key: str, default):
    """A training arm's top-level setting: its override, else its run config's, else `default` (a missing
    config file is reported when the arm runs)."""
    if key in arm.overrides:
        return arm.overrides[key]
    p = Path(arm.config)
    return (yaml.safe_load(p.read_text()) or {}).get(key, default) if p.is_file() else default


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
            f"{k}={_s(v)}" for k, v in ov.items()
        ]
    bake_every = int(_arm_setting(arm, "bake_every", 4))
    # max_steps stays the config's (it shapes the lr schedule): it must reach the budget (checked after the run)
    ov = {"model": cfg.model, "preset": cfg.preset, "seed": seed, "budget_tokens": cfg.budget_tokens,
          "output_dir": str(d), "save_strategy": "steps", "save_steps": bake_every,
          "mfv": cfg.arm_eval, "mfv_n": cfg.eval.mfv_n, "think_tokens": cfg.eval.think_tokens} | dict(arm.overrides)
    head = [sys.executable]
    if arm.launcher:
        head = [str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file", arm.launcher]
    cmd = head + [str(ROOT / "recipes/grpo_heal.py"), "--config", arm.config]
    for k, v in ov.items():  # a list is one value per word (argparse nargs="+")
        cmd += [f"--{k}", *map(str, v)] if isinstance(v, list) and v else [f"--{k}", _s(v)]
    ck = _latest_checkpoint(d)
    if ck is not None:
        cmd += ["--resume_from_checkpoint", str(ck)]
    return cmd


def _s(v) -> str:
    return json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)


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
    rows = arm_rows(d, arm.kind)
    # seconds: the arm's own per-round / per-bake times (they survive a kill and resume), plus this
    # attempt's wall time for the record
    info = dict(arm=arm.name, seed=seed, seconds=sum(float(r.get("seconds", 0.0)) for r in rows),
                last_attempt_wall_s=time.perf_counter() - t0, gen_tokens=rows[-1].get("gen_tokens", 0) if rows else 0,
                n_rows=len(rows)) | realised(d, arm.kind)
    if info["gen_tokens"] < cfg.budget_tokens and not arm.control:  # a control spends nothing on calibration
        print(f"warning: arm '{arm.name}' ended at {info['gen_tokens']} generated tokens, under budget_tokens "
              f"{cfg.budget_tokens} (its max_steps / rounds ran out first); its row is not at the matched budget",
              flush=True)
    write_atomic(done, json.dumps(info))
    return info


def realised(d: Path, kind: str) -> dict:
    """What the arm actually ran with, read from its own run directory (not from today's config): the rollout
    engine and the generation doses per round / bake (iterative: alpha x kappa for each alpha; online: the
    controller's kappa, x each of rollout_alphas where set), so the report shows the doses that were realised."""
    f = d / "config.yaml"
    rc = (yaml.safe_load(f.read_text()) or {}) if f.exists() else {}
    if kind == "iterative":
        alphas = [float(a) for a in rc.get("steer", {}).get("alphas", [1.0])]
    else:  # multi-strength rollouts: rollout j of a group at rollout_alphas[j % len] x kappa
        alphas = [float(a) for a in (rc.get("online") or {}).get("rollout_alphas") or [1.0]]
    doses = [[round(a * float(r.get("kappa") or 0.0), 4) for a in alphas] for r in arm_rows(d, kind)]
    return dict(engine=rc.get("engine", "hf"), doses=doses)


def arm_rows(d: Path, kind: str) -> list[dict]:
    f = d / ("rounds.jsonl" if kind == "iterative" else "bakes.jsonl")
    return [json.loads(x) for x in f.read_text().splitlines() if x.strip()] if f.exists() else []


def final_adapter(d: Path, kind: str) -> Path:
    rows = arm_rows(d, kind)
    if not rows:
        raise RuntimeError(f"{d} holds no completed round or bake; fix: raise budget_tokens or check {d}/train.log")
    k = rows[-1]["round"] if kind == "iterative" else rows[-1]["bake"]
    return d / (f"round_{k:02d}" if kind == "iterative" else f"bake_{k:02d}") / "cumulative"


# ------------------------------------------------------------------ caches and provenance
EVAL_VERSION = 3  # bump when a measure of the evaluation changes (2: incoh_ctx, dev/test split; 3: capability)
CAPABILITY = Path(__file__).parent / "evals" / "capability.yaml"


def _hash(d) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _file_hash(p: Path) -> str:
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()[:12] if Path(p).exists() else ""


def preset_hash(name: str) -> str:
    """The preset's YAML and every set file it names or includes (a shipped preset: its YAML and its contexts)."""
    return "".join(_file_hash(f) for f in load_preset(name, check=False).sources)


def arm_fingerprint(ev_fp: str, arm: "Arm", adapter: Path | None) -> str:
    """An evaluation's key: the evaluator's, the arm's definition, and the bytes of the adapter it loads."""
    d = dict(ev=ev_fp, kind=arm.kind, overrides=arm.overrides if arm.kind in ("steer", "prompt") else {})
    if adapter is not None:
        d["adapter"] = _file_hash(Path(adapter) / "adapter_model.safetensors") or str(adapter)
    return _hash(d)


# settings whose change makes the study another study (arms and seeds may be added)
STUDY_KEYS = ("model", "preset", "budget_tokens", "dtype", "steer", "eval")


TESTING_KNOBS = ("stop_after_step", "dump_rank_weights", "debug_nan_step")  # not in a run's fingerprint either


def _results_part(arm: dict) -> dict:
    """An arm's definition less the testing knobs (a run stopped on purpose resumes under the same study)."""
    return arm | dict(overrides={k: v for k, v in (arm.get("overrides") or {}).items() if k not in TESTING_KNOBS})


def _differs(old, new) -> bool:
    """A setting the stored config does not have (it was added to the code later) does not count as a change."""
    if isinstance(old, dict) and isinstance(new, dict):
        return any(k in new and _differs(v, new[k]) for k, v in old.items())
    return old != new


def check_study_config(cfg: "CompareConfig") -> None:
    """Refuse a config that changed what the study's finished results mean; write the merged config otherwise."""
    f = cfg.dir / "compare_config.yaml"
    new = json.loads(json.dumps(asdict(cfg)))  # tuples as lists, as the YAML reads them back
    if f.exists():
        old = yaml.safe_load(f.read_text()) or {}
        changed = [k for k in STUDY_KEYS if k in old and _differs(old[k], new[k])]
        old_arms = {a["name"]: a for a in old.get("arms", [])}
        changed += [f"arm {a['name']}" for a in new["arms"]
                    if a["name"] in old_arms and _differs(_results_part(old_arms[a["name"]]), _results_part(a))]
        if changed:
            raise CompareError(f"{cfg.dir} holds a study run with other settings ({', '.join(changed)}); fix: restore "
                               f"them, or pass compare_dir=<a new folder> for the new study")
        new["arms"] = list(old_arms.values()) + [a for a in new["arms"] if a["name"] not in old_arms]
        new["seeds"] = sorted(set(old.get("seeds", [])) | set(new["seeds"]))
    write_atomic(f, yaml.safe_dump(new, sort_keys=False))


# ------------------------------------------------------------------ the one evaluation
class Evaluator:
    """Holds the base model (as a Student, so trained arms load their cumulative adapter), the two
    scorers, the round-0 vector and dose, and the vignettes; evaluates any arm the same way."""

    def __init__(self, cfg: CompareConfig):
        self.cfg = cfg
        rc = cfg.run_config()
        p = stages.run_preset(rc)  # refused before the model loads
        if not (p.eval_persona_pos and p.eval_persona_neg):
            raise CompareError(f"preset '{p.name}' has no held-out eval_persona_pos/neg; fix: add them (written for "
                               "evaluation only) so arms are not judged by the reward's own context")
        # what each cache depends on: the model, the preset's files, the settings, the labelled replies, the
        # evaluation's own code; a cache made under another of these is not reused
        base = dict(model=cfg.model, dtype=cfg.dtype, preset=preset_hash(cfg.preset), eval_version=EVAL_VERSION,
                    capability=_file_hash(CAPABILITY))
        self.fp_vector = _hash(base | dict(steer=asdict(cfg.steer)))
        self.fp_judges = _hash(base | dict(labelled=_file_hash(LABELLED)))
        self.fp_eval = _hash(base | dict(steer=asdict(cfg.steer), eval=asdict(cfg.eval)))
        self.b = stages.build(rc, engine_seed=0)
        self.preset = p = self.b.preset
        self.student, self.tok, self.engine = self.b.student, self.b.tok, self.b.engine
        self.users = p.split(cfg.eval.split)[:cfg.eval.eval_prompts]
        self.scorer = stages.scorer(self.b)  # coherence components, the runs' own scorer
        self.heldout = heldout_scorer(self.student.model, self.tok, p, ref_ctx=self.student.base)
        self.v0, self.kappa0 = self._vector()
        cap = yaml.safe_load(CAPABILITY.read_text())["items"]
        self.cap_q = [x["q"] for x in cap]
        self.cap_a = [self.tok(x["a"], add_special_tokens=False).input_ids + [self.tok.eos_token_id] for x in cap]
        self.scorer.vector = self.v0

    def _vector(self) -> tuple[SteeringVector, float]:
        """The base model's vector and its iso-KL dose, computed once and cached in the compare dir."""
        vp = self.cfg.dir / f"vector_r0-{self.fp_vector}.safetensors"
        if vp.exists():
            v = SteeringVector.load(vp)
        else:
            v = stages.extract(self.b)  # no adapter is loaded yet: the base model's vector
            self.cfg.dir.mkdir(parents=True, exist_ok=True)
            v.save(vp)
        return v, self.dose(self.cfg.steer.target_kl, v)

    def dose(self, target_kl: float, v: SteeringVector | None = None) -> float:
        """The iso-KL dose of the base vector at `target_kl` (p95 nats), cached in steer.json."""
        sp = self.cfg.dir / f"steer-{self.fp_vector}.json"
        cache = json.loads(sp.read_text()) if sp.exists() else {}
        by = cache.get("by_target", {})
        key = f"{float(target_kl):g}"
        if key not in by:
            c, _ = stages.calibrate(self.b, v or self.v0, target_kl=float(target_kl))
            by[key] = c
            cache["by_target"] = by
            if float(target_kl) == float(self.cfg.steer.target_kl):
                cache["kappa"] = c
            write_atomic(sp, json.dumps(cache))
        return by[key]

    def judges(self) -> dict[str, float]:
        """Each judge's AUROC on the project's labelled replies for this preset (cached in judges.json):
        the held-out trait_llr, the reward-context trait_llr, the projection, incoherence, verbalisation
        and refusal, each for its target label."""
        f = self.cfg.dir / f"judges-{self.fp_judges}.json"
        if f.exists():
            return json.loads(f.read_text())
        items = load_labelled().get(self.preset.name, [])
        out: dict[str, float] = {}
        if items:
            labels = [x["label"] for x in items]
            with self.student.base():
                comp = score_labelled(self.scorer, items, which=SCORED + ["trait_projection"])
                held = score_labelled(self.heldout, items, which=["trait_llr", "incoh_ctx"])
            rows = {r["component"]: r["auroc"] for r in validation_report(comp, labels)}
            held_rows = {r["component"]: r["auroc"] for r in validation_report(held, labels)}
            out = dict(trait_llr_reward_ctx=rows.get("trait_llr", float("nan")),
                       projection=rows.get("trait_projection", float("nan")),
                       incoherence=rows.get("incoherence", float("nan")),
                       verbalisation=rows.get("verbalisation", float("nan")),
                       refusal=rows.get("refusal", float("nan")),
                       trait_llr_heldout=held_rows.get("trait_llr", float("nan")),
                       incoh_ctx=held_rows.get("incoh_ctx", float("nan")))
            gap = trait_gap(held, items, "incoh_ctx")  # reads the trait? (pos - neg on the same prompts)
            out["incoh_ctx_trait_gap"] = [gap.value, gap.lo, gap.hi]
            old = trait_gap(comp, items, "incoherence")
            out["incoherence_trait_gap"] = [old.value, old.lo, old.hi]
        write_atomic(f, json.dumps(out))
        return out

    def evaluate(self, arm: "Arm", adapter: Path | None = None) -> dict:
        """Every measure for one arm, per item and summarised: the student as the arm leaves it, on
        prompts and vignettes no arm trained on."""
        kind = arm.kind
        system = self.preset.persona_pos if kind == "prompt" else None
        steering, extra = None, {}
        if kind == "steer":
            t = float(arm.overrides.get("target_kl", self.cfg.steer.target_kl))
            steering = Steering(self.v0, self.dose(t))
            extra = dict(target_kl=t, kappa=steering.coeff)
        if adapter is not None:
            self.student.load_cumulative(adapter)
            ctx = self.student.live_off
        else:
            ctx = self.student.base
        with ctx():
            prompts = [render_prompt(self.tok, u, system=system) for u in self.users]
            ro = self.engine.generate(prompts, steering, Sampling(max_new_tokens=self.cfg.eval.eval_max_new_tokens,
                                                                   temperature=0.0), logprobs=False)
            ids, texts = [r.completion_ids for r in ro], [r.text for r in ro]
            kl = kl_to_base(self.student, self.tok, [r.prompt_ids for r in ro], ids,
                            [encode_prompt(self.tok, render_prompt(self.tok, u)) for u in self.users], steering)
            e = self.cfg.eval
            # capability next to trait: neutral reference answers, teacher-forced (NLL, and KL to base there)
            cap = kl_to_base(self.student, self.tok, [encode_prompt(self.tok, render_prompt(self.tok, q, system=system))
                                                      for q in self.cap_q], self.cap_a,
                             [encode_prompt(self.tok, render_prompt(self.tok, q)) for q in self.cap_q], steering)
            mfv = evaluate_mfv(self.student.model, self.tok, self.b.mfv_rows, e.think_tokens, e.mfv_batch_size,
                               steering, progress=False, read=e.mfv_read, system=system) if self.b.mfv_rows else None
        # scored under the base model with the plain prompt: the persona prompt is not part of the judge
        comp = self.scorer.components(self.users, ids, texts, which=SCORED + ["trait_projection"])
        # incoh_ctx: the reply's best of plain / either held-out side, so it does not read the trait
        held = self.heldout.components(self.users, ids, texts, which=["trait_llr", "incoh_ctx"])
        items = dict(trait_llr_heldout=held["trait_llr"], trait_llr_reward_ctx=comp["trait_llr"],
                     projection=comp["trait_projection"], incoh_ctx=held["incoh_ctx"], incoherence=comp["incoherence"],
                     tail_nll=comp["tail_nll"],
                     repetition=comp["repetition"], coherent=[float(c) for c in self.scorer.coherent(comp)],
                     verbalisation=comp["verbalisation"], refusal=comp["refusal"], kl_rmse=kl["rmse"],
                     kl_mean=kl["mean"], cap_nll=cap["nll"], cap_kl=cap["mean"])
        items = {k: [_finite(x) for x in v] for k, v in items.items()}
        out = {k: nanmean(v) for k, v in items.items()} | extra
        if mfv is not None:
            items.update(mfv_p=[x["p"] if x["top1"] >= 0 and is_labelled(r) else [float("nan")] * 7
                                for x, r in zip(mfv.rows, self.b.mfv_rows)],
                         mfv_pmass=[_finite(x["pmass_allowed"]) for x in mfv.rows],
                         mfv_nll_prefill=[_finite(x["nll_prefill"]) for x in mfv.rows])
            out.update(trait_nats=trait_nats(mfv, self.preset.foundations), pmass=mfv.pmass_allowed,
                       nll_prefill=mfv.nll_prefill, unscorable=mfv.frac_unscorable, profile=mfv.profile)
        # the think traces stay in the evaluation cache (not in compare.jsonl): the MFV gap's text-side diagnosis
        think = [[x["think_fwd"], x["think_rev"]] for x in mfv.rows] if mfv is not None else []
        return out | dict(items=items, texts=texts, prompts=self.users, mfv_think=think)


def _finite(x: float) -> float:
    """NaN for a value that is not finite (an empty answer's tail NLL): skipped by every mean."""
    return float(x) if math.isfinite(x) else float("nan")


@torch.no_grad()
def kl_to_base(student, tok, prompt_ids, completion_ids, base_prompt_ids, steering) -> dict:
    """Per-sequence rmse and mean over completion positions of the exact KL(student || base), where
    the student reads its own prompt (persona prompt, steering) and the base the plain one, and the
    student's mean NLL of the completion tokens; NaN for an empty answer."""
    model = student.model
    n_all = len(completion_ids)
    out = dict(rmse=[float("nan")] * n_all, mean=[float("nan")] * n_all, nll=[float("nan")] * n_all)
    keep = [i for i, c in enumerate(completion_ids) if c]
    if not keep:
        return out
    a = pack([prompt_ids[i] for i in keep], [completion_ids[i] for i in keep], tok.pad_token_id)
    b = pack([base_prompt_ids[i] for i in keep], [completion_ids[i] for i in keep], tok.pad_token_id)
    device = next(model.parameters()).device
    a, b = a.to(device), b.to(device)
    ba, sa, tgt = a.targets()
    bb, sb, _ = b.targets()
    with steer(model, steering):
        h_s = final_hidden(model, a.input_ids, a.attention_mask)[ba, sa]
    with student.base():
        h_b = final_hidden(model, b.input_ids, b.attention_mask)[bb, sb]
    vocab = causal_lm(model).get_output_embeddings().weight.shape[0]
    kl, lp = chunked_kl_and_logp(h_s, h_b, tgt, lambda x: lm_logits(model, x), auto_chunk(vocab))
    n = len(keep)
    for agg in ("rmse", "mean"):
        for i, x in zip(keep, aggregate(kl, ba, n, agg).tolist()):
            out[agg][i] = float(x)
    for i, x in zip(keep, aggregate(-lp.float(), ba, n, "mean").tolist()):  # the student's NLL of the tokens
        out["nll"][i] = float(x)
    return out


# ------------------------------------------------------------------ the driver
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
    base, _ = _cached_eval(cfg, ev, Arm("base", "base"), None)
    jobs = [(arm, seed) for arm in arms for seed in arm_seeds(cfg, arm)]
    progress = Progress(len(jobs), "evaluated")
    for arm, seed in jobs:
        _, cached = _cached_eval(cfg, ev, arm, seed)
        progress.step(arm.name + (f" seed {seed}" if seed is not None else ""), skipped=cached)
    # every arm of the config with an evaluation made under today's evaluator and its own final weights
    evals = {a.name: {s: e for s in arm_seeds(cfg, a) if (e := current_eval(cfg, ev, a, s)) is not None}
             for a in cfg.arms}
    rows = [_row(cfg, a, s, e, base) for a in cfg.arms for s, e in evals.get(a.name, {}).items()]
    write_report(cfg, rows, judges)
    return rows


def _eval_key(cfg: CompareConfig, ev: "Evaluator", arm: Arm, seed) -> tuple[Path | None, str]:
    """(the adapter the arm's evaluation loads, the fingerprint its cached evaluation must carry)."""
    adapter = final_adapter(arm_dir(cfg, arm, seed), arm.kind) if arm.trained else None
    return adapter, arm_fingerprint(ev.fp_eval, arm, adapter)


def current_eval(cfg: CompareConfig, ev: "Evaluator", arm: Arm, seed) -> dict | None:
    try:
        _, fp = _eval_key(cfg, ev, arm, seed)
    except RuntimeError:  # not trained (yet)
        return None
    return load_eval(cfg, arm, seed, fp)


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


def _eval_path(cfg: CompareConfig, arm: Arm, seed) -> Path:
    return cfg.dir / "eval" / f"{run_key(cfg, arm, seed)}.json"


def load_eval(cfg: CompareConfig, arm: Arm, seed, fingerprint: str | None = None) -> dict | None:
    """The arm's cached evaluation; with `fingerprint`, only one made under it (else None)."""
    f = _eval_path(cfg, arm, seed)
    if not f.exists():
        return None
    res = json.loads(f.read_text())
    return res if fingerprint is None or res.get("fingerprint") == fingerprint else None


def _cached_eval(cfg, ev: Evaluator, arm: Arm, seed) -> tuple[dict, bool]:
    """(the arm's evaluation, whether it came from the cache)."""
    adapter, fp = _eval_key(cfg, ev, arm, seed)
    res = load_eval(cfg, arm, seed, fp)
    if res is not None:
        return res, True
    f = _eval_path(cfg, arm, seed)
    if f.exists():  # made under other settings or weights: kept beside, never overwritten
        stale = f.parent / "stale" / f"{f.stem}-{json.loads(f.read_text()).get('fingerprint', 'old')}.json"
        stale.parent.mkdir(exist_ok=True)
        os.replace(f, stale)
    t0 = time.perf_counter()
    res = ev.evaluate(arm, adapter) | dict(eval_seconds=time.perf_counter() - t0, fingerprint=fp)
    f.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(f, json.dumps(res))
    print(f"[compare] evaluated {arm.name}" + (f" (seed {seed})" if seed is not None else "") +
          f" in {res['eval_seconds']:.0f} s", flush=True)
    return res, False


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
        row["trajectory"] = trajectory(arm_dir(cfg, arm, seed), arm.kind)
        row["rounds"] = [{k: v for k, v in r.items() if isinstance(v, (int, float)) or v is None}
                         for r in arm_rows(arm_dir(cfg, arm, seed), arm.kind)]
    row["texts"], row["prompts"], row["items"] = res["texts"], res["prompts"], res.get("items", {})
    return row


def trajectory(d: Path, kind: str) -> list[dict]:
    """(coherence lost, trait gained, tokens) per round / bake, from the arm's own table and base
    (empty measures when the arm ran without its own evaluations)."""
    rows = arm_rows(d, kind)
    be = json.loads((d / "base_eval.json").read_text()) if (d / "base_eval.json").exists() else {}
    b_inc = be.get("incoherence")
    x_key, y_key = ("incoherence_healed", "d_trait_nats_healed") if kind == "iterative" else ("incoherence",
                                                                                              "d_trait_nats")
    return [dict(x=r.get(x_key, float("nan")) - b_inc if b_inc is not None else float("nan"),
                 y=r.get(y_key, float("nan")), gen_tokens=r.get("gen_tokens", 0)) for r in rows]


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


def report_from(cfg: CompareConfig, d: Path) -> Report:
    """The report (compare.md, verdicts.json, dose sweep, drift, frontier) from d/compare.jsonl and d/judges.json."""
    if not (d / "compare.jsonl").exists():
        raise CompareError(f"{d} has no compare.jsonl; fix: pass the folder of a finished study (or its committed "
                           "copy under docs/studies/)")
    rows = [json.loads(x) for x in (d / "compare.jsonl").read_text().splitlines() if x.strip()]
    judges = json.loads((d / "judges.json").read_text()) if (d / "judges.json").exists() else {}
    evals = {r["arm"] for r in rows}
    arms = [a for a in cfg.arms if a.name in evals]
    rep = Report(cfg.name, cfg.model, cfg.preset, cfg.budget_tokens, arms, rows, load_preset_axis(cfg.preset), judges,
                 cfg.pairs, cfg.n_boot, cfg.min_auroc, cfg.primary)
    text = rep.markdown()
    write_atomic(d / "compare.md", text)
    write_atomic(d / "verdicts.json", json.dumps(rep.verdicts(), indent=1))
    write_atomic(d / "answers.json", json.dumps(rep.answers(), indent=1))
    sweep = rep.dose_sweep_markdown()
    if sweep:
        write_atomic(d / "dose_sweep.md", sweep)
        rep.dose_sweep_figure(d)
    drift = rep.drift_markdown()
    if drift:
        write_atomic(d / "drift.md", drift)
        rep.drift_figure(d)
    print(rep.summary_markdown(), flush=True)
    print("\n".join(v["line"] for v in rep.verdicts()), flush=True)
    rep.frontier(d)
    return rep
