"""Validate the reward components on the project's labelled replies: AUROC of each component for its
target label against the rest (`make reward-report`, or `steer-heal score --validate`)."""
from __future__ import annotations

from pathlib import Path

import yaml

from steer_heal.stats import t_interval

DATA = Path(__file__).parent / "data" / "labelled.yaml"


def load_labelled(path: str | Path = DATA) -> dict[str, list[dict]]:
    """preset -> [{prompt, reply, label}]."""
    d = yaml.safe_load(Path(path).read_text())
    return {preset: [dict(prompt=x["prompt"], reply=x["reply"], label=lab) for lab, xs in by.items() for x in xs]
            for preset, by in d.items()}


def auroc(pos: list[float], neg: list[float]) -> float:
    """P(score of a positive > score of a negative), ties count half (Mann-Whitney)."""
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


# (component, target label, the rest it must beat); higher component = more of the target
CHECKS = [("verbalisation", "narrate", None), ("incoherence", "incoherent", None), ("incoh_ctx", "incoherent", None),
          ("refusal", "refusal", None),
          ("trait_llr", "enact-pos", "enact-neg"), ("trait_projection", "enact-pos", "enact-neg")]


def score_labelled(scorer, items: list[dict], which=None) -> dict[str, list[float]]:
    tok = scorer.tok
    users = [x["prompt"] for x in items]
    texts = [x["reply"] for x in items]
    ids = [tok(t, add_special_tokens=False).input_ids + [tok.eos_token_id] for t in texts]
    return scorer.components(users, ids, texts, which=which)


def report(comp: dict[str, list[float]], labels: list[str]) -> list[dict]:
    rows = []
    for name, target, other in CHECKS:
        if name not in comp:
            continue
        pos = [v for v, l in zip(comp[name], labels) if l == target]
        neg = [v for v, l in zip(comp[name], labels) if (l == other if other else l != target)]
        rows.append(dict(component=name, target=target, vs=other or "rest", auroc=auroc(pos, neg)))
    return rows


def trait_gap(comp: dict[str, list[float]], items: list[dict], name: str = "incoh_ctx"):
    """Does a coherence measure read the trait? Its value on each coherent enact-pos reply minus the enact-neg
    reply to the same prompt: the mean over prompts with a 95% t-interval (one that holds 0 and stays narrow
    says it does not)."""
    by = {}
    for v, x in zip(comp[name], items):
        if x["label"] in ("enact-pos", "enact-neg"):
            by.setdefault(x["prompt"], {})[x["label"]] = v
    return t_interval([d["enact-pos"] - d["enact-neg"] for d in by.values() if len(d) == 2])


def means_by_label(comp: dict[str, list[float]], labels: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for lab in dict.fromkeys(labels):
        idx = [i for i, l in enumerate(labels) if l == lab]
        out[lab] = {k: sum(v[i] for i in idx) / len(idx) for k, v in comp.items() if k != "n_tokens"}
    return out
