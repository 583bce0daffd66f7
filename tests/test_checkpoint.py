"""Orbax checkpoint helper: round trip, overwrite, unfinished saves."""

import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax import checkpoint
from lego_jax.errors import LegoError


def tree():
  return {"a": jnp.arange(6.0).reshape(2, 3), "b": {"c": np.int32(7), "d": [np.ones(2, np.uint32)]}}


def test_round_trip(tmp_path):
  d = tmp_path / "ck"
  assert not checkpoint.exists(d)
  checkpoint.save(d, tree(), {"epoch": 3, "name": "mf"})
  assert checkpoint.exists(d)
  got, meta = checkpoint.restore(d)
  assert meta == {"epoch": 3, "name": "mf"}
  np.testing.assert_array_equal(got["a"], tree()["a"])
  assert got["a"].dtype == np.float32
  assert int(got["b"]["c"]) == 7
  np.testing.assert_array_equal(got["b"]["d"][0], np.ones(2, np.uint32))


def test_overwrite(tmp_path):
  d = tmp_path / "ck"
  checkpoint.save(d, tree(), {"epoch": 1})
  checkpoint.save(d, {"x": np.zeros(4)}, {"epoch": 2})
  got, meta = checkpoint.restore(d)
  assert meta == {"epoch": 2} and list(got) == ["x"]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temporary folders left


def test_partial_not_a_checkpoint(tmp_path):
  d = tmp_path / "ck"
  (d / "tree").mkdir(parents=True)  # as if killed before metadata.json was written
  assert not checkpoint.exists(d)
  with pytest.raises(LegoError, match="no finished checkpoint"):
    checkpoint.restore(d)
  checkpoint.save(d, tree(), {"epoch": 1})
  assert checkpoint.exists(d)


def test_interrupted_swap_recovers(tmp_path):
  d = tmp_path / "ck"
  checkpoint.save(d, tree(), {"epoch": 1})
  d.rename(tmp_path / ".ck.old")  # killed between the two renames of a later save
  assert checkpoint.exists(d)
  assert checkpoint.restore(d)[1] == {"epoch": 1}


def test_flatten_keeps_namedtuples(tmp_path):
  import optax
  params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
  state = optax.adam(1e-3).init(params)
  checkpoint.save(tmp_path / "ck", checkpoint.flatten(state), {})
  got = checkpoint.unflatten(state, checkpoint.restore(tmp_path / "ck")[0])
  assert type(got) is type(state) and type(got[0]) is type(state[0])
  np.testing.assert_array_equal(got[0].mu["w"], state[0].mu["w"])
  with pytest.raises(LegoError, match="expected"):
    checkpoint.unflatten(state, {"00000": np.zeros(1)})
