"""Unlearning: LEGO (calibration, combination, requests) and the baselines."""

from lego_jax.unlearning import calibration, calibrators, combination, losses
from lego_jax.unlearning.requests import Unlearner

__all__ = ["Unlearner", "calibration", "calibrators", "combination", "losses"]
