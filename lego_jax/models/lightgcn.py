"""LightGCN: BPR on embeddings propagated over the normalised user-item graph.

The graph is stored as edge lists (both directions, sorted by destination)
with weights 1/sqrt(deg_u deg_i); propagation is a gather plus
`jax.ops.segment_sum`, so no dense n x m matrix is built. The user table the
unlearning stages edit is the layer-0 (ego) table; scores always propagate.
"""

import jax
import jax.numpy as jnp
import numpy as np

from lego_jax.models.base import Model
from lego_jax.models.mf import bpr_loss, l2_batch, xavier_normal


def normalized_edges(train_pairs, n_users, n_items):
  """(dst, src, weight) of the symmetric-normalised bipartite graph; items are offset by n_users."""
  pairs = np.unique(np.asarray(train_pairs, np.int64).reshape(-1, 2), axis=0)
  u, i = pairs[:, 0], pairs[:, 1] + n_users
  deg = np.bincount(np.concatenate([u, i]), minlength=n_users + n_items).astype(np.float64)
  w = 1.0 / np.sqrt(deg[u] * deg[i])
  dst = np.concatenate([u, i])
  src = np.concatenate([i, u])
  w = np.concatenate([w, w])
  order = np.argsort(dst, kind="stable")
  return dst[order].astype(np.int32), src[order].astype(np.int32), w[order].astype(np.float32)


@jax.custom_vjp
def _spmm(x, dst, src, w):
  """A_hat @ x for the edge lists of `normalized_edges`."""
  return jax.ops.segment_sum(w[:, None] * x[src], dst, num_segments=x.shape[0],
                             indices_are_sorted=True)


def _spmm_fwd(x, dst, src, w):
  return _spmm(x, dst, src, w), (dst, src, w)


def _spmm_bwd(res, g):
  # A_hat is symmetric, so the cotangent is A_hat @ g: the same sorted
  # segment sum instead of an unsorted scatter-add (~20% faster on CPU).
  # The graph is frozen: no gradient for its arrays.
  dst, src, w = res
  return _spmm(g, dst, src, w), None, None, None


_spmm.defvjp(_spmm_fwd, _spmm_bwd)


def propagate(ego, aux, n_layers):
  """Mean of layers 0..n_layers of A_hat^l @ ego; ego (N, D)."""
  x, total = ego, ego
  for _ in range(n_layers):
    x = _spmm(x, aux["dst"], aux["src"], aux["w"])
    total = total + x
  return total / (n_layers + 1)


def make(model_cfg: dict, train_cfg: dict) -> Model:
  dim = int(model_cfg.get("dim", 64))
  n_layers = int(model_cfg.get("n_layers", 2))
  l2 = float(train_cfg.get("l2", 0.0))

  def init(key, n_users, n_items):
    ku, ki = jax.random.split(key)
    return {"user": xavier_normal(ku, (n_users, dim)), "item": xavier_normal(ki, (n_items, dim))}

  def build_aux(train_pairs, n_users, n_items):
    dst, src, w = normalized_edges(train_pairs, n_users, n_items)
    return {"dst": jnp.asarray(dst), "src": jnp.asarray(src), "w": jnp.asarray(w)}

  def final(params, aux):
    n_users = params["user"].shape[0]
    out = propagate(jnp.concatenate([params["user"], params["item"]], 0), aux, n_layers)
    return out[:n_users], out[n_users:]

  def loss(params, aux, users, pos, neg):
    fu, fi = final(params, aux)
    u, ip, ineg = fu[users], fi[pos], fi[neg]
    sp = jnp.sum(u * ip, -1)
    sn = jnp.einsum("bd,bnd->bn", u, ineg)
    reg = l2_batch(params["user"][users], params["item"][pos], params["item"][neg])
    return bpr_loss(sp, sn) + l2 * reg

  def score(params, aux, users, items=None):
    fu, fi = final(params, aux)
    u = fu[users]
    if items is None:
      return u @ fi.T
    return jnp.einsum("bd,btd->bt", u, fi[items])

  def user_table(params):
    return params["user"]

  def with_user_table(params, table):
    return {**params, "user": table}

  return Model("lightgcn", init, build_aux, loss, score, user_table, with_user_table)
