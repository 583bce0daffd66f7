"""Experiment configs: nested dicts read from TOML, overridable field by field.

A config file only states what differs from `DEFAULTS`; `resolve` merges it
over the defaults and applies `--set key=value` overrides (dotted keys, values
parsed as TOML literals and checked against the default's type). The resolved
config is saved as JSON in the workdir.
"""

import copy
import json
import os
import pathlib
import sys
import sysconfig
import tomllib
from typing import Any

from lego_jax.errors import LegoError, unknown

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "data": {
        "name": "synthetic",      # ml-100k | ml-1m | lastfm-360k | synthetic | a folder path
        "data_dir": "",           # default: $LEGO_DATA_DIR
        "format": "",             # auto-detected when empty
        "users_file": "",         # user-attribute file, where not the conventional one
        "attributes": [],         # which attributes to keep; empty = all
        "rating_threshold": 0.0,  # keep interactions with rating >= this (0 = all)
        "kcore": 0,
        "age_bins": "",           # "" = dataset default; "none" keeps raw codes; or e.g. "18,25,35,50"
        "split": "random",        # random | loo | predefined
        "split_ratios": [0.8, 0.1, 0.1],
        "synthetic_users": 3000,
        "synthetic_items": 2000,
        "synthetic_density": 0.045,
    },
    "model": {
        "name": "mf",             # mf | ncf | lightgcn
        "dim": 64,
        "mlp_layers": [128, 64],  # NCF MLP tower
        "n_layers": 2,            # LightGCN propagation layers
    },
    "train": {
        "epochs": 50,
        "batch_size": 2048,
        "lr": 1e-3,
        "l2": 1e-5,
        "eval_every": 1,
        "patience": 5,
        "metric": "ndcg@10",
        "negatives": 1,
    },
    "eval": {
        "ks": [10, 20],
        "batch_users": 1024,
    },
    "attack": {
        # l2 1e-2 and 100 full-batch Adam steps were the strongest MLP settings
        # measured (benchmarks/bench_attack.py docstring); more steps overfit.
        "hidden": 100,
        "l2": 1e-2,
        "lr": 1e-2,
        "steps": 100,
        "val_frac": 0.0,          # > 0: early stopping on an inner validation split
        "folds": 5,
        "paper_splits": 40,
        "paper_train_frac": 0.2,
    },
    "unlearn": {
        "attributes": [],         # empty = all attributes of the dataset
        "loss": "mmd",            # mmd | d2d | adversarial
        "calibrator": "table",    # table | residual
        # Adam moves every coordinate by about lr per step whatever the
        # gradient's size, so lr * steps bounds how far a user can move. These
        # values were picked by the measurements in the README (ML-1M MF).
        "steps": 600,
        "lr": 3e-3,
        "w_mi": 1.0,              # weight of MI / null-level (dimensionless)
        "lam_rank": 300.0,        # weight of the top-T hinge (in units of the score spread)
        # The pull toward the original row keeps a brick to what its attribute
        # needs: without it the minibatch noise of the MI estimate drifts every
        # row, and three bricks' drifts add up (README, "Utility").
        "l2": 10.0,
        # Class-stratified minibatch: `batch_users` users where > 0, else
        # `batch_fraction` of them. Steps that see every user overshoot below
        # chance; a sixth of the users worked on 943 and 6040 users alike
        # (docs/findings.md, "ML-100K").
        "batch_users": 0,
        "batch_fraction": 0.17,
        "topk": 20,
        "guard": 30,              # items after the top-T held below it by the same hinge
        "margin": 0.05,
        # The MI estimate: one hinge per kernel (`hinge`), each stopped at its
        # own permuted-label level (`stop`). The class means are measured by a
        # linear kernel and the RBF kernels see class-centred rows (`centre`),
        # so removing a nonlinear signal cannot over-balance the means, which
        # is what sent the linear probe below chance (README, over-unlearning).
        "linear_kernel": True,
        "linear_scope": "batch",  # batch | population (the linear kernel over every user)
        "centre": True,
        "bandwidths": [-2, -1, 0, 1, 2],  # RBF kernel bandwidths beta * 2^j
        "hinge": "kernel",        # kernel | sum (one hinge on the sum of the kernels)
        "stop": "null",           # null | two-sided | steps (see losses.excess_mi)
        "estimator": "kernel",    # kernel (B x B matrices) | features (random Fourier, O(B F))
        "features": 512,          # random features per bandwidth (estimator = features)
        "null_perms": 1,          # label permutations averaged for the null level
        "ckpt_every": 50,         # steps between checkpoints of a calibration in progress
        # The closed loop (lego_jax/unlearning/control.py): after calibration,
        # and again after combination, a gain per attribute sets how far its
        # move goes, read from cross-fitted probes, so that every probe lands
        # within `target_leakage` of chance (both directions) while validation
        # NDCG@10 keeps `min_retention` of the original.
        "control": "probe",       # probe | none
        "target_leakage": 0.01,   # |BAcc - chance| the loop aims for, per attribute and probe
        "min_retention": 0.95,    # utility floor: validation NDCG@10 after / before
        "probes": ["linear", "mlp"],  # steering attackers (the `attack` settings)
        "probe_folds": 3,
        "control_rounds": 6,      # probe readings per loop (each trains the probes once)
        "max_gain": 4.0,          # how far a move that stopped short may be extended
        # Per-attribute values of the weights above, keyed by attribute name,
        # e.g. `--set unlearn.per_attribute.age.lam_rank=100`.
        "per_attribute": {},
    },
    "combine": {
        "mode": "dim",            # dim | scalar | convex
        "steps": 100,
        "lr": 1e-2,
        "w_mi": 1.0,
        "lam_rank": 200.0,
        "init": "uniform",        # uniform (1/|R|) | ones
    },
    "run": {
        "methods": ["lego", "joint", "sequential", "leace", "adversarial"],
        "attackers": ["mlp", "linear"],
        "sweep": [],              # lam_rank values for the trade-off plot
        # The in-training adversarial baseline: "confusion" (heads learn on
        # stopped embeddings, embeddings pushed to uniform predictions) or plain
        # gradient "reverse"al, which leaked more than the original when measured.
        "adversarial_objective": "confusion",
        "adversarial_weight": 1.0,
    },
}


def config_dirs() -> list[pathlib.Path]:
  """Where named configs are looked up, in order."""
  dirs = []
  if os.environ.get("LEGO_CONFIG_DIR"):
    dirs.append(pathlib.Path(os.environ["LEGO_CONFIG_DIR"]))
  dirs.append(pathlib.Path.cwd() / "configs")
  dirs.append(pathlib.Path(__file__).resolve().parents[1] / "configs")  # source checkout
  dirs.append(pathlib.Path(sysconfig.get_path("data")) / "share" / "lego-jax" / "configs")
  dirs.append(pathlib.Path(sys.prefix) / "share" / "lego-jax" / "configs")
  return dirs


def available() -> list[str]:
  names = set()
  for d in config_dirs():
    if d.is_dir():
      names.update(p.stem for p in d.glob("*.toml"))
  return sorted(names)


def find(name: str) -> pathlib.Path:
  path = pathlib.Path(name)
  if path.suffix == ".toml" or os.sep in name:
    if not path.is_file():
      raise LegoError(f"config file {name} does not exist")
    return path
  for d in config_dirs():
    if (d / f"{name}.toml").is_file():
      return d / f"{name}.toml"
  raise unknown("config", name, available())


# Tables keyed by names a config cannot list (attribute names), each entry
# overriding some fields of a section: path -> (section, fields).
KEYED = {"unlearn.per_attribute": ("unlearn", ("w_mi", "lam_rank", "l2", "lr"))}


def merge(base: dict, over: dict, where: str = "") -> dict:
  """`over` merged into a copy of `base`; unknown fields and wrong types are refused."""
  out = copy.deepcopy(base)
  for key, value in over.items():
    path = f"{where}{key}"
    if path in KEYED:
      out[key] = _merge_keyed(out.get(key, {}), value, path)
      continue
    if key not in base:
      raise unknown("config field", path, [f"{where}{k}" for k in base])
    if isinstance(base[key], dict):
      if not isinstance(value, dict):
        raise LegoError(f"config field {path} must be a table, got {value!r}")
      out[key] = merge(base[key], value, path + ".")
    else:
      out[key] = _check_type(path, base[key], value)
  return out


def _merge_keyed(base: dict, over, path: str) -> dict:
  """Keeps only the fields each entry sets, type-checked against the section's defaults."""
  section, fields = KEYED[path]
  template = {f: DEFAULTS[section][f] for f in fields}
  if not isinstance(over, dict):
    raise LegoError(f"config field {path} must be a table keyed by name, got {over!r}")
  out = copy.deepcopy(base)
  for name, sub in over.items():
    if not isinstance(sub, dict):
      raise LegoError(f"config field {path}.{name} must be a table of {', '.join(fields)}, "
                      f"got {sub!r}")
    checked = merge(template, sub, f"{path}.{name}.")
    out[name] = {**out.get(name, {}), **{k: checked[k] for k in sub}}
  return out


def fill_defaults(config: dict, defaults: dict = DEFAULTS) -> dict:
  """`config` with the fields it lacks taken from `defaults` (configs saved by older versions)."""
  out = copy.deepcopy(config)
  for key, value in defaults.items():
    if key not in out:
      out[key] = copy.deepcopy(value)
    elif isinstance(value, dict) and isinstance(out[key], dict):
      out[key] = fill_defaults(out[key], value)
  return out


def _check_type(path: str, default, value):
  if isinstance(default, bool):
    ok = isinstance(value, bool)
  elif isinstance(default, float):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    value = float(value) if ok else value
  elif isinstance(default, int):
    ok = isinstance(value, int) and not isinstance(value, bool)
  elif isinstance(default, list):
    if isinstance(value, str):  # `--set unlearn.attributes=gender,age`
      value = [v for v in value.split(",") if v]
    ok = isinstance(value, list)
  else:
    ok = isinstance(value, str)
  if not ok:
    raise LegoError(f"config field {path} expects {type(default).__name__}, got {value!r}")
  return value


def parse_override(text: str) -> dict:
  """`a.b=value` -> {"a": {"b": value}}; the value is a TOML literal or a bare string."""
  if "=" not in text:
    raise LegoError(f"--set expects key=value, got {text!r}")
  key, raw = text.split("=", 1)
  try:
    value = tomllib.loads(f"v = {raw}")["v"]
  except tomllib.TOMLDecodeError:
    value = raw
  out: dict = {}
  node = out
  parts = key.strip().split(".")
  for p in parts[:-1]:
    node = node.setdefault(p, {})
  node[parts[-1]] = value
  return out


def resolve(name: str | None = None, overrides=()) -> dict:
  """The full config: defaults, then the named file, then each override."""
  config = copy.deepcopy(DEFAULTS)
  if name:
    path = find(name)
    try:
      with open(path, "rb") as f:
        config = merge(config, tomllib.load(f))
    except tomllib.TOMLDecodeError as e:
      raise LegoError(f"{path}: {e}") from None
  for text in overrides:
    config = merge(config, parse_override(text))
  return config


def save(config: dict, path: os.PathLike) -> None:
  """Writes the config as JSON, atomically."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
  os.replace(tmp, path)


def load(path: os.PathLike) -> dict:
  return json.loads(pathlib.Path(path).read_text())
