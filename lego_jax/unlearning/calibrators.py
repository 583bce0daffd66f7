"""Calibrators: how a calibrated user table is parameterised.

Each is a NamedTuple of pure functions (optax style):
  init(key, e0) -> params
  table(params, e0) -> (n_users, D) calibrated table

`table` is a free per-user offset (E = E0 + delta). `residual` is one small
shared map e -> e + g(e): it cannot write a user's own label into that user's
row, which is what makes a free table overshoot below chance (docs/findings.md),
and it applies unchanged to users who arrive after calibration.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from lego_jax.errors import unknown


class Calibrator(NamedTuple):
  init: Callable[[jax.Array, jax.Array], Any]
  table: Callable[[Any, jax.Array], jax.Array]


def table() -> Calibrator:
  return Calibrator(
      init=lambda key, e0: jnp.zeros_like(e0),
      table=lambda delta, e0: e0 + delta)


def residual(hidden: int = 128) -> Calibrator:
  """e -> e + W2 relu(W1 z + b1) + b2 with z the standardised input; W2 starts at 0."""

  def init(key, e0):
    d = e0.shape[-1]
    return {
        "w1": jax.random.normal(key, (d, hidden), e0.dtype) / jnp.sqrt(d),
        "b1": jnp.zeros((hidden,), e0.dtype),
        "w2": jnp.zeros((hidden, d), e0.dtype),
        "b2": jnp.zeros((d,), e0.dtype),
        # Input statistics are frozen at calibration time so the map is a
        # fixed function of e, usable for users added later.
        "mu": jnp.mean(e0, axis=0),
        "sd": jnp.std(e0, axis=0) + 1e-6,
    }

  def apply(p, e0):
    z = (e0 - jax.lax.stop_gradient(p["mu"])) / jax.lax.stop_gradient(p["sd"])
    return e0 + jax.nn.relu(z @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

  return Calibrator(init=init, table=apply)


CALIBRATORS = {"table": table, "residual": residual}


def get(name: str) -> Calibrator:
  if name not in CALIBRATORS:
    raise unknown("calibrator", name, CALIBRATORS)
  return CALIBRATORS[name]()
