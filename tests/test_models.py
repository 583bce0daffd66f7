"""Backbones: shapes, scores against naive numpy, user-table round trips."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax import models
from lego_jax.errors import LegoError
from lego_jax.models import lightgcn

N_USERS, N_ITEMS = 12, 17
MODEL_CFG = {"dim": 8, "mlp_layers": [16, 8], "n_layers": 2}
TRAIN_CFG = {"l2": 1e-4}


def tiny_pairs(seed=0, n=60):
  rng = np.random.default_rng(seed)
  flat = rng.choice(N_USERS * N_ITEMS, size=n, replace=False)
  return np.stack([flat // N_ITEMS, flat % N_ITEMS], 1).astype(np.int32)


def built(name):
  model = models.get(name, MODEL_CFG, TRAIN_CFG)
  params = model.init(jax.random.PRNGKey(1), N_USERS, N_ITEMS)
  aux = model.build_aux(tiny_pairs(), N_USERS, N_ITEMS)
  return model, params, aux


def naive_scores(name, params, pairs):
  p = jax.tree.map(np.asarray, params)
  if name == "mf":
    return p["user"] @ p["item"].T
  if name == "ncf":
    gmf = p["gmf_user"][:, None, :] * p["gmf_item"][None, :, :]
    x = np.concatenate([np.repeat(p["mlp_user"][:, None, :], N_ITEMS, 1),
                        np.repeat(p["mlp_item"][None, :, :], N_USERS, 0)], -1)
    for i in range(len(MODEL_CFG["mlp_layers"])):
      layer = p["mlp"][f"Dense_{i}"]
      x = np.maximum(x @ layer["kernel"] + layer["bias"], 0)
    h = np.concatenate([gmf, x], -1)
    return (h @ p["out"]["kernel"])[..., 0] + p["out"]["bias"][0]
  # LightGCN against the dense normalised adjacency D^-1/2 A D^-1/2.
  n = N_USERS + N_ITEMS
  a = np.zeros((n, n))
  a[pairs[:, 0], N_USERS + pairs[:, 1]] = 1
  a = a + a.T
  deg = a.sum(1)
  inv = np.where(deg > 0, 1 / np.sqrt(np.maximum(deg, 1)), 0)
  a_hat = inv[:, None] * a * inv[None, :]
  x = np.concatenate([p["user"], p["item"]]).astype(np.float64)
  total, layer = x.copy(), x
  for _ in range(MODEL_CFG["n_layers"]):
    layer = a_hat @ layer
    total += layer
  final = total / (MODEL_CFG["n_layers"] + 1)
  return final[:N_USERS] @ final[N_USERS:].T


@pytest.mark.parametrize("name", models.NAMES)
def test_score_matches_naive(name):
  model, params, aux = built(name)
  users = jnp.arange(N_USERS, dtype=jnp.int32)
  full = jax.jit(model.score)(params, aux, users)
  chex.assert_shape(full, (N_USERS, N_ITEMS))
  np.testing.assert_allclose(full, naive_scores(name, params, tiny_pairs()), rtol=1e-4, atol=1e-5)
  items = jax.random.randint(jax.random.PRNGKey(2), (N_USERS, 5), 0, N_ITEMS)
  some = model.score(params, aux, users, items)
  chex.assert_shape(some, (N_USERS, 5))
  np.testing.assert_allclose(some, np.take_along_axis(np.asarray(full), np.asarray(items), 1),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", models.NAMES)
def test_user_table_round_trip(name):
  model, params, aux = built(name)
  table = model.user_table(params)
  dim = MODEL_CFG["dim"] * (2 if name == "ncf" else 1)
  chex.assert_shape(table, (N_USERS, dim))
  chex.assert_trees_all_equal(model.with_user_table(params, table), params)
  other = table + 1.0
  np.testing.assert_array_equal(model.user_table(model.with_user_table(params, other)), other)
  # The parts the MI estimate measures in their own units tile the table.
  assert model.user_parts == ((MODEL_CFG["dim"],) * 2 if name == "ncf" else ())
  assert sum(model.user_parts) in (0, dim)


@pytest.mark.parametrize("name", models.NAMES)
def test_score_differentiable_in_user_table(name):
  model, params, aux = built(name)
  users = jnp.arange(4, dtype=jnp.int32)

  @jax.jit
  def f(table):
    return jnp.sum(model.score(model.with_user_table(params, table), aux, users) ** 2)

  g = jax.grad(f)(model.user_table(params))
  chex.assert_shape(g, model.user_table(params).shape)
  chex.assert_tree_all_finite(g)
  assert float(jnp.abs(g[:4]).sum()) > 0
  if name != "lightgcn":  # LightGCN mixes users through the graph; the others do not
    assert float(jnp.abs(g[4:]).sum()) == 0


@pytest.mark.parametrize("name", models.NAMES)
def test_loss_finite_scalar(name):
  model, params, aux = built(name)
  pairs = tiny_pairs()[:8]
  neg = jnp.zeros((8, 3), jnp.int32)
  loss = model.loss(params, aux, pairs[:, 0], pairs[:, 1], neg)
  chex.assert_shape(loss, ())
  chex.assert_tree_all_finite(loss)


def test_lightgcn_edges_symmetric_sorted():
  dst, src, w = lightgcn.normalized_edges(tiny_pairs(), N_USERS, N_ITEMS)
  indptr = lightgcn.csr_indptr(dst, N_USERS + N_ITEMS)
  assert indptr[-1] == len(dst) and np.all(np.diff(indptr) >= 0)
  assert len(dst) == 2 * len(tiny_pairs())
  assert np.all(np.diff(dst) >= 0)
  forward = {(d, s): x for d, s, x in zip(dst, src, w)}
  assert all(np.isclose(forward[(s, d)], x) for d, s, x in zip(dst, src, w))


def test_unknown_backbone():
  with pytest.raises(LegoError, match="valid: lightgcn, mf, ncf"):
    models.get("svd", MODEL_CFG, TRAIN_CFG)


@pytest.mark.parametrize("backend", ["cpu", "other"])
def test_lightgcn_gradient_matches_dense(backend, monkeypatch):
  # The sparse product has a hand-written (symmetric) backward; check it against
  # autodiff through a dense normalised adjacency.
  # "other" takes the segment-sum path that non-CPU backends use.
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  model, params, aux = built("lightgcn")
  pairs = tiny_pairs()
  n = N_USERS + N_ITEMS
  a = np.zeros((n, n), np.float32)
  a[pairs[:, 0], N_USERS + pairs[:, 1]] = 1
  a = a + a.T
  inv = 1 / np.sqrt(np.maximum(a.sum(1), 1))
  a_hat = jnp.asarray(inv[:, None] * a * inv[None, :])
  weights = jax.random.normal(jax.random.PRNGKey(5), (N_USERS, N_ITEMS))

  def dense(table):
    x = jnp.concatenate([table, params["item"]])
    layers = [x, a_hat @ x, a_hat @ (a_hat @ x)]
    f = sum(layers) / 3
    return jnp.sum(weights * (f[:N_USERS] @ f[N_USERS:].T))

  def sparse(table):
    users = jnp.arange(N_USERS)
    return jnp.sum(weights * model.score(model.with_user_table(params, table), aux, users))

  table = model.user_table(params)
  np.testing.assert_allclose(sparse(table), dense(table), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(jax.grad(sparse)(table), jax.grad(dense)(table), rtol=1e-4, atol=1e-6)
