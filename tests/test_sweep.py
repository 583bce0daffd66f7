"""Sweeps (lego_jax.sweep): a grid point of the vmapped program equals that setting run alone."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax import config as config_lib
from lego_jax.cli import main
from lego_jax.errors import LegoError
from lego_jax.requests import Unlearner, attribute_key
from lego_jax.sweep import VMAPPED, parse_grid
from lego_jax.unlearning import calibration, combination
from lego_jax.workdir import Workdir
from tests.test_unlearning import problem

# Two settings x two seeds of two attributes: the grid's eight bricks in one program.
SETTINGS = [calibration.HParams(1.0, 1.0, 0.1, 0.02), calibration.HParams(3.0, 0.5, 0.3, 0.05)]
SEEDS = (0, 7)


def grid_inputs(names=("a", "b")):
  """Flattened (setting, seed, attribute) hyper-parameters and keys, as the sweep lays them out."""
  points = [(hp, s) for hp in SETTINGS for s in SEEDS]
  hps = calibration.HParams(*(jnp.asarray([getattr(hp, f) for hp, _ in points for _ in names],
                                          jnp.float32) for f in calibration.HParams._fields))
  keys = jnp.stack([attribute_key(s, n) for _, s in points for n in names])
  return points, hps, keys


def _slow_but(fast, values):
  """`values` as parameters, all but `fast` in the slow tier (each compiles its own program)."""
  return [v if v == fast else pytest.param(v, marks=pytest.mark.slow) for v in values]


@pytest.mark.parametrize("loss", _slow_but("mmd", calibration.LOSSES))
def test_a_grid_point_of_the_vmapped_calibration_equals_that_setting_alone(loss):
  target, labels, score = problem()
  if loss == "adversarial":   # one attribute per table
    labels = labels[:1]
  names = ("a", "b")[:len(labels)]
  spec = calibration.Spec(num_classes=3, steps=6, batch_users=48, loss=loss)
  points, hps, keys = grid_inputs(names)
  k = len(names)
  grid, _, _ = calibration.calibrate(target, np.tile(labels, (len(points), 1)), hps, keys,
                                     spec=spec, score_fn=score)
  chex.assert_shape(grid, (len(points) * k,) + target.e0.shape)
  for g, (hp, seed) in enumerate(points):
    alone, _, _ = calibration.calibrate(
        target, labels, calibration.HParams(*(jnp.full((k,), v, jnp.float32) for v in hp)),
        jnp.stack([attribute_key(seed, n) for n in names]), spec=spec, score_fn=score)
    # float32: a batched program may sum in another order (jax 0.10: 2.2e-5 after 6 steps).
    chex.assert_trees_all_close(grid[g * k:(g + 1) * k], alone, atol=1e-4)
  # The points differ: the grid is not one setting repeated.
  assert not np.allclose(grid[:k], grid[-k:], atol=1e-3)


@pytest.mark.parametrize("loss", _slow_but("mmd", ["mmd", "vclub"]))
def test_a_grid_point_of_the_vmapped_combination_equals_that_fit_alone(loss):
  target, labels, score = problem()
  rng = np.random.default_rng(1)
  bricks = jnp.asarray(0.3 * rng.normal(size=(3, 2) + target.e0.shape), jnp.float32)
  hps = combination.HParams(jnp.asarray([1.0, 2.0, 0.5]), jnp.asarray([0.1, 0.3, 0.2]),
                            jnp.asarray([0.05, 0.02, 0.05]))
  keys = jnp.stack([jax.random.PRNGKey(s) for s in (0, 1, 2)])
  spec = combination.Spec(num_classes=3, mode="scalar", steps=5, batch_users=48,
                          mi=calibration.Spec(num_classes=3, loss=loss))
  w, tables, _ = combination.fit_grid(target, bricks, jnp.asarray(labels), jnp.ones(2), keys, hps,
                                      spec=spec, score_fn=score)
  chex.assert_shape(tables, (3,) + target.e0.shape)
  for g in range(3):
    hp = combination.HParams(*(float(x[g]) for x in hps))
    w1, t1, _ = combination.fit(target, bricks[g], jnp.asarray(labels), jnp.ones(2), keys[g], hp,
                                spec=spec, score_fn=score)
    chex.assert_trees_all_close((w[g], tables[g]), (w1, t1), atol=2e-5)


def test_grid_values_are_checked_like_overrides():
  config = config_lib.resolve(None)
  grid = parse_grid(["unlearn.w_mi=0.3,1,3", "unlearn.steps=10,20"], config)
  assert grid == {"unlearn.w_mi": [0.3, 1.0, 3.0], "unlearn.steps": [10, 20]}
  assert "unlearn.w_mi" in VMAPPED and "unlearn.steps" not in VMAPPED
  with pytest.raises(LegoError, match="unknown config field 'unlearn.w_my'.*unlearn.w_mi"):
    parse_grid(["unlearn.w_my=1"], config)
  with pytest.raises(LegoError, match="expects int"):
    parse_grid(["unlearn.steps=1.5"], config)
  with pytest.raises(LegoError, match="field=value"):
    parse_grid(["unlearn.w_mi"], config)
  with pytest.raises(LegoError, match="own workdir"):
    parse_grid(["model.dim=8,16"], config)
  with pytest.raises(LegoError, match="twice"):
    parse_grid(["unlearn.w_mi=1", "unlearn.w_mi=2"], config)


@pytest.mark.slow
def test_sweep_runs_the_grid_and_each_point_equals_that_run_alone(fresh_workdir, tmp_path, capsys):
  """The whole method, control loop included, through the command line."""
  out = tmp_path / "sweep"
  # Without the polish: its first Adam steps follow the sign of near-zero
  # gradients, so a 1e-6 difference in the combined table moves it by 1e-4
  # (its weights per point: the next test).
  assert main(["sweep", "--workdir", str(fresh_workdir), "--grid", "unlearn.w_mi=0.5,2",
               "--seeds", "2", "--attributes", "gender,age", "--out", str(out), "--json",
               "--set", "unlearn.polish_steps=0"]) == 0
  result = json.loads(capsys.readouterr().out)
  assert result == json.loads((out / "sweep.json").read_text())
  assert (out / "sweep.png").stat().st_size > 0 and "± " in (out / "sweep.md").read_text()
  assert result["vmapped"] == ["unlearn.w_mi"] and result["looped"] == []
  assert [s["setting"] for s in result["settings"]] == [{"unlearn.w_mi": 0.5}, {"unlearn.w_mi": 2.0}]
  for s in result["settings"]:
    for stat in [s["retention"], s["max_leakage"]] + [
        s["leakage"][a][n] for a in ("mlp", "linear") for n in ("gender", "age")]:
      assert stat["std"] >= 0 and stat["ci95"][0] <= stat["mean"] <= stat["ci95"][1]
  assert any(s["pareto"] for s in result["settings"])
  # The point (w_mi = 2, second seed) run alone, as `lego-jax unlearn` would with that config.
  i = next(i for i, r in enumerate(result["runs"])
           if r["setting"] == {"unlearn.w_mi": 2.0} and r["seed"] == result["seeds"][1])
  wd = Workdir.open(fresh_workdir)
  config = json.loads(json.dumps(wd.config))
  config["unlearn"]["w_mi"], config["seed"] = 2.0, result["seeds"][1]
  config["unlearn"]["polish_steps"] = 0
  u = Unlearner(wd, progress=False, config=config)
  alone = u.unlearn(["gender", "age"])
  np.testing.assert_allclose(np.load(out / "sweep_tables.npz")[f"run{i}"], alone, atol=2e-5)
  assert result["runs"][i]["strength"]["w_mi"] == [u.brick_meta()[n]["strength"]["w_mi"]
                                                   for n in ("gender", "age")]
  assert result["runs"][i]["combination_control"]["gains"] == u.status()["combination"]["gains"]
  assert not (fresh_workdir / "sweep.json").exists()   # --out, not the workdir


def test_each_point_of_a_sweep_is_polished_with_its_own_weights(fresh_workdir, tmp_path,
                                                                monkeypatch, capsys,
                                                                polish_reads_above):
  real, seen = Unlearner.polish_move, []

  def polish_move(self, table, names, seed=None, **settings):
    seen.append((seed, settings.get("w_mi")))
    return real(self, table, names, seed, **settings)
  monkeypatch.setattr(Unlearner, "polish_move", polish_move)
  assert main(["sweep", "--workdir", str(fresh_workdir), "--grid", "unlearn.w_mi=0.5,2",
               "--seeds", "1", "--attributes", "gender", "--out", str(tmp_path), "--json",
               "--set", "unlearn.target_leakage=0",
               "--set", "unlearn.mean_share=1"]) == 0      # once: no lighter table first
  result = json.loads(capsys.readouterr().out)
  assert sorted(w for _, w in seen) == [0.5, 2.0]
  assert all(r["combination_control"]["polish"]["attributes"] == ["gender"]
             for r in result["runs"])


def test_sweep_refuses_bad_input_before_any_work(fresh_workdir, capsys):
  assert main(["sweep", "--workdir", str(fresh_workdir), "--grid", "unlearn.w_mi=1",
               "--attributes", "religion"]) == 2
  assert "unknown attribute 'religion'" in capsys.readouterr().err
  assert main(["sweep", "--workdir", str(fresh_workdir), "--grid", "unlearn.nope=1"]) == 2
  assert "valid:" in capsys.readouterr().err
  assert main(["sweep", "--workdir", str(fresh_workdir), "--seeds", "0"]) == 2
  assert "--seeds must be >= 1" in capsys.readouterr().err
