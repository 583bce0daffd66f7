"""Matrix factorisation trained with the BPR loss."""

import jax
import jax.numpy as jnp

from lego_jax import config
from lego_jax.models.base import Model


def xavier_normal(key, shape):
  # RecBole's BPR initialisation, so results compare like for like.
  std = (2.0 / (shape[0] + shape[1])) ** 0.5
  return std * jax.random.normal(key, shape, jnp.float32)


def bpr_loss(pos, neg):
  """-log sigmoid(pos - neg), mean over the batch and negatives; pos (B,), neg (B, N)."""
  return -jnp.mean(jax.nn.log_sigmoid(pos[:, None] - neg))


def l2_batch(*arrays):
  """Sum of squares of the batch embeddings, per example (mean over the batch)."""
  return sum(jnp.sum(a ** 2) for a in arrays) / arrays[0].shape[0]


def init_tables(dim: int):
  """`(key, n_users, n_items) -> {"user", "item"}`: Xavier-normal embedding tables."""
  def init(key, n_users, n_items):
    ku, ki = jax.random.split(key)
    return {"user": xavier_normal(ku, (n_users, dim)), "item": xavier_normal(ki, (n_items, dim))}
  return init


def user_table(params):
  return params["user"]


def with_user_table(params, table):
  return {**params, "user": table}


def make(model_cfg, train_cfg) -> Model:
  """MF-BPR from the config's `model` and `train` sections (missing fields: the defaults)."""
  dim = config.view("model", model_cfg).dim
  l2 = config.view("train", train_cfg).l2

  def build_aux(train_pairs, n_users, n_items):
    return None

  def loss(params, aux, users, pos, neg):
    u = params["user"][users]
    ip = params["item"][pos]
    ineg = params["item"][neg]
    sp = jnp.sum(u * ip, -1)
    sn = jnp.einsum("bd,bnd->bn", u, ineg)
    return bpr_loss(sp, sn) + l2 * l2_batch(u, ip, ineg)

  def score(params, aux, users, items=None):
    u = params["user"][users]
    if items is None:
      return u @ params["item"].T
    return jnp.einsum("bd,btd->bt", u, params["item"][items])

  return Model("mf", init_tables(dim), build_aux, loss, score, user_table, with_user_table)
