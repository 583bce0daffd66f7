"""Hardening: names from data files stay inside the workdir, damaged checkpoints
are refused with one line, and a second writer is refused while readers work."""

import os
import pathlib
import shutil
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from lego_jax import checkpoint, cli
from lego_jax.requests import IN_PROGRESS, Unlearner
from lego_jax.workdir import Workdir, safe_name
from tests.conftest import tiny_config


# ---- names that become paths ------------------------------------------------
@hypothesis.given(st.text(min_size=1, max_size=80))
@hypothesis.settings(max_examples=300, deadline=None)
def test_safe_name_never_leaves_its_folder(name):
  base = pathlib.Path("/w/bricks")
  out = safe_name(name)
  assert "/" not in out and "\\" not in out and "\x00" not in out
  assert not out.startswith(".") and out not in ("", IN_PROGRESS)
  assert (base / out).parent == base
  assert os.path.normpath(base / out).startswith(str(base) + os.sep)


@hypothesis.given(st.lists(st.text(min_size=1, max_size=20), min_size=2, max_size=6, unique=True))
@hypothesis.settings(max_examples=200, deadline=None)
def test_safe_names_keep_distinct_names_apart(names):
  assert len({safe_name(n) for n in names}) == len(names)


def test_plain_names_keep_their_folders():
  # Existing workdirs have bricks/gender etc.; their layout must not change.
  for name in ("gender", "age", "occupation", "country", "age_group", "x-1"):
    assert safe_name(name) == name


HOSTILE = ["../../victim", "/abs/victim", IN_PROGRESS, "..", "a/b", "ok"]


def _hostile_dataset(root: pathlib.Path) -> pathlib.Path:
  """A one-line-per-user dataset whose attribute columns are hostile names."""
  folder = root / "data"
  folder.mkdir()
  rng = np.random.default_rng(0)
  n_users, n_items = 60, 80
  lines, test = [], []
  for u in range(n_users):
    items = rng.choice(n_items, size=12, replace=False)
    lines.append(" ".join(map(str, [u, *items[:10]])))
    test.append(" ".join(map(str, [u, *items[10:]])))
  (folder / "train.txt").write_text("\n".join(lines) + "\n")
  (folder / "test.txt").write_text("\n".join(test) + "\n")
  header = "\t".join(["user_id"] + HOSTILE)
  rows = ["\t".join([str(u)] + [str((u + k) % 2) for k in range(len(HOSTILE))])
          for u in range(n_users)]
  (folder / "users.tsv").write_text(header + "\n" + "\n".join(rows) + "\n")
  return folder


def _tree(root: pathlib.Path) -> dict:
  return {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_hostile_attribute_names_write_nothing_outside_the_workdir(tmp_path):
  folder = _hostile_dataset(tmp_path)
  victim = tmp_path / "victim"
  victim.mkdir()
  (victim / "precious.txt").write_text("keep me")
  (tmp_path / "abs").mkdir()
  before = {p: b for p, b in _tree(tmp_path).items()}
  wd_path = tmp_path / "runs" / "deep" / "wd"
  config = tiny_config(f"data.name={str(folder)!r}", "data.split=\"predefined\"")
  wd = Workdir.create(wd_path, config)
  wd.train(progress=False)
  assert sorted(wd.attribute_names()) == sorted(HOSTILE)
  u = Unlearner(wd, progress=False)
  u.unlearn(HOSTILE)
  after = _tree(tmp_path)
  outside = {p for p in set(after) | set(before) if wd_path not in p.parents}
  assert {p: after.get(p) for p in outside} == {p: before.get(p) for p in outside}
  assert (victim / "precious.txt").read_text() == "keep me"
  assert sorted(u.brick_meta()) == sorted(HOSTILE)
  assert all(p.parent == wd_path / "bricks" for p in (wd_path / "bricks").iterdir())
  for name in HOSTILE:  # each brick is found again by its own name
    assert u.table(f"brick:{name}").shape == u.table("original").shape


# ---- damaged checkpoints ----------------------------------------------------
def run_cli(capsys, *argv):
  code = cli.main(list(argv))
  out, err = capsys.readouterr()
  return code, out, err


@pytest.fixture(scope="module")
def unlearned_workdir(tmp_path_factory):
  path = tmp_path_factory.mktemp("sec") / "run"
  wd = Workdir.create(path, tiny_config())
  wd.train(progress=False)
  Unlearner(wd, progress=False).unlearn(["gender"])
  return path


def _damage(path: pathlib.Path, how: str) -> None:
  data = path.read_bytes()
  if how == "truncate":
    path.write_bytes(data[: len(data) // 2])
  else:  # flip up to 256 bytes in the middle
    mid = len(data) // 2
    k = min(256, len(data) - mid)
    path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + k]) + data[mid + k:])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["backbone", "bricks/gender", "combination"])
def test_every_damaged_checkpoint_file_is_refused_or_harmless(capsys, tmp_path, unlearned_workdir,
                                                              stage):
  read = "combined" if stage != "bricks/gender" else "brick:gender"
  good = tmp_path / "good.npz"
  assert run_cli(capsys, "export", "--workdir", str(unlearned_workdir), "--stage", read,
                 "--out", str(good))[0] == 0
  want = np.load(good)["embeddings"]
  files = sorted(p.relative_to(unlearned_workdir / stage)
                 for p in (unlearned_workdir / stage).rglob("*") if p.is_file() and p.stat().st_size)
  assert any(f.name == "metadata.json" for f in files) and len(files) > 3
  refused = 0
  for f in files:
    for how in ("flip", "truncate"):
      wd = tmp_path / "wd"
      shutil.rmtree(wd, ignore_errors=True)
      shutil.copytree(unlearned_workdir, wd)
      _damage(wd / stage / f, how)
      out = tmp_path / "out.npz"
      out.unlink(missing_ok=True)
      code, _, err = run_cli(capsys, "export", "--workdir", str(wd), "--stage", read,
                             "--out", str(out))
      assert "Traceback" not in err, (f, how, err)
      if code == 0:  # the damage missed everything read: the numbers must be the right ones
        np.testing.assert_array_equal(np.load(out)["embeddings"], want, err_msg=f"{f} {how}")
      else:
        refused += 1
        assert code == 2 and len(err.strip().splitlines()) == 1, (f, how, err)
        assert str(wd / stage) in err, (f, how, err)
  assert refused >= len(files)  # at least one form of damage to each file was caught


@pytest.mark.slow
def test_flipped_brick_bytes_are_caught_by_the_checksum(tmp_path, unlearned_workdir):
  wd = tmp_path / "wd"
  shutil.copytree(unlearned_workdir, wd)
  d = wd / "bricks" / "gender"
  tree, meta = checkpoint.restore(d)
  # A save whose data files are fine but whose values differ from the checksums.
  sums = (d / "checksums.json").read_text()
  checkpoint.save(d, {**tree, "delta": tree["delta"] + 1e30}, meta)
  (d / "checksums.json").write_text(sums)
  with pytest.raises(Exception, match="does not match its checksum"):
    checkpoint.restore(d)


@pytest.mark.slow
def test_brick_from_another_backbone_is_refused(tmp_path, unlearned_workdir):
  other = tmp_path / "other"
  config = tiny_config("train.lr=0.02")  # same data and split, another training
  w2 = Workdir.create(other, config)
  w2.train(progress=False)
  (other / "bricks").mkdir()
  shutil.copytree(unlearned_workdir / "bricks" / "gender", other / "bricks" / "gender")
  u = Unlearner(Workdir.open(other), progress=False)
  with pytest.raises(Exception, match="backbone_fingerprint"):
    u.table("brick:gender")
  assert u.stale() == ["gender"]   # `unlearn` recalibrates it


# ---- concurrent writers -----------------------------------------------------
HOLD = """
import sys, time
from lego_jax.workdir import writer_lock
with writer_lock(sys.argv[1]):
  print("held", flush=True)
  time.sleep(120)
"""


@pytest.mark.slow
def test_second_writer_is_refused_while_readers_work(capsys, tmp_path, unlearned_workdir):
  wd = tmp_path / "wd"
  shutil.copytree(unlearned_workdir, wd)
  env = {**os.environ, "PYTHONPATH": str(pathlib.Path(__file__).resolve().parents[1])}
  holder = subprocess.Popen([sys.executable, "-c", HOLD, str(wd)], stdout=subprocess.PIPE,
                            text=True, env=env)
  try:
    assert holder.stdout.readline().strip() == "held"
    config_before = (wd / "config.json").read_bytes()
    for argv in (["unlearn", "--workdir", str(wd), "--set", "unlearn.steps=3"],
                 ["request", "add", "age", "--workdir", str(wd)],
                 ["train", "--workdir", str(wd)]):
      code, _, err = run_cli(capsys, *argv)
      assert code == 2 and f"pid {holder.pid}" in err, (argv, err)
    assert (wd / "config.json").read_bytes() == config_before   # nothing of theirs was saved
    code, out, _ = run_cli(capsys, "request", "status", "--workdir", str(wd), "--json")
    assert code == 0 and '"active": ["gender"]' in out
    assert run_cli(capsys, "evaluate", "--workdir", str(wd), "--json")[0] == 0
  finally:
    holder.kill()
    holder.wait()
  # The OS drops a dead holder's lock: the next writer goes ahead.
  assert run_cli(capsys, "request", "add", "age", "--workdir", str(wd))[0] == 0
