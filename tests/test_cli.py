"""The command line and the main job, end to end on a tiny synthetic workdir."""

import json
import shutil

import numpy as np
import pytest

from lego_jax import cli, experiment
from lego_jax import methods as baselines
from tests.conftest import tiny_config


def run_cli(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


def test_data_inspect_json(capsys):
  code, out, _ = run_cli(capsys, "data", "inspect", "synthetic", "--json",
                         "--set", "data.synthetic_users=200", "--set", "data.synthetic_items=100")
  assert code == 0
  info = json.loads(out)
  assert set(info) == {"dataset", "users", "items", "interactions", "attributes", "split"}
  assert info["users"] == 200
  assert set(info["attributes"]) == {"gender", "age", "occupation"}
  assert sum(info["split"].values()) == info["interactions"]


@pytest.mark.parametrize("argv,message", [
    (["data", "inspect", "ml-2m"], "unknown dataset 'ml-2m'; valid:"),
    (["train", "--config", "nope", "--workdir", "/tmp/x"], "unknown config 'nope'; valid:"),
    (["train", "--workdir", "/tmp/x", "--set", "train.epoch=3"], "unknown config field 'train.epoch'"),
    (["train", "--workdir", "/tmp/x", "--set", "train.epochs=many"], "expects int"),
    (["evaluate", "--workdir", "/nonexistent/wd"], "not a lego-jax workdir"),
])
def test_user_mistakes_exit_2_with_one_line(capsys, argv, message):
  code, out, err = run_cli(capsys, *argv)
  assert code == 2
  assert message in err
  assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.slow
def test_workdir_commands(capsys, fresh_workdir, tmp_path):
  wd = str(fresh_workdir)
  code, out, _ = run_cli(capsys, "unlearn", "--workdir", wd, "--attributes", "gender,age")
  assert code == 0
  code, out, _ = run_cli(capsys, "request", "status", "--workdir", wd, "--json")
  status = json.loads(out)
  assert status["active"] == ["gender", "age"]
  assert set(status["bricks"]) == {"gender", "age"}
  assert all(set(b) == {"created", "steps", "seconds", "gain", "strength", "leakage", "stale"}
             for b in status["bricks"].values())
  assert all(b["stale"] == [] for b in status["bricks"].values())
  # gender and age were calibrated by one program: they share its seconds
  assert status["bricks"]["gender"]["seconds"] == status["bricks"]["age"]["seconds"] > 0
  # the MI weight and pull each brick ended with, after the loop's dual steps
  assert all(set(b["strength"]) == {"w_mi", "l2"} and b["strength"]["w_mi"] > 0
             for b in status["bricks"].values())
  comb = status["combination"]
  assert set(comb["leakage"]) == {"gender", "age"} and len(comb["gains"]["gender"]) == 2
  assert set(comb["residual_means"]) == {"gender", "age"}
  assert set(comb["leakage"]["gender"]) == {"linear", "mlp"}
  worst = max(abs(r["signed"]) for a in comb["leakage"].values() for r in a.values())
  assert comb["within_target"] == (worst <= 0.01)
  assert comb["within_target"] or any("probe reads" in w for w in comb["warnings"])
  code, out, _ = run_cli(capsys, "request", "status", "--workdir", wd)
  assert code == 0 and "every attribute within the target" in out
  assert "class means taken back" in out
  assert f"combined in {status['combination']['seconds']:.0f} s" in out
  assert run_cli(capsys, "request", "add", "occupation", "--workdir", wd)[0] == 0
  assert run_cli(capsys, "request", "withdraw", "age", "--workdir", wd)[0] == 0
  code, out, _ = run_cli(capsys, "request", "status", "--workdir", wd, "--json")
  assert json.loads(out)["active"] == ["gender", "occupation"]

  code, out, _ = run_cli(capsys, "evaluate", "--workdir", wd, "--json")
  stages = json.loads(out)
  assert set(stages) == {"original", "popularity", "combined"}
  assert set(stages["combined"]) == {"recall@10", "ndcg@10", "hr@10", "recall@20", "ndcg@20", "hr@20"}

  code, out, _ = run_cli(capsys, "attack", "--workdir", wd, "--stage", "brick:gender",
                         "--attacker", "linear", "--json")
  res = json.loads(out)
  assert (res["stage"], res["attacker"], res["protocol"]) == ("brick:gender", "linear", "cv5")
  assert set(res["attributes"]["gender"]) == {"bacc", "macro_f1", "auc", "chance", "leakage", "ci95"}
  assert abs(res["attributes"]["gender"]["leakage"]
             - abs(res["attributes"]["gender"]["bacc"] - 0.5)) < 1e-9

  code, out, _ = run_cli(capsys, "attack", "--workdir", wd, "--stage", "combined",
                         "--attacker", "linear", "--repeats", "2")
  assert code == 0 and "2 fold split(s)" in out and "split_sd" in out
  code, _, err = run_cli(capsys, "attack", "--workdir", wd, "--repeats", "0")
  assert code == 2 and "repeats must be at least 1" in err and "Traceback" not in err

  code, _, err = run_cli(capsys, "attack", "--workdir", wd, "--stage", "brick:religion")
  assert code == 2 and "valid: brick:age, brick:gender, brick:occupation, combined, original" in err

  out_file = tmp_path / "e.npz"
  assert run_cli(capsys, "export", "--workdir", wd, "--stage", "combined", "--out", str(out_file))[0] == 0
  z = np.load(out_file)
  assert z["embeddings"].dtype == np.float32 and z["embeddings"].shape[0] == len(z["user_ids"])
  assert z["user_ids"].dtype.kind == "U"
  assert set(z["attr_gender_classes"]) == {"F", "M"}
  assert z["attr_age"].min() >= -1


@pytest.mark.slow
def test_main_job_writes_results_report_and_plots(tmp_path):
  cfg = tiny_config("run.sweep=[1.0, 100.0]")
  results = experiment.train_and_evaluate(cfg, tmp_path / "run", progress=False)
  for f in ("results.json", "report.md", "leakage.png", "tradeoff.png", "config.json"):
    assert (tmp_path / "run" / f).is_file(), f
  stored = json.loads((tmp_path / "run" / "results.json").read_text())
  assert set(stored["methods"]) == {"original", "popularity", "lego", "joint", "sequential",
                                    "leace", "adversarial"}
  for m in ("lego", "joint", "sequential", "leace", "adversarial"):
    r = stored["methods"][m]
    assert set(r) == {"ranking", "retention", "attack", "seconds"} | (
        {"control"} if m == "lego" else set())
    assert set(r["attack"]) == {"mlp", "linear"}
    assert set(r["attack"]["mlp"]) == {"gender", "age", "occupation"}
  assert len(stored["sweep"]) == 2
  report = (tmp_path / "run" / "report.md").read_text()
  assert "| lego " in report and "| leace " in report
  assert results["methods"]["lego"]["ranking"] == stored["methods"]["lego"]["ranking"]


@pytest.mark.slow
def test_failing_stage_is_named_and_finished_stages_kept(tmp_path, monkeypatch):
  cfg = tiny_config("run.methods=[\"lego\", \"leace\"]")

  def broken(wd, names):
    raise RuntimeError("boom")

  monkeypatch.setitem(baselines.METHODS, "leace", broken)
  monkeypatch.setitem(experiment.METHODS, "leace", broken)
  with pytest.raises(experiment.StageError, match="stage 'method:leace' failed with RuntimeError: boom"):
    experiment.train_and_evaluate(cfg, tmp_path / "run", progress=False)
  run = tmp_path / "run"
  assert (run / "backbone").is_dir() and (run / "combination").is_dir()
  assert (run / "stages" / "method_lego.json").is_file()
  assert not (run / "stages" / "method_leace.json").exists()


@pytest.mark.parametrize("debug", [False, True])
def test_a_bug_inside_a_stage_shows_its_traceback_only_with_debug(capsys, monkeypatch, debug):
  from lego_jax import runner

  def dispatch(args):
    try:
      raise RuntimeError("boom")
    except RuntimeError as e:
      raise experiment.StageError("stage 'method:leace' failed with RuntimeError: boom") from e

  monkeypatch.setattr(runner, "dispatch", dispatch)
  code, _, err = run_cli(capsys, *(["--debug"] if debug else []), "evaluate", "--workdir", "x")
  assert code == 2 and err.startswith("lego-jax: error: stage 'method:leace' failed")
  assert ("Traceback" in err and "RuntimeError: boom" in err) == debug
  assert ("rerun with `lego-jax --debug" in err) != debug


@pytest.mark.slow
def test_a_stage_is_redone_only_when_its_own_settings_change(tmp_path, monkeypatch):
  run = tmp_path / "run"
  experiment.train_and_evaluate(tiny_config("run.methods=[\"lego\", \"leace\"]"), run,
                                progress=False)
  calls = []
  for m in ("lego", "leace"):
    real = experiment.METHODS[m]
    monkeypatch.setitem(experiment.METHODS, m,
                        lambda wd, names, m=m, real=real: calls.append(m) or real(wd, names))
  experiment.train_and_evaluate(tiny_config("run.methods=[\"lego\", \"leace\"]"), run,
                                progress=False)
  assert calls == []
  # New unlearning settings (and a fresh brick folder, since bricks are reused
  # whatever the settings) redo LEGO only; LEACE does not depend on them.
  shutil.rmtree(run / "bricks")
  experiment.train_and_evaluate(
      tiny_config("run.methods=[\"lego\", \"leace\"]", "unlearn.lam_rank=5.0"), run, progress=False)
  assert calls == ["lego"]


@pytest.mark.slow
def test_grid_writes_one_table_with_a_row_per_method_and_backbone(tmp_path):
  from tests.conftest import TINY
  text = experiment.grid(["synthetic_mf", "synthetic_lightgcn"], tmp_path,
                         TINY + ["run.methods=[\"lego\", \"leace\"]", "model.n_layers=1"])
  assert (tmp_path / "grid.md").read_text() == text
  lines = [l for l in text.splitlines() if l.startswith("| synthetic")]
  assert [l.split("|")[2:4] for l in lines] == [
      [" mf       ", " original "], [" mf       ", " lego     "], [" mf       ", " leace    "],
      [" lightgcn ", " original "], [" lightgcn ", " lego     "], [" lightgcn ", " leace    "]]
  header = text.splitlines()[2]
  assert "leak gender (mlp / linear)" in header and "max leak" in header
  # Every leakage cell holds both attackers' values.
  assert all(len(l.split("|")[6].split("/")) == 2 for l in lines)
