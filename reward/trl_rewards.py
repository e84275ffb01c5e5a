"""The components as TRL reward functions: plain named functions, one logged metric each.

TRL calls `f(prompts=..., completions=..., completion_ids=..., **dataset_columns)` and logs
`rewards/<f.__name__>/mean`. Signs follow the combined reward: the penalty components come back
negated and weighted, so TRL's weighted sum (all weights 1) equals `Scorer.combined`.
"""
from __future__ import annotations

from reward.components import TRAIT_COMPONENT


def user_text(prompt) -> str:
    if isinstance(prompt, list):  # conversational: the last user turn
        return next(m["content"] for m in reversed(prompt) if m["role"] == "user")
    return prompt


def _completion_text(c) -> str:
    return c[-1]["content"] if isinstance(c, list) else c


def reward_inputs(scorer, prompts, completions, completion_ids, kwargs):
    users = kwargs.get("user") or [user_text(p) for p in prompts]
    texts = [_completion_text(c) for c in completions]
    ids = completion_ids or [scorer.tok(t, add_special_tokens=False).input_ids for t in texts]
    return list(users), [list(x) for x in ids], texts


def make_reward_functions(scorer, which: list[str] | None = None) -> list:
    """One TRL reward function per component: trait (weighted), -verbalisation, -incoherence, -refusal."""
    c = scorer.cfg
    trait_key = TRAIT_COMPONENT[c.reward_trait]
    spec = {trait_key: c.w_trait, "verbalisation": -c.w_verb, "incoherence": -c.w_incoh, "refusal": -c.w_refusal}
    if which:
        spec = {k: v for k, v in spec.items() if k in which}

    def make(name: str, weight: float):
        def fn(prompts, completions, completion_ids=None, **kwargs):
            users, ids, texts = reward_inputs(scorer, prompts, completions, completion_ids, kwargs)
            vals = scorer.components(users, ids, texts, which=[name])[name]
            return [weight * v for v in vals]

        fn.__name__ = fn.__qualname__ = name
        fn.weight = weight  # signed; reward_norm per_term standardises the component, then weighs it by |weight|
        return fn

    return [make(k, w) for k, w in spec.items()]
