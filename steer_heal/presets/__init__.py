"""Persona presets: a contrastive pair plus prompt sets written for this project."""
from __future__ import annotations

import re
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
    dev_prompts: list[str]  # held out from training; for choosing doses, presets and defaults
    foundations: dict[str, int] = field(default_factory=dict)
    persona_demos: list[dict] = field(default_factory=list)  # [{user, pos, neg}]: trait_llr's few-shot context
    # held-out judge (compare): a paraphrased pair + demonstrations written for evaluation only
    eval_persona_pos: str = ""
    eval_persona_neg: str = ""
    eval_persona_demos: list[dict] = field(default_factory=list)
    test_prompts: list[str] = field(default_factory=list)  # held out from training and from every choice: verdicts

    @property
    def eval_prompts(self) -> list[str]:
        """The runs' own per-round / per-bake evaluations read the dev prompts."""
        return self.dev_prompts

    def split(self, name: str) -> list[str]:
        """The held-out prompts of one split: dev (choosing settings) or test (verdicts)."""
        if name not in ("dev", "test"):
            raise ValueError(f"unknown eval split '{name}'; fix: dev or test")
        out = self.dev_prompts if name == "dev" else self.test_prompts
        if not out:
            raise ValueError(f"preset '{self.name}' has no {name}_prompts; fix: add them to its YAML")
        return out

    def seen(self) -> list[str]:
        """Every text a run conditions on before evaluation: extraction contexts, training prompts, persona demos."""
        return self.contexts + self.prompts + [d["user"] for d in self.persona_demos + self.eval_persona_demos]


# words that carry no topic: function words and the question templates every prompt set shares
_STOP = set("""a an the and or but if of to in on at for with about from by as into over after before than then so
i me my you your we our they them their he him his she her it its this that these those who whom what which when where
why how is are was were be been being do does did have has had will would can could should may might must shall
not no yes any some all just very really ever never still also there here one ones thing things
think thinks thought feel feels felt say says said tell tells describe make makes made give gives write
someone somebody person people anyone everyone""".split())


def content_words(text: str) -> set[str]:
    ws = re.findall(r"[a-z0-9]+", text.lower().replace("'", ""))
    return {w[:-1] if len(w) > 3 and w.endswith("s") else w for w in ws if w not in _STOP}


def overlap(a: str, b: str) -> float:
    """Jaccard overlap of the two texts' topic words (function words and question templates left out)."""
    A, B = content_words(a), content_words(b)
    return len(A & B) / max(len(A | B), 1)


NEAR_DUPLICATE = 0.35  # overlap at or above this: an eval prompt too close to something the runs saw


def near_duplicates(p: Preset, threshold: float = NEAR_DUPLICATE) -> list[tuple[str, str, float]]:
    """(eval prompt, the seen text it nearly copies, overlap) for every dev or test prompt at or over threshold."""
    seen = p.seen()
    out = []
    for e in p.dev_prompts + p.test_prompts:
        best = max(seen, key=lambda o: overlap(e, o), default="")
        if best and overlap(e, best) >= threshold:
            out.append((e, best, overlap(e, best)))
    return out


def load_prompt_set(name_or_path: str, preset: Preset) -> list[str]:
    """A training prompt set in place of the preset's (presets/prompts/<name>.yaml or a path). Refused when one
    of its prompts nearly copies a held-out prompt: the evaluation would read what the run trained on."""
    p = Path(name_or_path)
    if not p.exists():
        p = HERE / "prompts" / f"{name_or_path}.yaml"
    if not p.exists():
        names = sorted(q.stem for q in (HERE / "prompts").glob("*.yaml"))
        raise ValueError(f"unknown prompt set '{name_or_path}'; fix: use one of {names} or a YAML path")
    prompts = list((yaml.safe_load(p.read_text()) or {}).get("prompts") or [])
    if not prompts:
        raise ValueError(f"prompt set {p} has no prompts; fix: give it a `prompts:` list")
    for e in preset.dev_prompts + preset.test_prompts:
        hit = max(prompts, key=lambda t: overlap(e, t))
        if overlap(e, hit) >= NEAR_DUPLICATE:
            raise ValueError(f"prompt set {p}: '{hit}' nearly copies the held-out prompt '{e}' "
                             f"(overlap {overlap(e, hit):.2f}); fix: reword or drop it")
    return prompts


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
        dev_prompts=list(d.get("dev_prompts", d.get("eval_prompts", []))),
        test_prompts=list(d.get("test_prompts", [])),
        foundations=dict(d.get("foundations", {})),
        persona_demos=list(d.get("persona_demos", [])),
        eval_persona_pos=d.get("eval_persona_pos", ""),
        eval_persona_neg=d.get("eval_persona_neg", ""),
        eval_persona_demos=list(d.get("eval_persona_demos", [])),
    )
