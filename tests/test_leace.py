"""LEACE erasure: equal class means, linear probes at chance, idempotence, missing labels."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax.errors import LegoError
from lego_jax.evaluation.attackers import attack
from lego_jax.unlearning import leace

CLASSES = [2, 3, 4]


def planted(n=600, dim=8, seed=0, missing=0.2):
  """Embeddings with one class offset per attribute; some labels missing."""
  rng = np.random.default_rng(seed)
  y = np.stack([rng.integers(0, c, n) for c in CLASSES])
  x = rng.normal(size=(n, dim))
  for k, c in enumerate(CLASSES):
    x += rng.normal(0.0, 1.0, (c, dim))[y[k]]
  y[1:, :][rng.random((len(CLASSES) - 1, n)) < missing] = -1
  return x.astype(np.float32), y


def class_mean_gap(x, codes, num_classes):
  """Largest |class mean - mean| over classes, on the labelled users."""
  lab = codes >= 0
  mu = x[lab].mean(0)
  return max(float(np.abs(x[lab & (codes == c)].mean(0) - mu).max())
             for c in range(num_classes) if (codes == c).any())


def test_class_means_coincide_for_every_attribute():
  x, y = planted()
  assert min(class_mean_gap(x, y[k], c) for k, c in enumerate(CLASSES)) > 0.1
  xe = leace.erase(x, y, CLASSES)
  chex.assert_shape(xe, x.shape)
  assert xe.dtype == np.float32
  for k, c in enumerate(CLASSES):
    assert class_mean_gap(xe.astype(np.float64), y[k], c) < 1e-4


def test_single_eraser_shapes_rank_and_projection():
  x, y = planted()
  for k, c in enumerate(CLASSES):
    e = leace.fit(x, y[k], c)
    chex.assert_shape([e.mean, e.proj], [(8,), (8, 8)])
    assert e.rank == c - 1 == np.linalg.matrix_rank(e.proj)
    assert e.n_fit == int((y[k] >= 0).sum())
    # An oblique projection: P^2 = P.
    np.testing.assert_allclose(e.proj @ e.proj, e.proj, atol=1e-8)


def test_linear_probe_drops_to_chance():
  x, y = planted()
  names = ["a", "b", "c"]
  before = attack(x, y, CLASSES, attacker="linear", names=names, seed=0)
  after = attack(leace.erase(x, y, CLASSES), y, CLASSES, attacker="linear", names=names, seed=0)
  for n in names:
    assert before[n]["leakage"] > 0.2
    # No better than chance. It can be a little *below* chance: the means are
    # equal in-sample, so a training fold's (noise) class-mean difference is
    # exactly opposite to the held-out fold's and cross-validated probes
    # anti-learn (stronger here, with balanced classes and few users, than on
    # real tables, where the attacker's class balancing dilutes it).
    assert after[n]["bacc"] - after[n]["chance"] <= 0.03, (n, after[n])
    assert after[n]["leakage"] <= 0.1, (n, after[n])


def test_eraser_generalises_to_held_out_users():
  # Fitted on the even users, attacked on the odd ones only: no anti-learning,
  # just the finite-sample error of the fitted eraser.
  x, y = planted(n=1200)
  fitted = np.arange(1200) % 2 == 0
  chain = leace.fit_chain(x, np.where(fitted, y, -1), CLASSES)
  held_out = np.where(fitted, -1, y)
  before = attack(x, held_out, CLASSES, attacker="linear", seed=0)
  after = attack(leace.apply_chain(chain, x), held_out, CLASSES, attacker="linear", seed=0)
  for n in before:
    assert before[n]["leakage"] > 0.2
    assert after[n]["leakage"] <= 0.07, (n, after[n])


def test_idempotent():
  x, y = planted()
  e = leace.fit(x, y[0], CLASSES[0])
  once = leace.apply(e, x)
  np.testing.assert_allclose(leace.apply(e, once), once, atol=1e-5)
  xe = leace.erase(x, y, CLASSES)
  np.testing.assert_allclose(leace.erase(xe, y, CLASSES), xe, atol=1e-4)
  # Refitting rounds: later erasers are affine, so they keep earlier class means equal.
  np.testing.assert_allclose(leace.erase(x, y, CLASSES, rounds=3), xe, atol=1e-4)


def test_unlabelled_users_are_moved_but_not_fitted():
  x, y = planted()
  codes = y[1]
  lab = codes >= 0
  e_all = leace.fit(x, codes, CLASSES[1])
  e_lab = leace.fit(x[lab], codes[lab], CLASSES[1])
  np.testing.assert_allclose(e_all.mean, e_lab.mean, atol=1e-10)
  np.testing.assert_allclose(e_all.proj, e_lab.proj, atol=1e-8)
  xe = leace.apply(e_all, x)
  # The eraser is an affine map of every row: unlabelled rows move too.
  assert np.abs(xe[~lab] - x[~lab]).max() > 1e-3


def test_nothing_to_erase_gives_identity():
  x, _ = planted(n=50)
  for codes in (np.full(50, -1), np.where(np.arange(50) < 10, 1, -1)):
    e = leace.fit(x, codes, 3)
    assert e.rank == 0
    np.testing.assert_array_equal(leace.apply(e, x), x)


def test_rank_deficient_embeddings():
  # Fewer users than dimensions, plus a duplicated column: Sigma_xx is singular.
  rng = np.random.default_rng(1)
  y = rng.integers(0, 3, 12)
  x = rng.normal(size=(12, 20)) + 2.0 * np.eye(3, 20)[y]
  x[:, 5] = x[:, 4]
  xe = leace.erase(x, y[None], [3])
  assert np.all(np.isfinite(xe))
  assert class_mean_gap(xe, y, 3) < 1e-4


class TestApplyJit(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jax_apply_matches_numpy(self):
    x, y = planted(n=200)
    e = leace.fit(x, y[2], CLASSES[2])
    got = self.variant(leace.apply)(e, jnp.asarray(x))
    assert isinstance(got, jax.Array) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), leace.apply(e, x), atol=1e-4)


def test_bad_input_raises_lego_error():
  x, y = planted(n=50)
  with pytest.raises(LegoError, match="labels"):
    leace.erase(x, y[:, :10], CLASSES)
  with pytest.raises(LegoError, match="class counts"):
    leace.erase(x, y, CLASSES[:2])
  with pytest.raises(LegoError, match=r"-1\.\.1"):
    leace.fit(x, np.full(50, 5), 2)
  with pytest.raises(LegoError, match="NaN"):
    leace.fit(np.full((50, 3), np.nan), y[0], 2)
  with pytest.raises(LegoError, match="rounds"):
    leace.erase(x, y, CLASSES, rounds=0)
