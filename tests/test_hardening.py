"""Bad input is refused as one LegoError naming the file, line or config field."""

import json
import pathlib
import re

import numpy as np
import pytest

from lego_jax import cli, config as config_lib
from lego_jax.data import load_dataset
from lego_jax.errors import LegoError
from lego_jax.workdir import Workdir, write_json


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
  from lego_jax.unlearning import adversarial
  from lego_jax.unlearning import calibration, calibrators, combination, losses
  assert config_lib.MODEL_NAMES == models.NAMES
  assert config_lib.LOSSES == calibration.LOSSES
  assert config_lib.LINEAR_SCOPES == calibration.LINEAR_SCOPES
  assert config_lib.UNITS == calibration.UNITS
  assert config_lib.PROJECTIONS == calibration.PROJECTIONS
  assert config_lib.BALLS == calibration.BALLS
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


# --- input files ---------------------------------------------------------------

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
BOM = b"\xef\xbb\xbf"


def copy_fixture(name: str, dest: pathlib.Path, bom: bool = False) -> pathlib.Path:
  """A fixture folder under its conventional file names, optionally each file with a BOM."""
  dest.mkdir(parents=True)
  for f in (FIXTURES / name).iterdir():
    (dest / f.name.removesuffix(".handwritten")).write_bytes((BOM if bom else b"") + f.read_bytes())
  return dest


def summary(ds):
  return (list(ds.user_ids), list(ds.item_ids), ds.users.tolist(), ds.items.tolist(),
          {n: (a.classes, a.codes.tolist()) for n, a in ds.attributes.items()}, ds.fingerprint)


@pytest.mark.parametrize("fixture", ["ml100k", "ml1m", "recbole", "lightgcn", "lastfm"])
def test_a_leading_bom_reads_like_no_bom(tmp_path, fixture):
  plain = load_dataset(copy_fixture(fixture, tmp_path / "plain" / "ds"))
  marked = load_dataset(copy_fixture(fixture, tmp_path / "bom" / "ds", bom=True))
  assert not any(u.startswith("\ufeff") for u in marked.user_ids)
  assert summary(marked) == summary(plain)


def test_a_users_tsv_with_a_bom_keeps_its_labels(tmp_path):
  folder = copy_fixture("recbole", tmp_path / "ds")
  users = tmp_path / "users.tsv"
  users.write_bytes(BOM + b"user_id\tgroup\n7\ta\n8\tb\n")
  ds = load_dataset(folder, users_file=str(users))
  group = ds.attributes["group"]
  assert [group.classes[c] if c >= 0 else None for c in group.codes[:2]] == ["a", "b"]


def test_a_tab_separator_is_shown_readably(tmp_path):
  folder = copy_fixture("ml100k", tmp_path / "ds")
  with open(folder / "u.data", "ab") as f:
    f.write(b"9\t101\t5\n")
  with pytest.raises(LegoError, match=r"u\.data:\d+: expected 4 fields separated by '\\t', got 3"):
    load_dataset(folder)


@pytest.mark.parametrize("train,line", [
    (b"0 10 11\nhello 12\n\x00\x01 13\n", 3),
    (b"0 10 11\n1 \xff\xfe 12\n", 2),
    (b"0 10 11\n\n2 10\x07 12\n", 3),
])
def test_binary_garbage_in_a_lightgcn_file_names_its_line(tmp_path, train, line):
  folder = copy_fixture("lightgcn", tmp_path / "ds")
  (folder / "train.txt").write_bytes(train)
  with pytest.raises(LegoError, match=rf"train\.txt:{line}: expected `user item item \.\.\.` "
                                      "lines of text, got binary data"):
    load_dataset(folder)


def test_text_ids_in_a_lightgcn_file_are_kept(tmp_path):
  folder = copy_fixture("lightgcn", tmp_path / "ds")
  (folder / "train.txt").write_bytes(b"0 10 11\nhello 12\n")
  assert "hello" in load_dataset(folder).user_ids


@pytest.mark.parametrize("fixture,name,content,message", [
    ("ml100k", "u.data", b"1\t101\t5\t1\n2\x01\t101\t4\t2\n", r"u\.data:2: user id holds a control"),
    ("ml1m", "ratings.dat", b"1::201::5::1\n1::2\x0002::5::1\n", r"ratings\.dat:2: item id holds a"),
    ("recbole", "toy.user", b"user_id:token\tgender:token\n7\tF\n\x1b8\tM\n",
     r"toy\.user:3: user id holds a control"),
])
def test_control_characters_in_an_id_name_the_line(tmp_path, fixture, name, content, message):
  folder = copy_fixture(fixture, tmp_path / "ds")
  (folder / name).write_bytes(content)
  with pytest.raises(LegoError, match=message):
    load_dataset(folder)


def test_a_users_file_that_is_not_a_table_is_quoted_briefly(capsys, tmp_path):
  folder = copy_fixture("recbole", tmp_path / "ds")
  secret = tmp_path / "secret.txt"
  secret.write_text("root:$6$abcdefghijklmnopqrstuvwxyz0123456789:19000:0:99999:7:::\n")
  err = one_line_error(*run_cli(capsys, "data", "inspect", folder, "--users", secret)[::2])
  assert f"{secret}:1: expected a header starting with user_id" in err
  quoted = err.split("got ", 1)[1]
  assert len(quoted.strip("'.")) <= 20 and "abcdefghijklmnopqrstuvwxyz" not in err


def permission_denied(monkeypatch, method: str, where: pathlib.Path):
  """Path.<method> raises PermissionError under `where` (tests run as root: chmod is no use)."""
  real = getattr(pathlib.Path, method)
  real_is_dir = pathlib.Path.is_dir

  def denied(self, *a, **kw):
    # mkdir of an existing folder is EEXIST, not EACCES, even in a read-only parent.
    if str(self).startswith(str(where)) and not (method == "mkdir" and real_is_dir(self)):
      raise PermissionError(13, "Permission denied", str(self))
    return real(self, *a, **kw)
  monkeypatch.setattr(pathlib.Path, method, denied)


@pytest.mark.parametrize("method", ["is_dir", "is_file", "open", "glob"])
def test_an_unreadable_folder_or_file_is_named(capsys, monkeypatch, tmp_path, method):
  folder = copy_fixture("recbole", tmp_path / "ds")
  permission_denied(monkeypatch, method, folder)
  err = one_line_error(*run_cli(capsys, "data", "inspect", folder)[::2])
  assert str(folder) in err and ("Permission denied" in err or "cannot read" in err)


def test_an_unreadable_lightgcn_users_file_is_named(capsys, monkeypatch, tmp_path):
  folder = copy_fixture("lightgcn", tmp_path / "ds")
  real = open

  def denied(path, *a, **kw):
    if str(path).endswith("users.tsv"):
      raise PermissionError(13, "Permission denied", str(path))
    return real(path, *a, **kw)
  monkeypatch.setattr("builtins.open", denied)
  err = one_line_error(*run_cli(capsys, "data", "inspect", folder)[::2])
  assert f"{folder / 'users.tsv'}: cannot read: Permission denied" in err


def test_a_named_users_file_that_cannot_be_read_is_named(capsys, monkeypatch, tmp_path):
  folder = copy_fixture("recbole", tmp_path / "ds")
  users = tmp_path / "users.tsv"
  users.write_text("user_id\tgroup\n7\ta\n")
  permission_denied(monkeypatch, "is_file", users)
  err = one_line_error(*run_cli(capsys, "data", "inspect", folder, "--users", users)[::2])
  assert str(users) in err and "Permission denied" in err


# --- workdirs and commands -------------------------------------------------------


def tiny_recbole(folder: pathlib.Path, users_header: str = None) -> pathlib.Path:
  """40 users x 30 items, 8 interactions each; a `.user` with only a header where asked."""
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  lines = ["user_id:token\titem_id:token"]
  for u in range(40):
    lines += [f"u{u}\ti{i}" for i in rng.choice(30, 8, replace=False)]
  (folder / f"{folder.name}.inter").write_text("\n".join(lines) + "\n")
  if users_header is not None:
    (folder / f"{folder.name}.user").write_text(users_header + "\n")
  return folder


def train_tiny(capsys, folder, wd):
  code, _, err = run_cli(capsys, "train", "--workdir", wd, "--set", f"data.name={json.dumps(str(folder))}",
                         "--set", "train.epochs=1", "--set", "model.dim=4",
                         "--set", "train.batch_size=64", "--set", "eval.batch_users=32")
  assert code == 0, err


@pytest.mark.slow
def test_attack_without_a_users_file_says_there_are_no_attributes(capsys, tmp_path):
  wd = tmp_path / "wd"
  train_tiny(capsys, tiny_recbole(tmp_path / "plain"), wd)
  err = one_line_error(*run_cli(capsys, "attack", "--workdir", wd)[::2])
  assert "dataset plain has no user attributes" in err
  err = one_line_error(*run_cli(capsys, "unlearn", "--workdir", wd)[::2])
  assert "no user attributes" in err


@pytest.mark.slow
def test_attributes_without_labelled_users_are_refused(capsys, tmp_path):
  wd = tmp_path / "wd"
  train_tiny(capsys, tiny_recbole(tmp_path / "empty", "user_id:token\tgender:token\tage:token"), wd)
  for argv in (["unlearn"], ["attack", "--attacker", "linear"]):
    err = one_line_error(*run_cli(capsys, *argv, "--workdir", wd)[::2])
    assert ("attributes gender (0 classes, 0 labelled users), age (0 classes, 0 labelled users) "
            "cannot be attacked or unlearned") in err
  assert not (wd / "bricks").exists() or not any((wd / "bricks").iterdir())


def tree(path: pathlib.Path) -> dict:
  return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}


def test_a_read_only_workdir_can_be_read_and_refuses_writes(capsys, monkeypatch, fresh_workdir,
                                                            tmp_path):
  permission_denied(monkeypatch, "write_text", fresh_workdir)
  permission_denied(monkeypatch, "mkdir", fresh_workdir)
  before = tree(fresh_workdir)
  wd = str(fresh_workdir)
  assert run_cli(capsys, "evaluate", "--workdir", wd, "--json")[0] == 0
  assert run_cli(capsys, "attack", "--workdir", wd, "--attacker", "linear", "--json")[0] == 0
  assert run_cli(capsys, "request", "status", "--workdir", wd, "--json")[0] == 0
  assert run_cli(capsys, "export", "--workdir", wd, "--out", tmp_path / "e.npz")[0] == 0
  assert tree(fresh_workdir) == before
  err = one_line_error(*run_cli(capsys, "unlearn", "--workdir", wd, "--set", "unlearn.lr=0.02")[::2])
  assert f"cannot write {fresh_workdir / 'config.json'}: Permission denied" in err
  with pytest.raises(LegoError, match=f"cannot write {fresh_workdir / 'x.json'}"):
    write_json(fresh_workdir / "x.json", {})


def test_export_to_an_unwritable_path_is_one_line(capsys, fresh_workdir, tmp_path):
  (tmp_path / "file").write_text("")
  out = tmp_path / "file" / "sub" / "e.npz"
  err = one_line_error(*run_cli(capsys, "export", "--workdir", fresh_workdir, "--out", out)[::2])
  assert f"cannot write {out}" in err


@pytest.mark.parametrize("argv", [
    ["run", "--workdir", "{tmp}/wd"],
    ["train", "--workdir", "{tmp}/wd"],
    ["data", "inspect", "synthetic"],
])
def test_data_dir_with_the_synthetic_dataset_is_refused(capsys, tmp_path, argv):
  mydata = copy_fixture("recbole", tmp_path / "mydata")
  argv = [a.format(tmp=tmp_path) for a in argv] + ["--data-dir", mydata]
  err = one_line_error(*run_cli(capsys, *argv)[::2])
  assert "is ignored by the synthetic dataset" in err and f"--set data.name={mydata}" in err
  assert not (tmp_path / "wd").exists()


def test_data_dir_naming_a_dataset_folder_says_how_to_use_it(capsys, tmp_path):
  mydata = copy_fixture("ml100k", tmp_path / "mydata")
  err = one_line_error(*run_cli(capsys, "data", "inspect", "ml-1m", "--data-dir", mydata)[::2])
  assert f"{mydata} itself holds a movielens-100k dataset" in err
  assert f"--set data.name={mydata}" in err


def test_a_relative_data_dir_is_kept_absolute(capsys, monkeypatch, tmp_path):
  copy_fixture("ml100k", tmp_path / "data" / "ml-100k")
  monkeypatch.chdir(tmp_path)
  from lego_jax import runner
  args = cli.parser().parse_args(["train", "--workdir", "wd", "--data-dir", "data"])
  assert runner._overrides(args) == [f"data.data_dir={json.dumps(str(tmp_path / 'data'))}"]
  monkeypatch.setenv("LEGO_DATA_DIR", "data")
  assert load_dataset("ml-100k").n_users == 3


def test_a_bad_sweep_is_one_line(capsys, tmp_path):
  err = one_line_error(*run_cli(capsys, "run", "--workdir", tmp_path / "wd", "--sweep", "1,lots")[::2])
  assert "--sweep expects comma-separated numbers, got '1,lots'" in err


def test_a_corrupt_or_unreadable_workdir_config_is_one_line(capsys, monkeypatch, tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  (wd / "config.json").write_text('{"seed": 0, "data": {')
  err = one_line_error(*run_cli(capsys, "evaluate", "--workdir", wd)[::2])
  assert f"{wd / 'config.json'}: not a valid config" in err
  permission_denied(monkeypatch, "read_text", wd)
  err = one_line_error(*run_cli(capsys, "evaluate", "--workdir", wd)[::2])
  assert f"cannot read {wd / 'config.json'}: Permission denied" in err
