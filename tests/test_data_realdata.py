"""Counts on the real MovieLens files under $LEGO_DATA_DIR (see shared/data/README.md)."""

import os
import pathlib
import time

import numpy as np
import pytest

from lego_jax.data import describe, load_dataset, split_dataset

pytestmark = pytest.mark.realdata


@pytest.fixture(scope="module")
def data_dir() -> pathlib.Path:
  path = os.environ.get("LEGO_DATA_DIR")
  if not path:
    pytest.skip("LEGO_DATA_DIR not set: it names the folder holding ml-100k/ and ml-1m/")
  if not pathlib.Path(path).is_dir():
    pytest.skip(f"LEGO_DATA_DIR={path} is not a folder")
  # Absolute: a relative path (../shared/data) would dangle in symlinks made under tmp_path.
  return pathlib.Path(path).absolute()


def _need(data_dir, name):
  if not (data_dir / name).is_dir():
    pytest.skip(f"{data_dir / name} is absent")


@pytest.fixture(scope="module")
def ml1m(data_dir):
  _need(data_dir, "ml-1m")
  start = time.perf_counter()
  ds = load_dataset("ml-1m", data_dir=data_dir)
  return ds, time.perf_counter() - start


def test_ml1m_counts(ml1m):
  ds, seconds = ml1m
  assert (ds.n_users, ds.n_items, ds.n_interactions) == (6040, 3706, 1_000_209)
  assert int(ds.counts.sum()) == 1_000_209
  gender = ds.attributes["gender"]
  assert dict(zip(gender.classes, gender.counts())) == {"F": 1709, "M": 4331}
  age = ds.attributes["age"]
  assert age.classes == ("1", "18", "25", "35", "45", "50", "56")
  assert age.counts() == [222, 1103, 2096, 1193, 550, 496, 380]
  assert ds.attributes["occupation"].num_classes == 21
  assert all(a.missing == 0 for a in ds.attributes.values())
  assert seconds < 10, f"loading ML-1M took {seconds:.1f} s"


def test_ml1m_split_and_describe(ml1m):
  ds, _ = ml1m
  sp = split_dataset(ds)
  d = describe(ds, sp)
  assert sum(d["split"].values()) == 1_000_209
  assert 0.79 < d["split"]["train"] / 1_000_209 < 0.81
  assert d["attributes"]["gender"] == {"classes": ["F", "M"], "counts": [1709, 4331], "missing": 0}


def test_ml1m_originals_agree_with_atomic(data_dir, ml1m, tmp_path):
  """users.dat + the original ratings.dat lines of users 1-2999 (movielens-1m reader)."""
  _need(data_dir, "ml-1m")
  part = data_dir / "ml-1m" / "ratings.users0001-2999.dat.gz"
  if not part.is_file():
    pytest.skip(f"{part} is absent")
  (tmp_path / "ratings.dat.gz").symlink_to(part)
  (tmp_path / "users.dat").symlink_to(data_dir / "ml-1m" / "users.dat")
  orig = load_dataset(tmp_path)
  assert orig.n_users == 2999 and orig.n_interactions == 487_650
  assert orig.timestamps is not None
  full, _ = ml1m
  first = np.isin(full.user_ids[full.users], orig.user_ids)
  assert int(first.sum()) == 487_650
  for name, a in orig.attributes.items():
    b = full.attributes[name]
    assert [b.classes[c] for c in b.codes[:2999]] == [a.classes[c] for c in a.codes]


def test_ml100k_counts(data_dir):
  _need(data_dir, "ml-100k")
  ds = load_dataset("ml-100k", data_dir=data_dir)
  assert (ds.n_users, ds.n_items, ds.n_interactions) == (943, 1682, 100_000)
  gender = ds.attributes["gender"]
  assert dict(zip(gender.classes, gender.counts())) == {"F": 273, "M": 670}
  assert ds.attributes["occupation"].num_classes == 21
  assert ds.attributes["age"].classes == ("<18", "18-24", "25-34", "35-44", "45-49", "50-55", "56+")
  assert sum(ds.attributes["age"].counts()) == 943
  assert ds.attributes["age"].num_classes == 7
  assert load_dataset("ml-100k", data_dir=data_dir, rating_threshold=4).n_interactions == 55_375
  sp = split_dataset(ds, "loo")
  assert len(sp.test) == len(sp.valid) == 943


def test_ml100k_as_path_and_env(data_dir, monkeypatch):
  _need(data_dir, "ml-100k")
  monkeypatch.setenv("LEGO_DATA_DIR", str(data_dir))
  by_name = load_dataset("ml-100k")
  by_path = load_dataset(str(data_dir / "ml-100k"), format="movielens-100k")
  assert by_name.fingerprint == by_path.fingerprint
