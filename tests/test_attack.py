"""Attackers and leakage metrics: hand-computed metrics, noise, signal, vmap."""

import functools
import math
import os
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax import experiment
from lego_jax.errors import LegoError
from lego_jax.evaluation import classification_metrics as cm

from lego_jax.evaluation import attackers as attack_lib  # noqa: E402
from lego_jax.workdir import Workdir
from tests.conftest import tiny_config

FAST = {"steps": 20}


def _data(n=600, dim=8, classes=(2, 4, 7), shift=0.0, seed=0):
  """Gaussian embeddings and uniform random labels; with shift > 0 every
  class also moves the mean (a planted signal). The labels depend only on
  (n, classes, seed), so the noise and signal versions share padded shapes
  and hence one compiled attacker."""
  rng = np.random.default_rng(seed)
  y = np.stack([rng.integers(0, c, n) for c in classes])
  x = rng.normal(size=(n, dim))
  for k, c in enumerate(classes):
    x = x + rng.normal(size=(c, dim))[y[k]] * shift * 2 / math.sqrt(dim)
  return x.astype(np.float32), y, list(classes)


# ---------------------------------------------------------------- metrics


def test_balanced_accuracy_and_macro_f1_by_hand():
  y_true = [0, 0, 0, 1]
  y_pred = [0, 0, 1, 1]
  # recalls 2/3 and 1; F1 class 0 = 4/5, class 1 = 2/3.
  assert cm.balanced_accuracy(y_true, y_pred) == pytest.approx((2 / 3 + 1) / 2)
  assert cm.macro_f1(y_true, y_pred) == pytest.approx((0.8 + 2 / 3) / 2)
  # A class predicted but absent from y_true counts in F1 (as sklearn), not BAcc.
  assert cm.balanced_accuracy([0, 0], [0, 2]) == pytest.approx(0.5)
  assert cm.macro_f1([0, 0], [0, 2]) == pytest.approx((2 / 3 + 0) / 2)


def test_rankdata_and_auc_with_ties():
  np.testing.assert_allclose(cm.rankdata([3, 1, 3, 2]), [3.5, 1, 3.5, 2])
  # pairs (pos, neg): (.8,.5)=1 (.8,.2)=1 (.5,.5)=1/2 (.5,.2)=1 -> 3.5 / 4
  assert cm.binary_auc([1, 1, 0, 0], [0.8, 0.5, 0.5, 0.2]) == pytest.approx(0.875)
  assert cm.binary_auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
  assert math.isnan(cm.binary_auc([1, 1], [0.1, 0.2]))


def test_macro_auc_ovr_matches_pairwise_count():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 60)
  p = rng.integers(0, 4, (60, 3)) / 4.0  # coarse scores: many ties

  def brute(pos, score):
    s_pos, s_neg = score[pos], score[~pos]
    wins = (s_pos[:, None] > s_neg[None]).sum() + 0.5 * (s_pos[:, None] == s_neg[None]).sum()
    return wins / (s_pos.size * s_neg.size)

  expected = np.mean([brute(y == c, p[:, c]) for c in range(3)])
  assert cm.macro_auc_ovr(y, p) == pytest.approx(expected)


def test_leakage_is_two_sided_and_ci95():
  assert cm.leakage(0.30, 2) == pytest.approx(0.20)  # below chance leaks too
  assert cm.leakage(0.70, 2) == pytest.approx(0.20)
  assert cm.leakage(0.25, 4) == pytest.approx(0.0)
  lo, hi = cm.ci95([0.5, 0.6, 0.7])
  half = 4.303 * 0.1 / math.sqrt(3)
  assert (lo, hi) == pytest.approx((0.6 - half, 0.6 + half))
  assert cm.ci95([0.4]) == [0.4, 0.4]
  assert cm.t975(4) == pytest.approx(2.776) and cm.t975(500) == pytest.approx(1.96)


# ---------------------------------------------------------------- balancing and splits


def test_balance_drops_missing_and_equalises_classes():
  codes = np.array([0] * 10 + [1] * 4 + [-1] * 5 + [2] * 6)
  idx = attack_lib.balance(codes, np.random.default_rng(0))
  assert np.all(codes[idx] >= 0)
  np.testing.assert_array_equal(np.bincount(codes[idx]), [4, 4, 4])
  np.testing.assert_array_equal(idx, np.sort(idx))


def test_max_users_samples_an_equal_share_per_class():
  codes = np.array([0] * 10 + [1] * 40 + [-1] * 5 + [2] * 30)
  idx = attack_lib.balance(codes, np.random.default_rng(0), max_users=20)
  np.testing.assert_array_equal(np.bincount(codes[idx]), [6, 6, 6])
  # A cap above the balanced size, or 0, changes nothing.
  for cap in (0, 30, 1000):
    np.testing.assert_array_equal(attack_lib.balance(codes, np.random.default_rng(0), cap),
                                  attack_lib.balance(codes, np.random.default_rng(0)))


def test_the_sampled_protocol_attacks_at_most_max_users_and_still_finds_the_signal():
  x, y, classes = _data(n=900, shift=1.0)
  out = attack_lib.attack(x, y, classes, attacker="linear", config={"steps": 100, "max_users": 140},
                          names=["a", "b", "c"])
  for name, c in zip("abc", classes):
    assert out[name]["n"] == (140 // c) * c, out[name]
    assert out[name]["bacc"] > out[name]["chance"] + 0.2, out[name]


def test_stratified_kfold_partitions_and_stratifies():
  y = np.repeat([0, 1, 2], [11, 11, 11])
  splits = attack_lib.stratified_kfold(y, 5, np.random.default_rng(0))
  tests = np.concatenate([te for _, te in splits])
  np.testing.assert_array_equal(np.sort(tests), np.arange(y.size))
  for tr, te in splits:
    assert np.intersect1d(tr, te).size == 0 and tr.size + te.size == y.size
    counts = np.bincount(y[te], minlength=3)
    assert counts.min() >= 2 and counts.max() <= 3


def test_paper_splits_train_fraction():
  y = np.repeat([0, 1], [50, 50])
  splits = attack_lib.stratified_splits(y, 4, 0.2, np.random.default_rng(0))
  assert len(splits) == 4
  for tr, te in splits:
    np.testing.assert_array_equal(np.bincount(y[tr]), [10, 10])
    assert te.size == 80


# ---------------------------------------------------------------- the attackers


def _assert_padding_ignored(fn, validation: bool, atol: float):
  """`fn` (a per-task predict function) gives the padded class nothing, and
  padding rows, wherever they point and whatever their label, change nothing."""
  x, y, _ = _data(n=200, dim=4, classes=(3,), shift=1.0)
  # Rows 0..139 fitted (120..139 validation where asked), 140..149 padding (weights 0).
  fitted = 120 if validation else 140
  task = attack_lib.Tasks(
      train_idx=jnp.arange(150), train_y=jnp.asarray(y[0, :150]),
      train_w=(jnp.arange(150) < fitted) * 1.0,
      val_w=((jnp.arange(150) >= fitted) & (jnp.arange(150) < 140)) * 1.0,
      test_idx=jnp.arange(150, 200), test_y=jnp.asarray(y[0, 150:]), test_w=jnp.ones(50),
      class_mask=jnp.array([True, True, True, False]), fold=0, attr=0)
  rest = (jax.random.PRNGKey(0), attack_lib.Settings(1e-4, 1e-2, 20))
  probs = fn(jnp.asarray(x), task, *rest)
  chex.assert_shape(probs, (50, 4))
  np.testing.assert_allclose(np.asarray(probs).sum(1), 1.0, rtol=1e-5)
  assert float(jnp.max(probs[:, 3])) == 0.0  # the padded class gets nothing
  padded = task._replace(train_idx=task.train_idx.at[140:].set(jnp.arange(160, 170)),
                         train_y=task.train_y.at[140:].set(2))
  chex.assert_trees_all_close(fn(jnp.asarray(x), padded, *rest), probs, atol=atol)


@pytest.mark.slow
def test_train_and_predict_ignores_padding():
  fn = jax.jit(functools.partial(attack_lib.train_and_predict, attacker="mlp", hidden=8))
  _assert_padding_ignored(fn, validation=True, atol=1e-6)


class TestQuadraticPadding(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_quadratic_ignores_padding_rows_and_classes(self):
    _assert_padding_ignored(self.variant(attack_lib.quadratic_predict), validation=False,
                            atol=1e-5)


@pytest.mark.parametrize("attacker", [pytest.param("mlp", marks=pytest.mark.slow), "linear", "knn",
                                      "quadratic"])
def test_gaussian_noise_leaks_nothing(attacker):
  x, y, classes = _data(n=2000, dim=16)
  out = attack_lib.attack(x, y, classes, attacker=attacker, seed=0)
  assert list(out) == ["attr0", "attr1", "attr2"]
  for name, r in out.items():
    assert r["leakage"] < 0.03, (name, r)
    assert r["chance"] == pytest.approx(1 / classes[int(name[-1])])
    assert abs(r["auc"] - 0.5) < 0.03, (name, r)
    assert r["folds"] == 5 and r["ci95"][0] <= r["bacc"] <= r["ci95"][1]
    assert all(isinstance(v, float) for k, v in r.items() if k not in ("n", "folds", "ci95"))


@pytest.mark.parametrize("attacker", ["mlp", "linear", "knn", "quadratic"])
def test_planted_signal_is_found(attacker):
  x, y, classes = _data(shift=1.0)
  out = attack_lib.attack(x, y, classes, attacker=attacker, config={"steps": 100},
                          names=["a", "b", "c"])
  for name, r in out.items():
    assert r["bacc"] > r["chance"] + 0.2, (name, r)
    assert r["auc"] > 0.7, (name, r)


def test_repeats_average_fold_splits_and_report_their_spread():
  x, y, classes = _data(n=600, dim=8, shift=0.3)
  one = [attack_lib.attack(x, y, classes, attacker="linear", seed=s) for s in (3, 4, 5)]
  pooled = attack_lib.attack(x, y, classes, attacker="linear", seed=3, repeats=3)
  for name, r in pooled.items():
    baccs = [o[name]["bacc"] for o in one]
    assert r["folds"] == 15 and "split_sd" not in one[0][name]
    assert r["bacc"] == pytest.approx(np.mean(baccs), abs=1e-9)
    assert r["split_sd"] == pytest.approx(np.std(baccs, ddof=1), abs=1e-9)
    assert r["leakage"] == pytest.approx(abs(r["bacc"] - r["chance"]), abs=1e-12)
  # Different seeds drew different folds: the spread is a measurement, not 0.
  assert max(r["split_sd"] for r in pooled.values()) > 0
  with pytest.raises(LegoError, match="repeats must be at least 1"):
    attack_lib.attack(x, y, classes, attacker="linear", repeats=0)


def test_the_main_job_averages_its_attacks_over_attack_repeats(tmp_path):
  config = tiny_config('run.methods=["leace"]', 'run.attackers=["linear"]', "attack.repeats=2")
  results = experiment.train_and_evaluate(config, tmp_path / "run", progress=False)
  wd = Workdir.open(tmp_path / "run")
  labels, classes = wd.labels(results["attributes"])
  two = attack_lib.attack(wd.backbone().table(), labels, classes, attacker="linear",
                          seed=config["seed"], config=config["attack"],
                          names=results["attributes"], repeats=2)
  for name, r in results["methods"]["original"]["attack"]["linear"].items():
    assert r["folds"] == 2 * config["attack"]["folds"] and "split_sd" in r
    assert r["bacc"] == pytest.approx(two[name]["bacc"], abs=1e-9)
  assert "mean over 2 fold splits" in (tmp_path / "run" / "report.md").read_text()


def test_knn_reads_local_structure_a_linear_probe_cannot():
  # Classes in interleaved small clusters: the class means are equal, but
  # every user's neighbours share its class.
  rng = np.random.default_rng(0)
  centres = rng.normal(size=(40, 8)) * 3.0
  which = rng.integers(0, 40, 2000)
  x = (centres[which] + 0.3 * rng.normal(size=(2000, 8))).astype(np.float32)
  y = (which % 2)[None].astype(np.int64)
  knn = attack_lib.attack(x, y, [2], attacker="knn")["attr0"]
  lin = attack_lib.attack(x, y, [2], attacker="linear")["attr0"]
  assert knn["bacc"] > 0.9 and lin["leakage"] < knn["leakage"] - 0.15
  # One compiled program for every task equals the per-task loop.
  looped = attack_lib.attack(x, y, [2], attacker="knn", vmap=False)["attr0"]
  assert looped["bacc"] == pytest.approx(knn["bacc"])


def test_quadratic_reads_second_moments_where_a_linear_probe_cannot():
  # Two coordinates correlated +0.8 in class 1 and -0.8 in class 0: equal
  # means and marginals, so only the classes' covariances tell them apart.
  rng = np.random.default_rng(0)
  y = rng.integers(0, 2, 2000)
  x = rng.normal(size=(2000, 6))
  x[:, 1] = 0.8 * np.where(y == 1, 1.0, -1.0) * x[:, 0] + 0.6 * x[:, 1]
  x = x.astype(np.float32)
  quad = attack_lib.attack(x, y[None], [2], attacker="quadratic")["attr0"]
  lin = attack_lib.attack(x, y[None], [2], attacker="linear")["attr0"]
  assert quad["bacc"] > 0.75 and lin["leakage"] < 0.04
  looped = attack_lib.attack(x, y[None], [2], attacker="quadratic", vmap=False)["attr0"]
  assert looped["bacc"] == pytest.approx(quad["bacc"], abs=1e-6)


def test_early_stopping_option_finds_signal():
  x, y, classes = _data(shift=1.0)
  out = attack_lib.attack(x, y, classes, attacker="linear",
                          config={"steps": 50, "val_frac": 0.2})
  for r in out.values():
    assert r["bacc"] > r["chance"] + 0.2, r


@pytest.mark.slow
def test_vmapped_equals_python_loop():
  x, y, classes = _data()
  vm, *_ = attack_lib.attack_probs(x, y, classes, config=FAST)
  loop, *_ = attack_lib.attack_probs(x, y, classes, config=FAST, vmap=False)
  tasks, probs = vm[0]
  start = 0
  for ltasks, lprobs in loop:  # the loop pads each attribute on its own
    t, nte, _ = lprobs.shape
    np.testing.assert_array_equal(tasks.test_idx[start:start + t, :nte], ltasks.test_idx)
    chex.assert_trees_all_close(probs[start:start + t, :nte], lprobs, atol=1e-3)
    start += t
  assert start == probs.shape[0] == 15
  a = attack_lib.attack(x, y, classes, config=FAST)
  b = attack_lib.attack_loop(x, y, classes, config=FAST)
  chex.assert_trees_all_close(a, b, atol=1e-3)


def test_attribute_result_does_not_depend_on_its_neighbours():
  x, y, classes = _data(shift=1.0)
  both = attack_lib.attack(x, y, classes, config=FAST, names=["a", "b", "c"])
  alone = attack_lib.attack(x, y[:1], classes[:1], config=FAST, names=["a"])
  chex.assert_trees_all_close(both["a"], alone["a"], atol=1e-3)


def test_seed_determinism():
  x, y, classes = _data()
  a = attack_lib.attack(x, y, classes, config=FAST, seed=3)
  b = attack_lib.attack(x, y, classes, config=FAST, seed=3)
  c = attack_lib.attack(x, y, classes, config=FAST, seed=4)
  assert a == b
  assert a != c


def test_missing_labels_are_excluded():
  x, y, classes = _data(classes=(2, 3), shift=1.0)
  y = y.copy()
  missing = np.arange(0, 600, 3)
  y[0, missing] = -1
  out = attack_lib.attack(x, y, classes, attacker="linear", config=FAST)
  m = np.bincount(y[0][y[0] >= 0]).min()
  assert out["attr0"]["n"] == 2 * m
  assert out["attr1"]["n"] == 3 * np.bincount(y[1]).min()
  # Users without a label play no part: scrambling their rows changes nothing.
  x2 = x.copy()
  x2[missing] = np.random.default_rng(9).normal(size=(missing.size, x.shape[1])) * 100
  out2 = attack_lib.attack(x2, y[:1], classes[:1], attacker="linear", config=FAST)
  chex.assert_trees_all_close(out2["attr0"], out["attr0"], atol=1e-6)


def test_paper_protocol():
  x, y, classes = _data(classes=(2,), shift=1.0)
  cfg = dict(FAST, paper_splits=4)
  out = attack_lib.attack(x, y, classes, attacker="linear", protocol="paper", config=cfg)
  assert out["attr0"]["folds"] == 4
  assert out["attr0"]["bacc"] > 0.6


def test_bad_input_raises_lego_error():
  x, y, classes = _data(n=100, dim=4, classes=(2,))
  with pytest.raises(LegoError, match="valid: knn, linear, mlp, quadratic"):
    attack_lib.attack(x, y, classes, attacker="svm")
  with pytest.raises(LegoError, match="valid: cv5, paper"):
    attack_lib.attack(x, y, classes, protocol="loo")
  with pytest.raises(LegoError, match="must lie in -1..0"):
    attack_lib.attack(x, y, [1])
  with pytest.raises(LegoError, match="unknown config field .attack.stepz."):
    attack_lib.attack(x, y, classes, config={"stepz": 3})
  tiny = np.full((1, 100), -1)
  tiny[0, :3] = [0, 1, 1]
  with pytest.raises(LegoError, match="attr0 needs at least 2 classes"):
    attack_lib.attack(x, tiny, classes)


# ---------------------------------------------------------------- real data


@pytest.mark.realdata
def test_ml100k_svd_embeddings_leak_gender():
  """64-d SVD embeddings of ML-100K's interactions leak gender (as MF does)."""
  root = os.environ.get("LEGO_DATA_DIR")
  if not root:
    pytest.skip("LEGO_DATA_DIR not set: the MovieLens folder (with ml-100k/) is needed")
  folder = pathlib.Path(root) / "ml-100k"
  if not (folder / "u.data").is_file():
    pytest.skip(f"{folder}/u.data not found")
  inter = np.loadtxt(folder / "u.data", dtype=np.int64)[:, :2] - 1
  users = [line.split("|") for line in (folder / "u.user").read_text().splitlines()]
  gender = np.array([u[2] == "M" for u in users], dtype=np.int64)
  m = np.zeros((len(users), inter[:, 1].max() + 1), dtype=np.float32)
  m[inter[:, 0], inter[:, 1]] = 1.0
  u, s, _ = np.linalg.svd(m, full_matrices=False)
  emb = u[:, :32] * np.sqrt(s[:32])
  out = attack_lib.attack(emb, gender[None], [2], attacker="linear", names=["gender"])
  assert out["gender"]["bacc"] > 0.58, out
  assert out["gender"]["n"] == 2 * 273
