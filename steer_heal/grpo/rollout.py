"""TRL `rollout_func`: the engine serves the baked student plus c * v (never the live LoRA)."""
from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch

from reward.trl_rewards import user_text
from steer_heal.chat import encode_prompt, render_prompt
from steer_heal.engine.base import Sampling
from steer_heal.steering.core import Steering, SteeringVector


@dataclass
class SteerState:
    """What the behaviour policy is: updated in place at bakes and by the dose controller."""
    vector: SteeringVector
    kappa: float
    bake_round: int = 0
    gen_tokens: int = 0  # generated tokens so far, all ranks: rollouts + calibration (the comparison's budget)

    @property
    def steering(self) -> Steering:
        return Steering(self.vector, self.kappa)


def make_rollout_func(engine, student, state: SteerState, max_new_tokens: int, temperature: float = 1.0,
                      top_p: float = 1.0, timers: dict | None = None, steered: bool = True,
                      system: str | None = None, live: bool = False, alphas: list[float] = (), log=None):
    """rollout_func(prompts, trainer) -> prompt_ids, completion_ids, logprobs (+ `user` for rewards).

    TRL hands prompts already repeated num_generations times. Logprobs are the steered behaviour
    policy's; the learner is unsteered, so importance-sampling correction is off by design.
    Controls: `steered=False` generates unsteered (placebo); with `system` the rollouts are
    generated under that system prompt but returned with the plain prompt's ids, which is what the
    learner trains on (prompt distillation). `live=True` (on-policy distillation) samples from the
    learner itself: baked + live LoRA, unsteered; a vLLM engine gets the live weights pushed first.
    `alphas` (multi-strength rollouts): rollout j of each group of num_generations is generated at
    alphas[j % len(alphas)] x kappa, one engine call per strength; each rollout's dose is returned as
    `dose` (reward functions see it), kept in `rollout_func.doses` and passed to `log`. An alpha of 0 is
    the baked student's own unsteered reply (VSPO: the group then contrasts steered and unsteered).
    """
    def rollout_func(prompts, trainer):
        t0 = time.perf_counter()
        users = [user_text(p) for p in prompts]
        rendered = [render_prompt(engine.tok, u, system=system) for u in users]
        seed = int(trainer.state.global_step) * 7919 + int(trainer.accelerator.process_index)
        samp = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
        if live:
            if getattr(engine, "push_live", None) is not None:  # an engine with its own weight copy
                t1 = time.perf_counter()
                engine.push_live(student)
                if timers is not None:
                    timers["push"] = timers.get("push", 0.0) + time.perf_counter() - t1
            ro = engine.generate(rendered, None, samp, logprobs=True)
            doses = [0.0] * len(rendered)  # the learner itself, unsteered
        else:
            with student.live_off():  # behaviour policy: baked student + steering, no live LoRA
                ro, doses = _steered(engine, rendered, state, samp, alphas if steered else (),
                                     int(getattr(trainer, "num_generations", 1) or 1), steered)
        if system is not None:
            ro = [replace(r, prompt_ids=encode_prompt(engine.tok, render_prompt(engine.tok, u)))
                  for u, r in zip(users, ro)]
        engine.sleep()  # one rollout per optimizer step (steps_per_generation = grad accumulation): sleep once
        if timers is not None:
            timers["rollout"] = timers.get("rollout", 0.0) + time.perf_counter() - t0
        state.gen_tokens += int(global_sums([sum(len(r.completion_ids) for r in ro)], trainer.accelerator.device)[0])
        rollout_func.last = (users, [list(r.completion_ids) for r in ro])  # the trainer's filter flags read it
        rollout_func.doses = doses
        if log is not None:
            log("rollout_doses", step=int(trainer.state.global_step), doses=[round(d, 6) for d in doses])
        return {"prompt_ids": [r.prompt_ids for r in ro], "completion_ids": [r.completion_ids for r in ro],
                "logprobs": [r.logprobs for r in ro], "user": users, "dose": doses}

    rollout_func.last = None
    rollout_func.doses = []
    return rollout_func


def rollout_multipliers(n: int, group: int, alphas) -> list[float]:
    """The steering multiplier of each of n rollouts (groups of `group` consecutive copies of a prompt)."""
    return [float(alphas[(i % group) % len(alphas)]) for i in range(n)] if alphas else [1.0] * n


def _steered(engine, rendered, state: SteerState, samp: Sampling, alphas, group: int, steered: bool):
    """(rollouts, doses): one engine call per distinct strength, rollouts back in their order."""
    if not steered:
        return engine.generate(rendered, None, samp, logprobs=True), [0.0] * len(rendered)
    mult = rollout_multipliers(len(rendered), group, alphas)
    ro = [None] * len(rendered)
    for k, a in enumerate(sorted(set(mult))):
        idx = [i for i, m in enumerate(mult) if m == a]
        steering = Steering(state.vector, a * state.kappa) if a else None  # 0: the student's own reply
        sub = engine.generate([rendered[i] for i in idx], steering, replace(samp, seed=samp.seed + 104729 * k),
                              logprobs=True)
        for i, r in zip(idx, sub):
            ro[i] = r
    return ro, [m * state.kappa for m in mult]


def global_sums(xs: list[float], device) -> list[float]:
    """Per-rank numbers summed over all ranks in one all-reduce (every rank must call it); the
    tensor lives on the accelerator's device, as NCCL requires."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [float(x) for x in xs]
    t = torch.tensor([float(x) for x in xs], device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()
