"""Data layer on hand-written fixtures and small synthetic data (no real files)."""

import atexit
import dataclasses
import gzip
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import pytest

from lego_jax.config import DEFAULTS
from lego_jax.data import (DATASETS, MISSING, describe, from_config, load_dataset,
                           split_dataset)
from lego_jax.data import readers
from lego_jax.data.split import random_folds
from lego_jax.errors import LegoError

# Hand-written lines in the MovieLens formats are stored as `*.handwritten` so
# no file in the repository carries a MovieLens file name (their licence
# forbids redistribution; these files hold invented ids and values). The tests
# read a copy with the conventional names.
_SOURCE = pathlib.Path(__file__).parent / "fixtures"
FIXTURES = pathlib.Path(tempfile.mkdtemp(prefix="lego-fixtures-"))
atexit.register(shutil.rmtree, FIXTURES, True)
for _f in _SOURCE.rglob("*"):
  if _f.is_file():
    _dest = FIXTURES / _f.relative_to(_SOURCE).with_name(_f.name.removesuffix(".handwritten"))
    _dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(_f, _dest)


def small_synthetic(**kw):
  args = dict(synthetic_users=300, synthetic_items=200, synthetic_density=0.05, seed=0)
  args.update(kw)
  return load_dataset("synthetic", **args)


def pairs(ds):
  return {(ds.user_ids[u], ds.item_ids[i]) for u, i in zip(ds.users, ds.items)}


def attr(ds, name):
  a = ds.attributes[name]
  return {ds.user_ids[u]: (a.classes[c] if c >= 0 else None) for u, c in enumerate(a.codes)}


# --- formats ---------------------------------------------------------------


def test_ml100k_fixture():
  ds = load_dataset(FIXTURES / "ml100k")
  assert readers.detect_format(FIXTURES / "ml100k") == "movielens-100k"
  assert list(ds.user_ids) == ["1", "2", "3"]  # user 4 has no ratings: dropped
  assert list(ds.item_ids) == ["101", "102", "103", "104"]
  assert ds.n_interactions == 9  # (1, 101) appears twice: merged
  assert ds.counts[(ds.users == 0) & (ds.items == 0)].tolist() == [2]
  assert ds.counts.sum() == 10
  assert list(ds.attributes) == ["gender", "age", "occupation"]  # zip left out
  assert attr(ds, "gender") == {"1": "F", "2": "M", "3": "M"}
  assert attr(ds, "age") == {"1": "<18", "2": "25-34", "3": "56+"}
  assert attr(ds, "occupation")["3"] == "none"  # an ML-100K class, not a missing label
  # Merged pair keeps its latest timestamp.
  assert ds.timestamps[(ds.users == 0) & (ds.items == 0)].tolist() == [880000011]


def test_ml1m_fixture_and_gz(tmp_path):
  ds = load_dataset(FIXTURES / "ml1m")
  assert ds.n_users == 3 and ds.n_items == 4 and ds.n_interactions == 8
  assert attr(ds, "age") == {"1": "1", "2": "56", "3": "25"}  # ML-1M codes kept
  assert ds.attributes["occupation"].classes == ("0", "10", "16")  # numeric order
  folder = tmp_path / "gz"
  folder.mkdir()
  shutil.copy(FIXTURES / "ml1m" / "users.dat", folder)
  with gzip.open(folder / "ratings.dat.gz", "wb") as f:
    f.write((FIXTURES / "ml1m" / "ratings.dat").read_bytes())
  gz = load_dataset(folder)
  assert pairs(gz) == pairs(ds)
  assert gz.fingerprint == ds.fingerprint  # same content, same preprocessing


def test_recbole_fixture_plain_and_gz(tmp_path):
  ds = load_dataset(FIXTURES / "recbole")
  assert readers.detect_format(FIXTURES / "recbole") == "recbole"
  assert ds.n_users == 3 and ds.n_items == 3 and ds.n_interactions == 7
  assert list(ds.attributes) == ["gender", "age", "occupation"]
  assert ds.attributes["occupation"].classes == ("4", "12")
  for name in ("toy.inter", "toy.user"):
    with gzip.open(tmp_path / (name + ".gz"), "wb") as f:
      f.write((FIXTURES / "recbole" / name).read_bytes())
  gz = load_dataset(tmp_path, format="recbole")
  assert pairs(gz) == pairs(ds)
  assert {n: a.classes for n, a in gz.attributes.items()} == {
      n: a.classes for n, a in ds.attributes.items()}


def test_recbole_rating_threshold():
  ds = load_dataset(FIXTURES / "recbole", rating_threshold=4)
  assert pairs(ds) == {("7", "x1"), ("8", "x1"), ("9", "x2"), ("9", "x3")}


def test_rating_threshold_without_ratings(tmp_path):
  (tmp_path / "a.inter").write_text("user_id:token\titem_id:token\n1\t2\n")
  with pytest.raises(LegoError, match="needs ratings"):
    load_dataset(tmp_path, rating_threshold=4)


def test_lightgcn_fixture():
  ds = load_dataset(FIXTURES / "lightgcn")
  assert readers.detect_format(FIXTURES / "lightgcn") == "lightgcn"
  assert list(ds.user_ids) == ["0", "1", "2", "3"]  # user 9 (attributes only) dropped
  assert ds.n_interactions == 17
  assert np.bincount(ds.fold, minlength=3).tolist() == [11, 2, 4]
  assert list(ds.attributes) == ["gender", "age", "region"]
  assert attr(ds, "age")["2"] is None  # empty cell: missing, not guessed
  assert ds.attributes["age"].missing == 1
  sp = split_dataset(ds, "predefined")
  assert len(sp.train) == 11 and len(sp.valid) == 2 and len(sp.test) == 4
  test = {(ds.user_ids[u], ds.item_ids[i]) for u, i in sp.test}
  assert test == {("0", "15"), ("1", "16"), ("2", "13"), ("3", "10")}


def test_lightgcn_users_file_option(tmp_path):
  for name in ("train.txt", "test.txt"):
    shutil.copy(FIXTURES / "lightgcn" / name, tmp_path)
  assert load_dataset(tmp_path).attributes == {}  # no attribute file: no attributes
  (tmp_path / "people.csv").write_text("user,sex\n0,F\n1,M\n")
  ds = load_dataset(tmp_path, users_file=str(tmp_path / "people.csv"))
  assert attr(ds, "sex") == {"0": "F", "1": "M", "2": None, "3": None}


def test_lastfm_fixture():
  ds = load_dataset(FIXTURES / "lastfm")
  assert readers.detect_format(FIXTURES / "lastfm") == "lastfm"
  assert list(ds.user_ids) == ["aa01", "bb02", "cc03"]  # dd04 has no plays
  # An artist without an mbid is identified by its name.
  assert "name:Artist One" in ds.item_ids
  assert list(ds.attributes) == ["gender", "age", "country"]  # signup left out
  assert attr(ds, "gender") == {"aa01": "f", "bb02": "m", "cc03": None}
  assert attr(ds, "age") == {"aa01": "18-24", "bb02": None, "cc03": None}  # -1337 is unknown
  # plays act as the rating for a threshold
  assert pairs(load_dataset(FIXTURES / "lastfm", rating_threshold=100)) == {
      ("aa01", "name:Artist One"), ("cc03", "mb-0003")}


def test_named_lastfm_folder(tmp_path):
  shutil.copytree(FIXTURES / "lastfm", tmp_path / "lastfm-360k")
  ds = load_dataset("lastfm-360k", data_dir=tmp_path)
  assert ds.name == "lastfm-360k" and ds.n_users == 3


# --- attributes and preprocessing -----------------------------------------


def test_age_bins():
  assert small_synthetic(age_bins="none").attributes["age"].num_classes == 4  # labelled groups
  ml100 = FIXTURES / "ml100k"
  assert load_dataset(ml100, age_bins="none").attributes["age"].classes == ("17", "33", "61")
  assert load_dataset(ml100, age_bins="30,60").attributes["age"].classes == ("<30", "30-59", "60+")
  ml1 = FIXTURES / "ml1m"
  assert load_dataset(ml1, age_bins="18").attributes["age"].classes == ("<18", "18+")
  with pytest.raises(LegoError, match="age_bins"):
    load_dataset(ml100, age_bins="30,abc")
  with pytest.raises(LegoError, match="increase"):
    load_dataset(ml100, age_bins="30,20")


def test_attribute_selection():
  ds = load_dataset(FIXTURES / "ml100k", attributes=["occupation", "zip"])
  assert list(ds.attributes) == ["occupation", "zip"]
  with pytest.raises(LegoError, match=r"unknown attribute 'height'.*age, gender, occupation"):
    load_dataset(FIXTURES / "ml100k", attributes=["height"])


def test_kcore():
  ds = small_synthetic()
  core = small_synthetic(kcore=10)
  assert core.n_interactions < ds.n_interactions
  assert np.bincount(core.users).min() >= 10 and np.bincount(core.items).min() >= 10
  assert core.fingerprint != ds.fingerprint


def test_fingerprint_tracks_content_and_preprocessing():
  base = load_dataset(FIXTURES / "ml100k")
  assert base.fingerprint == load_dataset(FIXTURES / "ml100k").fingerprint
  others = [load_dataset(FIXTURES / "ml100k", rating_threshold=3),
            load_dataset(FIXTURES / "ml100k", age_bins="none"),
            load_dataset(FIXTURES / "ml100k", attributes=["gender"]),
            load_dataset(FIXTURES / "ml100k", kcore=1)]
  prints = {base.fingerprint} | {o.fingerprint for o in others}
  assert len(prints) == 5
  assert small_synthetic(seed=1).fingerprint != small_synthetic(seed=0).fingerprint


# --- synthetic ---------------------------------------------------------------


def test_synthetic_shape_and_determinism():
  ds = small_synthetic()
  again = small_synthetic()
  assert ds.fingerprint == again.fingerprint
  np.testing.assert_array_equal(ds.items, again.items)
  assert ds.n_users == 300 and ds.n_items <= 200
  assert 0.03 < ds.n_interactions / (300 * 200) < 0.08
  assert [a.num_classes for a in ds.attributes.values()] == [2, 4, 10]
  gender = np.bincount(ds.attributes["gender"].codes) / ds.n_users
  assert 0.2 < gender.min() < 0.4  # ~70/30
  pop = np.sort(np.bincount(ds.items))[::-1]
  assert pop[:20].sum() > 3 * pop[-20:].sum()  # long tail
  assert all(a.missing == 0 for a in ds.attributes.values())


def _probe_bacc(ds, name, seed=0):
  """Balanced accuracy of a ridge probe on SVD user embeddings, held-out half."""
  x = np.zeros((ds.n_users, ds.n_items), np.float32)
  x[ds.users, ds.items] = 1
  u, s, _ = np.linalg.svd(x - x.mean(0), full_matrices=False)
  e = np.c_[u[:, :32] * s[:32], np.ones(ds.n_users)]
  y = ds.attributes[name].codes
  c = y.max() + 1
  rng = np.random.default_rng(seed)
  idx = rng.permutation(ds.n_users)
  tr, te = idx[: len(idx) // 2], idx[len(idx) // 2:]
  onehot = np.eye(c)[y] / np.bincount(y[tr], minlength=c)  # class-balanced targets
  w = np.linalg.solve(e[tr].T @ e[tr] + np.eye(e.shape[1]), e[tr].T @ onehot[tr])
  pred = (e[te] @ w).argmax(1)
  return np.mean([np.mean(pred[y[te] == k] == k) for k in range(c)]), 1 / c


@pytest.mark.slow
def test_synthetic_attributes_leak():
  ds = load_dataset("synthetic", synthetic_users=1000, synthetic_items=400, seed=3)
  for name, margin in (("gender", 0.1), ("age", 0.08), ("occupation", 0.015)):
    bacc, chance = _probe_bacc(ds, name)
    assert bacc > chance + margin, (name, bacc, chance)


# --- splits ----------------------------------------------------------------


def _as_set(a):
  return set(map(tuple, a.tolist()))


@pytest.mark.parametrize("method", ["random", "loo"])
def test_split_disjoint_cover_deterministic(method):
  ds = small_synthetic()
  sp = split_dataset(ds, method, seed=5)
  parts = [_as_set(sp.train), _as_set(sp.valid), _as_set(sp.test)]
  assert sum(map(len, parts)) == ds.n_interactions
  assert set.union(*parts) == set(zip(ds.users.tolist(), ds.items.tolist()))
  assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
  assert sp.train.dtype == np.int32 and sp.train.shape[1] == 2
  again = split_dataset(ds, method, seed=5)
  np.testing.assert_array_equal(sp.test, again.test)
  assert sp.fingerprint == again.fingerprint
  assert split_dataset(ds, method, seed=6).fingerprint != sp.fingerprint
  assert set(np.unique(sp.train[:, 0]).tolist()) == set(range(ds.n_users))  # all keep train
  if method == "random":
    assert 0.7 < len(sp.train) / ds.n_interactions < 0.85  # small users round up
    assert not np.array_equal(split_dataset(ds, method, seed=6).test, sp.test)
  else:
    assert len(sp.test) == len(sp.valid) == ds.n_users  # every synthetic user has >= 5


def test_random_split_rounding_small_users():
  users = np.repeat(np.arange(5), [1, 2, 3, 5, 10]).astype(np.int32)
  fold = random_folds(users, (0.8, 0.1, 0.1), np.random.default_rng(0))
  per_user = [np.bincount(fold[users == u], minlength=3).tolist() for u in range(5)]
  assert per_user == [[1, 0, 0], [2, 0, 0], [3, 0, 0], [3, 1, 1], [8, 1, 1]]
  fold = random_folds(users, (0.34, 0.33, 0.33), np.random.default_rng(0))
  assert all(np.bincount(fold[users == u], minlength=3)[0] >= 1 for u in range(5))


def test_loo_uses_timestamps():
  ds = load_dataset(FIXTURES / "ml100k")
  sp = split_dataset(ds, "loo")
  test = {(ds.user_ids[u], ds.item_ids[i]) for u, i in sp.test}
  valid = {(ds.user_ids[u], ds.item_ids[i]) for u, i in sp.valid}
  # latest per user: 1 -> 101 (ts ...11), 2 -> 101 (...10), 3 -> 104 (...09)
  assert test == {("1", "101"), ("2", "101"), ("3", "104")}
  assert valid == {("1", "102"), ("2", "102"), ("3", "101")}


def test_random_split_respects_predefined():
  ds = load_dataset(FIXTURES / "lightgcn")
  pre = split_dataset(ds, "predefined")
  for seed in (0, 1):
    sp = split_dataset(ds, "random", seed=seed)
    np.testing.assert_array_equal(sp.train, pre.train)
    np.testing.assert_array_equal(sp.test, pre.test)
    assert sp.fingerprint == pre.fingerprint
  # Without valid.txt, random draws valid from train but keeps test.
  ds = load_dataset(FIXTURES / "lightgcn")
  nofold_valid = ds.fold.copy()
  nofold_valid[nofold_valid == 1] = 0
  ds2 = dataclasses.replace(ds, fold=nofold_valid)
  sp = split_dataset(ds2, "random", ratios=(0.5, 0.5, 0.0))
  assert _as_set(sp.test) == _as_set(pre.test)
  assert len(sp.valid) > 0 and not (_as_set(sp.valid) & _as_set(sp.test))


def test_split_errors():
  ds = small_synthetic()
  with pytest.raises(LegoError, match="no predefined split"):
    split_dataset(ds, "predefined")
  with pytest.raises(LegoError, match=r"unknown split method 'kfold'; valid: loo, predefined, random"):
    split_dataset(ds, "kfold")
  with pytest.raises(LegoError, match="ratios"):
    split_dataset(ds, "random", ratios=(0.8, 0.3, 0.1))


# --- errors ------------------------------------------------------------------


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(LegoError) as e:
    load_dataset("ml-20m")
  for name in DATASETS:
    assert name in str(e.value)


def test_unknown_format():
  with pytest.raises(LegoError, match="unknown format 'csv'"):
    load_dataset(FIXTURES / "ml100k", format="csv")


def test_missing_files(tmp_path, monkeypatch):
  monkeypatch.delenv("LEGO_DATA_DIR", raising=False)
  with pytest.raises(LegoError, match="LEGO_DATA_DIR"):
    load_dataset("ml-1m")
  with pytest.raises(LegoError, match=r"ml-1m: folder .* does not exist"):
    load_dataset("ml-1m", data_dir=tmp_path)
  with pytest.raises(LegoError, match=r"no dataset files found in .*u\.data and u\.user"):
    load_dataset(tmp_path)
  shutil.copy(FIXTURES / "ml100k" / "u.data", tmp_path)
  with pytest.raises(LegoError, match=r"missing u\.user in .*expected u\.data and u\.user"):
    load_dataset(tmp_path)
  with pytest.raises(LegoError, match=r"missing ratings\.dat"):
    load_dataset(tmp_path, format="movielens-1m")
  with pytest.raises(LegoError, match="does not exist"):
    load_dataset(FIXTURES / "ml100k", users_file="nope.tsv")


@pytest.mark.parametrize("folder,name,line,bad", [
    ("ml100k", "u.data", 3, "1\t103\t5\n"),
    ("ml100k", "u.user", 2, "2|33|M\n"),
    ("ml1m", "ratings.dat", 4, "2::201::two::970000004\n"),
    ("recbole", "toy.inter", 5, "8\tx3\n"),
    ("lastfm", "usersha1-artmbid-artname-plays.tsv", 2, "aa01\tmb-0002\tArtist Two\tmany\n"),
])
def test_malformed_line_names_file_and_line(tmp_path, folder, name, line, bad):
  shutil.copytree(FIXTURES / folder, tmp_path / folder)
  path = tmp_path / folder / name
  lines = path.read_text().splitlines(keepends=True)
  lines[line - 1] = bad
  path.write_text("".join(lines))
  with pytest.raises(LegoError, match=f"{name}:{line}: "):
    load_dataset(tmp_path / folder)


def test_malformed_user_file_header(tmp_path):
  shutil.copytree(FIXTURES / "lightgcn", tmp_path / "l")
  (tmp_path / "l" / "users.tsv").write_text("user_id\tgender\n0\tF\textra\n")
  with pytest.raises(LegoError, match=r"users\.tsv:2: expected 2 fields"):
    load_dataset(tmp_path / "l")
  (tmp_path / "l" / "users.tsv").write_text("user_id\tgender\n0\tF\n0\tM\n")
  with pytest.raises(LegoError, match=r"users\.tsv:3: user '0' repeats line 2"):
    load_dataset(tmp_path / "l")


def test_blank_lines_and_crlf(tmp_path):
  shutil.copytree(FIXTURES / "ml100k", tmp_path / "m")
  path = tmp_path / "m" / "u.data"
  path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n", 3) + b"\n\n")
  ds = load_dataset(tmp_path / "m")
  assert ds.n_interactions == 9


# --- config and describe -------------------------------------------------------


def test_from_config_and_describe():
  config = json.loads(json.dumps(DEFAULTS))
  config["data"].update(synthetic_users=200, synthetic_items=150, split="random")
  config["seed"] = 4
  ds, sp = from_config(config)
  assert ds.fingerprint == small_synthetic(synthetic_users=200, synthetic_items=150,
                                           synthetic_density=0.045, seed=4).fingerprint
  d = describe(ds, sp)
  assert list(d) == ["dataset", "users", "items", "interactions", "attributes", "split"]
  assert d["dataset"] == "synthetic" and d["users"] == 200
  assert set(d["attributes"]) == {"gender", "age", "occupation"}
  for a in d["attributes"].values():
    assert list(a) == ["classes", "counts", "missing"]
    assert len(a["classes"]) == len(a["counts"]) and sum(a["counts"]) + a["missing"] == 200
  assert sum(d["split"].values()) == d["interactions"]
  json.dumps(d)  # plain JSON types only
  assert all(type(v) is int for v in d["split"].values())


def test_missing_attribute_codes_are_minus_one():
  ds = load_dataset(FIXTURES / "lastfm")
  assert (ds.attributes["age"].codes == MISSING).sum() == 2


@pytest.mark.slow
def test_fingerprint_stable_across_processes():
  """Fingerprints are compared across runs: no dependence on hash randomisation."""
  code = ("from lego_jax.data import load_dataset as l; "
          f"print(l('synthetic', synthetic_users=100, synthetic_items=80).fingerprint, "
          f"l({str(FIXTURES / 'lightgcn')!r}).fingerprint)")
  outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": str(s)}).stdout
          for s in (1, 2)}
  assert len(outs) == 1
  assert outs.pop().split()[1] == load_dataset(FIXTURES / "lightgcn").fingerprint
