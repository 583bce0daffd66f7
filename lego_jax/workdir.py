"""A run's workdir: the resolved config, the data fingerprint and every stage.

  config.json        the resolved config (identity fields fixed at creation)
  data.json          dataset and split fingerprints, sizes
  backbone/          Orbax: trained params, optimiser state, epoch (lego_jax.training)
  bricks/<attr>/     Orbax: one calibrated attribute (lego_jax.requests)
  combination/       Orbax: weights, active set, final table
  results.json, report.md, *.png   (lego_jax.runner)

A workdir is tied to one dataset, split, backbone and training config; opening
it with another is refused with a message that says what differs.
"""

import contextlib
import fcntl
import functools
import hashlib
import json
import os
import pathlib
import re
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from lego_jax import checkpoint, config as config_lib, data as data_lib, models, sharding, training
from lego_jax.errors import LegoError, unknown
from lego_jax.evaluation import attackers, ranking

# The fields a trained backbone depends on; the rest (unlearn, combine,
# attack, run, eval) may change between commands on the same workdir.
IDENTITY = ("seed", "data", "model", "train")


# Names from data files and configs (attributes, stages) become folder names:
# only these characters pass through unchanged, so no name can climb out of
# its folder (`..`, `/`, an absolute path) or collide with a dot-folder of ours.
_SAFE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def safe_name(name: str) -> str:
  """A file-system name for `name` that stays inside the folder it is joined to.

  Names made only of letters, digits, `_` and `-` are kept as they are (so
  existing workdirs keep their layout); any other name becomes a slug of it
  plus a hash of the exact name, which keeps distinct names apart.
  """
  name = str(name)
  if _SAFE.fullmatch(name):
    return name
  slug = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_")[:40] or "name"
  return f"{slug}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


def child(folder: os.PathLike, name: str) -> pathlib.Path:
  """`folder / safe_name(name)`."""
  return pathlib.Path(folder) / safe_name(name)


def _diff(old: Any, new: Any, where: str = "") -> list[str]:
  if isinstance(old, dict) and isinstance(new, dict):
    out = []
    for k in sorted(set(old) | set(new)):
      out += _diff(old.get(k), new.get(k), f"{where}.{k}" if where else k)
    return out
  return [] if old == new else [f"{where}: workdir has {old!r}, now {new!r}"]


def write_json(path: os.PathLike, obj) -> None:
  """Atomic JSON write (temporary file, then rename)."""
  path = pathlib.Path(path)
  tmp = path.with_name(f".{path.name}.tmp")
  text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
  with sharding.writer(f"write {path}") as writes:
    if not writes:
      return
    try:
      tmp.write_text(text)
      os.replace(tmp, path)
    except OSError as e:  # a read-only workdir, a full disk
      raise LegoError(f"cannot write {path}: {e.strerror or e}") from None


def _json_default(o):
  if isinstance(o, (np.integer,)):
    return int(o)
  if isinstance(o, (np.floating,)):
    return float(o)
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(type(o).__name__)


def _read_json(path: pathlib.Path):
  try:
    return json.loads(path.read_text())
  except OSError as e:
    raise LegoError(f"cannot read {path}: {e.strerror or e}") from None
  except ValueError as e:  # a truncated or hand-edited file
    raise LegoError(f"{path}: not valid JSON ({e})") from None


def _data_info(ds: data_lib.Dataset, split: data_lib.Split) -> dict:
  """What data.json records: the data a workdir's backbone was trained on."""
  return {"dataset": ds.name, "dataset_fingerprint": ds.fingerprint,
          "split_fingerprint": split.fingerprint, "n_users": ds.n_users, "n_items": ds.n_items}


def _identity(config: dict, field: str):
  value = config.get(field)
  if field == "data":  # the same files may be reached by another path: data.json checks content
    value = {k: v for k, v in value.items() if k != "data_dir"}
  return value


class Backbone(NamedTuple):
  """The trained recommender, and scoring with a substituted user table.

  Build it with `Backbone.build`: `score` is made once per backbone, so every
  jit of it (calibration, combination, evaluation) shares one compile cache.
  """
  model: models.Model
  params: Any
  aux: Any
  # `(table, users, items=None) -> scores`, pure (jit/grad-able).
  score: Callable
  # A hash of the trained params: what a brick or combination was made from.
  fingerprint: str

  @classmethod
  def build(cls, model: models.Model, params, aux) -> "Backbone":
    leaves, treedef = jax.tree.flatten((params, aux))
    arrays = [i for i, x in enumerate(leaves) if isinstance(x, (jax.Array, np.ndarray))]

    def score(table, users, items=None):
      # Under jit the frozen params and graph are closed-over constants, and
      # XLA constant-folds the graph's index arithmetic: minutes of compile
      # time per program for ML-1M LightGCN. The barrier makes them opaque.
      held = list(leaves)
      for i, x in zip(arrays, jax.lax.optimization_barrier([leaves[i] for i in arrays])):
        held[i] = x
      p, a = jax.tree.unflatten(treedef, held)
      return model.score(model.with_user_table(p, table), a, users, items)
    return cls(model, params, aux, score, params_fingerprint(params))

  def table(self) -> jax.Array:
    return self.model.user_table(self.params)

  def ranking_fn(self, table) -> Callable:
    """`users -> (B, n_items)` full-ranking scores with `table` substituted."""
    score = jax.jit(self.score)
    table = jnp.asarray(table)
    return lambda users: score(table, users)


def params_fingerprint(params) -> str:
  """A short hash of a pytree's array values, shapes and dtypes."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    x = np.ascontiguousarray(np.asarray(leaf))
    h.update(f"{x.dtype}{x.shape}".encode())
    h.update(x.tobytes())
  return h.hexdigest()[:16]


# Writer locks held by this process: resolved workdir -> [file descriptor, depth].
_HELD: dict[str, list] = {}


@contextlib.contextmanager
def writer_lock(path: os.PathLike):
  """The exclusive right to write the workdir at `path`.

  A second writing process is refused with the holder's pid, so two commands
  never interleave their checkpoints and config.json. The lock is re-entrant
  within a process, and the OS drops it when the holder dies (`flock`), so a
  killed run leaves no stale lock. Readers take no lock: every write is an
  atomic rename, so they see the old state or the new one. Across processes
  (`sharding.initialize`) process 0 holds it for the run: it alone writes.
  """
  path = pathlib.Path(path)
  if not sharding.is_writer():
    yield
    return
  try:
    path.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    if key in _HELD:
      _HELD[key][1] += 1
      try:
        yield
      finally:
        _HELD[key][1] -= 1
      return
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
  except OSError as e:
    raise LegoError(f"cannot write to workdir {path}: {e.strerror or e}") from None
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
      raise LegoError(f"workdir {path} is being written by another lego-jax process "
                      f"(pid {holder}); wait for it to finish, or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _HELD[key] = [fd, 1]
    try:
      yield
    finally:
      del _HELD[key]
  finally:
    os.close(fd)   # closing the descriptor releases the flock


class Workdir:
  """Opens or creates a workdir; loads its data and backbone on first use."""

  def __init__(self, path: os.PathLike, config: dict):
    self.path = pathlib.Path(path)
    self.config = config

  @classmethod
  def create(cls, path: os.PathLike, config: dict) -> "Workdir":
    """A new workdir, or an existing one if its identity fields match `config`."""
    path = pathlib.Path(path)
    config_lib.validate(config)  # before anything is written: a refused config leaves no trace
    if (path / "config.json").is_file():
      old = config_lib.load(path / "config.json")
      diffs = [d for f in IDENTITY for d in _diff(_identity(old, f), _identity(config, f), f)]
      if diffs:
        raise LegoError(f"workdir {path} was built with another config; differs: {'; '.join(diffs)}"
                        " (use another --workdir)")
    with writer_lock(path), sharding.writer(f"write {path / 'config.json'}") as writes:
      if writes:   # writer_lock creates the folder, or says why it cannot
        config_lib.save(config, path / "config.json")
    return cls(path, config)

  @classmethod
  def open(cls, path: os.PathLike, overrides=()) -> "Workdir":
    """An existing workdir; `overrides` (`key=value`) may change its non-identity fields."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
      raise LegoError(f"{path} is not a lego-jax workdir (no config.json); "
                      "create one with `lego-jax train` or `lego-jax run`")
    config = config_lib.apply_overrides(
        config_lib.fill_defaults(config_lib.load(path / "config.json")), overrides)
    return cls.create(path, config) if overrides else cls(path, config)

  @functools.cached_property
  def data(self) -> tuple[data_lib.Dataset, data_lib.Split]:
    """The dataset and split, refused where data.json records other data. Reading
    writes nothing: `train` records the data the backbone is trained on."""
    ds, split = data_lib.from_config(self.config)
    meta = self.path / "data.json"
    if meta.is_file():
      diffs = _diff(_read_json(meta), _data_info(ds, split))
      if diffs:
        raise LegoError(f"workdir {self.path} was built on other data; differs: {'; '.join(diffs)}")
    return ds, split

  @property
  def dataset(self) -> data_lib.Dataset:
    return self.data[0]

  @property
  def split(self) -> data_lib.Split:
    return self.data[1]

  def attribute_names(self) -> list[str]:
    return list(self.dataset.attributes)

  def labels(self, names) -> tuple[np.ndarray, list[int]]:
    """(K, n_users) int codes (-1 missing) and class counts for the named attributes."""
    attrs = self.dataset.attributes
    if not attrs:
      raise LegoError(f"dataset {self.dataset.name} has no user attributes, so there is nothing "
                      "to attack or unlearn; give a user-attribute file (data.users_file)")
    if not names:
      raise LegoError(f"no attribute given; valid: {', '.join(attrs)}")
    for name in names:
      if name not in attrs:
        raise unknown("attribute", name, attrs)
    # Classes no user has are left out, so fewer than 2 means nothing to learn:
    # an estimate on it would be silently meaningless.
    bad = [f"{a} ({attrs[a].num_classes} class{'es' if attrs[a].num_classes != 1 else ''}, "
           f"{int((attrs[a].codes >= 0).sum())} labelled users)"
           for a in names if attrs[a].num_classes < 2]
    if bad:
      raise LegoError(f"attribute{'s' if len(bad) > 1 else ''} {', '.join(bad)} cannot be "
                      "attacked or unlearned: each needs labelled users of at least 2 classes")
    return (np.stack([attrs[a].codes for a in names]).astype(np.int32),
            [attrs[a].num_classes for a in names])

  def writing(self):
    """A context in which this process alone writes the workdir (see `writer_lock`)."""
    return writer_lock(self.path)

  def train(self, progress: bool = True) -> Backbone:
    """Trains the backbone, or resumes its interrupted training; returns it.

    The first call records the data's fingerprints in data.json, so a later
    command on other data (changed files, another split) is refused."""
    with self.writing():
      if not (self.path / "data.json").is_file():
        write_json(self.path / "data.json", _data_info(*self.data))
      return self._load_backbone(progress)

  def backbone(self, progress: bool = False) -> Backbone:
    """The trained backbone. Nothing is trained here: where training has not
    finished, a LegoError says which command does it."""
    if not hasattr(self, "_backbone"):
      d = self.path / "backbone"
      if not (checkpoint.exists(d) and checkpoint.metadata(d).get("done")):
        raise LegoError(f"workdir {self.path} has no trained backbone (training not run or "
                        f"interrupted); run `lego-jax train --workdir {self.path}`")
      self._load_backbone(progress)
    return self._backbone

  def _load_backbone(self, progress: bool) -> Backbone:
    if not hasattr(self, "_backbone"):
      cfg = self.config
      model = models.get(cfg["model"]["name"], cfg["model"], cfg["train"])
      result = training.train(model, self.split, cfg, ckpt_dir=self.path / "backbone",
                              progress=progress)
      self._backbone = Backbone.build(model, jax.tree.map(jnp.asarray, result.params),
                                      result.aux)
    return self._backbone

  def eval_ks(self) -> tuple:
    """`eval.ks` plus the headline 10 and 20 that every report reads."""
    return tuple(sorted(set(self.config["eval"]["ks"]) | {10, 20}))

  def evaluate(self, table=None, stage: str = "test", backbone: Optional[Backbone] = None) -> dict:
    """Ranking metrics with `table` as the user table (None = original); per-user values kept.

    `backbone` scores it (default: this workdir's; the in-training adversarial
    baseline brings its own)."""
    bb = backbone or self.backbone()
    table = bb.table() if table is None else table
    table = sharding.over_users(jnp.asarray(table), sharding.mesh(self.config["run"]["devices"]))
    return ranking.evaluate(bb.ranking_fn(table), self.split, stage=stage, ks=self.eval_ks(),
                            batch_users=self.config["eval"]["batch_users"])

  def attack(self, table, attacker: str = "mlp", protocol: str = "cv5", names=None,
             repeats: Optional[int] = None) -> dict:
    """Attribute-inference attack on `table` (the seed and settings of this
    workdir's config), averaged over `repeats` fold splits (default
    `attack.repeats`)."""
    names = self.attribute_names() if names is None else list(names)
    labels, num_classes = self.labels(names)
    return attackers.attack(np.asarray(table), labels, num_classes, attacker=attacker,
                            protocol=protocol, seed=self.config["seed"],
                            config=self.config["attack"], names=names,
                            repeats=self.attack_repeats(repeats))

  def attack_repeats(self, repeats: Optional[int] = None) -> int:
    """`repeats` where given, else this config's `attack.repeats`."""
    return int(self.config["attack"]["repeats"] if repeats is None else repeats)

  def evaluate_popularity(self, stage: str = "test") -> dict:
    return ranking.evaluate(ranking.popularity_score_fn(self.split), self.split, stage=stage,
                            ks=self.eval_ks(), batch_users=self.config["eval"]["batch_users"])
