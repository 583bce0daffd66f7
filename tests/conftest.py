"""Shared fixtures: a tiny synthetic workdir with a trained MF backbone."""

import pathlib
import shutil

import jax
import pytest

from lego_jax import config as config_lib
from lego_jax.workdir import Workdir

TINY = [
    "data.synthetic_users=240", "data.synthetic_items=150", "data.synthetic_density=0.08",
    "model.dim=16", "train.epochs=3", "train.batch_size=256", "train.lr=0.01",
    "eval.batch_users=128",
    "unlearn.steps=12", "unlearn.batch_users=64", "unlearn.ckpt_every=4", "unlearn.lr=0.01",
    "unlearn.polish_steps=4",
    "combine.steps=6", "combine.lr=0.05",
    "attack.steps=60", "attack.repeats=1",   # tests check behaviour, not a leakage's precision
]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
  # Real-data checks read MovieLens files and take minutes: the fast tier
  # (`-m "not slow"`) leaves them to the full suite with the rest.
  for item in items:
    if item.get_closest_marker("realdata"):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="module")
def _drop_compiled_programs():
  """Each module compiles its own programs; the whole suite compiled several
  hundred into one process, and near its end XLA's CPU compiler crashed
  (segfault while compiling a calibration that had compiled fine earlier).
  Dropping JAX's caches after each module keeps that state bounded."""
  yield
  jax.clear_caches()


def tiny_config(*extra):
  return config_lib.resolve(None, TINY + list(extra))


@pytest.fixture(scope="session")
def trained_workdir(tmp_path_factory) -> pathlib.Path:
  """A workdir with a finished backbone; copy it (`fresh_workdir`) before changing it."""
  path = tmp_path_factory.mktemp("wd") / "run"
  Workdir.create(path, tiny_config()).train(progress=False)
  return path


@pytest.fixture
def fresh_workdir(trained_workdir, tmp_path) -> pathlib.Path:
  path = tmp_path / "run"
  shutil.copytree(trained_workdir, path)
  return path


@pytest.fixture
def polish_reads_above(monkeypatch):
  """The polish's readings (the only ones naming their probes) shifted 0.5
  above chance, so that it moves every attribute: it leaves out one read
  below chance, and the tiny fixture's may read below."""
  from lego_jax.requests import Unlearner
  from lego_jax.unlearning import control
  real = Unlearner._read

  def above(self, tables, names, probes=None, *args, **kwargs):
    r = real(self, tables, names, probes, *args, **kwargs)
    return r if probes is None else control.Reading(r.signed + 0.5, r.lo + 0.5, r.hi + 0.5,
                                                    r.probes)
  monkeypatch.setattr(Unlearner, "_read", above)
