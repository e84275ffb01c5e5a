from steer_heal.steering.core import (
                                      LayerBandError,
                                      Steering,
                                      SteeringVector,
                                      add_steering,
                                      cosine_flat,
                                      layer_band,
                                      mean_diff,
)
from steer_heal.steering.extract import PersonaError, activation_shift, check_personas, extract_vector
from steer_heal.steering.hooks import steer

__all__ = ["LayerBandError", "Steering", "SteeringVector", "add_steering", "cosine_flat", "layer_band",
           "mean_diff", "PersonaError", "activation_shift", "check_personas", "extract_vector", "steer"]
