"""Orbax checkpoints with a JSON metadata file, saved atomically.

A checkpoint is a folder holding `tree/` (an Orbax PyTree checkpoint) and
`metadata.json`, written last. A new save goes to a sibling temporary folder
that is renamed into place, so a reader sees the old checkpoint or the new
one, never half of one; a folder without `metadata.json` is not a checkpoint.
Arrays are saved as numpy (host) arrays and come back as numpy arrays, so a
checkpoint written on a GPU restores on a CPU.
"""

import json
import os
import pathlib
import shutil
import uuid
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lego_jax.errors import LegoError

_TREE = "tree"
_META = "metadata.json"


def _complete(path: pathlib.Path) -> bool:
  return (path / _META).is_file() and (path / _TREE).is_dir()


def _backup(directory: pathlib.Path) -> pathlib.Path:
  return directory.with_name(f".{directory.name}.old")


def _recover(directory: pathlib.Path) -> None:
  """Finishes a swap interrupted between its two renames."""
  old = _backup(directory)
  if not directory.exists() and old.exists() and _complete(old):
    os.replace(old, directory)


def exists(directory) -> bool:
  """Whether a finished checkpoint is at `directory`."""
  directory = pathlib.Path(directory)
  _recover(directory)
  return _complete(directory)


def save(directory, tree, metadata: dict) -> None:
  """Saves a pytree of arrays (dicts/lists) and a JSON-able dict, replacing any previous save."""
  directory = pathlib.Path(directory).absolute()
  directory.parent.mkdir(parents=True, exist_ok=True)
  _recover(directory)
  tree = jax.tree.map(np.asarray, jax.device_get(tree))
  tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    ocp.PyTreeCheckpointer().save(tmp / _TREE, tree)
    (tmp / _META).write_text(json.dumps(metadata, indent=1, sort_keys=True))
    old = _backup(directory)
    if old.exists():
      shutil.rmtree(old)
    if directory.exists():
      os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def restore(directory):
  """(tree, metadata) of the checkpoint at `directory`; arrays come back as numpy."""
  directory = pathlib.Path(directory).absolute()
  if not exists(directory):
    raise LegoError(f"no finished checkpoint at {directory}")
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # Orbax warns about sharding when restoring to host
    tree = ocp.PyTreeCheckpointer().restore(directory / _TREE)
  return jax.tree.map(np.asarray, tree), metadata(directory)


def metadata(directory) -> dict:
  """The metadata of the checkpoint at `directory`, without reading its arrays."""
  directory = pathlib.Path(directory).absolute()
  if not exists(directory):
    raise LegoError(f"no finished checkpoint at {directory}")
  return json.loads((directory / _META).read_text())


def flatten(tree) -> dict:
  """A pytree's leaves under ordered string keys.

  Orbax restores NamedTuples (optax states, calibration states) as plain
  containers; saving the leaves and rebuilding with `unflatten` keeps the types.
  """
  return {f"{i:05d}": leaf for i, leaf in enumerate(jax.tree.leaves(tree))}


def unflatten(template, flat: dict):
  """The inverse of `flatten`, given a pytree of the same structure and dtypes."""
  leaves = [flat[k] for k in sorted(flat)]
  like = jax.tree.leaves(template)
  if len(leaves) != len(like):
    raise LegoError(f"checkpoint holds {len(leaves)} arrays, expected {len(like)}")
  leaves = [jnp.asarray(x, dtype=jnp.asarray(t).dtype) for x, t in zip(leaves, like)]
  return jax.tree.unflatten(jax.tree.structure(template), leaves)
