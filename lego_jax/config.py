"""Experiment configs: nested dicts read from TOML, overridable field by field.

A config file only states what differs from `DEFAULTS`; `resolve` merges it
over the defaults and applies `--set key=value` overrides (dotted keys, values
parsed as TOML literals and checked against the default's type), then
`validate` checks every value against `CONSTRAINTS`. The resolved config is
saved as JSON in the workdir.
"""

import copy
import json
import os
import pathlib
import sys
import sysconfig
import tomllib
from typing import Any

from lego_jax.data import FORMATS, SPLIT_METHODS
from lego_jax.data.load import parse_age_bins
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
        # gradient's size, so lr * steps bounds how far a user can move. The
        # closed loop (control) extends a move that stopped short, so 400 steps
        # (600 before it) pay for its probe readings (docs/results.md).
        "steps": 400,
        "lr": 3e-3,
        "w_mi": 1.0,              # weight of MI / null-level (dimensionless)
        "lam_rank": 300.0,        # weight of the top-T hinge (in units of the score spread)
        # The pull toward the original row keeps a brick to what its attribute
        # needs: without it the minibatch noise of the MI estimate drifts every
        # row, and three bricks' drifts add up (docs/findings.md, "Utility").
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
        # is what sent the linear probe below chance (docs/findings.md, over-unlearning).
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
        "probe_folds": 5,         # as the attackers that judge: the below-chance artifact depends on it
        "probe_repeats": 0,       # fold splits averaged per reading; 0 = about 4000 users scored
        "control_rounds": 4,      # search rounds; each reads the probes on two tables
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
  validate(config)
  return config


# ---------------------------------------------------------------------------
# Values: checked up front, so a bad one is refused before anything is trained
# or written, naming the field and what it accepts.
#
# The name lists live with the code that uses them, in modules that import JAX;
# config must stay light, so they are repeated here (tests/test_hardening.py
# checks the copies agree).
MODEL_NAMES = ("mf", "ncf", "lightgcn")                    # models.NAMES
LOSSES = ("mmd", "d2d", "adversarial")                     # unlearning.calibration.LOSSES
CALIBRATORS = ("table", "residual")                        # unlearning.calibrators.CALIBRATORS
STOPS = ("null", "two-sided", "steps")                     # unlearning.losses.STOPS
HINGES = ("kernel", "sum")                                 # unlearning.losses.HINGES
ESTIMATORS = ("kernel", "features")                        # unlearning.losses.ESTIMATORS
LINEAR_SCOPES = ("batch", "population")                    # unlearning.calibration.LINEAR_SCOPES
COMBINE_MODES = ("dim", "scalar", "convex")                # unlearning.combination.MODES
COMBINE_INITS = ("uniform", "ones")                        # unlearning.combination.INITS
ATTACKERS = ("mlp", "linear", "knn")                       # evaluation.attackers.ATTACKERS
ADVERSARIAL_OBJECTIVES = ("reverse", "confusion")          # unlearning.adversarial.OBJECTIVES
RANKING_METRICS = ("recall", "ndcg", "hr")                 # evaluation.ranking.METRICS


def _number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def _range(lo=None, hi=None, lo_open=False, hi_open=False, integer=False):
  """A check for a number in [lo, hi] (open ends where asked), and its description."""
  def ok(x):
    if not _number(x) or (integer and not isinstance(x, int)) or x != x:
      return False
    if lo is not None and (x <= lo if lo_open else x < lo):
      return False
    return hi is None or (x < hi if hi_open else x <= hi)
  if lo is not None and hi is not None:
    text = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
  elif lo is not None:
    text = f"{'>' if lo_open else '>='} {lo:g}"
  else:
    text = "a number"
  kind = "an integer" if integer else "a number"
  return ok, f"{kind} {text}" if lo is not None or hi is not None else kind


def _one_of(*names):
  return (lambda x: x in names), f"one of {', '.join(repr(n) for n in names)}"


def _each(check, at_least: int = 0):
  ok, text = check
  return ((lambda x: isinstance(x, list) and len(x) >= at_least and all(ok(v) for v in x)),
          f"a {'non-empty ' if at_least else ''}list, each {text}")


def _metric(x) -> bool:
  name, _, k = str(x).partition("@")
  return name in RANKING_METRICS and k.isdigit() and int(k) >= 1


def _age_bins(x) -> bool:
  try:
    parse_age_bins(x)
  except LegoError:
    return False
  return True


def _ratios(x) -> bool:
  return (isinstance(x, list) and len(x) == 3 and all(_number(r) and r >= 0 for r in x)
          and x[0] > 0 and abs(sum(x) - 1) <= 1e-6)


POSITIVE_INT = _range(1, integer=True)
NON_NEGATIVE_INT = _range(0, integer=True)
POSITIVE = _range(0, lo_open=True)
NON_NEGATIVE = _range(0)
FRACTION = _range(0, 1, lo_open=True, hi_open=True)

# field -> (check, what it accepts). A field missing here is not checked (a
# field added to DEFAULTS keeps working before it gets a line).
CONSTRAINTS = {
    "seed": NON_NEGATIVE_INT,
    "data.format": _one_of("", *FORMATS),
    "data.rating_threshold": NON_NEGATIVE,
    "data.kcore": NON_NEGATIVE_INT,
    "data.age_bins": (_age_bins, "'', 'none' or increasing integers like '18,25,35'"),
    "data.split": _one_of(*SPLIT_METHODS),
    "data.split_ratios": (_ratios, "3 non-negative numbers (train > 0) summing to 1"),
    "data.synthetic_users": POSITIVE_INT,
    "data.synthetic_items": POSITIVE_INT,
    "data.synthetic_density": _range(0, 1, lo_open=True),
    "model.name": _one_of(*MODEL_NAMES),
    "model.dim": POSITIVE_INT,
    "model.mlp_layers": _each(POSITIVE_INT),
    "model.n_layers": NON_NEGATIVE_INT,
    "train.epochs": POSITIVE_INT,
    "train.batch_size": POSITIVE_INT,
    "train.lr": POSITIVE,
    "train.l2": NON_NEGATIVE,
    "train.eval_every": NON_NEGATIVE_INT,   # 0 is read as 1
    "train.patience": POSITIVE_INT,
    "train.metric": (_metric, f"METRIC@K with METRIC one of {', '.join(RANKING_METRICS)} "
                              "and K >= 1, e.g. 'ndcg@10'"),
    "train.negatives": POSITIVE_INT,
    "eval.ks": _each(POSITIVE_INT, at_least=1),
    "eval.batch_users": POSITIVE_INT,
    "attack.hidden": POSITIVE_INT,
    "attack.l2": NON_NEGATIVE,
    "attack.lr": POSITIVE,
    "attack.steps": POSITIVE_INT,
    "attack.val_frac": _range(0, 1, hi_open=True),
    "attack.folds": _range(2, integer=True),
    "attack.paper_splits": POSITIVE_INT,
    "attack.paper_train_frac": FRACTION,
    "unlearn.loss": _one_of(*LOSSES),
    "unlearn.calibrator": _one_of(*CALIBRATORS),
    "unlearn.steps": POSITIVE_INT,
    "unlearn.lr": POSITIVE,
    "unlearn.w_mi": NON_NEGATIVE,
    "unlearn.lam_rank": NON_NEGATIVE,
    "unlearn.l2": NON_NEGATIVE,
    "unlearn.batch_users": NON_NEGATIVE_INT,  # 0 = unlearn.batch_fraction of the users
    "unlearn.batch_fraction": _range(0, 1, lo_open=True),
    "unlearn.control": _one_of("probe", "none"),
    "unlearn.target_leakage": NON_NEGATIVE,
    "unlearn.min_retention": _range(0, 1),
    "unlearn.probes": _each(_one_of(*ATTACKERS), at_least=1),
    "unlearn.probe_folds": _range(2, integer=True),
    "unlearn.probe_repeats": NON_NEGATIVE_INT,
    "unlearn.control_rounds": POSITIVE_INT,
    "unlearn.max_gain": _range(1),
    "unlearn.topk": POSITIVE_INT,
    "unlearn.guard": NON_NEGATIVE_INT,
    "unlearn.margin": NON_NEGATIVE,
    "unlearn.linear_scope": _one_of(*LINEAR_SCOPES),
    "unlearn.bandwidths": _each(_range()),  # empty: the linear kernel alone
    "unlearn.hinge": _one_of(*HINGES),
    "unlearn.stop": _one_of(*STOPS),
    "unlearn.estimator": _one_of(*ESTIMATORS),
    "unlearn.features": POSITIVE_INT,
    "unlearn.null_perms": POSITIVE_INT,
    "unlearn.ckpt_every": POSITIVE_INT,
    "combine.mode": _one_of(*COMBINE_MODES),
    "combine.steps": POSITIVE_INT,
    "combine.lr": POSITIVE,
    "combine.w_mi": NON_NEGATIVE,
    "combine.lam_rank": NON_NEGATIVE,
    "combine.init": _one_of(*COMBINE_INITS),
    "run.attackers": _each(_one_of(*ATTACKERS)),
    "run.sweep": _each(NON_NEGATIVE),
    "run.adversarial_objective": _one_of(*ADVERSARIAL_OBJECTIVES),
    "run.adversarial_weight": NON_NEGATIVE,
}


def _refuse(path: str, value, what: str) -> LegoError:
  return LegoError(f"config field {path} must be {what}, got {value!r}")


def validate(config: dict) -> None:
  """Refuses values out of range (LegoError naming the field); unlisted fields pass."""
  for path, (ok, what) in CONSTRAINTS.items():
    section, _, field = path.rpartition(".")
    node = config.get(section) if section else config
    if isinstance(node, dict) and field in node and not ok(node[field]):
      raise _refuse(path, node[field], what)
  for path, (section, fields) in KEYED.items():
    head, _, key = path.partition(".")
    for name, entry in ((config.get(head) or {}).get(key) or {}).items():
      for field, value in entry.items():
        ok, what = CONSTRAINTS.get(f"{section}.{field}", (lambda x: True, ""))
        if not ok(value):
          raise _refuse(f"{path}.{name}.{field}", value, what)


def save(config: dict, path: os.PathLike) -> None:
  """Writes the config as JSON, atomically."""
  path = pathlib.Path(path)
  tmp = path.with_suffix(path.suffix + ".tmp")
  try:
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True))
    os.replace(tmp, path)
  except OSError as e:  # a read-only workdir, a full disk
    raise LegoError(f"cannot write {path}: {e.strerror or e}") from None


def load(path: os.PathLike) -> dict:
  try:
    return json.loads(pathlib.Path(path).read_text())
  except OSError as e:
    raise LegoError(f"cannot read {path}: {e.strerror or e}") from None
  except ValueError as e:  # a truncated or hand-edited file
    raise LegoError(f"{path}: not a valid config ({e})") from None
