"""A study's config: its arms (kinds base | prompt | steer | iterative | online) and the settings every arm shares,
read from YAML with every setting checked (the arms' own run configs and overrides included) before anything runs."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

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
    nested_names,
    setting,
)
from steer_heal.presets import load_preset
from steer_heal.setting import SettingError, read_yaml
from steer_heal.study.measures import EXPECTS, PRIMARY_MEASURES

ONLINE_KEYS = {flat_name(path) for path, _, _ in leaves(ONLINE)}  # steer-heal's flat keys (the rest are TRL's)
KINDS = ("base", "prompt", "steer", "iterative", "online")


class CompareError(ValueError):
    """A bad comparison config; the message names the fix."""


@dataclass
class Arm:
    name: str = setting("", "the arm's name (its directory under compare_dir)")
    kind: str = setting("", "base | prompt (persona as system prompt) | steer | iterative | online")
    config: str = setting("", "the arm's own run config (iterative: a run YAML; online: a grpo YAML)")
    overrides: dict = setting({}, "section.key -> value for steer-heal settings (both drivers: heal.kl_tau, "
                                  "online.objective), key -> value for top-level and TRL settings (control, "
                                  "learning_rate)")
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


NESTED = nested_names(ONLINE)
FLAT_TO_NESTED = {v: k for k, v in NESTED.items()}


def online_overrides(name: str, overrides: dict) -> dict:
    """An online arm's overrides as its recipe's parser reads them: each steer-heal setting written by its path in
    the run config (heal.kl_tau, as iterative arms write it) becomes its flat name (kl_tau); TRL's own settings
    (learning_rate, max_steps) and top-level ones (control) pass unchanged. A flat name for a sectioned setting
    is refused, so a study writes each setting one way for both drivers."""
    out = {}
    for k, v in overrides.items():
        if k in FLAT_TO_NESTED:
            raise CompareError(f"arm '{name}': override '{k}' is a steer-heal setting; fix: write it as "
                               f"{FLAT_TO_NESTED[k]} (its path in the run config, the same for both drivers)")
        out[NESTED.get(k, k)] = v
    return out


def check_arm_settings(arm: "Arm") -> None:
    """A training arm's run config plus its overrides against every setting's allowed values, before anything
    runs (an iterative arm: its nested keys; an online arm: the flat keys steer-heal declares, TRL's own are
    checked by TRL when the arm starts)."""
    try:
        if arm.kind == "iterative":
            load_config(arm.config, [f"{k}={cli_value(v)}" for k, v in arm.overrides.items()])
        else:
            flat = read_yaml(arm.config) | dict(arm.overrides)
            from_flat({k: v for k, v in flat.items() if k in ONLINE_KEYS})
    except SettingError as e:
        raise CompareError(f"arm '{arm.name}': {e}") from None


def _read(path: str, overrides: list[str]) -> dict:
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
    return d


def _check_arm(arm: Arm) -> None:
    if arm.kind not in KINDS:
        raise CompareError(f"arm '{arm.name}': unknown kind '{arm.kind}'; fix: one of {KINDS}")
    if arm.trained and not arm.config:
        raise CompareError(f"arm '{arm.name}' ({arm.kind}) needs config:; fix: point it at the arm's run config")
    if arm.control not in CONTROLS:
        raise CompareError(f"arm '{arm.name}': unknown control '{arm.control}'; fix: one of {CONTROLS[1:]}")
    if arm.kind == "online":
        for control in {arm.control, "placebo" if arm.placebo else ""}:
            try:
                check_control(control, str(arm_setting(arm, "objective", "")))
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
    if arm.placebo and (not arm.trained or arm.control):
        raise CompareError(f"arm '{arm.name}': placebo: true needs a steered training arm; fix: remove it")


def _check_questions(cfg: CompareConfig) -> None:
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


def load_compare(path: str, overrides: list[str] = ()) -> CompareConfig:
    """The study config at `path` with `key=value` overrides, every setting checked; one line at the first
    problem (CompareError)."""
    d = _read(path, overrides)
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
        if arm.kind == "online":  # held as the flat names the online recipe reads (train_command passes them on)
            arm.overrides = online_overrides(arm.name, dict(arm.overrides))
        _check_arm(arm)
        cfg.arms.append(arm)
        if arm.placebo:  # an unsteered rollout is the same at every multiplier (and a control refuses rollout_alphas)
            ov = {k: v for k, v in arm.overrides.items() if k != "rollout_alphas"} | {"control": "placebo"}
            cfg.arms.append(Arm(f"{arm.name}_placebo", arm.kind, arm.config, ov, arm.launcher, placebo_of=arm.name))
    try:  # the preset, before anything runs: one line at its first problem
        load_preset(cfg.preset)
    except (SettingError, ValueError) as e:
        raise CompareError(str(e)) from None
    _check_questions(cfg)
    return cfg


def arm_setting(arm: Arm, key: str, default):
    """A training arm's top-level setting: its override, else its run config's, else `default` (a missing
    config file is reported when the arm runs)."""
    if key in arm.overrides:
        return arm.overrides[key]
    p = Path(arm.config)
    return (yaml.safe_load(p.read_text()) or {}).get(key, default) if p.is_file() else default


def cli_value(v) -> str:
    """One override as the arm's command line reads it (lists, dicts and booleans as JSON)."""
    return json.dumps(v) if isinstance(v, (list, dict, bool)) else str(v)
