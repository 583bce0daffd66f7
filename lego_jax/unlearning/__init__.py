"""Unlearning algorithms (the pure core): LEGO's calibration, combination and
closed-loop control, their losses, and the baselines' algorithms. The
stateful side (a workdir's bricks and requests) is `lego_jax.requests`."""

from lego_jax.unlearning import calibration, calibrators, combination, control, losses

__all__ = ["calibration", "calibrators", "combination", "control", "losses"]
