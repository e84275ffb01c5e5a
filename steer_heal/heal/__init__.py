from steer_heal.heal.kl import AGGS, aggregate, barrier, chunked_kl_and_logp, kl_from_logits
from steer_heal.heal.train import HealDivergedError, HealResult, heal_round, heal_terms, round_lam

__all__ = ["AGGS", "aggregate", "barrier", "chunked_kl_and_logp", "kl_from_logits", "HealDivergedError",
           "HealResult", "heal_round", "heal_terms", "round_lam"]
