"""Student-side scores: greedy answers to fixed prompts, scored by the shared Scorer.

One function for the iterative round table, the online bake table and the comparison, so their
trait / coherence columns are the same numbers computed the same way.
"""
from __future__ import annotations

import math

from steer_heal.chat import render_prompt
from steer_heal.engine.base import Sampling
from steer_heal.steering.core import Steering

SCORED = ["trait_llr", "incoherence", "verbalisation", "refusal"]


def summarise(scorer, comp: dict) -> dict:
    """Means over a batch of scored answers (the coherent fraction by the filter's own test)."""
    n = max(len(comp["tail_nll"]), 1)
    fin = [t for t in comp["tail_nll"] if math.isfinite(t)]
    inc = [x for x in comp["incoherence"] if math.isfinite(x)]
    return dict(trait=sum(comp["trait_llr"]) / n, coherence=sum(scorer.coherent(comp)) / n,
                tail_nll=sum(fin) / max(len(fin), 1), incoherence=sum(inc) / max(len(inc), 1),
                repetition=sum(comp["repetition"]) / n, verbalisation=sum(comp["verbalisation"]) / n,
                refusal=sum(comp["refusal"]) / n)


def student_scores(engine, scorer, users: list[str], steering: Steering | None = None, max_new_tokens: int = 48,
                   desc: str | None = None, heldout=None) -> dict:
    """Greedy answers of whatever the engine serves (the caller sets the student's mode) to `users`,
    scored under the scorer's reference (and, with `heldout`, the trait under the held-out persona
    context: `trait_heldout`). Returns the summary plus the prompts and texts."""
    prompts = [render_prompt(engine.tok, u) for u in users]
    ro = engine.generate(prompts, steering, Sampling(max_new_tokens=max_new_tokens, temperature=0.0, seed=0),
                         logprobs=False, desc=desc)
    comp = scorer.components(users, [r.completion_ids for r in ro], [r.text for r in ro],
                             prompt_ids=[r.prompt_ids for r in ro], which=SCORED)
    out = summarise(scorer, comp)
    if heldout is not None:
        h = heldout.components(users, [r.completion_ids for r in ro], [r.text for r in ro], which=["trait_llr"])
        out["trait_heldout"] = sum(h["trait_llr"]) / max(len(h["trait_llr"]), 1)
    return out | {"texts": [r.text for r in ro], "prompts": users}
