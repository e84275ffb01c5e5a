"""The rollout-engine interface shared by the HF engine and the vLLM engine."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from steer_heal.steering.core import Steering


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 -> greedy
    top_p: float = 1.0
    seed: int = 0
    min_new_tokens: int = 0  # EOS is suppressed until this many tokens
    banned: list[list[int]] = field(default_factory=list)  # token sequences never to complete (e.g. "</think>")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass
class Rollout:
    prompt: str  # the rendered chat prompt
    text: str  # decoded completion, special tokens removed
    prompt_ids: list[int]
    completion_ids: list[int]  # includes the EOS token when the model stopped
    logprobs: list[float] = field(default_factory=list)  # behaviour-policy log p per completion token
    finished: bool = False  # stopped on EOS before max_new_tokens


def eos_token_ids(tok, generation_config=None) -> list[int]:
    """Every id that ends a completion: the tokenizer's eos plus the generation config's (chat models
    often list several, e.g. <|im_end|> and <|endoftext|>)."""
    ids = {tok.eos_token_id}
    e = getattr(generation_config, "eos_token_id", None)
    ids.update(e if isinstance(e, list) else [e])
    return sorted(i for i in ids if i is not None)


class RolloutEngine(Protocol):
    tok: object  # the tokenizer prompts are rendered with
    n_generated: int  # completion tokens generated so far (the budget counts diff it around a stage)

    def push(self, student) -> None:
        """Make the engine serve the student's current baked weights."""
        ...

    def sleep(self) -> None:
        """Free accelerator memory for training until the next generate / push (a no-op where there
        is nothing to free). Called once per optimizer step and once per bake."""
        ...

    def generate(self, prompts: list[str], steering: Steering | None, sampling: Sampling,
                 logprobs: bool = True, desc: str | None = None) -> list[Rollout]:
        """Complete rendered chat prompts under optional steering; order preserved."""
        ...
