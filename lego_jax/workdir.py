"""A run's workdir: the resolved config, the data fingerprint and every stage.

  config.json        the resolved config (identity fields fixed at creation)
  data.json          dataset and split fingerprints, sizes
  backbone/          Orbax: trained params, optimiser state, epoch (lego_jax.training)
  bricks/<attr>/     Orbax: one calibrated attribute (lego_jax.unlearning.requests)
  combination/       Orbax: weights, active set, final table
  results.json, report.md, *.png   (lego_jax.runner)

A workdir is tied to one dataset, split, backbone and training config; opening
it with another is refused with a message that says what differs.
"""

import functools
import json
import os
import pathlib
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from lego_jax import config as config_lib, data as data_lib, models, training
from lego_jax.errors import LegoError, unknown
from lego_jax.evaluation import attackers, ranking

# The fields a trained backbone depends on; the rest (unlearn, combine,
# attack, run, eval) may change between commands on the same workdir.
IDENTITY = ("seed", "data", "model", "train")


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
    return cls(model, params, aux, score)

  def table(self) -> jax.Array:
    return self.model.user_table(self.params)

  def ranking_fn(self, table) -> Callable:
    """`users -> (B, n_items)` full-ranking scores with `table` substituted."""
    score = jax.jit(self.score)
    table = jnp.asarray(table)
    return lambda users: score(table, users)


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
    try:
      path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
      raise LegoError(f"cannot create workdir {path}: {e.strerror or e}") from None
    config_lib.save(config, path / "config.json")
    return cls(path, config)

  @classmethod
  def open(cls, path: os.PathLike, overrides=()) -> "Workdir":
    """An existing workdir; `overrides` (`key=value`) may change its non-identity fields."""
    path = pathlib.Path(path)
    if not (path / "config.json").is_file():
      raise LegoError(f"{path} is not a lego-jax workdir (no config.json); "
                      "create one with `lego-jax train` or `lego-jax run`")
    config = config_lib.fill_defaults(config_lib.load(path / "config.json"))
    for text in overrides:
      config = config_lib.merge(config, config_lib.parse_override(text))
    return cls.create(path, config) if overrides else cls(path, config)

  @functools.cached_property
  def data(self) -> tuple[data_lib.Dataset, data_lib.Split]:
    ds, split = data_lib.from_config(self.config)
    info = {"dataset": ds.name, "dataset_fingerprint": ds.fingerprint,
            "split_fingerprint": split.fingerprint, "n_users": ds.n_users, "n_items": ds.n_items}
    meta = self.path / "data.json"
    if meta.is_file():
      old = json.loads(meta.read_text())
      diffs = _diff(old, info)
      if diffs:
        raise LegoError(f"workdir {self.path} was built on other data; differs: {'; '.join(diffs)}")
    else:
      write_json(meta, info)
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

  def backbone(self, progress: bool = True) -> Backbone:
    """The trained backbone: trains it (or resumes training) where not finished."""
    if not hasattr(self, "_backbone"):
      cfg = self.config
      model = models.get(cfg["model"]["name"], cfg["model"], cfg["train"])
      result = training.train(model, self.split, cfg, ckpt_dir=self.path / "backbone",
                              progress=progress)
      self._backbone = Backbone.build(model, jax.tree.map(jnp.asarray, result.params),
                                      result.aux)
    return self._backbone

  def evaluate(self, table=None, stage: str = "test") -> dict:
    """Ranking metrics with `table` as the user table (None = original); per-user values kept."""
    bb = self.backbone(progress=False)
    table = bb.table() if table is None else table
    ec = self.config["eval"]
    return ranking.evaluate(bb.ranking_fn(table), self.split, stage=stage, ks=tuple(ec["ks"]),
                            batch_users=ec["batch_users"])

  def attack(self, table, attacker: str = "mlp", protocol: str = "cv5", names=None) -> dict:
    """Attribute-inference attack on `table` (the seed and settings of this workdir's config)."""
    names = self.attribute_names() if names is None else list(names)
    labels, num_classes = self.labels(names)
    return attackers.attack(np.asarray(table), labels, num_classes, attacker=attacker,
                            protocol=protocol, seed=self.config["seed"],
                            config=self.config["attack"], names=names)

  def evaluate_popularity(self, stage: str = "test") -> dict:
    ec = self.config["eval"]
    return ranking.evaluate(ranking.popularity_score_fn(self.split), self.split, stage=stage,
                            ks=tuple(ec["ks"]), batch_users=ec["batch_users"])
