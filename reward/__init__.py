"""Scoring shared by the iterative filter and the online reward."""
from reward.scores import (FilterConfig, Scores, keep_mask, persona_llr, refusal, repetition, score_rollouts,
                           tail_nll, verbalisation)

__all__ = ["FilterConfig", "Scores", "keep_mask", "persona_llr", "refusal", "repetition", "score_rollouts",
           "tail_nll", "verbalisation"]
