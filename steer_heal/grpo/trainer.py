"""GRPOTrainer subclass (trl==1.16.0): TRL's policy loss plus the RMSE reverse-KL barrier.

Only `_compute_loss` is overridden. TRL's own KL term (mean of k3 estimates, `args.beta`) must be
0; the penalty here is beta * relu(D - tau) with D the exact per-position KL to the reference,
aggregated per sequence (rmse by default), computed by the same functions as the iterative heal.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from trl import GRPOTrainer

from steer_heal.grpo.penalty import rmse_kl_penalty
from steer_heal.heal.kl import aggregate

log = logging.getLogger("steer_heal.grpo")


@dataclass
class KLPenalty:
    beta: float = 0.3
    tau: float = 0.5
    agg: str = "rmse"  # mean | rmse | p95 | max (ablations)
    reference: str = "prev"  # prev: the last bake; base: the original weights
    direction: str = "reverse"
    chunk: int = 0


class SteerHealGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, student, kl: KLPenalty | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.beta != 0.0:
            raise ValueError("GRPOConfig.beta must be 0: steer-heal replaces TRL's mean-k3 KL with its RMSE barrier; "
                             "fix: set the penalty with kl.beta instead")
        self.student = student
        self.kl = kl or KLPenalty()
        self.timers: dict[str, float] = {}  # rollout / scoring / ref_forward seconds, logged per step as deltas
        self._timers_seen: dict[str, float] = {}
        # the engine serves the steered teacher and the learner is unsteered: they are meant to differ
        self.vllm_importance_sampling_correction = False
        log.warning("importance-sampling correction between the rollout engine and the trainer is OFF by design: "
                    "rollouts come from the steered baked student, the learner is the unsteered student + live LoRA")

    def _compute_loss(self, model, inputs):
        loss = super()._compute_loss(model, inputs)
        if self.kl.beta == 0.0:
            return loss
        k = self.kl
        inner = self.accelerator.unwrap_model(model)  # DDP wrapper -> the PeftModel (same parameters)
        pen, D, kl = rmse_kl_penalty(inner, lambda: self.student.reference(k.reference), inputs["prompt_ids"],
                                     inputs["prompt_mask"], inputs["completion_ids"], inputs["completion_mask"],
                                     k.beta, k.tau, k.agg, k.direction == "reverse", k.chunk, self.timers)
        mode = "train" if self.model.training else "eval"
        with torch.no_grad():
            b, _ = inputs["completion_mask"].bool().nonzero(as_tuple=True)
            n = inputs["completion_ids"].shape[0]
            m = self._metrics[mode]
            m["kl_rmse"].append(float(aggregate(kl.detach(), b, n, "rmse").mean()))
            m["kl_mean"].append(float(aggregate(kl.detach(), b, n, "mean").mean()))
            m["barrier_active_frac"].append(float((D.detach() > k.tau).float().mean()))
            m["kl_penalty"].append(float(pen.detach()))
            if getattr(self, "scorer", None) is not None:
                self.timers["scoring"] = self.scorer.seconds
            for name, total in self.timers.items():
                m[f"time/{name}"].append(total - self._timers_seen.get(name, 0.0))
                self._timers_seen[name] = total
            if getattr(self, "steer_state", None) is not None:
                m["kappa"].append(float(self.steer_state.kappa))
                m["bake_round"].append(float(self.steer_state.bake_round))
        normalizer = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        total = loss + pen / normalizer
        if not torch.isfinite(total):
            from steer_heal.heal.train import HealDivergedError

            raise HealDivergedError(f"GRPO loss is {float(total.detach())} at step {self.state.global_step}; fix: lower "
                                    "learning_rate or kl_beta and resume from the last checkpoint")
        return total
