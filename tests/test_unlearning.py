"""LEGO unlearning: losses, vmapped calibration, combination, requests, persistence."""

import dataclasses
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax import config as config_lib
from lego_jax import checkpoint
from lego_jax.errors import LegoError
from lego_jax.unlearning import calibration, combination, losses
from lego_jax.requests import IN_PROGRESS, Finished, Lighter, Unlearner, attribute_key
from lego_jax.workdir import Workdir
from tests.conftest import tiny_config


# ---- losses -----------------------------------------------------------------
def naive_mmd2(x, y, beta):
  def k(a, b):
    d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
    return sum(np.exp(-d2 / (beta * 2.0 ** j)) for j in losses.BANDWIDTH_EXPONENTS)
  return k(x, x).mean() - 2 * k(x, y).mean() + k(y, y).mean()


def test_mmd_mi_matches_naive_computation():
  rng = np.random.default_rng(0)
  e = rng.normal(size=(40, 3)).astype(np.float32)
  y = rng.integers(0, 3, 40)
  y[:4] = -1
  m = (y >= 0).astype(np.float32)
  valid = e[y >= 0]
  d2 = ((valid[:, None] - valid[None]) ** 2).sum(-1)
  beta = d2.sum() / (len(valid) * (len(valid) - 1))
  want = sum((y == c).sum() / m.sum() * naive_mmd2(e[y == c], valid, beta) for c in range(3))
  got = losses.mmd_mi(jnp.asarray(e), jnp.asarray(y), jnp.asarray(m), num_classes=5)
  np.testing.assert_allclose(got, want, rtol=1e-4)
  # D2D: classes 1, 2 against class 0.
  want_d2d = sum(naive_mmd2(e[y == c], e[y == 0], beta) for c in (1, 2))
  got_d2d = losses.d2d_mi(jnp.asarray(e), jnp.asarray(y), jnp.asarray(m), num_classes=5)
  np.testing.assert_allclose(got_d2d, want_d2d, rtol=1e-4)


def test_mmd_mi_grows_with_planted_signal():
  rng = np.random.default_rng(1)
  y = rng.integers(0, 2, 300)
  noise = rng.normal(size=(300, 8))
  m = jnp.ones(300)
  vals = [float(losses.mmd_mi(jnp.asarray(noise + s * y[:, None]), jnp.asarray(y), m, 2))
          for s in (0.0, 0.5, 2.0)]
  assert vals[0] < vals[1] < vals[2]


def _dot_precisions(jaxpr):
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      out.append(eqn.params["precision"])
    for sub in jax.core.jaxprs_in_params(eqn.params):
      out += _dot_precisions(sub)
  return out


@pytest.mark.parametrize("estimator", losses.ESTIMATORS)
def test_mi_estimate_asks_for_full_float32_products(estimator):
  # GPUs run float32 matmuls in TF32 unless told otherwise, which drowns an
  # MMD (a small difference of large sums) in rounding noise.
  e = jnp.ones((8, 3))
  ys = jnp.zeros((2, 8), jnp.int32)
  fn = lambda e: losses.mi_estimate(jax.random.PRNGKey(0), e, ys, jnp.ones((2, 8)), num_classes=2,
                                    estimator=estimator, linear=True, centre=True)[0].sum()
  precisions = _dot_precisions(jax.make_jaxpr(jax.grad(fn))(e).jaxpr)
  assert precisions
  highest = jax.lax.Precision.HIGHEST
  assert all(p is not None and all(x == highest for x in p) for p in precisions), precisions


@pytest.mark.slow
def test_population_linear_kernel_sees_every_user_and_has_a_lower_null():
  rng = np.random.default_rng(3)
  n = 600
  y = rng.integers(0, 2, n)
  table = jnp.asarray(rng.normal(size=(n, 8)) + 0.1 * y[:, None], jnp.float32)
  labels = jnp.asarray(y[None], jnp.int32)
  users = jnp.arange(64)
  batch = calibration.Spec(num_classes=2)
  pop = calibration.Spec(num_classes=2, linear_scope="population")
  mi_b, null_b, _ = batch.mi(jax.random.PRNGKey(0), table, users, labels)
  mi_p, null_p, _ = pop.mi(jax.random.PRNGKey(0), table, users, labels)
  chex.assert_equal_shape([mi_b, mi_p, null_b, null_p])
  # The linear column: a 600-user null is about 64/600 of a 64-user one.
  assert float(null_p[0, 0]) < 0.5 * float(null_b[0, 0])
  grad = lambda spec: jax.grad(lambda t: spec.mi(jax.random.PRNGKey(0), t, users, labels)[0].sum())
  outside = lambda g: float(jnp.abs(g(table)[64:]).max())
  assert outside(grad(batch)) == 0.0 and outside(grad(pop)) > 0.0


def test_excess_mi_is_zero_at_or_below_null():
  np.testing.assert_allclose(losses.excess_mi(jnp.array([[0.5], [1.0], [3.0]]), jnp.ones((3, 1))),
                             [0.0, 0.0, 2.0])
  np.testing.assert_allclose(losses.excess_mi(jnp.array([3.0]), jnp.array([1.5]), "steps"), 2.0)
  np.testing.assert_allclose(losses.excess_mi(jnp.array([[0.5], [3.0]]), jnp.ones((2, 1)),
                                              "two-sided"), [0.5, 2.0])


def test_excess_mi_kernel_hinge_stops_each_kernel_at_its_own_null():
  # One kernel already below its null, one above: the summed hinge lets the
  # first keep the second's gradient (and sink further), the per-kernel one not.
  mi, null = jnp.array([0.5, 3.0]), jnp.array([1.0, 1.0])
  np.testing.assert_allclose(losses.excess_mi(mi, null, hinge="kernel"), 2.0)
  np.testing.assert_allclose(losses.excess_mi(mi, null, hinge="sum"), 0.75)
  g = jax.grad(lambda x: losses.excess_mi(x, null, hinge="kernel"))(mi)
  np.testing.assert_allclose(g, [0.0, 1.0])
  g = jax.grad(lambda x: losses.excess_mi(x, null, hinge="sum"))(mi)
  np.testing.assert_allclose(g, [0.5, 0.5])


@pytest.mark.parametrize("loss", ["mmd", "d2d"])
def test_feature_mi_equals_kernel_mi_for_an_exact_factorisation(loss):
  rng = np.random.default_rng(3)
  e = jnp.asarray(rng.normal(size=(30, 4)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 30))
  m = jnp.ones(30)
  k = losses.kernels(e, m, (0,), linear=True)
  for kj in k:
    vals, vecs = np.linalg.eigh(np.asarray(kj, np.float64))
    phi = jnp.asarray(vecs * np.sqrt(np.maximum(vals, 0.0)), jnp.float32)   # k = phi phi^T
    want = losses.MI_LOSSES[loss](e, y, m, 3, kj)
    np.testing.assert_allclose(losses.feature_mi(phi, y, m, 3, loss), want, rtol=1e-3, atol=1e-6)


def test_linear_kernel_mmd_is_the_spread_of_class_means():
  rng = np.random.default_rng(4)
  e = rng.normal(size=(50, 3)).astype(np.float32)
  y = rng.integers(0, 2, 50)
  m = jnp.ones(50)
  beta = float(losses.bandwidth(jnp.asarray(e), m))
  want = sum((y == c).mean() * ((e[y == c].mean(0) - e.mean(0)) ** 2).sum() for c in (0, 1)) / beta
  got = losses.feature_mi(jnp.asarray(e) / np.sqrt(beta), jnp.asarray(y), m, 2)
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_random_features_approximate_the_rbf_kernel():
  rng = np.random.default_rng(5)
  e = jnp.asarray(rng.normal(size=(20, 6)), jnp.float32)
  m = jnp.ones(20)
  exps = (-1, 0, 1)
  phis = losses.random_features(jax.random.PRNGKey(0), e, m, exps, n_features=20000)
  for phi, k in zip(phis, losses.kernels(e, m, exps)):
    np.testing.assert_allclose(phi @ phi.T, k, atol=0.03)


@pytest.mark.parametrize("loss", ["mmd", "d2d"])
def test_a_stack_of_kernels_gives_each_kernels_mi(loss):
  rng = np.random.default_rng(8)
  e = jnp.asarray(rng.normal(size=(40, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(-1, 3, 40))
  m = (y >= 0).astype(jnp.float32)
  ks = losses.kernels(e, m, (-1, 0, 1), linear=True)
  got = losses.MI_LOSSES[loss](e, y, m, 4, ks)
  chex.assert_shape(got, (4,))
  want = [losses.MI_LOSSES[loss](e, y, m, 4, k) for k in ks]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)


class CentredFeaturesTest(chex.TestCase):
  """The shared-cosine form of the centred features equals computing them directly."""

  def direct(self, x, y, m, freqs, exps, loss):
    beta = losses.bandwidth(x, jnp.ones(x.shape[0]))
    c = losses.class_centred(x, y, m, 3)
    f = freqs[0][0].shape[-1]
    return jnp.stack([losses.feature_mi(jnp.sqrt(2.0 / f) * jnp.cos(
        c @ z / jnp.sqrt(beta * 2.0 ** (j - 1)) + b), y, m, 3, loss)
        for (z, b), j in zip(freqs, exps)])

  @chex.variants(with_jit=True, without_jit=True)
  def test_centred_features_are_the_features_of_the_class_centred_rows(self):
    rng = np.random.default_rng(9)
    e = jnp.asarray(rng.normal(size=(50, 4)) + rng.integers(0, 2, (50, 1)), jnp.float32)
    y = jnp.asarray(rng.integers(-1, 3, 50))
    m = (y >= 0).astype(jnp.float32)
    exps = (-1, 0, 1)
    freqs = losses.frequencies(jax.random.PRNGKey(1), 4, exps, 64, jnp.float32)
    for loss in ("mmd", "d2d"):
      @self.variant
      def shared(x):
        beta = losses.bandwidth(x, jnp.ones(50))
        trig = [jnp.concatenate([jnp.cos(a), jnp.sin(a)], -1)
                for a in losses.angles(x, freqs, beta, exps)]
        return jnp.stack(losses.centred_feature_mis(trig, freqs, beta, exps, x, y, m, 3, loss))

      direct = lambda x: self.direct(x, y, m, freqs, exps, loss)
      np.testing.assert_allclose(shared(e), direct(e), rtol=1e-4, atol=1e-7)
      np.testing.assert_allclose(jax.grad(lambda x: shared(x).sum())(e),
                                 jax.grad(lambda x: direct(x).sum())(e), rtol=1e-3, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["kernel", "features"])
def test_mi_estimate_sees_a_planted_signal_and_not_a_permuted_one(estimator):
  rng = np.random.default_rng(6)
  y = rng.integers(0, 2, 400)
  e = jnp.asarray(rng.normal(size=(400, 8)) + 0.7 * y[:, None], jnp.float32)
  ys = jnp.asarray(np.stack([y, rng.permutation(y)]))
  mi, null = losses.mi_estimate(jax.random.PRNGKey(0), e, ys, jnp.ones((2, 400)), num_classes=2,
                                estimator=estimator, linear=True, n_null=4)
  chex.assert_shape([mi, null], (2, 1 + len(losses.BANDWIDTH_EXPONENTS)))
  ratio = np.asarray(mi / null)
  assert (ratio[0] > 5).all()            # the real attribute: far above no-information
  assert (ratio[1] < 3).all()            # a shuffled one: at the no-information level


def test_losses_of_class_centred_rows_cannot_move_class_means():
  rng = np.random.default_rng(7)
  e = jnp.asarray(rng.normal(size=(60, 5)), jnp.float32)
  y = jnp.asarray(rng.integers(-1, 3, 60))
  m = (y >= 0).astype(jnp.float32)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(losses.class_centred(x, y, m, 3)) ** 3))(e)
  for c in range(3):
    np.testing.assert_allclose(np.asarray(g)[np.asarray(y) == c].sum(0), 0.0, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["kernel", "features"])
def test_centred_kernels_see_shape_and_the_linear_kernel_sees_location(estimator):
  rng = np.random.default_rng(8)
  y = rng.integers(0, 2, 600)
  noise = rng.normal(size=(600, 6))
  shifted = noise + 0.8 * y[:, None]                     # classes differ in mean only
  scaled = noise * np.where(y == 1, 2.0, 1.0)[:, None]   # classes differ in spread only
  ratio = {}
  for name, e in (("shifted", shifted), ("scaled", scaled)):
    mi, null = losses.mi_estimate(
        jax.random.PRNGKey(0), jnp.asarray(e, jnp.float32), jnp.asarray(y)[None],
        jnp.ones((1, 600)), num_classes=2, estimator=estimator, linear=True, centre=True,
        exponents=(0, 1), n_null=4)
    ratio[name] = np.asarray(mi / null)[0]               # [linear, rbf 2^0, rbf 2^1]
  assert ratio["shifted"][0] > 10 and (ratio["shifted"][1:] < 3).all()
  assert ratio["scaled"][0] < 3 and (ratio["scaled"][1:] > 10).all()


@pytest.mark.slow
def test_centred_estimate_with_the_linear_kernel_alone():
  # `bandwidths = []` leaves the class means: one kernel, whatever `centre` says.
  rng = np.random.default_rng(9)
  y = rng.integers(0, 2, 200)
  e = jnp.asarray(rng.normal(size=(200, 4)) + 0.8 * y[:, None], jnp.float32)
  for centre in (True, False):
    mi, null = losses.mi_estimate(jax.random.PRNGKey(0), e, jnp.asarray(y)[None], jnp.ones((1, 200)),
                                  num_classes=2, linear=True, centre=centre, exponents=())
    chex.assert_shape([mi, null], (1, 1))
    assert float(mi[0, 0] / null[0, 0]) > 10


@pytest.mark.slow
@pytest.mark.parametrize("scope", calibration.LINEAR_SCOPES)
def test_spec_mi_with_the_linear_kernel_alone(scope):
  rng = np.random.default_rng(10)
  y = jnp.asarray(rng.integers(0, 2, (1, 120)))
  table = jnp.asarray(rng.normal(size=(120, 4)), jnp.float32) + 2.0 * y[0][:, None]
  spec = calibration.Spec(num_classes=2, bandwidths=(), linear_scope=scope)
  mi, null, excess = spec.mi(jax.random.PRNGKey(0), table, jnp.arange(0, 120, 2), y)
  chex.assert_shape([mi, null], (1, 1))
  chex.assert_shape(excess, (1,))
  assert float(excess[0]) > 5


def _narrow_signal(n=400, seed=11):
  """Six wide noise coordinates and two narrow ones (1/20 the spread) whose
  shape, not mean, depends on the label: the kind of signal NCF's MLP-tower
  half carried."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  wide = rng.normal(size=(n, 6))
  sign = rng.choice([-1.0, 1.0], size=(n, 2))
  narrow = np.where(y[:, None] == 1, sign * 1.5 + 0.3 * rng.normal(size=(n, 2)),
                    rng.normal(size=(n, 2)) * 0.3) / 20
  return jnp.asarray(np.concatenate([wide, narrow], 1), jnp.float32), jnp.asarray(y)[None]


@pytest.mark.parametrize("units", ["parts", "coordinates"])
def test_estimate_in_units_sees_a_signal_in_a_narrow_part(units):
  table, y = _narrow_signal()
  users = jnp.arange(table.shape[0])
  ratio = {}
  for u in (units, "none"):
    # The additive kernel has a bandwidth per coordinate: only the row kernels here.
    # Units only: the parts' own kernels (`part_kernels`) would see the narrow part raw too.
    spec = calibration.Spec(num_classes=2, linear_kernel=False, units=u, parts=(6, 2),
                            marginal_features=0, part_kernels=False)
    mi, null, _ = spec.mi(jax.random.PRNGKey(0), table, users, y, calibration.units(table, spec))
    ratio[u] = float(mi.sum() / null.sum())
  # Raw distances are all but blind to the two narrow coordinates.
  assert ratio["none"] < 2 and ratio[units] > 5, ratio


@pytest.mark.parametrize("units", ["parts", "coordinates"])
def test_estimate_in_units_ignores_each_parts_scale(units):
  table, y = _narrow_signal()
  users = jnp.arange(0, table.shape[0], 2)
  spec = calibration.Spec(num_classes=2, units=units, parts=(6, 2))
  rng = np.random.default_rng(3)
  scale = (rng.uniform(0.1, 10.0, 8) if units == "coordinates"
           else np.repeat(rng.uniform(0.1, 10.0, 2), [6, 2]))
  scale = jnp.asarray(scale, jnp.float32)
  a = spec.mi(jax.random.PRNGKey(1), table, users, y, calibration.units(table, spec))
  b = spec.mi(jax.random.PRNGKey(1), table * scale, users, y, calibration.units(table * scale, spec))
  # Equal up to float32 rounding of the rescaled table.
  chex.assert_trees_all_close(a, b, rtol=1e-3, atol=1e-6)


def test_units_of_one_part_or_none_leave_the_table_as_is():
  table, _ = _narrow_signal()
  for spec in (calibration.Spec(num_classes=2), calibration.Spec(num_classes=2, parts=(8,)),
               calibration.Spec(num_classes=2, units="none", parts=(6, 2))):
    assert calibration.units(table, spec) is None
  u = calibration.units(table, calibration.Spec(num_classes=2, parts=(6, 2)))
  np.testing.assert_allclose(u, np.repeat([np.sqrt(np.var(table[:, :6], 0).mean()),
                                           np.sqrt(np.var(table[:, 6:], 0).mean())], [6, 2]),
                             rtol=1e-5)
  with pytest.raises(LegoError, match="do not add up"):
    calibration.units(table, calibration.Spec(num_classes=2, parts=(6, 3)))
  with pytest.raises(LegoError, match="coordinates, none, parts"):
    calibration.Spec(num_classes=2, units="whitened")


def test_part_kernels_add_each_parts_own_estimate():
  table, y = _narrow_signal()
  users = jnp.arange(table.shape[0])
  j = len(losses.BANDWIDTH_EXPONENTS) + 1                          # linear + RBFs
  spec = calibration.Spec(num_classes=2, parts=(6, 2))
  units = calibration.units(table, spec)
  mi, null, _ = spec.mi(jax.random.PRNGKey(0), table, users, y, units)
  chex.assert_shape([mi, null], (1, 3 * j))
  whole = dataclasses.replace(spec, part_kernels=False).mi(jax.random.PRNGKey(0), table, users,
                                                          y, units)[0]
  np.testing.assert_allclose(mi[:, :j], whole, rtol=1e-6)
  # The kernel estimate itself needs no key (only its null level does).
  x = table / units
  for k, part in enumerate((slice(0, 6), slice(6, 8))):
    own = losses.mi_estimate(jax.random.PRNGKey(9), x[:, part], y, jnp.ones_like(y, jnp.float32),
                             num_classes=2, linear=True, centre=True)[0]
    np.testing.assert_allclose(mi[:, (k + 1) * j:(k + 2) * j], own, rtol=1e-5)
  # A table of one part has nothing more to read.
  for parts in ((), (8,)):
    one = calibration.Spec(num_classes=2, parts=parts)
    a = one.mi(jax.random.PRNGKey(0), table, users, y)
    b = dataclasses.replace(one, part_kernels=False).mi(jax.random.PRNGKey(0), table, users, y)
    chex.assert_trees_all_equal(a, b)


def test_part_kernels_read_a_signal_the_whole_row_dilutes():
  # A shape signal in a part of 2 coordinates beside a part of 30 noise
  # coordinates, each part in its own units: on the whole row the noise part
  # dominates every distance.
  rng = np.random.default_rng(15)
  n = 600
  y = rng.integers(0, 2, n)
  sign = rng.choice([-1.0, 1.0], size=(n, 2))
  signal = np.where(y[:, None] == 1, sign + 0.3 * rng.normal(size=(n, 2)),
                    0.5 * rng.normal(size=(n, 2)))
  table = jnp.asarray(np.concatenate([signal, rng.normal(size=(n, 30))], 1), jnp.float32)
  spec = calibration.Spec(num_classes=2, linear_kernel=False, parts=(2, 30), marginal_features=0)
  mi, null, _ = spec.mi(jax.random.PRNGKey(0), table, jnp.arange(n), jnp.asarray(y)[None],
                        calibration.units(table, spec))
  j = len(losses.BANDWIDTH_EXPONENTS)
  ratio = np.asarray(mi[0] / null[0])
  whole, first, second = ratio[:j], ratio[j:2 * j], ratio[2 * j:]
  assert first.max() > 5 * max(whole.max(), 1.0) and second.max() < 3, ratio


def test_ncf_bricks_measure_each_tower_in_its_own_units(tmp_path):
  wd = Workdir.create(tmp_path / "ncf", tiny_config("model.name=ncf", "train.epochs=1"))
  wd.train(progress=False)
  u = Unlearner(wd, progress=False)
  assert u.spec().parts == u.combination_spec().mi.parts == (16, 16)
  e0 = u.target().e0
  units = np.asarray(calibration.units(e0, u.spec()))
  for part in (slice(0, 16), slice(16, 32)):
    np.testing.assert_allclose(units[part], np.sqrt(np.var(np.asarray(e0)[:, part], 0).mean()),
                               rtol=1e-5)


def test_marginal_kernel_matches_its_exact_form():
  # The features' inner products approach the mean over coordinates of 1-D RBFs.
  rng = np.random.default_rng(12)
  e = jnp.asarray(rng.normal(size=(30, 3)) * [1.0, 0.1, 3.0], jnp.float32)
  ones = jnp.ones(30)
  phi = losses.marginal_features(jax.random.PRNGKey(0), e, ones, (0, 1), n_features=20000)
  x = np.asarray(e)
  beta = 2 * x.var(0) * 30 / 29
  d2 = (x[:, None] - x[None]) ** 2                                    # (B, B, D)
  want = sum(np.exp(-d2 / (beta * 2.0 ** j)) for j in (0, 1)).mean(-1) / 2
  np.testing.assert_allclose(np.asarray(phi @ phi.T), want, atol=0.03)


def test_marginal_kernel_reads_a_single_coordinates_shape():
  # One coordinate of 16 whose spread, not mean, depends on the label: the
  # row kernels hardly see it; the additive kernel does.
  rng = np.random.default_rng(13)
  y = rng.integers(0, 2, 600)
  e = rng.normal(size=(600, 16))
  e[:, 0] = np.where(y == 1, rng.choice([-1.0, 1.0], 600) + 0.2 * rng.normal(size=600),
                     0.3 * rng.normal(size=600))
  e = jnp.asarray(e, jnp.float32)
  mi, null = losses.mi_estimate(jax.random.PRNGKey(0), e, jnp.asarray(y)[None], jnp.ones((1, 600)),
                                num_classes=2, linear=True, centre=True, marginal=16)
  chex.assert_shape([mi, null], (1, 1 + len(losses.BANDWIDTH_EXPONENTS) + 1))
  ratio = np.asarray(mi[0] / null[0])
  assert ratio[-1] > 5 and ratio[-1] > 3 * ratio[1:-1].max(), ratio


def _norm_scaled_shift(n=600, seed=14):
  """Rows whose class shift grows with the original row's norm and averages
  zero: what a class shift that is the same for every user leaves (ML-1M MF,
  docs/findings.md). Returns (original, table, labels (1, n))."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, n)
  scale = rng.uniform(0.5, 1.5, n)
  e0 = rng.normal(size=(n, 8)) * scale[:, None]
  shift = np.zeros((n, 8))
  shift[:, 0] = (scale - scale.mean()) * np.where(y == 1, 1.0, -1.0) * 3.0
  return (jnp.asarray(e0, jnp.float32), jnp.asarray(e0 + shift, jnp.float32),
          jnp.asarray(y)[None])


def test_interaction_kernels_read_a_class_shift_that_follows_the_norm():
  e0, table, y = _norm_scaled_shift()
  users = jnp.arange(table.shape[0])
  plain = calibration.Spec(num_classes=2, bandwidths=())
  spec = dataclasses.replace(plain, interaction=True)
  mi, null, _ = plain.mi(jax.random.PRNGKey(0), table, users, y, e0=e0)
  chex.assert_shape([mi, null], (1, 1))
  assert float(mi[0, 0] / null[0, 0]) < 3         # the class means agree
  mi, null, excess = spec.mi(jax.random.PRNGKey(0), table, users, y, e0=e0)
  chex.assert_shape([mi, null], (1, 3))            # linear, original norm, own norm
  ratio = np.asarray(mi[0] / null[0])
  assert ratio[1] > 5 and ratio[2] > 5, ratio
  # Without the original table the row's own norm stands in for it.
  mi, null, _ = spec.mi(jax.random.PRNGKey(0), table, users, y)
  chex.assert_shape(mi, (1, 3))
  assert float(mi[0, 1] / null[0, 1]) > 5
  # On labels that carry nothing, nothing is read.
  perm = jnp.asarray(np.random.default_rng(0).permutation(np.asarray(y[0])))[None]
  mi, null, _ = spec.mi(jax.random.PRNGKey(0), table, users, perm, e0=e0)
  assert float(np.max(np.asarray(mi[0] / null[0]))) < 5


def test_an_estimate_without_any_kernel_is_a_config_error():
  with pytest.raises(LegoError, match="needs a kernel"):
    calibration.Spec(num_classes=2, linear_kernel=False, bandwidths=())


def test_prior_kl_is_zero_at_the_prior():
  y = jnp.array([0, 0, 0, 1])
  logits = jnp.log(jnp.array([[0.75, 0.25]] * 4))
  assert abs(float(losses.prior_kl(logits, y, jnp.ones(4), 2))) < 1e-6
  assert float(losses.prior_kl(jnp.array([[5.0, -5.0]] * 4), y, jnp.ones(4), 2)) > 0.1


def test_rank_hinge_guard_keeps_the_next_items_below_the_list():
  # A top-3 list in order, then two guard items that must stay below item 3.
  ok = jnp.array([[3.0, 2.0, 1.0, 0.5, 0.0]])
  guards_swapped = jnp.array([[3.0, 2.0, 1.0, 0.5, 0.8]])
  intruder = jnp.array([[3.0, 2.0, 1.0, 0.5, 1.2]])
  assert float(losses.rank_hinge(ok, 0.05, guard=2)) == 0.0
  assert float(losses.rank_hinge(guards_swapped, 0.05, guard=2)) == 0.0   # their order is free
  np.testing.assert_allclose(losses.rank_hinge(guards_swapped, 0.05), 0.35 / 4, rtol=1e-5)  # a list of 5
  np.testing.assert_allclose(losses.rank_hinge(intruder, 0.05, guard=2), 0.25 / 4, rtol=1e-5)


def test_rank_hinge_counts_order_flips():
  ok = jnp.array([[3.0, 2.0, 1.0]])
  flipped = jnp.array([[1.0, 2.0, 3.0]])
  assert float(losses.rank_hinge(ok, 0.05)) == 0.0
  np.testing.assert_allclose(losses.rank_hinge(flipped, 0.05), 1.05)


# ---- calibration on a small synthetic MF problem -----------------------------
def problem(n=120, d=6, m=30, t=5, seed=0):
  rng = np.random.default_rng(seed)
  labels = np.stack([rng.integers(0, 2, n), rng.integers(0, 3, n)]).astype(np.int32)
  labels[1, :7] = -1
  e0 = rng.normal(size=(n, d)) + 0.8 * labels[0, :, None] - 0.5 * (labels[1, :, None] == 2)
  items = jnp.asarray(rng.normal(size=(m, d)), jnp.float32)
  e0 = jnp.asarray(e0, jnp.float32)
  topk = jax.lax.top_k(e0 @ items.T, t)[1]
  target = calibration.Target(e0, topk, jnp.float32(1.0))
  return target, labels, score_fn_for(items)


_SCORE_FNS = {}


def score_fn_for(items):
  # One function object per item table, so jit caches stay warm across tests.
  key = id(items)
  if key not in _SCORE_FNS:
    _SCORE_FNS[key] = lambda table, users, it: jnp.einsum("bd,btd->bt", table[users], items[it])
  return _SCORE_FNS[key]


SPEC = calibration.Spec(num_classes=3, steps=8, batch_users=48, chunk=0)


def hparams(k):
  return calibration.HParams(*(jnp.full((k,), v, jnp.float32) for v in (1.0, 1.0, 0.1, 0.02)))


@pytest.mark.slow
def test_vmapped_calibration_equals_python_loop():
  target, labels, score = problem()
  keys = jnp.stack([attribute_key(0, "a"), attribute_key(0, "b")])
  bricks, _, _ = calibration.calibrate(target, labels, hparams(2), keys, spec=SPEC, score_fn=score)
  chex.assert_shape(bricks, (2,) + target.e0.shape)
  for k in range(2):
    hp = jax.tree.map(lambda x: x[k], hparams(2))
    brick, _, _ = calibration.calibrate_one(target, jnp.asarray(labels[k]), hp, keys[k],
                                            spec=SPEC, score_fn=score)
    # float32: a batched program may sum in another order (jax 0.10: 3.4e-5).
    chex.assert_trees_all_close(bricks[k], brick, atol=1e-4)
  assert float(jnp.abs(bricks).max()) > 0  # it moved


@pytest.mark.slow
class CalibrateOneTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    target, labels, score = problem(n=60)
    hp = jax.tree.map(lambda x: x[0], hparams(1))
    spec = calibration.Spec(num_classes=3, steps=3, batch_users=32)
    fn = self.variant(lambda t, y, key: calibration.calibrate_one(
        t, y, hp, key, spec=spec, score_fn=score)[0])
    ref = calibration.calibrate_one(target, jnp.asarray(labels[1]), hp, attribute_key(0, "b"),
                                    spec=spec, score_fn=score)[0]
    chex.assert_trees_all_close(fn(target, jnp.asarray(labels[1]), attribute_key(0, "b")), ref,
                                atol=1e-5)


@pytest.mark.slow
def test_same_seed_same_bricks_other_seed_differs():
  target, labels, score = problem()
  run = lambda seed: calibration.calibrate(
      target, labels, hparams(2), jnp.stack([attribute_key(seed, "a"), attribute_key(seed, "b")]),
      spec=SPEC, score_fn=score)[0]
  chex.assert_trees_all_equal(run(0), run(0))
  assert not np.allclose(run(0), run(1))


@pytest.mark.slow
def test_chunked_resume_equals_uninterrupted():
  target, labels, score = problem()
  keys = jnp.stack([attribute_key(0, "a"), attribute_key(0, "b")])
  chunked = calibration.Spec(num_classes=3, steps=8, batch_users=48, chunk=3)
  want, _, _ = calibration.calibrate(target, labels, hparams(2), keys, spec=chunked, score_fn=score)
  saved = []

  def interrupt(state):
    saved.append(state)
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    calibration.calibrate(target, labels, hparams(2), keys, spec=chunked, score_fn=score,
                          on_chunk=interrupt)
  assert int(saved[0].step[0]) == 3
  got, state, _ = calibration.calibrate(target, labels, hparams(2), keys, spec=chunked,
                                        score_fn=score, state=saved[0])
  assert int(state.step[0]) == 8
  chex.assert_trees_all_close(got, want, atol=1e-6)


def test_adjusted_hyperparameters_take_effect_from_the_next_chunk():
  target, labels, score = problem()
  keys = jnp.stack([attribute_key(0, "a"), attribute_key(0, "b")])
  chunked = calibration.Spec(num_classes=3, steps=8, batch_users=48, chunk=3)
  run = lambda adjust: calibration.calibrate(target, labels, hparams(2), keys, spec=chunked,
                                             score_fn=score, adjust=adjust)[0]
  chex.assert_trees_all_equal(run(lambda st, hp: hp), run(None))
  first = []

  def freeze(state, hp):   # lr 0 after the first chunk: the brick stays where it was
    first.append(calibration.bricks(state, target.e0, spec=chunked))
    return hp._replace(lr=jnp.zeros_like(hp.lr))
  chex.assert_trees_all_close(run(freeze), first[0], atol=1e-7)
  assert float(jnp.abs(first[0]).max()) > 0


def test_a_table_at_another_scale_gets_the_same_brick_scaled():
  # lr and l2 are in units of the table's spread: the steps are scale-free
  target, labels, score = problem()
  hp = jax.tree.map(lambda x: x[0], hparams(1))
  spec = calibration.Spec(num_classes=3, steps=6, batch_users=48)
  key = attribute_key(0, "a")
  want = calibration.calibrate_one(target, jnp.asarray(labels[0]), hp, key, spec=spec,
                                   score_fn=score)[0]
  c = 3.0
  scaled = calibration.Target(c * target.e0, target.topk, c * target.scale)
  got = calibration.calibrate_one(scaled, jnp.asarray(labels[0]), hp, key, spec=spec,
                                  score_fn=score)[0]
  chex.assert_trees_all_close(got, c * want, atol=1e-4 * c)


@pytest.mark.parametrize("loss,calibrator", [("d2d", "table"), ("adversarial", "table"),
                                             ("mmd", "residual")])
@pytest.mark.slow
def test_loss_and_calibrator_options_run_and_reduce_leak(loss, calibrator):
  target, labels, score = problem(n=200)
  spec = calibration.Spec(num_classes=3, steps=40, batch_users=0, loss=loss, calibrator=calibrator)
  # Adam moves every parameter by about lr per step; a shared map's weights
  # act on all users at once, so it needs a smaller step than a free table.
  hp = calibration.HParams(1.0, 0.1, 0.0, 0.01 if calibrator == "residual" else 0.05)
  brick, _, trace = calibration.calibrate_one(target, jnp.asarray(labels[0]), hp,
                                              attribute_key(0, "a"), spec=spec, score_fn=score)
  y = labels[0]
  gap = lambda e: float(np.linalg.norm(e[y == 1].mean(0) - e[y == 0].mean(0)))
  e0 = np.asarray(target.e0)
  assert np.isfinite(np.asarray(brick)).all()
  assert gap(e0 + np.asarray(brick)) < 0.7 * gap(e0)


def test_calibration_with_the_interaction_kernels_removes_a_norm_following_shift():
  _, table, y = _norm_scaled_shift()
  target, _, score = problem(n=table.shape[0], d=8)   # its top-T lists; no ranking weight
  target = target._replace(e0=table)
  spec = calibration.Spec(num_classes=2, steps=60, batch_users=0, bandwidths=(),
                          interaction=True)
  hp = calibration.HParams(1.0, 0.0, 0.0, 0.05)
  brick, _, _ = calibration.calibrate_one(target, y[0], hp, attribute_key(0, "a"), spec=spec,
                                          score_fn=score)
  users = jnp.arange(table.shape[0])

  def ratio(e):   # each kernel's estimate over its permuted-label level
    mi, null, _ = spec.mi(jax.random.PRNGKey(1), e, users, y, e0=table)
    return np.asarray(mi[0] / null[0])
  before, after = ratio(table), ratio(table + brick)
  assert np.isfinite(np.asarray(brick)).all()
  assert after[2] < 0.5 * before[2], (before, after)   # the shift along the row's own norm


@pytest.mark.slow
def test_joint_labels_sum_attributes_in_one_table():
  target, labels, score = problem()
  hp = jax.tree.map(lambda x: x[0], hparams(1))
  brick, _, trace = calibration.calibrate_one(target, jnp.asarray(labels), hp,
                                              attribute_key(0, "joint"), spec=SPEC, score_fn=score)
  chex.assert_shape(brick, target.e0.shape)
  chex.assert_shape(trace.mi, (SPEC.steps, 2))
  # The joint baseline runs it chunked (one table of A attributes, with a
  # progress bar between chunks): the same table.
  chunked = dataclasses.replace(SPEC, chunk=3)
  bricks, state, _ = calibration.calibrate(target, jnp.asarray(labels)[None], hparams(1),
                                           attribute_key(0, "joint")[None], spec=chunked,
                                           score_fn=score)
  chex.assert_trees_all_close(bricks[0], brick, atol=1e-5)
  assert int(state.step[0]) == SPEC.steps


def test_spec_rejects_unknown_options():
  with pytest.raises(LegoError, match="valid: adversarial, d2d, mmd"):
    calibration.Spec(num_classes=2, loss="kl")
  with pytest.raises(LegoError, match="calibrator"):
    calibration.Spec(num_classes=2, calibrator="mlp")
  with pytest.raises(LegoError, match="combination mode"):
    combination.Spec(num_classes=2, mode="sum")


# ---- combination ----------------------------------------------------------------
def test_combination_takes_its_own_stop_and_class_mean_scope_and_the_rest_from_unlearn():
  cfg = config_lib.resolve(None, ["combine.stop=steps", "combine.linear_scope=population",
                                  "unlearn.centre=false"])
  spec = combination.Spec.from_config(cfg["combine"], cfg["unlearn"], 3)
  assert (spec.mi.stop, spec.mi.linear_scope, spec.mi.centre) == ("steps", "population", False)
  assert calibration.Spec.from_config(cfg["unlearn"], 3).stop == cfg["unlearn"]["stop"] != "steps"


@pytest.mark.parametrize("mode", combination.MODES)
def test_inactive_bricks_do_not_contribute(mode):
  rng = np.random.default_rng(0)
  e0 = jnp.asarray(rng.normal(size=(10, 4)), jnp.float32)
  bricks = jnp.asarray(rng.normal(size=(3, 10, 4)), jnp.float32)
  active = jnp.array([1.0, 0.0, 1.0])
  w = jnp.asarray(rng.normal(size=(3, 4 if mode == "dim" else 1)), jnp.float32)
  got = combination.combine(w, e0, bricks, active, mode)
  bricks_changed = bricks.at[1].set(100.0)
  chex.assert_trees_all_close(got, combination.combine(w, e0, bricks_changed, active, mode))


def test_convex_combination_weights_sum_to_one():
  coef = combination.coefficients(jnp.array([[0.3], [2.0], [-1.0]]), jnp.array([1.0, 0.0, 1.0]),
                                  "convex")
  np.testing.assert_allclose(float(coef.sum()), 1.0, rtol=1e-6)
  assert float(coef[1, 0]) == 0.0


@pytest.mark.slow
def test_fit_reduces_mi_of_active_attributes():
  target, labels, score = problem(n=200)
  keys = jnp.stack([attribute_key(0, "a"), attribute_key(0, "b")])
  spec = calibration.Spec(num_classes=3, steps=30, batch_users=0)
  bricks, _, _ = calibration.calibrate(target, labels, hparams(2), keys, spec=spec, score_fn=score)
  cspec = combination.Spec(num_classes=3, steps=20, batch_users=0)
  w, table, trace = combination.fit(target, bricks, jnp.asarray(labels), jnp.ones(2),
                                    jax.random.PRNGKey(0), combination.HParams(1.0, 0.1, 0.05),
                                    spec=cspec, score_fn=score)
  chex.assert_shape(w, (2, target.e0.shape[1]))
  chex.assert_shape(table, target.e0.shape)
  first = losses.mmd_mi(target.e0, jnp.asarray(labels[0]), jnp.ones(200), 3)
  last = losses.mmd_mi(table, jnp.asarray(labels[0]), jnp.ones(200), 3)
  assert float(last) < 0.5 * float(first)


# ---- requests over a workdir ------------------------------------------------------
def brick_mtimes(path):
  return {d.name: os.stat(d / "metadata.json").st_mtime_ns
          for d in (path / "bricks").iterdir() if not d.name.startswith(".")}


@pytest.mark.slow
def test_requests_reuse_bricks_and_match_direct_unlearning(fresh_workdir):
  u = Unlearner(Workdir.open(fresh_workdir), progress=False)
  assert u.calibrate(["gender", "age", "occupation"]) == ["gender", "age", "occupation"]
  direct = u.combine(["gender", "occupation"])
  before = brick_mtimes(fresh_workdir)
  u.combine(["gender", "age", "occupation"])
  u.withdraw("age")
  np.testing.assert_array_equal(u.table("combined"), direct)
  u.add("age")
  assert u.active() == ["gender", "occupation", "age"]
  assert brick_mtimes(fresh_workdir) == before       # no brick recalibrated
  assert u.calibrate(["age"]) == []
  status = u.status()
  assert sorted(status["bricks"]) == ["age", "gender", "occupation"]
  assert all(b["steps"] == 12 for b in status["bricks"].values())
  with pytest.raises(LegoError, match="already active"):
    u.add("age")
  with pytest.raises(LegoError, match="valid: age, gender, occupation"):
    u.add("religion")


@pytest.mark.slow
def test_unlearn_redoes_bricks_made_under_other_settings_and_requests_do_not(fresh_workdir):
  Unlearner(Workdir.open(fresh_workdir), progress=False).unlearn(["gender", "age"])
  before = brick_mtimes(fresh_workdir)
  u = Unlearner(Workdir.open(fresh_workdir, ["unlearn.lam_rank=7.0"]), progress=False)
  assert u.stale() == ["age", "gender"]
  # `request status` says which, and what they were made under otherwise.
  assert u.status()["bricks"]["age"]["stale"] == ["unlearn.lam_rank"]
  from lego_jax import runner
  _, _, text = runner._status(u, False)
  assert ("stale: gender, made under another value of unlearn.lam_rank (`lego-jax unlearn` "
          "recalibrates it; requests reuse it)") in text(u.status())
  u.add("occupation")                                # a request: others reused as they are
  assert {k: v for k, v in brick_mtimes(fresh_workdir).items() if k != "occupation"} == before
  u.unlearn(["gender", "occupation"])                # a run with new settings means them
  after = brick_mtimes(fresh_workdir)
  assert after["gender"] != before["gender"] and after["age"] == before["age"]
  assert u.stale() == ["age"] and u.status()["bricks"]["gender"]["stale"] == []
  assert "stale: gender" not in text(u.status())
  # A brick made before a field existed is made under another value of it.
  meta = u.brick_meta()["gender"]
  older = {k: v for k, v in meta["settings"].items() if k != "part_kernels"}
  assert u.why_stale("gender", {**meta, "settings": older}) == ["unlearn.part_kernels"]


@pytest.mark.slow
def test_per_attribute_values_redo_only_that_brick(fresh_workdir):
  Unlearner(Workdir.open(fresh_workdir), progress=False).unlearn(["gender", "age"])
  before = brick_mtimes(fresh_workdir)
  wd = Workdir.open(fresh_workdir, ["unlearn.per_attribute.age.lam_rank=3.0"])
  u = Unlearner(wd, progress=False)
  assert u.stale() == ["age"]
  u.unlearn(["gender", "age"])
  after = brick_mtimes(fresh_workdir)
  assert after["gender"] == before["gender"] and after["age"] != before["age"]
  assert u.brick_meta()["age"]["settings"]["lam_rank"] == 3.0
  assert u.stale() == []
  bad = Workdir.open(fresh_workdir, ["unlearn.per_attribute.religion.lam_rank=3.0"])
  with pytest.raises(LegoError, match=r"unknown attribute \(in unlearn.per_attribute\) 'religion'"):
    Unlearner(bad, progress=False).unlearn(["gender"])


def test_a_preserved_list_longer_than_the_catalogue_is_refused(fresh_workdir):
  wd = Workdir.open(fresh_workdir, ["unlearn.guard=200"])
  with pytest.raises(LegoError, match=r"unlearn.topk \+ unlearn.guard = 220 exceeds the 150 items"):
    Unlearner(wd, progress=False).unlearn(["gender"])


@pytest.mark.slow
def test_single_active_brick_reproduces_that_brick(fresh_workdir):
  wd = Workdir.open(fresh_workdir)
  # The combination's own fit, without the loop's steps after it: on 240
  # users a class mean's permuted-label size alone (`null_means`) is larger
  # than this 12-step brick's move.
  config = {**wd.config, "unlearn": {**wd.config["unlearn"], "control": "none"}}
  u = Unlearner(wd, progress=False, config=config)
  u.unlearn(["gender"])
  combined, brick, e0 = u.table("combined"), u.table("brick:gender"), u.table("original")
  # The combination may rescale the brick per dimension, but stays close to it.
  rel = np.linalg.norm(combined - brick) / np.linalg.norm(brick - e0)
  assert rel < 0.5


@pytest.mark.slow
def test_interrupted_calibration_resumes(fresh_workdir):
  wd = Workdir.open(fresh_workdir)
  want = Unlearner(wd, progress=False)
  want.calibrate(["gender"])
  want_brick = want.table("brick:gender")
  # Interrupt a second workdir's calibration after its first chunk.
  import shutil
  other = fresh_workdir.parent / "other"
  shutil.copytree(fresh_workdir, other)
  shutil.rmtree(other / "bricks")
  u = Unlearner(Workdir.open(other), progress=False)
  real_save = checkpoint.save
  calls = []

  def save_then_stop(directory, tree, meta):
    real_save(directory, tree, meta)
    calls.append(directory)
    raise KeyboardInterrupt

  checkpoint.save = save_then_stop
  try:
    with pytest.raises(KeyboardInterrupt):
      u.calibrate(["gender"])
  finally:
    checkpoint.save = real_save
  assert calls and calls[0].name == IN_PROGRESS
  meta = checkpoint.restore(other / "bricks" / IN_PROGRESS)[1]
  assert meta["attributes"] == ["gender"]
  # the loop's first reading (a quarter of the steps) is stored with the state,
  # so the resumed run's next strength step compares against it as this one would
  assert len(meta["strength"]["previous"]) == 1 and meta["strength"]["w_mi"] == [1.0]
  u2 = Unlearner(Workdir.open(other), progress=False)
  u2.calibrate(["gender"])
  np.testing.assert_allclose(u2.table("brick:gender"), want_brick, atol=1e-6)
  assert not (other / "bricks" / IN_PROGRESS).exists()


@pytest.mark.slow
def test_brick_from_another_backbone_is_refused(fresh_workdir):
  wd = Workdir.open(fresh_workdir)
  Unlearner(wd, progress=False).calibrate(["gender"])
  tree, meta = checkpoint.restore(fresh_workdir / "bricks" / "gender")
  checkpoint.save(fresh_workdir / "bricks" / "gender", tree, {**meta, "split": "0123456789abcdef"})
  with pytest.raises(LegoError, match="differs: split"):
    Unlearner(Workdir.open(fresh_workdir), progress=False).table("brick:gender")


def test_residual_means_take_back_the_stored_share_of_the_combined_class_means(fresh_workdir):
  from lego_jax.unlearning import control
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age"]
  unsized = {**wd.config, "unlearn": {**wd.config["unlearn"], "null_means": False,
                                        "null_shapes": False, "null_covariances": False}}
  plain = Unlearner(wd, progress=False, config=unsized).unlearn(names)
  config = {**unsized, "unlearn": {**unsized["unlearn"], "residual_means": True,
                                   "target_leakage": 0.0}}
  u = Unlearner(wd, progress=False, config=config)
  table = u.unlearn(names)                               # bricks reused, recombined
  shares = u.status()["combination"]["residual_means"]
  assert set(shares) == set(names)
  assert all(s in (0.0,) + control.RESIDUAL_SHARES for s in shares.values())
  labels, num_classes = wd.labels(names)
  parts = control.class_mean_parts(plain, labels, num_classes)
  expected = plain - np.tensordot(np.asarray([shares[n] for n in names], plain.dtype), parts, 1)
  np.testing.assert_allclose(table, expected, atol=1e-5)
  np.testing.assert_allclose(u.table("combined"), table, atol=1e-6)


def test_the_kept_table_has_class_means_and_covariances_at_their_permuted_label_size(
    fresh_workdir):
  from benchmarks.null_means import class_sizes, covariance_sizes
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age"]
  table = np.asarray(Unlearner(wd, progress=False).unlearn(names), np.float64)
  labels, _ = wd.labels(names)
  for y in np.asarray(labels):
    observed, null = class_sizes(table, y, perms=64, seed=5)
    ratio = observed[null > 0] / null[null > 0]
    assert np.all((ratio > 0.6) & (ratio < 1.6)), ratio
    observed, null = covariance_sizes(table, y, perms=64, seed=5)
    assert 0.7 < observed.sum() / null.sum() < 1.4, observed.sum() / null.sum()


def test_null_sized_sizes_each_attributes_classes_as_configured(fresh_workdir):
  from benchmarks.null_means import covariance_sizes
  from lego_jax.unlearning import control
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age"]
  labels, num_classes = wd.labels(names)
  y, c = np.asarray(labels)[0], num_classes[0]
  rng = np.random.default_rng(0)        # gender: one class spread wider on every coordinate
  table = (rng.normal(size=(y.size, 6)) * np.where(y[:, None] == 1, 1.6, 1.0)).astype(np.float32)
  known = y >= 0

  def shape_ratio(t):
    x = np.asarray(t, np.float64)[known]
    size = lambda yy: control._sizes(control._shapes(x, yy, c)[0], c, x.var(0))
    perm = np.random.default_rng(3)
    return size(y[known]) / np.mean([size(perm.permutation(y[known])) for _ in range(32)], 0)

  def covariance_ratio(t):
    observed, null = covariance_sizes(np.asarray(t, np.float64), y, perms=32, seed=3)
    return observed.sum() / null.sum()

  def config(**unlearn):
    return {**wd.config, "unlearn": {**wd.config["unlearn"], **unlearn}}
  assert covariance_ratio(table) > 3 and np.median(shape_ratio(table)) > 3
  default = Unlearner(wd, progress=False)       # covariances, then class means
  sized = default.null_sized(table, names)
  assert 0.6 < covariance_ratio(sized) < 1.6
  np.testing.assert_array_equal(sized, default.null_sized(table, names))
  shaped = Unlearner(wd, progress=False, config=config(null_covariances=False, null_shapes=True))
  assert np.median(shape_ratio(shaped.null_sized(table, names))) < 1.5
  means_only = Unlearner(wd, progress=False, config=config(null_covariances=False))
  means = means_only.null_sized(table, names)
  assert np.median(shape_ratio(means)) > 3 and covariance_ratio(means) > 3   # class shifts only
  off = Unlearner(wd, progress=False, config=config(null_covariances=False, null_shapes=False,
                                                    null_means=False))
  np.testing.assert_array_equal(off.null_sized(table, names), table)


def test_residual_means_take_back_per_attribute_the_share_the_probes_read_best(fresh_workdir):
  from lego_jax.unlearning import control
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age"]
  plain = Unlearner(wd, progress=False).unlearn(names)
  labels, num_classes = wd.labels(names)

  def gap(table, a):   # how far apart the attribute's class means are
    x = np.asarray(table, np.float64)
    means = np.stack([x[labels[a] == c].mean(0) for c in range(num_classes[a])])
    return np.linalg.norm(means - means.mean(0))

  best_at = np.asarray([0.5, 0.25])   # probes read chance once this share is taken back

  def fake_read(table, names, probes=None, seeds=None):
    signed = np.asarray([[abs((1 - gap(table, a) / gap(plain, a)) - best_at[a]) for a in (0, 1)]])
    return control.Reading(np.repeat(signed, 2, 0), signed - 0.01, signed + 0.01,
                           ("linear", "mlp"))
  u = Unlearner(wd, progress=False)
  u._read, u.retention = fake_read, lambda t: 0.99
  reading = fake_read(plain, names)
  table, shares, after, ret = u._take_back_means(names, plain, reading, None, 0.95, 1.0)
  np.testing.assert_array_equal(shares, best_at)
  assert after.worst().max() < 0.05 < reading.worst().min()
  parts = control.class_mean_parts(plain, labels, num_classes)
  np.testing.assert_allclose(table, plain - 0.5 * parts[0] - 0.25 * parts[1], atol=1e-5)
  # Under the utility floor, the table is left as it was.
  u.retention = lambda t: 0.9
  kept = u._take_back_means(names, plain, reading, None, 0.95, 1.0)
  np.testing.assert_array_equal(kept[0], plain)
  np.testing.assert_array_equal(kept[1], 0.0)


def test_polish_adds_the_stored_gain_of_the_move_for_the_attributes_above_target(fresh_workdir):
  from lego_jax.unlearning import control
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age"]
  # Without sizing the class statistics: their maps follow the table they are
  # given, so the polished table would not be the unpolished one plus the gain
  # times the move.
  base = {**wd.config["unlearn"], "residual_means": False, "target_leakage": 0.0,
          "polish_steps": 0, "null_covariances": False, "null_shapes": False,
          "null_means": False}
  plain = Unlearner(wd, progress=False, config={**wd.config, "unlearn": base}).unlearn(names)
  u = Unlearner(wd, progress=False, config={**wd.config, "unlearn": {**base, "polish_steps": 4}})
  # The tiny fixture's probes may read its attributes below chance, which are
  # not polished: the polish's readings (the only ones naming their probes)
  # read every attribute above, crossing chance at a gain of 0.4.
  move = u.polish_move(plain, names)
  real = u._read

  def crossing(tables, attributes, probes=None, **kwargs):
    if probes is None:
      return real(tables, attributes, probes, **kwargs)
    gain = np.linalg.norm(tables - plain) / np.linalg.norm(move)
    signed = np.full((len(probes), len(attributes)), 0.05 * (1 - gain / 0.4))
    return control.Reading(signed, signed - 0.01, signed + 0.01, tuple(probes))
  u._read = crossing
  table = u.unlearn(names)                               # bricks reused, recombined
  polish = u.status()["combination"]["polish"]
  assert polish["attributes"] == names
  np.testing.assert_allclose(polish["gain"], 0.4, atol=0.01)
  assert np.abs(move).max() > 0
  np.testing.assert_allclose(table, plain + polish["gain"] * move, atol=1e-5)
  np.testing.assert_allclose(u.table("combined"), table, atol=1e-6)
  from lego_jax import runner
  _, _, text = runner._status(u, False)
  assert (f"polish of gender, age at {polish['gain']:.2f}" in text(u.status()))


def test_the_polish_draws_its_own_number_of_random_features(fresh_workdir):
  # The bricks' `features` stays theirs; `polish_features` sets the polish's.
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age"]
  table = np.asarray(wd.backbone().table())
  with_cfg = lambda **f: Unlearner(wd, progress=False, config={
      **wd.config, "unlearn": {**wd.config["unlearn"], "polish_steps": 3, **f}})
  default = with_cfg().polish_move(table, names)
  np.testing.assert_array_equal(default, with_cfg(features=16).polish_move(table, names))
  few = with_cfg(polish_features=16).polish_move(table, names)
  np.testing.assert_array_equal(few, with_cfg(polish_features=16, features=64).polish_move(
      table, names))
  assert not np.allclose(few, default)


def test_the_combination_reports_leakage_read_on_folds_the_loop_did_not_choose_by(fresh_workdir):
  wd = Workdir.open(fresh_workdir)
  u = Unlearner(wd, progress=False)
  calls, real = [], u._read

  def recording_read(tables, names, probes=None, seeds=None, purpose="control"):
    reading = real(tables, names, probes, seeds, purpose)
    calls.append((purpose, np.array(tables, copy=True), reading))
    return reading
  u._read = recording_read
  table = u.unlearn(["gender", "age"])
  purpose, read_table, reading = calls[-1]
  assert purpose == "report" and all(p == "control" for p, _, _ in calls[:-1])
  np.testing.assert_array_equal(read_table, table)      # the kept table, read once afresh
  meta = u.status()["combination"]
  assert meta["leakage"] == reading.report(["gender", "age"])
  assert set(meta["leakage_steered"]) == {"gender", "age"}
  assert meta["leakage_steered"] != meta["leakage"]
  # Other folds, other numbers: the report is not the loop's reading again.
  again = real(table, ["gender", "age"], purpose="report")
  np.testing.assert_array_equal(again.signed, reading.signed)            # deterministic
  other = real(table, ["gender", "age"])
  assert not np.array_equal(other.signed, reading.signed)


def _fake_polish(wd, signed_at, sized=False):
  """An Unlearner whose polish move is a fixed random table and whose probes
  read gender, age and occupation at `signed_at(gain)` along it; returns the
  Unlearner, the table polished, the move and the attribute lists moved."""
  from lego_jax.unlearning import control
  rng = np.random.default_rng(0)
  plain = rng.normal(size=(wd.split.n_users, 8)).astype(np.float32)
  move = rng.normal(size=plain.shape).astype(np.float32)
  polished = []

  def fake_move(table, which, seed=None):
    polished.append(which)
    return move

  def fake_read(table, names, probes=None, seeds=None):
    probes = tuple(probes or ("linear", "mlp"))
    gain = np.linalg.norm(table - plain) / np.linalg.norm(move)
    signed = np.tile(signed_at(gain), (len(probes), 1))
    return control.Reading(signed, signed - 0.01, signed + 0.01, probes)
  config = wd.config if sized else {**wd.config, "unlearn": {
      **wd.config["unlearn"], "null_means": False, "null_shapes": False,
      "null_covariances": False}}
  u = Unlearner(wd, progress=False, config=config)
  u._read, u.polish_move, u.retention = fake_read, fake_move, lambda t: 0.99
  return u, plain, move, polished


def test_polish_takes_the_gain_where_the_probes_cross_chance_above_the_floor(fresh_workdir):
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age", "occupation"]
  crossing = lambda gain: [0.05 * (1 - gain / 0.4), 0.0, 0.03 * (1 - gain / 0.4)]  # at 0.4
  u, plain, move, polished = _fake_polish(wd, crossing)
  reading = u._read(plain, names)
  table, polish, after, ret = u._polish(names, plain, reading, None, None, 0.95, 1.0)
  assert polished == [["gender", "occupation"]]        # age is within the target already
  assert polish["attributes"] == ["gender", "occupation"]
  np.testing.assert_allclose(polish["gain"], 0.4, atol=1e-4)
  np.testing.assert_allclose(table, plain + polish["gain"] * move, atol=1e-5)
  assert ret == 0.99 and after.worst().max() < 1e-3
  # Under the utility floor, the table is left as it was.
  u.retention = lambda t: 0.9
  kept = u._polish(names, plain, reading, None, None, 0.95, 1.0)
  np.testing.assert_array_equal(kept[0], plain)
  assert kept[1]["gain"] == 0.0 and kept[3] == 1.0
  # With `null_shapes` and `null_means` every polished table is read, and kept, sized.
  sized, _, _, _ = _fake_polish(wd, crossing, sized=True)
  table, polish, _, _ = sized._polish(names, plain, reading, None, None, 0.95, 1.0)
  assert polish["gain"] > 0
  np.testing.assert_allclose(table, sized.null_sized(plain + polish["gain"] * move, names),
                             atol=1e-5)


def test_the_polish_leaves_out_an_attribute_read_below_chance(fresh_workdir):
  # A polish only takes class information away: occupation, read at -0.03,
  # would go further below; gender, above, is polished alone.
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age", "occupation"]
  u, plain, _, polished = _fake_polish(wd, lambda gain: [0.05 * (1 - gain / 0.4), 0.0, -0.03])
  table, polish, after, _ = u._polish(names, plain, u._read(plain, names), None, None,
                                      0.95, 1.0)
  assert polished == [["gender"]] and polish["attributes"] == ["gender"]
  # Occupation's -0.03 stays the worst reading; any gain taking gender within it ranks first.
  assert polish["gain"] > 0 and abs(after.worst_signed()[0]) <= 0.03
  np.testing.assert_allclose(after.worst_signed()[1:], [0.0, -0.03])
  # Read below chance alone, nothing is polished.
  u, plain, _, polished = _fake_polish(wd, lambda gain: [-0.03, -0.03, -0.03])
  kept = u._polish(names, plain, u._read(plain, names), None, None, 0.95, 1.0)
  assert kept[0] is plain and kept[1] is None and polished == []


def test_the_polish_reads_its_own_probes_on_the_table_as_it_will_be_kept(fresh_workdir):
  from lego_jax.unlearning import control
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age"]
  rng = np.random.default_rng(0)
  plain = rng.normal(size=(wd.split.n_users, 8)).astype(np.float32)
  move = rng.normal(size=plain.shape).astype(np.float32)
  seen, polished = [], []

  def fake_read(table, names, probes=None, seeds=None):
    # The steering probes read chance; the neighbour vote reads age, gone at
    # half the move.
    probes = tuple(probes or ("linear", "mlp"))
    seen.append((probes, np.array(table, copy=True)))
    gain = np.linalg.norm(table - plain) / np.linalg.norm(move)
    signed = np.asarray([[0.0, 0.04 * (1 - gain / 0.5) if p == "knn" else 0.0]
                         for p in probes])
    return control.Reading(signed, signed - 0.01, signed + 0.01, probes)

  def fake_move(table, which, seed=None):
    polished.append(which)
    return move
  u = Unlearner(wd, progress=False)
  u._read, u.polish_move, u.retention = fake_read, fake_move, lambda t: 0.99
  steering = fake_read(plain, names)
  assert steering.worst().max() == 0.0
  table, polish, after, ret = u._polish(names, plain, steering, None, None, 0.95, 1.0)
  assert polished == [["age"]] and polish["attributes"] == ["age"]
  # (The fake measures the move on the sized table, which sizing shifts a little.)
  np.testing.assert_allclose(polish["gain"], 0.5, atol=0.02)
  # Read with the neighbour vote, on the sized table before the polish too.
  assert all(p == ("linear", "mlp", "knn") for p, _ in seen[1:])
  np.testing.assert_allclose(seen[1][1], u.null_sized(plain, names), atol=1e-6)
  np.testing.assert_allclose(table, u.null_sized(plain + polish["gain"] * move, names),
                             atol=1e-5)
  assert after.probes == ("linear", "mlp")             # what the loop's other steps compare
  # With the steering probes only, nothing reads above the target: no polish.
  only = Unlearner(wd, progress=False, config={
      **wd.config, "unlearn": {**wd.config["unlearn"], "polish_probes": []}})
  only._read, only.polish_move = fake_read, fake_move
  kept = only._polish(names, plain, steering, None, None, 0.95, 1.0)
  assert kept[0] is plain and kept[1] is None and kept[2] is steering and len(polished) == 1


def test_a_refused_lighter_table_is_kept_where_the_searched_one_reads_further(fresh_workdir):
  from lego_jax.unlearning import control
  wd = Workdir.open(fresh_workdir)
  names = ["gender"]
  config = {**wd.config, "unlearn": {**wd.config["unlearn"], "null_means": False,
                                     "null_shapes": False, "null_covariances": False}}
  reading = lambda x: control.Reading(np.full((2, 1), x), np.full((2, 1), x - 0.01),
                                      np.full((2, 1), x + 0.01), ("linear", "mlp"))
  light, searched = np.ones((wd.split.n_users, 4)), np.zeros((wd.split.n_users, 4))
  for light_reads, searched_reads, light_ret, searched_ret, kept in [
      (0.021, 0.041, 0.97, 0.97, light), (0.041, 0.021, 0.97, 0.97, searched),
      (0.021, 0.041, 0.90, 0.97, searched), (0.041, 0.021, 0.97, 0.90, light)]:
    u = Unlearner(wd, progress=False, config=config)
    u._lighter_means = lambda *a, **k: Lighter(np.array([[0.75, 1.0]]), Finished(
        light, np.zeros(1), None, reading(light_reads), light_ret), False)
    u._solve = lambda read, active, independent: (
        np.ones((1, 2)), [control.Step(np.ones((1, 2)), reading(searched_reads))])
    u._finish = lambda *a, **k: Finished(searched, np.zeros(1), None,
                                         reading(searched_reads), searched_ret)
    u.retention = lambda t: light_ret if t is light else searched_ret
    u._read = lambda t, *a, **k: reading(light_reads if t is light else searched_reads)
    table, meta = u._control_combination(names, lambda g: searched)
    assert table is kept
    assert meta["gains"]["gender"] == ([0.75, 1.0] if kept is light else [1.0, 1.0])


def test_lighter_means_finish_the_table_at_a_share_of_the_class_mean_parts(fresh_workdir):
  from lego_jax.unlearning import control
  wd = Workdir.open(fresh_workdir)
  names = ["gender", "age"]
  rng = np.random.default_rng(0)
  mean, rest, move = (rng.normal(size=(wd.split.n_users, 8)).astype(np.float32)
                      for _ in range(3))
  table_at = lambda g: float(g[0, 0]) * mean + float(g[0, 1]) * rest
  light = table_at(np.asarray([[0.5, 1.0]]))

  def fake_read(table, names, probes=None, seeds=None):   # at the light table: chance at 0.3
    probes = tuple(probes or ("linear", "mlp"))
    gain = np.linalg.norm(table - light) / np.linalg.norm(move)
    signed = np.tile([0.04 * (1 - gain / 0.3), 0.02 * (1 - gain / 0.3)], (len(probes), 1))
    return control.Reading(signed, signed - 0.01, signed + 0.01, probes)
  config = {**wd.config, "unlearn": {**wd.config["unlearn"], "mean_share": 0.5,
                                     "residual_means": False, "null_means": False,
                                     "null_shapes": False, "null_covariances": False}}
  u = Unlearner(wd, progress=False, config=config)
  u._read, u.polish_move, u.retention = fake_read, lambda t, w, s=None: move, lambda t: 0.99
  gains, (table, shares, polish, after, ret), accepted = u._lighter_means(
      names, table_at, None, None, 0.95)
  assert accepted
  np.testing.assert_array_equal(gains, [[0.5, 1.0], [0.5, 1.0]])
  assert polish["attributes"] == names and not shares.any()
  np.testing.assert_allclose(polish["gain"], 0.3, atol=1e-4)
  np.testing.assert_allclose(table, light + polish["gain"] * move, atol=1e-5)
  assert ret == 0.99 and after.worst().max() < 1e-3
  # Under the floor, or with a polish that cannot bring the probes within
  # twice the target, the loop searches the gains as before.
  u.retention = lambda t: 0.9
  assert not u._lighter_means(names, table_at, None, None, 0.95).accepted
  u.retention, u.polish_move = lambda t: 0.99, lambda t, w, s=None: 1e-3 * move
  assert not u._lighter_means(names, table_at, None, None, 0.95).accepted
  off = Unlearner(wd, progress=False,
                  config={**wd.config, "unlearn": {**wd.config["unlearn"], "mean_share": 1.0}})
  assert off._lighter_means(names, table_at, None, None, 0.95) is None
