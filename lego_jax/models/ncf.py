"""NeuMF: a GMF tower and an MLP tower over separate embeddings, trained with BCE.

The user embedding the unlearning stages edit is both towers' user tables,
concatenated (GMF first), so neither tower keeps leaking the attribute.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lego_jax import config
from lego_jax.models.base import Model
from lego_jax.models.mf import l2_batch, xavier_normal


class Tower(nn.Module):
  """The MLP tower over concat(user, item) embeddings."""
  layers: Sequence[int]

  @nn.compact
  def __call__(self, x):
    for width in self.layers:
      x = nn.relu(nn.Dense(width)(x))
    return x


def make(model_cfg, train_cfg) -> Model:
  """NeuMF from the config's `model` and `train` sections (missing fields: the defaults)."""
  model = config.view("model", model_cfg)
  dim, layers, l2 = model.dim, model.mlp_layers, config.view("train", train_cfg).l2
  tower = Tower(layers)
  # Full-ranking scores run the MLP on every (user, item) pair; map over users
  # in chunks so memory stays at chunk * n_items * width.
  chunk = 64

  def init(key, n_users, n_items):
    k = jax.random.split(key, 6)
    mlp = tower.init(k[4], jnp.zeros((1, 2 * dim))).get("params", {})
    out_in = dim + (layers[-1] if layers else 2 * dim)
    return {
        "gmf_user": xavier_normal(k[0], (n_users, dim)),
        "gmf_item": xavier_normal(k[1], (n_items, dim)),
        "mlp_user": xavier_normal(k[2], (n_users, dim)),
        "mlp_item": xavier_normal(k[3], (n_items, dim)),
        "mlp": mlp,
        "out": {"kernel": xavier_normal(k[5], (out_in, 1)), "bias": jnp.zeros((1,))},
    }

  def build_aux(train_pairs, n_users, n_items):
    return None

  def logits(params, gu, mu, gi, mi):
    """Logits for matching leading shapes of user (.., D) and item (.., D) embeddings."""
    gmf = gu * gi
    mlp = tower.apply({"params": params["mlp"]}, jnp.concatenate([mu, mi], -1))
    h = jnp.concatenate([gmf, mlp], -1)
    return (h @ params["out"]["kernel"])[..., 0] + params["out"]["bias"][0]

  def pair_logits(params, users, items):
    """users (B,), items (B, T) -> (B, T)."""
    gu = params["gmf_user"][users][:, None, :]
    mu = params["mlp_user"][users][:, None, :]
    gi, mi = params["gmf_item"][items], params["mlp_item"][items]
    t = items.shape[1]
    return logits(params, jnp.repeat(gu, t, 1), jnp.repeat(mu, t, 1), gi, mi)

  def loss(params, aux, users, pos, neg):
    lp = pair_logits(params, users, pos[:, None])[:, 0]
    ln = pair_logits(params, users, neg)
    bce = -(jnp.mean(jax.nn.log_sigmoid(lp)) + jnp.mean(jax.nn.log_sigmoid(-ln)) * neg.shape[1])
    bce = bce / (1 + neg.shape[1])
    reg = l2_batch(params["gmf_user"][users], params["mlp_user"][users],
                   params["gmf_item"][pos], params["mlp_item"][pos],
                   params["gmf_item"][neg], params["mlp_item"][neg])
    return bce + l2 * reg

  def score(params, aux, users, items=None):
    if items is not None:
      return pair_logits(params, users, items)
    if not layers:  # no MLP layers: the generic path
      gi, mi = params["gmf_item"], params["mlp_item"]

      def generic(u):
        g = jnp.broadcast_to(params["gmf_user"][u], gi.shape)
        return logits(params, g, jnp.broadcast_to(params["mlp_user"][u], mi.shape), gi, mi)

      return jax.lax.map(generic, users, batch_size=min(chunk, users.shape[0]))
    # Full ranking runs the tower on every (user, item) pair. The first Dense
    # layer is linear in concat(user, item), so project users and items once
    # and add: this removes most of the work (the first layer is the widest).
    mlp = params["mlp"]
    k0, b0 = mlp["Dense_0"]["kernel"], mlp["Dense_0"]["bias"]
    pu = params["mlp_user"][users] @ k0[:dim]                # (B, W0)
    pi = params["mlp_item"] @ k0[dim:] + b0                  # (m, W0)
    gi = params["gmf_item"]
    w_out = params["out"]["kernel"][:, 0]

    def one(args):
      gu, u0 = args
      x = jax.nn.relu(u0[None, :] + pi)
      for j in range(1, len(layers)):
        x = jax.nn.relu(x @ mlp[f"Dense_{j}"]["kernel"] + mlp[f"Dense_{j}"]["bias"])
      return (gi * gu) @ w_out[:dim] + x @ w_out[dim:] + params["out"]["bias"][0]

    gu = params["gmf_user"][users]
    return jax.lax.map(one, (gu, pu), batch_size=min(chunk, users.shape[0]))

  def user_table(params):
    return jnp.concatenate([params["gmf_user"], params["mlp_user"]], axis=1)

  def with_user_table(params, table):
    return {**params, "gmf_user": table[:, :dim], "mlp_user": table[:, dim:]}

  return Model("ncf", init, build_aux, loss, score, user_table, with_user_table, (dim, dim))
