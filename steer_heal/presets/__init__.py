"""Persona presets: a contrastive pair plus prompt sets written for this project."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from steer_heal.presets.check import KEYS, check_preset
from steer_heal.presets.check import MINIMUMS as MIN
from steer_heal.presets.text import NEAR_DUPLICATE, content_words, near_duplicates, overlap
from steer_heal.setting import read_yaml

__all__ = ["Preset", "PresetError", "load_preset", "load_prompt_set", "available", "defaults_line", "NEAR_DUPLICATE",
           "content_words", "near_duplicates", "overlap", "HERE"]

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
    path: Path | None = None  # the YAML it was read from
    sources: list[Path] = field(default_factory=list)  # that YAML and every set file it names (a study's hash)
    defaults: list[str] = field(default_factory=list)  # fields left to the shipped trait-neutral sets
    unknown_keys: list[str] = field(default_factory=list)  # keys of the YAML no field reads (typos)

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


class PresetError(ValueError):
    """An unusable preset; the message names the fix (one line)."""


# the shipped trait-neutral sets a preset may name instead of listing its own: field -> (folder, key)
SET_FIELDS = {"contexts": ("contexts", "contexts"), "prompts": ("prompts", "prompts"),
              "dev_prompts": ("heldout", "dev_prompts"), "test_prompts": ("heldout", "test_prompts")}
DEFAULT_SET = "general"


def shipped_sets(field_name: str) -> list[str]:
    folder, _ = SET_FIELDS[field_name]
    if folder == "contexts":
        return [DEFAULT_SET]
    return sorted(q.stem for q in (HERE / folder).glob("*.yaml"))


def _set_file(field_name: str, name: str, base: Path) -> Path:
    """A set named in a preset: a YAML path (beside the preset, or as given), else a shipped set's name."""
    for cand in (base / name, Path(name)):
        if cand.suffix in (".yaml", ".yml") and cand.is_file():
            return cand
    folder, _ = SET_FIELDS[field_name]
    f = HERE / "general_contexts.yaml" if folder == "contexts" and name in (DEFAULT_SET, "general_contexts") \
        else HERE / folder / f"{name}.yaml"
    if not f.is_file():
        raise PresetError(f"{field_name}: no set named '{name}'; fix: a list of texts, a YAML path, or one of "
                          f"{shipped_sets(field_name)}")
    return f


def _read_set(field_name: str, f: Path) -> list[str]:
    key = SET_FIELDS[field_name][1]
    d = read_yaml(f)
    xs = d.get(key) or (d.get("contexts") if field_name == "contexts" else None)
    if not isinstance(xs, list):
        raise PresetError(f"{f} has no `{key}:` list; fix: give it one")
    return [str(x) for x in xs]


def load_preset(name_or_path: str, check: bool = True) -> Preset:
    """A preset by name or path. Each of contexts / prompts / dev_prompts / test_prompts is a list, the name of
    a shipped set (`general`) or a YAML path; one the preset leaves out is the shipped trait-neutral set
    (listed in `Preset.defaults`). With `check` (every run, eval and compare) the preset is refused in one
    line at its first problem (steer_heal/presets/check.py); `steer-heal preset check FILE` lists them all."""
    p = Path(name_or_path)
    if not p.is_file():
        p = HERE / f"{name_or_path}.yaml"
    if not p.is_file():
        raise PresetError(f"unknown preset '{name_or_path}'; fix: use one of {available()} or a YAML path "
                          "(`steer-heal preset new NAME --pos ... --neg ...` writes one)")
    d = read_yaml(p)
    sources, defaults, lists = [p], [], {}
    for fld in SET_FIELDS:
        v = d.get(fld, d.get("eval_prompts") if fld == "dev_prompts" else None)
        if v is None and not (fld == "contexts" and d.get("include_contexts")):
            v = DEFAULT_SET
            defaults.append(fld)
        if isinstance(v, str):
            if v == DEFAULT_SET and fld not in defaults:
                defaults.append(fld)
            f = _set_file(fld, v, p.parent)
            sources.append(f)
            v = _read_set(fld, f)
        lists[fld] = [str(x) for x in (v or [])]
    if d.get("include_contexts"):
        f = _set_file("contexts", str(d["include_contexts"]), p.parent)
        sources.append(f)
        lists["contexts"] += _read_set("contexts", f)
    preset = Preset(
        name=d.get("name", p.stem),
        persona_pos=str(d.get("persona_pos") or ""),
        persona_neg=str(d.get("persona_neg") or ""),
        contexts=lists["contexts"],
        prompts=lists["prompts"],
        dev_prompts=lists["dev_prompts"],
        test_prompts=lists["test_prompts"],
        foundations=dict(d.get("foundations") or {}),
        persona_demos=list(d.get("persona_demos") or []),
        eval_persona_pos=str(d.get("eval_persona_pos") or ""),
        eval_persona_neg=str(d.get("eval_persona_neg") or ""),
        eval_persona_demos=list(d.get("eval_persona_demos") or []),
    )
    preset.path, preset.sources, preset.defaults = p, sources, defaults
    preset.unknown_keys = sorted(set(d) - KEYS)
    if check:
        problems = check_preset(preset)
        if problems:
            more = f" ({len(problems) - 1} more: `steer-heal preset check {p}` lists them)" if len(problems) > 1 else ""
            raise PresetError(f"preset {p}: {problems[0]}{more}")
    return preset


def defaults_line(preset: Preset) -> str:
    """The one line a run prints when the preset leaves parts to the shipped trait-neutral sets."""
    if not preset.defaults:
        return ""
    return (f"preset '{preset.name}': {', '.join(preset.defaults)} from the shipped trait-neutral '{DEFAULT_SET}' "
            f"set{'s' if len(preset.defaults) > 1 else ''}; prompts written for the trait measure it better "
            "(`steer-heal preset new` writes a commented skeleton)")


def skeleton(name: str, pos: str, neg: str) -> str:
    """A commented preset a person fills in; it passes `steer-heal preset check` as written (every prompt set
    names the shipped trait-neutral `general` set until the person writes the trait's own)."""
    q = json.dumps  # a JSON string is a YAML double-quoted scalar
    return f"""# {name}: a steer-heal preset. `steer-heal preset check <this file>` says what is missing, one line each.
name: {name}
# The persona pair: two system prompts that are opposite poles of ONE axis, the same length and style. Write the
# opposite pole in its own words; "someone who does not ..." makes the vector read negation, not the trait.
persona_pos: {q(pos)}
persona_neg: {q(neg)}

# Moral-foundations axis (optional): the MFV vignettes' foundations this trait moves, with the sign of the move,
# from Care, Fairness, Loyalty, Authority, Sanctity, Liberty, SocialNorms. Leave it out when the trait has no
# moral-foundations axis: the run then reports no MFV trait column and no MFV verdict (it still reports the
# MFV answer mass and prefill NLL, which read coherence).
# foundations: {{Care: 1}}

# Extraction contexts (>= {MIN['contexts']}): everyday user turns; the vector is the mean difference of the two
# personas' states over them. `general` is the shipped trait-neutral set (96). Your own, as a list:
#   contexts: ["What do you make of strangers?", ...]
contexts: general

# Training prompts (>= {MIN['prompts']}): what the run generates replies to. Situations where the trait shows work best.
# Example: "My team lost the final again. What now?"
prompts: general

# Held-out prompts, never trained on: dev (>= {MIN['dev_prompts']}) chooses settings, test (>= {MIN['test_prompts']})
# gives verdicts.
# Each must not near-copy a context, a training prompt or a demo (topic-word overlap < {NEAR_DUPLICATE}); the check
# names any that do. Example dev prompt: "My exam results come out tomorrow."
dev_prompts: general
test_prompts: general

# Persona demonstrations (optional): short exchanges acting each pole out, shown before a reply when the trait
# log-likelihood ratio (the reward's trait term) scores it. One example:
# persona_demos:
#   - user: "It's raining on my day off."
#     pos: "..."   # the positive pole's reply
#     neg: "..."   # the opposite pole's reply

# The held-out judge (optional, for `steer-heal compare`): a paraphrase of the pair (and demos) written for
# evaluation only, never the reward's context. Without it the comparison has no trait_llr* (held-out trait).
# Its labelled replies (reward/data/labelled.yaml) give the judges' AUROC; under 0.75 the report withholds
# verdicts on that measure.
# eval_persona_pos: "..."
# eval_persona_neg: "..."
"""
