"""The paper's formulation (docs/method.md, "The paper variant"): the vCLUB
bound, the ball around E0, vCLUB combination and the paper presets."""

import dataclasses
import pathlib
import tomllib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lego_jax import config as config_lib
from lego_jax import sweep
from lego_jax.errors import LegoError
from lego_jax.requests import IN_PROGRESS, Unlearner, attribute_key
from lego_jax.unlearning import calibration, combination, losses
from lego_jax.workdir import Workdir

from tests.conftest import TINY
from tests.test_unlearning import problem

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
PAIRS = [f"{d}_{m}" for d in ("ml1m", "ml100k") for m in ("mf", "ncf", "lightgcn")]
VCLUB = calibration.Spec(num_classes=3, steps=8, batch_users=48, loss="vclub", vclub_hidden=16,
                         projection="ball", epsilon=0.3)


def hparams(k, lam_rank=0.0, l2=0.0, lr=0.05):
  return calibration.HParams(*(jnp.full((k,), v, jnp.float32) for v in (1.0, lam_rank, l2, lr)))


# ---- the bound ----------------------------------------------------------------
def test_vclub_matches_the_pairwise_formula():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(30, 4)).astype(np.float32)
  y = rng.integers(0, 3, 30)
  y[:5] = -1
  logq = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  valid = np.flatnonzero(y >= 0)
  # (1/B) sum_i [log q(y_i|e_i) - (1/B) sum_j log q(y_j|e_i)] over the labelled rows
  want = np.mean([logq[i, y[i]] - np.mean([logq[i, y[j]] for j in valid]) for i in valid])
  got = losses.vclub(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(y >= 0, jnp.float32))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _fitted_bound(e, e0, y, steps=100):
  """The bound on held-out rows under a classifier fitted on the other half."""
  heads = calibration.init_classifiers(jax.random.PRNGKey(0), e.shape[1], 3, 32, 1)
  opt = optax.adam(1e-2).init(heads)
  z = calibration.classifier_input(e, e0)
  half = e.shape[0] // 2
  step = jax.jit(lambda h, o: calibration.classifier_step(h, o, z[:half], y[None, :half], 1e-2))
  for _ in range(steps):
    heads, opt = step(heads, opt)
  return float(calibration.vclub_bounds(heads, z[half:], y[None, half:])[0])


def test_vclub_is_near_zero_for_independent_labels_and_large_for_written_ones():
  rng = np.random.default_rng(1)
  e0 = jnp.asarray(rng.normal(size=(2000, 8)), jnp.float32)
  y = jnp.asarray(rng.integers(0, 3, 2000))
  assert abs(_fitted_bound(e0, e0, y)) < 0.1
  written = e0.at[:, 0].add(3.0 * y)
  assert _fitted_bound(written, e0, y) > 1.0   # log 3 = 1.1 is what a perfect q reads at least


# ---- the ball -----------------------------------------------------------------
class BallTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_never_outside_and_identity_inside(self):
    rng = np.random.default_rng(2)
    delta = jnp.asarray(rng.normal(size=(50, 6)) * rng.uniform(0.01, 3, (50, 1)), jnp.float32)
    project = self.variant(calibration.project_ball, static_argnames="ball")
    r = 1.0
    rows = project(delta, r, ball="row")
    norms = np.linalg.norm(np.asarray(delta), axis=1)
    assert np.all(np.linalg.norm(np.asarray(rows), axis=1) <= r * (1 + 1e-6))
    inside = norms <= r
    assert inside.any() and (~inside).any()
    np.testing.assert_array_equal(np.asarray(rows)[inside], np.asarray(delta)[inside])
    # outside: on the sphere, same direction
    np.testing.assert_allclose(np.linalg.norm(np.asarray(rows)[~inside], axis=1), r, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rows)[~inside] * norms[~inside, None],
                               np.asarray(delta)[~inside], rtol=1e-4, atol=1e-6)
    total = float(jnp.linalg.norm(delta))
    table = project(delta, total / 2, ball="table")
    np.testing.assert_allclose(float(jnp.linalg.norm(table)), total / 2, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(table), np.asarray(delta) / 2, rtol=1e-5)
    chex.assert_trees_all_equal(project(delta, total * 2, ball="table"), delta)


def test_radius_is_relative_to_the_spread():
  e0 = jnp.asarray(np.random.default_rng(3).normal(size=(40, 4)), jnp.float32)
  row = calibration.Spec(num_classes=2, epsilon=0.5, ball="row")
  table = calibration.Spec(num_classes=2, epsilon=0.5, ball="table")
  s = float(calibration.spread(e0))
  np.testing.assert_allclose(calibration.radius(e0, row), 0.5 * s * 2.0, rtol=1e-6)
  np.testing.assert_allclose(calibration.radius(3 * e0, row), 3 * 0.5 * s * 2.0, rtol=1e-5)
  np.testing.assert_allclose(calibration.radius(e0, table), 0.5 * s * np.sqrt(160), rtol=1e-6)


@pytest.mark.parametrize("loss,ball", [
    pytest.param("vclub", "row", marks=pytest.mark.slow),
    pytest.param("mmd", "table", marks=pytest.mark.slow),
    pytest.param("mmd", "row", marks=pytest.mark.slow),
    pytest.param("vclub", "table", marks=pytest.mark.slow)])
def test_calibration_stays_in_the_ball(loss, ball):
  target, labels, score = problem()
  spec = calibration.Spec(num_classes=3, steps=6, batch_users=48, loss=loss, vclub_hidden=16,
                          projection="ball", epsilon=0.05, ball=ball)
  keys = jnp.stack([attribute_key(0, "a"), attribute_key(0, "b")])
  bricks, _, _ = calibration.calibrate(target, labels, hparams(2, lr=0.2), keys, spec=spec,
                                       score_fn=score)
  r = float(calibration.radius(target.e0, spec))
  norms = (np.linalg.norm(np.asarray(bricks), axis=-1) if ball == "row"
           else np.linalg.norm(np.asarray(bricks).reshape(2, -1), axis=-1))
  assert norms.max() <= r * (1 + 1e-5)
  assert norms.max() >= 0.99 * r   # lr 0.2 spreads per step reaches the boundary: it bound


def test_ball_needs_a_free_table_and_a_positive_radius():
  with pytest.raises(LegoError, match="calibrator"):
    calibration.Spec(num_classes=2, projection="ball", calibrator="residual")
  with pytest.raises(LegoError, match="projection"):
    calibration.Spec(num_classes=2, projection="sphere")
  with pytest.raises(LegoError, match="unlearn.epsilon"):
    config_lib.resolve(None, ["unlearn.epsilon=0"])
  with pytest.raises(LegoError, match="unlearn.ball"):
    config_lib.resolve(None, ["unlearn.ball=cube"])


# ---- vCLUB calibration --------------------------------------------------------
@pytest.mark.slow
def test_vclub_calibration_lowers_what_a_fresh_classifier_reads():
  # At a moderate step. At lr 0.05 with no ball the same run overshoots: the
  # table learns to fool its own classifier, and a fresh one reads more than
  # before (1.96 against 1.18): the ball is what holds vCLUB (docs/method.md).
  target, labels, score = problem(n=400)
  spec = calibration.Spec(num_classes=3, steps=60, batch_users=200, loss="vclub",
                          vclub_hidden=16)
  keys = attribute_key(0, "a")[None]
  bricks, state, trace = calibration.calibrate(target, labels[:1], hparams(1, lr=0.02), keys,
                                               spec=spec, score_fn=score)
  y = jnp.asarray(labels[0])
  before = _fitted_bound(target.e0, target.e0, y, steps=200)
  after = _fitted_bound(target.e0 + bricks[0], target.e0, y, steps=200)
  assert before > 0.5 and after < 0.75 * before, (before, after)
  chex.assert_shape(trace.mi, (1, 60, 1))
  # the classifier is part of the state, stacked per table and attribute
  chex.assert_shape(state.adv["w1"], (1, 1, target.e0.shape[1], 16))


@pytest.mark.slow
def test_vclub_serves_several_attributes_in_one_table():
  target, labels, score = problem()
  keys = attribute_key(0, "joint")[None]
  bricks, state, trace = calibration.calibrate(target, labels[None], hparams(1), keys,
                                               spec=VCLUB, score_fn=score)
  chex.assert_shape(state.adv["w1"], (1, 2, target.e0.shape[1], 16))
  chex.assert_shape(trace.mi, (1, 8, 2))
  assert float(jnp.abs(bricks).max()) > 0


@pytest.mark.slow
class VclubJitTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_equals_no_jit(self):
    target, labels, score = problem()
    hp = jax.tree.map(lambda x: x[0], hparams(1))
    run = self.variant(lambda t, y, hp, k: calibration.calibrate_one(t, y, hp, k, spec=VCLUB,
                                                                     score_fn=score)[0])
    got = run(target, jnp.asarray(labels[1]), hp, attribute_key(0, "b"))
    want = calibration.jit_calibrate_one(target, jnp.asarray(labels[1]), hp, attribute_key(0, "b"),
                                         spec=VCLUB, score_fn=score)[0]
    chex.assert_trees_all_close(got, want, atol=1e-5)


def test_interrupted_vclub_calibration_resumes_exactly():
  target, labels, score = problem()
  keys = jnp.stack([attribute_key(0, "a"), attribute_key(0, "b")])
  chunked = calibration.Spec(**{**VCLUB.__dict__, "chunk": 3})
  want, want_state, _ = calibration.calibrate(target, labels, hparams(2), keys, spec=chunked,
                                              score_fn=score)
  saved = []

  def interrupt(state):
    saved.append(state)
    raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    calibration.calibrate(target, labels, hparams(2), keys, spec=chunked, score_fn=score,
                          on_chunk=interrupt)
  # through the checkpoint's flat form, as requests.py stores it
  from lego_jax import checkpoint
  template = calibration.init_states(keys, target.e0, hparams(2).lr, spec=chunked)
  restored = checkpoint.unflatten(template, checkpoint.flatten(saved[0]))
  got, state, _ = calibration.calibrate(target, labels, hparams(2), keys, spec=chunked,
                                        score_fn=score, state=restored)
  chex.assert_trees_all_close(got, want, atol=1e-6)
  chex.assert_trees_all_close(state.adv, want_state.adv, atol=1e-6)


# ---- combination --------------------------------------------------------------
@pytest.mark.slow
def test_convex_vclub_combination_trains_its_own_classifiers():
  target, labels, score = problem()
  # bricks in the ball, as calibration leaves them (any will do for the weights)
  r = float(calibration.radius(target.e0, VCLUB))
  bricks = jax.vmap(lambda d: calibration.project_ball(d, r))(
      jax.random.normal(jax.random.PRNGKey(1), (2,) + target.e0.shape))
  spec = combination.Spec(num_classes=3, mode="convex", steps=10, batch_users=60, mi=VCLUB)
  hp = combination.HParams(w_mi=1.0, lam_rank=0.0, lr=0.1)
  w, table, trace = combination.fit(target, bricks, jnp.asarray(labels), jnp.ones(2),
                                    jax.random.PRNGKey(0), hp, spec=spec, score_fn=score)
  coef = combination.coefficients(w, jnp.ones(2), "convex")
  np.testing.assert_allclose(float(coef.sum()), 1.0, rtol=1e-6)
  assert float(jnp.abs(w[0] - w[1]).max()) > 0   # the weights moved off equal
  chex.assert_shape(trace["mi"], (10, 2))
  # a convex combination of tables in the row ball is in it
  assert np.linalg.norm(np.asarray(table - target.e0), axis=-1).max() <= r * (1 + 1e-5)


def test_combination_keeps_vclub_and_replaces_adversarial():
  cfg = config_lib.resolve(None, ["unlearn.loss=vclub"])
  spec = combination.Spec.from_config(cfg["combine"], cfg["unlearn"], 3)
  assert spec.mi.loss == "vclub"
  cfg = config_lib.resolve(None, ["unlearn.loss=adversarial"])
  assert combination.Spec.from_config(cfg["combine"], cfg["unlearn"], 3).mi.loss == "mmd"


# ---- the presets --------------------------------------------------------------
@pytest.mark.parametrize("pair", PAIRS)
def test_paper_preset_is_its_pair_with_the_paper_method(pair):
  base = config_lib.resolve(pair)
  paper = config_lib.resolve(f"{pair}_paper")
  for section in ("seed", "data", "model", "train", "eval", "attack"):
    assert paper[section] == base[section], section
  u, c = paper["unlearn"], paper["combine"]
  assert (u["loss"], u["lam_rank"], u["l2"], u["projection"], u["control"]) == (
      "vclub", 0.0, 0.0, "ball", "none")
  assert (c["mode"], c["lam_rank"]) == ("convex", 0.0)
  text = (CONFIGS / f"{pair}_paper.toml").read_text()
  assert tomllib.loads(text)   # plain TOML


@pytest.mark.slow
def test_paper_settings_end_to_end(tmp_path):
  preset = tomllib.loads((CONFIGS / "ml100k_mf_paper.toml").read_text())
  over = [f"{s}.{k}={config_lib.literal(v)}" for s in ("unlearn", "combine")
          for k, v in preset[s].items()]
  cfg = config_lib.resolve(None, TINY + over + ["unlearn.steps=12", "combine.steps=6"])
  wd = Workdir.create(tmp_path / "run", cfg)
  wd.train(progress=False)
  u = Unlearner(wd, progress=False)
  table = u.unlearn(["gender", "age"])
  e0 = u.table("original")
  spec = u.spec()
  r = float(calibration.radius(jnp.asarray(e0), spec))
  for name in ("gender", "age"):
    brick = u.table(f"brick:{name}") - e0
    assert 0 < np.linalg.norm(brick, axis=-1).max() <= r * (1 + 1e-5)
  assert np.linalg.norm(table - e0, axis=-1).max() <= r * (1 + 1e-5)
  assert u.status()["active"] == ["gender", "age"]
  assert not (wd.path / "bricks" / IN_PROGRESS).exists()
  result = wd.evaluate(table)
  assert result["ndcg@10"] > 0


@pytest.mark.slow
def test_interrupted_vclub_calibration_resumes_from_its_checkpoint(fresh_workdir):
  # Through the workdir: the in-progress checkpoint holds the classifiers too.
  import shutil
  from lego_jax import checkpoint
  over = ["unlearn.loss=vclub", "unlearn.projection=ball", "unlearn.epsilon=0.2",
          "unlearn.control=none", "unlearn.vclub_hidden=8"]
  other = fresh_workdir.parent / "other"
  shutil.copytree(fresh_workdir, other)
  want = Unlearner(Workdir.open(fresh_workdir, over), progress=False)
  want.calibrate(["gender"])
  u = Unlearner(Workdir.open(other, over), progress=False)
  real_save = checkpoint.save

  def save_then_interrupt(directory, tree, meta):
    real_save(directory, tree, meta)
    raise KeyboardInterrupt

  checkpoint.save = save_then_interrupt
  try:
    with pytest.raises(KeyboardInterrupt):
      u.calibrate(["gender"])
  finally:
    checkpoint.save = real_save
  tree, _ = checkpoint.restore(other / "bricks" / IN_PROGRESS)
  template = calibration.init_states(attribute_key(0, "gender")[None], u.target().e0,
                                     jnp.ones(1), spec=u.spec())
  assert jax.tree.leaves(template.adv) and len(tree) == len(jax.tree.leaves(template))
  Unlearner(Workdir.open(other, over), progress=False).calibrate(["gender"])
  np.testing.assert_allclose(Unlearner(Workdir.open(other), progress=False).table("brick:gender"),
                             want.table("brick:gender"), atol=1e-6)


# ---- no ranking hinge -----------------------------------------------------------
def test_a_zero_ranking_weight_leaves_the_hinge_out_of_the_program():
  def spec(*overrides):
    cfg = config_lib.resolve(None, list(overrides))
    return (calibration.Spec.from_config(cfg["unlearn"], 3).rank,
            combination.Spec.from_config(cfg["combine"], cfg["unlearn"], 3).rank)

  assert spec() == (True, True)
  assert spec("unlearn.lam_rank=0", "combine.lam_rank=0") == (False, False)
  assert spec("unlearn.lam_rank=0", "unlearn.per_attribute.age.lam_rank=2") == (True, True)
  # A sweep compiles one program for all its points: one weighing the hinge keeps it in.
  base = config_lib.resolve(None, ["unlearn.lam_rank=0", "combine.lam_rank=0"])
  points = [{"unlearn.lam_rank": 0.0}, {"unlearn.lam_rank": 5.0}]
  cfg = sweep.compiled_config(base, points, ["unlearn.lam_rank"])
  assert calibration.Spec.from_config(cfg["unlearn"], 3).rank
  assert not combination.Spec.from_config(cfg["combine"], cfg["unlearn"], 3).rank


def test_without_the_hinge_the_backbone_is_never_scored_and_nothing_else_changes():
  target, labels, score = problem(n=60)
  hp = jax.tree.map(lambda x: x[0], hparams(1, l2=0.1))

  def unused(*_):
    raise AssertionError("the backbone was scored")

  key = attribute_key(0, "a")
  y = jnp.asarray(labels[0])
  spec = calibration.Spec(num_classes=3, steps=4, batch_users=32)
  with_hinge = calibration.calibrate_one(target, y, hp, key, spec=spec, score_fn=score)[0]
  without = calibration.calibrate_one(target, y, hp, key,
                                      spec=dataclasses.replace(spec, rank=False),
                                      score_fn=unused)[0]
  chex.assert_trees_all_close(without, with_hinge, atol=1e-6)
  bricks = jnp.stack([with_hinge, -with_hinge])
  chp = combination.HParams(w_mi=1.0, lam_rank=0.0, lr=0.1)
  cspec = combination.Spec(num_classes=3, steps=3, batch_users=32)
  fit = lambda s, fn: combination.fit(target, bricks, jnp.asarray(labels), jnp.ones(2),
                                      jax.random.PRNGKey(0), chp, spec=s, score_fn=fn)[0]
  chex.assert_trees_all_close(fit(dataclasses.replace(cspec, rank=False), unused),
                              fit(cspec, score), atol=1e-6)
