"""Persona presets: a contrastive pair plus prompt sets written for this project."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

HERE = Path(__file__).parent


@dataclass
class Preset:
    name: str
    persona_pos: str
    persona_neg: str
    contexts: list[str]
    prompts: list[str]
    eval_prompts: list[str]
    foundations: dict[str, int] = field(default_factory=dict)
    persona_demos: list[dict] = field(default_factory=list)  # [{user, pos, neg}]: trait_llr's few-shot context
    # held-out judge (compare): a paraphrased pair + demonstrations written for evaluation only
    eval_persona_pos: str = ""
    eval_persona_neg: str = ""
    eval_persona_demos: list[dict] = field(default_factory=list)


def available() -> list[str]:
    return sorted(p.stem for p in HERE.glob("*.yaml") if p.stem != "general_contexts")


def load_preset(name_or_path: str) -> Preset:
    p = Path(name_or_path)
    if not p.exists():
        p = HERE / f"{name_or_path}.yaml"
    if not p.exists():
        raise ValueError(f"unknown preset '{name_or_path}'; fix: use one of {available()} or a YAML path")
    d = yaml.safe_load(p.read_text())
    ctx = list(d.get("contexts", []))
    if d.get("include_contexts"):
        ctx += yaml.safe_load((p.parent / d["include_contexts"]).read_text())["contexts"]
    return Preset(
        name=d.get("name", p.stem),
        persona_pos=d.get("persona_pos", ""),
        persona_neg=d.get("persona_neg", ""),
        contexts=ctx,
        prompts=list(d.get("prompts", [])),
        eval_prompts=list(d.get("eval_prompts", [])),
        foundations=dict(d.get("foundations", {})),
        persona_demos=list(d.get("persona_demos", [])),
        eval_persona_pos=d.get("eval_persona_pos", ""),
        eval_persona_neg=d.get("eval_persona_neg", ""),
        eval_persona_demos=list(d.get("eval_persona_demos", [])),
    )
