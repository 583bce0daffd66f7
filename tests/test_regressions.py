"""Regression tests for bugs found by reading the code."""

import shutil

import numpy as np

from lego_jax import experiment
from lego_jax import methods as baselines
from lego_jax.workdir import Workdir
from tests.conftest import tiny_config


def test_main_job_runs_with_other_ranking_cutoffs(tmp_path):
  # eval.ks other than [10, 20] crashed the report, which reads @10 and @20.
  config = tiny_config("eval.ks=[5]", 'run.methods=["leace"]', 'run.attackers=["linear"]')
  results = experiment.train_and_evaluate(config, tmp_path / "run", progress=False)
  ranking = results["methods"]["leace"]["ranking"]
  assert {"ndcg@5", "ndcg@10", "recall@20"} <= set(ranking)
  assert 0 < results["methods"]["leace"]["retention"]["ndcg@5"]
  assert (tmp_path / "run" / "report.md").is_file()


def test_adversarial_baseline_is_keyed_on_its_settings(fresh_workdir, tmp_path):
  # Changing run.adversarial_weight reported the model trained with the old weight.
  wd = Workdir.open(fresh_workdir)
  first = baselines.adversarial(wd, ["gender"]).table
  other = Workdir.open(fresh_workdir, ["run.adversarial_weight=0.0"])
  second = baselines.adversarial(other, ["gender"]).table
  assert len(list((fresh_workdir / "methods" / "adversarial").iterdir())) == 2
  assert not np.allclose(first, second)
  again = baselines.adversarial(Workdir.open(fresh_workdir, ["run.adversarial_weight=1.0"]),
                                ["gender"]).table
  np.testing.assert_array_equal(first, again)   # the first one's checkpoint is reused
