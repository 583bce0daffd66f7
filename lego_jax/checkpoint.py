"""Orbax checkpoints with a JSON metadata file, saved atomically.

A checkpoint is a folder holding `tree/` (an Orbax PyTree checkpoint) and
`metadata.json`, written last. A new save goes to a sibling temporary folder
that is renamed into place, so a reader sees the old checkpoint or the new
one, never half of one; a folder without `metadata.json` is not a checkpoint.
Arrays are saved as numpy (host) arrays and come back as numpy arrays, so a
checkpoint written on a GPU restores on a CPU.

Across several processes (`sharding.initialize`) every process calls `save`
with the same tree: its arrays are gathered to every host, and process 0
alone writes them while the others wait. Orbax's multi-process save is not
used: it has every process save to one folder (ours are named per save), and
called by process 0 alone it fails at its cross-process barrier (a Gloo
timeout after 30 s, orbax-checkpoint 0.12.8). Orbax here acts for one process
(`_checkpointer`); each process restores on its own.
"""

import hashlib
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

from lego_jax import sharding
from lego_jax.errors import LegoError

_TREE = "tree"
_META = "metadata.json"
# sha256 of every array saved, checked on restore: a damaged file can decode
# to plausible-looking numbers (flipped bytes gave rows of 4.5e37), which no
# reader would notice otherwise. Checkpoints from before it are read unchecked.
_SUMS = "checksums.json"


def _complete(path: pathlib.Path) -> bool:
  return (path / _META).is_file() and (path / _TREE).is_dir()


def _backup(directory: pathlib.Path) -> pathlib.Path:
  return directory.with_name(f".{directory.name}.old")


def _recover(directory: pathlib.Path) -> None:
  """Finishes a swap interrupted between its two renames."""
  old = _backup(directory)
  if not directory.exists() and old.exists() and _complete(old):
    try:
      os.replace(old, directory)
    except FileNotFoundError:  # another process of the run finished it first
      pass


def _checkpointer() -> ocp.Checkpointer:
  """Orbax's PyTree checkpointer; across processes, one that acts for this process
  alone (Orbax's default makes every process join each save and restore)."""
  if sharding.processes() == 1:
    return ocp.PyTreeCheckpointer()
  me = jax.process_index()
  alone = ocp.options.MultiprocessingOptions(primary_host=me, active_processes={me},
                                             barrier_sync_key_prefix=f"lego-jax-{me}")
  return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(multiprocessing_options=alone),
                          multiprocessing_options=alone)


def exists(directory) -> bool:
  """Whether a finished checkpoint is at `directory`."""
  directory = pathlib.Path(directory)
  _recover(directory)
  return _complete(directory)


def save(directory, tree, metadata: dict) -> None:
  """Saves a pytree of arrays (dicts/lists) and a JSON-able dict, replacing any previous save."""
  directory = pathlib.Path(directory).absolute()
  tree = jax.tree.map(sharding.to_host, tree)
  with sharding.writer(f"save {directory}") as writes:
    if writes:
      _save(directory, tree, metadata)


def _save(directory: pathlib.Path, tree, metadata: dict) -> None:
  directory.parent.mkdir(parents=True, exist_ok=True)
  _recover(directory)
  tmp = directory.with_name(f".{directory.name}.tmp-{uuid.uuid4().hex[:8]}")
  try:
    _checkpointer().save(tmp / _TREE, tree)
    (tmp / _SUMS).write_text(json.dumps(checksums(tree), indent=1, sort_keys=True))
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


def remove(directory) -> None:
  """Deletes the folder at `directory` where there is one (process 0, across processes)."""
  with sharding.writer(f"remove {directory}") as writes:
    if writes:
      shutil.rmtree(directory, ignore_errors=True)


def checksums(tree) -> dict:
  """{key path: sha256 of dtype, shape and bytes} of every array in `tree`."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    x = np.ascontiguousarray(np.asarray(leaf))
    h = hashlib.sha256(f"{x.dtype}{x.shape}".encode())
    h.update(x.tobytes())
    out[jax.tree_util.keystr(path)] = h.hexdigest()
  return out


def _damaged(directory: pathlib.Path, what: str) -> LegoError:
  return LegoError(f"checkpoint {directory} is damaged ({what}); delete the folder and rerun "
                   "the command that made it")


def restore(directory):
  """(tree, metadata) of the checkpoint at `directory`; arrays come back as numpy.

  A damaged checkpoint (unreadable, or arrays that do not match the checksums
  saved with them) is a LegoError naming the folder, never wrong numbers.
  """
  directory = pathlib.Path(directory).absolute()
  meta = metadata(directory)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # Orbax warns about sharding when restoring to host
      tree = _checkpointer().restore(directory / _TREE)
    tree = jax.tree.map(np.asarray, tree)
  except Exception as e:  # Orbax and its codecs raise many types on damaged files
    first = (str(e).strip().splitlines() or [""])[0][:160]
    raise _damaged(directory, f"{_TREE}/ unreadable: {type(e).__name__}: {first}") from None
  sums = directory / _SUMS
  if sums.is_file():
    try:
      want = json.loads(sums.read_text())
    except (OSError, ValueError) as e:
      raise _damaged(directory, f"{_SUMS}: {e}") from None
    got = checksums(tree)
    if set(got) != set(want):
      raise _damaged(directory, f"{_TREE}/ holds arrays {sorted(got)}, {_SUMS} lists {sorted(want)}")
    bad = [k for k in sorted(got) if got[k] != want[k]]
    if bad:
      raise _damaged(directory, f"array {bad[0]} in {_TREE}/ does not match its checksum")
  return tree, meta


def metadata(directory) -> dict:
  """The metadata of the checkpoint at `directory`, without reading its arrays."""
  directory = pathlib.Path(directory).absolute()
  if not exists(directory):
    raise LegoError(f"no finished checkpoint at {directory}")
  try:
    meta = json.loads((directory / _META).read_text())
  except (OSError, ValueError) as e:
    raise _damaged(directory, f"{_META}: {e}") from None
  if not isinstance(meta, dict):
    raise _damaged(directory, f"{_META} is not a JSON object")
  return meta


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
