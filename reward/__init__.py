"""Scoring shared by the iterative filter and the online reward."""
from reward.components import COMPONENTS, RewardConfig, Scorer
from reward.scores import persona_llr, refusal, repetition, tail_nll, verbalisation
from reward.trl_rewards import make_reward_functions

__all__ = ["COMPONENTS", "RewardConfig", "Scorer", "make_reward_functions", "persona_llr", "refusal", "repetition",
           "tail_nll", "verbalisation"]
