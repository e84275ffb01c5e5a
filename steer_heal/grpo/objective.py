"""What the online loss is, as the run config declares it: the objective and its policy-term settings, the
barrier, and the one-line refusals of GRPO settings that would silently change their meaning. Plain data; the
trainer (trainer.py) computes it."""
from __future__ import annotations

from dataclasses import dataclass, replace

from steer_heal.grpo.advantage import IS_CORRECTIONS, REWARD_NORMS

OBJECTIVES = ("grpo", "nll", "grpo+nll", "kd", "opd")
OPD_ESTIMATORS = ("token", "full")


class OnlineConfigError(ValueError):
    """A GRPO setting the online objectives cannot honour; the message names the fix."""


@dataclass
class KLPenalty:
    """The barrier, as the run config's heal section declares it (KLPenalty.from_config): no defaults here."""
    beta: float
    tau: float
    agg: str  # mean | rmse | p95 | max (ablations)
    reference: str  # prev: the last bake; base: the original weights
    direction: str
    chunk: int

    @classmethod
    def from_config(cls, heal, **changes) -> "KLPenalty":
        return replace(cls(heal.kl_beta, heal.kl_tau, heal.kl_agg, heal.kl_reference, heal.kl_direction,
                           heal.kl_chunk_tokens), **changes)


@dataclass
class Objective:
    """The loss, as the run config's online section declares it (Objective.from_config): no defaults here."""
    name: str  # grpo | nll | grpo+nll | kd | opd: the key of SteerHealGRPOTrainer.LOSSES
    w_pg: float  # grpo+nll: weight of TRL's policy loss
    w_nll: float  # grpo+nll: weight of the filtered NLL
    fused: bool  # one student forward per micro-batch; False: TRL's own forward + a second one (bench)
    opd_estimator: str  # opd: token (sampled-token advantages) | full (full-vocabulary reverse KL)
    reward_norm: str  # sum | per_term (grpo/advantage.py)
    is_correction: str  # none | truncated | shaped: the policy term on steered rollouts
    is_cap: float
    is_gamma: float

    @classmethod
    def from_config(cls, online, **changes) -> "Objective":
        return replace(cls(online.objective, online.w_pg, online.w_nll, online.fused, online.opd_estimator,
                           online.reward_norm, online.is_correction, online.is_cap, online.is_gamma), **changes)

    @property
    def corrected(self) -> bool:
        """Whether the policy term is ours, weighted by the ratio to the behaviour policy."""
        return self.is_correction != "none" and self.name in ("grpo", "grpo+nll")

    @property
    def pg(self) -> bool:
        """Whether the loss reads TRL's policy loss."""
        return self.name in ("grpo", "grpo+nll") or (self.name == "opd" and self.opd_estimator == "token")

    @property
    def teacher(self) -> bool:
        """Whether a no-grad forward of the steered baked student runs (kd, opd)."""
        return self.name in ("kd", "opd")


def check_online_args(args, objective: str, opd_estimator: str = "token", reward_norm: str = "sum",
                      is_correction: str = "none") -> None:
    """One-line refusals for settings that would silently change what the objectives mean."""
    if objective not in OBJECTIVES:
        raise OnlineConfigError(f"unknown objective '{objective}'; fix: use one of {', '.join(OBJECTIVES)}")
    if opd_estimator not in OPD_ESTIMATORS:
        raise OnlineConfigError(f"unknown opd_estimator '{opd_estimator}'; fix: use one of {', '.join(OPD_ESTIMATORS)}")
    if reward_norm not in REWARD_NORMS:
        raise OnlineConfigError(f"unknown reward_norm '{reward_norm}'; fix: use one of {', '.join(REWARD_NORMS)}")
    if reward_norm == "per_term" and getattr(args, "scale_rewards", "group") == "batch":
        raise OnlineConfigError("reward_norm per_term standardises within groups; scale_rewards=batch would rescale "
                                "over the batch; fix: scale_rewards: group (or none)")
    if is_correction not in IS_CORRECTIONS:
        raise OnlineConfigError(f"unknown is_correction '{is_correction}'; fix: use one of {', '.join(IS_CORRECTIONS)}")
    if is_correction != "none" and objective not in ("grpo", "grpo+nll"):
        raise OnlineConfigError(f"is_correction {is_correction} weights the policy term on steered rollouts, which "
                                f"objective {objective} does not have; fix: is_correction: none, or objective grpo / "
                                "grpo+nll")
    if is_correction != "none" and getattr(args, "loss_type", "grpo") != "grpo":
        raise OnlineConfigError(f"is_correction {is_correction} aggregates like loss_type grpo (token mean per "
                                f"sequence), not {args.loss_type}; fix: loss_type: grpo")
    if args.num_iterations != 1:
        raise OnlineConfigError(f"num_iterations={args.num_iterations}: the rollouts come from the steered baked "
                                "student, so old log-probs would be the learner's, not the behaviour policy's; "
                                "fix: set num_iterations: 1")
    if args.steps_per_generation != args.gradient_accumulation_steps:
        raise OnlineConfigError(f"steps_per_generation={args.steps_per_generation} differs from "
                                f"gradient_accumulation_steps={args.gradient_accumulation_steps}: rollouts would be "
                                "reused across optimizer steps and bakes; fix: leave steps_per_generation unset")
    if args.off_policy_mask_threshold is not None:
        raise OnlineConfigError("off_policy_mask_threshold would compare the steered behaviour log-probs with the "
                                "unsteered learner's and drop rollouts for the steering itself; fix: remove "
                                "off_policy_mask_threshold")
