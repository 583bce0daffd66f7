"""Workdir: reading one writes nothing; training records the data it was trained on."""

import json
import pathlib

import numpy as np
import pytest

from lego_jax import cli
from lego_jax.errors import LegoError
from lego_jax.workdir import Workdir
from tests.conftest import tiny_config


def _snapshot(path: pathlib.Path) -> dict:
  return {p.relative_to(path): (p.stat().st_mtime_ns, p.read_bytes() if p.is_file() else None)
          for p in sorted(path.rglob("*"))}


def test_reading_a_new_workdir_writes_no_data_json(tmp_path):
  wd = Workdir.create(tmp_path / "new", tiny_config())
  before = _snapshot(wd.path)
  assert wd.dataset.n_users > 0 and wd.split.n_users == wd.dataset.n_users
  wd.labels(wd.attribute_names())
  with pytest.raises(LegoError, match="no trained backbone"):
    wd.backbone()
  assert _snapshot(wd.path) == before
  assert not (wd.path / "data.json").exists()


def test_reading_a_trained_workdir_changes_no_file(fresh_workdir, capsys):
  before = _snapshot(fresh_workdir)
  wd = Workdir.open(fresh_workdir)
  wd.data, wd.backbone()
  assert cli.main(["evaluate", "--workdir", str(fresh_workdir), "--json"]) == 0
  assert "original" in json.loads(capsys.readouterr().out)
  assert _snapshot(fresh_workdir) == before


def test_training_records_the_data_and_other_data_is_refused(fresh_workdir):
  meta = fresh_workdir / "data.json"
  recorded = json.loads(meta.read_text())
  ds, split = Workdir.open(fresh_workdir).data
  assert recorded["dataset_fingerprint"] == ds.fingerprint
  assert recorded["split_fingerprint"] == split.fingerprint
  meta.write_text(json.dumps({**recorded, "split_fingerprint": "0" * 16}))
  with pytest.raises(LegoError, match="built on other data; differs: split_fingerprint"):
    Workdir.open(fresh_workdir).data


def _write_interactions(folder: pathlib.Path, rows) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  lines = ["user_id:token\titem_id:token\trating:float\ttimestamp:float"]
  lines += [f"u{u}\ti{i}\t5\t{t}" for t, (u, i) in enumerate(rows)]
  (folder / "mine.inter").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_data_files_changed_after_training_are_refused(tmp_path):
  rng = np.random.default_rng(0)
  rows = [(u, i) for u in range(40) for i in rng.choice(30, size=8, replace=False)]
  data = tmp_path / "mine"
  _write_interactions(data, rows)
  path = tmp_path / "run"
  Workdir.create(path, tiny_config(f"data.name={json.dumps(str(data))}")).train(progress=False)
  assert (path / "data.json").is_file()
  Workdir.open(path).data  # the same files: accepted
  _write_interactions(data, rows + [(0, 29), (1, 28)])
  with pytest.raises(LegoError, match="built on other data; differs: dataset_fingerprint"):
    Workdir.open(path).data
