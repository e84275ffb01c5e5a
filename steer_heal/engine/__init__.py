from steer_heal.engine.base import Rollout, RolloutEngine, Sampling
from steer_heal.engine.hf import HFEngine

__all__ = ["Rollout", "RolloutEngine", "Sampling", "HFEngine"]
