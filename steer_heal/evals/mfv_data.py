"""Moral-foundations vignettes (hub layout of `wassname/tiny-mfv`): local folder or the hub."""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from datasets import load_dataset

FOUNDATIONS = ["Care", "Fairness", "Loyalty", "Authority", "Sanctity", "Liberty", "SocialNorms"]
CONFIGS = ("classic", "scifi", "ai-actor")
CONDITIONS = ("other_violate", "self_violate")
HUB_ID = "wassname/tiny-mfv"
ENV = "STEER_HEAL_MFV_DIR"


class MFVDataError(ValueError):
    """The vignettes cannot be found; the message names both ways to provide them."""


def _coarse(row: dict) -> str:
    f = row.get("foundation_coarse", "")
    return "SocialNorms" if f.replace(" ", "") == "SocialNorms" else f


def _from_folder(folder: Path, config: str, condition: str) -> list[dict]:
    p = folder / config / f"vignettes_{condition}.jsonl"
    if not p.exists():
        raise MFVDataError(f"no {config}/{condition} vignettes in '{folder}'; fix: point {ENV} (or eval.mfv_dir) at a "
                           f"folder in the hub layout of {HUB_ID} (with {config}/vignettes_{condition}.jsonl)")
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()]


def _from_hub(config: str, condition: str) -> list[dict]:
    try:
        return [dict(r) for r in load_dataset(HUB_ID, config, split=condition)]
    except Exception as e:
        raise MFVDataError(f"MFV vignettes not found: no local folder given and the hub dataset {HUB_ID} could not be "
                           f"loaded ({type(e).__name__}); fix: set {ENV}=<folder in the {HUB_ID} layout> "
                           f"(or eval.mfv_dir), or go online so `datasets` can fetch {HUB_ID}") from None


def load_vignettes(source: str | None = None, config: str = "classic", condition: str = "other_violate",
                   n: int | None = None, seed: int = 0) -> list[dict]:
    """Rows with id, text, foundation_coarse, human_<F>. `source`: folder; default ${ENV}, then the hub."""
    if config not in CONFIGS or condition not in CONDITIONS:
        raise MFVDataError(
            f"unknown MFV split {config}/{condition}; fix: config in {CONFIGS}, condition in {CONDITIONS}"
        )
    source = source or os.environ.get(ENV)
    rows = _from_folder(Path(source), config, condition) if source else _from_hub(config, condition)
    for r in rows:
        r["foundation_coarse"] = _coarse(r)
    return stratified(rows, n, seed) if n else rows


def stratified(rows: list[dict], n: int, seed: int = 0) -> list[dict]:
    """n rows spread over foundations round-robin (seeded), not the first n; keeps the file order."""
    if n >= len(rows):
        return rows
    rng = random.Random(seed)
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        groups.setdefault(r["foundation_coarse"], []).append(i)
    for g in groups.values():
        rng.shuffle(g)
    picked: list[int] = []
    keys = sorted(groups)
    while len(picked) < n:
        for k in keys:
            if groups[k] and len(picked) < n:
                picked.append(groups[k].pop())
    return [rows[i] for i in sorted(picked)]


def human_profile(rows: list[dict]) -> list[float]:
    """Mean over rows of the normalised human rater distribution over the 7 options."""
    acc = [0.0] * 7
    for r in rows:
        h = [float(r.get(f"human_{f}", 0.0)) for f in FOUNDATIONS]
        s = sum(h) or 1.0
        acc = [a + x / s for a, x in zip(acc, h)]
    return [a / max(len(rows), 1) for a in acc]


def is_labelled(row: dict) -> bool:
    """A vignette with any human rating: only these count in the profile and accuracy (tinymfv)."""
    return any(float(row.get(f"human_{f}", 0) or 0) > 0 for f in FOUNDATIONS)


def human_label(row: dict) -> int:
    h = [float(row.get(f"human_{f}", 0.0)) for f in FOUNDATIONS]
    return max(range(7), key=lambda i: h[i])
