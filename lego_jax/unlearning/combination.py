"""Flexible Combination: merge the active bricks into one table.

  E* = E0 + sum_{k active} W_k * D_k

Only the weights W are learned (per attribute and dimension, `dim`; one per
attribute, `scalar`; or a convex combination of the calibrated tables,
`convex`), minimising the active attributes' MI surrogates plus the ranking
regulariser. The active set is a mask, not a shape, so one compiled function
serves every request set over the same stored bricks. With a vCLUB
calibration the MI terms are vCLUB bounds under classifiers trained on the
combined table, alternating with the weights.
"""

import dataclasses
import functools
from typing import Callable, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from lego_jax.errors import LegoError, unknown
from lego_jax.unlearning import calibration, losses

MODES = ("dim", "scalar", "convex")
INITS = ("uniform", "ones")


@dataclasses.dataclass(frozen=True)
class Spec:
  num_classes: int
  mode: str = "dim"
  steps: int = 100
  batch_users: int = 1024
  margin: float = 0.05
  guard: int = 0
  init: str = "uniform"
  rank: bool = True           # the ranking hinge is computed (False: lam_rank is 0)
  # The calibration's Spec, whose MI estimator (loss, kernels, stopping rule)
  # the combination uses too; None = the defaults.
  mi: Optional[calibration.Spec] = None

  def __post_init__(self):
    if self.mode not in MODES:
      raise unknown("combination mode", self.mode, MODES)
    if self.init not in INITS:
      raise unknown("combination init", self.init, INITS)
    if self.steps < 0:
      raise LegoError(f"combine.steps must be >= 0, got {self.steps}")
    if self.mi is None:
      object.__setattr__(self, "mi", calibration.Spec(num_classes=self.num_classes))

  @classmethod
  def from_config(cls, cfg: dict, unlearn_cfg: dict, num_classes: int, parts=()) -> "Spec":
    # An adversarial calibration is combined with the MMD estimator; a vCLUB one
    # with vCLUB, under classifiers of the combination's own (see `fit`).
    loss = unlearn_cfg["loss"] if unlearn_cfg["loss"] in (*losses.MI_LOSSES, "vclub") else "mmd"
    # The combination's own stopping rule and class-mean scope: it learns a few
    # weights, not free rows, so it can use estimates a brick would overfit.
    own = {f: cfg[f] for f in ("stop", "linear_scope") if f in cfg}
    mi = calibration.Spec.from_config({**unlearn_cfg, "loss": loss, **own}, num_classes,
                                      parts=parts)
    return cls(num_classes=num_classes, mode=cfg["mode"], steps=cfg["steps"],
               batch_users=unlearn_cfg["batch_users"], margin=unlearn_cfg["margin"],
               guard=unlearn_cfg["guard"],
               init=cfg["init"], rank=float(cfg["lam_rank"]) > 0, mi=mi)


class HParams(NamedTuple):
  w_mi: float
  lam_rank: float
  lr: float

  @classmethod
  def from_config(cls, cfg: dict) -> "HParams":
    return cls(float(cfg["w_mi"]), float(cfg["lam_rank"]), float(cfg["lr"]))


def init_weights(active, dim: int, spec: Spec) -> jax.Array:
  """Starting weights (K, dim) or (K, 1): 1/|R| or 1 on active bricks."""
  k = active.shape[0]
  width = dim if spec.mode == "dim" else 1
  if spec.mode == "convex":
    return jnp.zeros((k, 1))   # softmax logits: equal weights
  value = 1.0 / jnp.maximum(active.sum(), 1.0) if spec.init == "uniform" else 1.0
  return jnp.full((k, width), 1.0) * value


def coefficients(w, active, mode: str) -> jax.Array:
  """The per-brick multipliers (K, width) with inactive bricks zeroed."""
  active = active.astype(w.dtype)
  if mode == "convex":
    logits = jnp.where(active[:, None] > 0, w, -jnp.inf)
    return jnp.where(active[:, None] > 0, jax.nn.softmax(logits, axis=0), 0.0)
  return w * active[:, None]


def combine(w, e0, bricks, active, mode: str, gains=None) -> jax.Array:
  """E* = E0 + sum_k gain_k coef_k * D_k; bricks (K, n, D), gains (K,) (default 1)."""
  coef = coefficients(w, active, mode)
  if gains is not None:
    coef = coef * gains[:, None]
  coef = jnp.broadcast_to(coef, (coef.shape[0], bricks.shape[-1]))
  return e0 + jnp.einsum("kd,knd->nd", coef, bricks, precision=jax.lax.Precision.HIGHEST)


@functools.partial(jax.jit, static_argnames=("spec", "score_fn"))
def fit(target, bricks, labels, active, key, hp: HParams, *, spec: Spec,
        score_fn: Callable) -> tuple[jax.Array, jax.Array, dict]:
  """Learns the weights for the active bricks; returns (weights, E*, trace).

  `target` is the calibration's `Target` (original table, top-T lists, scale).
  """
  e0, topk, scale = target
  chex.assert_rank([e0, bricks, labels], [2, 3, 2])
  n = e0.shape[0]
  batch = n if spec.batch_users <= 0 else min(spec.batch_users, n)
  tx = optax.adam(hp.lr)
  w = init_weights(active, e0.shape[1], spec)
  vclub = spec.mi.loss == "vclub"
  k_heads = jax.random.fold_in(key, 1)   # the weights' keys stay as without vCLUB
  # vCLUB needs a classifier per attribute on the combined table itself: the
  # bricks' classifiers read each brick alone, and the combination is another
  # table. They are trained from scratch, alternating with the weights.
  heads = (calibration.init_classifiers(k_heads, e0.shape[1], spec.num_classes,
                                        spec.mi.vclub_hidden, labels.shape[0]) if vclub else ())
  htx = optax.adam(spec.mi.vclub_lr)
  u = calibration.units(e0, spec.mi)

  def objective(w, users, k_mi, heads):
    table = combine(w, e0, bricks, active, spec.mode)
    if vclub:
      mi = calibration.vclub_bounds(heads, calibration.classifier_input(table[users], e0),
                                    labels[:, users])
      null, gap = jnp.zeros_like(mi), mi
    else:
      mi, null, gap = spec.mi.mi(k_mi, table, users, labels, u, e0)
    rank = (losses.rank_hinge(score_fn(table, users, topk[users]) / scale, spec.margin, spec.guard)
            if spec.rank else jnp.zeros((), table.dtype))
    total = hp.w_mi * jnp.sum(gap * active) + hp.lam_rank * rank
    return total, {"mi": mi, "null": null, "rank": rank}

  def step(carry, key):
    w, opt, heads, hopt = carry
    k_batch, k_mi = jax.random.split(key)
    users = jax.random.permutation(k_batch, n)[:batch]
    if vclub:
      z = calibration.classifier_input(combine(w, e0, bricks, active, spec.mode)[users], e0)
      heads, hopt = calibration.classifier_step(heads, hopt, z, labels[:, users], spec.mi.vclub_lr)
    g, trace = jax.grad(objective, has_aux=True)(w, users, k_mi, heads)
    upd, opt = tx.update(g, opt, w)
    return (optax.apply_updates(w, upd), opt, heads, hopt), trace

  carry = (w, tx.init(w), heads, htx.init(heads))
  (w, *_), trace = jax.lax.scan(step, carry, jax.random.split(key, spec.steps))
  return w, combine(w, e0, bricks, active, spec.mode), trace


@functools.partial(jax.jit, static_argnames=("spec", "score_fn"))
def fit_grid(target, bricks, labels, active, keys, hps: HParams, *, spec: Spec,
             score_fn: Callable) -> tuple[jax.Array, jax.Array, dict]:
  """`fit` for G grid points in one program: bricks (G, K, n, D), keys (G, 2)
  and each `hps` leaf (G,); the target, labels and active set are shared.
  Returns weights (G, K, width), tables (G, n, D) and traces stacked alike."""
  chex.assert_rank(bricks, 4)
  chex.assert_equal_shape_prefix([bricks, keys], 1)
  one = lambda b, k, hp: fit(target, b, labels, active, k, hp, spec=spec, score_fn=score_fn)
  return jax.vmap(one)(bricks, keys, hps)
