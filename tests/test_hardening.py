"""Bad input is refused as one LegoError naming the file, line or config field."""

import json
import re

import pytest

from lego_jax import cli, config as config_lib
from lego_jax.errors import LegoError
from lego_jax.workdir import Workdir


def run_cli(capsys, *argv):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def one_line_error(code, err) -> str:
  assert code == 2, err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
  assert err.startswith("lego-jax: error: ")
  return err.strip()


# --- config values -----------------------------------------------------------


@pytest.mark.parametrize("override,message", [
    ("model.dim=0", "model.dim must be an integer >= 1, got 0"),
    ("train.batch_size=0", "train.batch_size must be an integer >= 1"),
    ("unlearn.topk=0", "unlearn.topk must be an integer >= 1"),
    ("unlearn.lr=0", "unlearn.lr must be a number > 0, got 0.0"),
    ("train.lr=-1", "train.lr must be a number > 0"),
    ("unlearn.batch_users=-1", "unlearn.batch_users must be an integer >= 0"),
    ("eval.ks=[0]", "eval.ks must be a non-empty list, each an integer >= 1, got [0]"),
    ("eval.ks=[]", "eval.ks must be a non-empty list"),
    ('combine.mode="xyz"', "combine.mode must be one of 'dim', 'scalar', 'convex', got 'xyz'"),
    ("train.negatives=0", "train.negatives must be an integer >= 1"),
    ("model.n_layers=-1", "model.n_layers must be an integer >= 0"),
    ("unlearn.steps=-5", "unlearn.steps must be an integer >= 1, got -5"),
    ("train.epochs=0", "train.epochs must be an integer >= 1"),
    ("model.name=bpr", "model.name must be one of 'mf', 'ncf', 'lightgcn'"),
    ("unlearn.loss=kl", "unlearn.loss must be one of 'mmd', 'd2d', 'adversarial'"),
    ("unlearn.calibrator=linear", "unlearn.calibrator must be one of 'table', 'residual'"),
    ("unlearn.stop=never", "unlearn.stop must be one of 'null', 'two-sided', 'steps'"),
    ("unlearn.hinge=max", "unlearn.hinge must be one of 'kernel', 'sum'"),
    ("unlearn.estimator=exact", "unlearn.estimator must be one of 'kernel', 'features'"),
    ("unlearn.linear_scope=all", "unlearn.linear_scope must be one of 'batch', 'population'"),
    ("combine.init=zeros", "combine.init must be one of 'uniform', 'ones'"),
    ("data.split=kfold", "data.split must be one of 'random', 'loo', 'predefined'"),
    ("data.format=csv", "data.format must be one of ''"),
    ("train.metric=ndcg", "train.metric must be METRIC@K"),
    ("train.metric=auc@10", "train.metric must be METRIC@K"),
    ("train.metric=ndcg@0", "train.metric must be METRIC@K"),
    ("data.split_ratios=[0.5, 0.5, 0.5]", "data.split_ratios must be 3 non-negative numbers"),
    ("data.age_bins=30,20", "data.age_bins must be '', 'none' or increasing integers"),
    ("attack.folds=1", "attack.folds must be an integer >= 2"),
    ('run.attackers=["svm"]', "run.attackers must be a list, each one of 'mlp', 'linear'"),
    ("unlearn.per_attribute.age.lr=-1", "unlearn.per_attribute.age.lr must be a number > 0"),
    ("unlearn.per_attribute.age.lam_rank=-1", "unlearn.per_attribute.age.lam_rank must be a "
                                              "number >= 0"),
])
def test_out_of_range_config_values_name_the_field_and_range(override, message):
  with pytest.raises(LegoError, match="^config field " + re.escape(message)):
    config_lib.resolve(None, [override])


def test_defaults_and_shipped_configs_are_valid():
  config_lib.validate(config_lib.resolve(None))
  for name in config_lib.available():
    config_lib.resolve(name)


def test_fields_without_a_constraint_are_not_checked():
  # Fields added to DEFAULTS elsewhere pass until the table lists them.
  cfg = config_lib.resolve(None)
  cfg["unlearn"]["not_in_the_table"] = -1
  config_lib.validate(cfg)
  assert all(k.rpartition(".")[0] in ("",) + tuple(config_lib.DEFAULTS)
             for k in config_lib.CONSTRAINTS)


def test_name_lists_agree_with_the_modules_that_use_them():
  # config must not import the JAX modules, so it repeats their name lists.
  from lego_jax import models
  from lego_jax.evaluation import attackers, ranking
  from lego_jax.models import adversarial
  from lego_jax.unlearning import calibration, calibrators, combination, losses
  assert config_lib.MODEL_NAMES == models.NAMES
  assert config_lib.LOSSES == calibration.LOSSES
  assert config_lib.LINEAR_SCOPES == calibration.LINEAR_SCOPES
  assert config_lib.CALIBRATORS == tuple(calibrators.CALIBRATORS)
  assert config_lib.STOPS == losses.STOPS
  assert config_lib.HINGES == losses.HINGES
  assert config_lib.ESTIMATORS == losses.ESTIMATORS
  assert config_lib.COMBINE_MODES == combination.MODES
  assert config_lib.COMBINE_INITS == combination.INITS
  assert config_lib.ATTACKERS == attackers.ATTACKERS
  assert config_lib.ADVERSARIAL_OBJECTIVES == adversarial.OBJECTIVES
  assert config_lib.RANKING_METRICS == ranking.METRICS


def test_a_refused_train_writes_nothing(capsys, tmp_path):
  wd = tmp_path / "wd"
  err = one_line_error(*run_cli(capsys, "train", "--workdir", wd, "--set", "model.dim=0")[::2])
  assert "model.dim" in err
  assert not wd.exists()


def test_workdir_create_refuses_a_bad_config_before_writing(tmp_path):
  cfg = config_lib.resolve(None)
  cfg["train"]["batch_size"] = 0
  with pytest.raises(LegoError, match="train.batch_size"):
    Workdir.create(tmp_path / "wd", cfg)
  assert not (tmp_path / "wd").exists()


def test_a_refused_unlearn_leaves_the_workdir_config_unchanged(capsys, fresh_workdir):
  before = (fresh_workdir / "config.json").read_text()
  err = one_line_error(*run_cli(capsys, "unlearn", "--workdir", fresh_workdir,
                                "--set", "unlearn.steps=-5")[::2])
  assert "unlearn.steps must be an integer >= 1, got -5" in err
  assert (fresh_workdir / "config.json").read_text() == before
  assert json.loads(before)["unlearn"]["steps"] > 0
  with pytest.raises(LegoError, match="combine.mode"):
    Workdir.open(fresh_workdir, ['combine.mode="xyz"'])
  assert (fresh_workdir / "config.json").read_text() == before
