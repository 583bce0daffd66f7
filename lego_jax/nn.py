"""Pieces shared by every attribute classifier: heads, masked cross-entropy, labels.

The attackers (lego_jax.evaluation.attackers), the in-training adversarial
baseline (lego_jax.unlearning.adversarial) and calibration's adversarial
surrogate (lego_jax.unlearning.calibration) all fit a small head on user
embeddings to predict an attribute; they differ only in initialisation and
precision, which the arguments below select.

A head is a dict: {"w", "b"} (linear) or {"w1", "b1", "w2", "b2"} (one ReLU
hidden layer). Labels are int codes with -1 = missing.
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lego_jax.errors import LegoError


def init_head(key, dim: int, classes: int, hidden: int = 0, *, gain: float = 2.0,
              key_per_class: bool = False) -> dict:
  """A linear head (hidden 0, LeCun-normal) or an MLP head.

  The MLP's first layer is normal with variance gain / dim (2: He, for the
  ReLU; 1: LeCun), its second LeCun-normal. `key_per_class` draws each output
  column from its own key, so a class's initial weights do not depend on how
  far the class axis was padded.
  """
  if hidden <= 0:
    return {"w": jax.random.normal(key, (dim, classes)) * jnp.sqrt(1.0 / dim),
            "b": jnp.zeros(classes)}
  k1, k2 = jax.random.split(key)
  if key_per_class:
    cols = jax.vmap(lambda c: jax.random.fold_in(k2, c))(jnp.arange(classes))
    w2 = jax.vmap(lambda k: jax.random.normal(k, (hidden,)))(cols).T
  else:
    w2 = jax.random.normal(k2, (hidden, classes))
  return {"w1": jax.random.normal(k1, (dim, hidden)) * jnp.sqrt(gain / dim),
          "b1": jnp.zeros(hidden), "w2": w2 * jnp.sqrt(1.0 / hidden), "b2": jnp.zeros(classes)}


def head_logits(head: dict, x, precision=None):
  """Logits (..., classes) of a head on embeddings x (..., dim)."""
  dot = lambda a, b: jnp.matmul(a, b, precision=precision)
  if "w" in head:
    return dot(x, head["w"]) + head["b"]
  return dot(jax.nn.relu(dot(x, head["w1"]) + head["b1"]), head["w2"]) + head["b2"]


def weight_decay(head: dict):
  """Sum of squares of a head's weights (biases not penalised)."""
  return sum(jnp.sum(v ** 2) for k, v in head.items() if k.startswith("w"))


def nll(logits, y):
  """Per-row negative log-likelihood of labels y; rows with y < 0 read class 0 (mask them)."""
  logp = jax.nn.log_softmax(logits, axis=-1)
  return -jnp.take_along_axis(logp, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]


def weighted_mean(values, weights):
  """sum(weights * values) / sum(weights), 0 where the weights sum to less than 1."""
  return jnp.sum(weights * values) / jnp.maximum(jnp.sum(weights), 1.0)


def cross_entropy(logits, y, weights=None):
  """Mean cross-entropy over the rows with a label (y >= 0), or weighted by `weights`."""
  if weights is None:
    weights = (y >= 0).astype(logits.dtype)
  return weighted_mean(nll(logits, y), weights)


def check_labels(labels, num_classes: Sequence[int], *, who: str, n_users: Optional[int] = None,
                 names: Optional[Sequence[str]] = None,
                 min_classes: int = 1) -> tuple[np.ndarray, list[int]]:
  """(K, n) int64 labels and K class counts, or a LegoError starting with `who`.

  `labels` is (K, n) or one attribute's (n,); each row must lie in -1..C-1 for
  its class count C, which must be at least `min_classes`. `names` (K distinct)
  name the attributes in messages (default "attribute k").
  """
  y = np.asarray(labels)
  if y.ndim == 1:
    y = y[None]
  if y.ndim != 2 or (n_users is not None and y.shape[1] != n_users):
    raise LegoError(f"{who}: labels must be (attributes, {n_users or 'n'} users), "
                    f"got shape {y.shape}")
  num_classes = [int(c) for c in num_classes]
  if len(num_classes) != y.shape[0] or not num_classes:
    raise LegoError(f"{who}: {y.shape[0]} label rows but {len(num_classes)} class counts")
  if names is None:
    names = [f"attribute {k}" for k in range(y.shape[0])]
  names = list(names)
  if len(names) != y.shape[0] or len(set(names)) != len(names):
    raise LegoError(f"{who}: need {y.shape[0]} distinct attribute names, got {names}")
  for row, name, c in zip(y, names, num_classes):
    if c < min_classes:
      raise LegoError(f"{who}: {name} needs at least {min_classes} classes, got {c}")
    if row.min(initial=0) < -1 or row.max(initial=-1) >= c:
      raise LegoError(f"{who}: labels of {name} must lie in -1..{c - 1}")
  return y.astype(np.int64), num_classes
