"""Regression tests for bugs found by reading the code."""


import numpy as np
import pytest

from lego_jax import experiment
from lego_jax import methods as baselines
from lego_jax.workdir import Workdir
from tests.conftest import TINY, tiny_config


@pytest.mark.slow
def test_main_job_runs_with_other_ranking_cutoffs(tmp_path):
  # eval.ks other than [10, 20] crashed the report, which reads @10 and @20.
  config = tiny_config("eval.ks=[5]", 'run.methods=["leace"]', 'run.attackers=["linear"]')
  results = experiment.train_and_evaluate(config, tmp_path / "run", progress=False)
  ranking = results["methods"]["leace"]["ranking"]
  assert {"ndcg@5", "ndcg@10", "recall@20"} <= set(ranking)
  assert 0 < results["methods"]["leace"]["retention"]["ndcg@5"]
  assert (tmp_path / "run" / "report.md").is_file()


@pytest.mark.slow
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


def _results(orig_ndcg, pop_ndcg, ci_half, batch_users, users=300):
  attack = {"gender": {"ci95": [0.5 - ci_half, 0.5 + ci_half], "n": 100, "leakage": 0.0,
                       "bacc": 0.5, "chance": 0.5}}
  config = tiny_config()
  config["unlearn"]["batch_users"] = batch_users
  return {"attributes": ["gender"], "users": users, "config": config,
          "methods": {"original": {"ranking": {"ndcg@10": orig_ndcg}, "attack": {"mlp": attack}},
                      "popularity": {"ranking": {"ndcg@10": pop_ndcg}}}}


def test_trust_warnings_say_where_numbers_cannot_be_trusted():
  from lego_jax.report import trust_warnings
  assert trust_warnings(_results(0.30, 0.10, 0.02, 0)) == []
  words = " ".join(trust_warnings(_results(0.035, 0.056, 0.07, 1024)))
  assert "worse than item popularity" in words
  assert "gender: the attackers' 95% interval is ±0.070" in words
  assert "covers all 300 users" in words


def test_run_ends_with_results_files_and_verdict(tmp_path, capsys):
  from lego_jax import cli
  sets = TINY + ['run.methods=["leace"]', 'run.attackers=["linear"]']
  code = cli.main(["run", "--workdir", str(tmp_path / "r")]
                  + [a for s in sets for a in ("--set", s)])
  out = capsys.readouterr().out
  assert code == 0
  assert "| leace" in out and "max leakage (linear)" in out
  assert f"wrote {tmp_path / 'r' / 'results.json'}" in out
  assert "Config:" not in out and len(out.splitlines()) < 20


@pytest.mark.slow
def test_long_stages_say_what_they_do(fresh_workdir, capsys):
  # Requests ran for minutes without a word: calibration has a bar, and the
  # combination and every probe reading of the closed loop a line each.
  from lego_jax.requests import Unlearner
  u = Unlearner(Workdir.open(fresh_workdir), progress=True)
  u.unlearn(["gender"])
  err = capsys.readouterr().err
  assert "calibrating gender" in err and "combining gender" in err
  assert "control, bricks: gender" in err
  # The combination's readings: the gain search, or the lighter class-mean share first.
  assert "control, combined table: gender" in err or "control, class-mean parts x0.75" in err
  from lego_jax import methods
  methods.sequential(Workdir.open(fresh_workdir), ["gender", "age"])
  err = capsys.readouterr().err
  assert "sequential 1/2: gender" in err and "sequential 2/2: age" in err
