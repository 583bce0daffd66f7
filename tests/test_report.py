"""What the run's report shows."""

from lego_jax import report

ATTACKERS = ("mlp", "linear", "quadratic")


def _results():
  read = lambda bacc: {"gender": {"leakage": abs(bacc - 0.5), "bacc": bacc, "chance": 0.5,
                                  "ci95": [bacc - 0.02, bacc + 0.02], "n": 400}}
  ranking = {"ndcg@10": 0.2, "recall@10": 0.1}
  return {
      "attributes": ["gender"], "dataset": "synthetic", "users": 400,
      "config": {"model": {"name": "mf"}, "run": {"attackers": list(ATTACKERS)},
                 "unlearn": {"target_leakage": 0.01, "batch_users": 256, "batch_fraction": 0.25}},
      "methods": {"original": {"ranking": ranking, "attack": {a: read(0.7) for a in ATTACKERS}},
                  "lego": {"ranking": ranking, "retention": {"ndcg@10": 0.97}, "seconds": 3.0,
                           "attack": {a: read(0.46 if a == "quadratic" else 0.5)
                                      for a in ATTACKERS}}}}


def test_the_report_shows_every_attacker_the_run_used(tmp_path):
  results = _results()
  text = report.summary(results)
  for a in ATTACKERS:
    assert f"leak gender ({a})" in text and f"| gender ({a})" in text
  assert "0.460 (0.500)" in text                         # the quadratic reading, not dropped
  assert "max leakage (quadratic)" in report.digest(results, tmp_path)
  report.plots(tmp_path, results)
  assert (tmp_path / "leakage.png").is_file()
