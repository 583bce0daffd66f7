"""Experiment configs: nested dicts read from TOML, overridable field by field.

A config file only states what differs from `DEFAULTS`; `resolve` merges it
over the defaults and applies `--set key=value` overrides (dotted keys, values
parsed as TOML literals and checked against the default's type), then
`validate` checks every value against `CONSTRAINTS`. The resolved config is
saved as JSON in the workdir.
"""

import copy
import dataclasses
import json
import os
import pathlib
import re
import sys
import sysconfig
import tomllib
import types
from collections.abc import Mapping
from typing import Any, ClassVar

from lego_jax.errors import LegoError, unknown

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "data": {
        "name": "synthetic",
        "data_dir": "",
        "format": "",
        "users_file": "",
        "attributes": [],
        "rating_threshold": 0.0,
        "kcore": 0,
        "age_bins": "",
        "split": "random",
        "split_ratios": [0.8, 0.1, 0.1],
        "synthetic_users": 3000,
        "synthetic_items": 2000,
        "synthetic_density": 0.045,
    },
    "model": {
        "name": "mf",
        "dim": 64,
        "mlp_layers": [128, 64],
        "n_layers": 2,
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
        "hidden": 100,
        "l2": 1e-2,
        "lr": 1e-2,
        "steps": 100,
        "val_frac": 0.0,
        "folds": 5,
        "paper_splits": 40,
        "paper_train_frac": 0.2,
        "max_users": 20000,
        # One split's leakage moves by an sd of up to 0.02 on ML-1M, the size
        # of the bar it is held to; the mean of five by under half that.
        "repeats": 5,
    },
    "unlearn": {
        "attributes": [],
        "loss": "mmd",
        "calibrator": "table",
        "steps": 400,
        # lr and l2 are in units of the table's spread (the RMS deviation of a
        # coordinate), so they mean the same on every backbone; 0.0085 and 1.2
        # are the former 3e-3 and 10 on ML-1M MF, whose spread is 0.35.
        "lr": 0.0085,
        "w_mi": 1.0,
        "lam_rank": 300.0,
        "l2": 1.2,
        "batch_users": 0,
        "batch_fraction": 0.17,
        "max_batch_users": 4096,
        "topk": 20,
        "guard": 30,
        "margin": 0.05,
        "linear_kernel": True,
        "linear_scope": "batch",
        "centre": True,
        "units": "parts",
        "bandwidths": [-2, -1, 0, 1, 2],
        "hinge": "kernel",
        "stop": "null",
        "estimator": "kernel",
        "features": 512,
        "marginal_features": 0,
        "part_kernels": True,
        "interaction": False,
        "null_perms": 1,
        "projection": "none",
        "epsilon": 0.5,
        "ball": "row",
        "vclub_hidden": 64,
        "vclub_lr": 1e-2,
        "ckpt_every": 50,
        "control": "probe",
        "target_leakage": 0.01,
        "min_retention": 0.95,
        "probes": ["linear", "mlp"],
        "probe_folds": 5,
        "probe_repeats": 0,
        "control_rounds": 4,
        "max_gain": 4.0,
        "residual_means": True,
        "polish_steps": 100,
        "polish_probes": ["knn"],
        "polish_features": 512,
        "null_covariances": True,
        "null_shapes": False,
        "null_means": True,
        "mean_share": 0.75,
        "per_attribute": {},
    },
    "combine": {
        "mode": "scalar",
        "steps": 100,
        "lr": 1e-2,
        "w_mi": 1.0,
        "lam_rank": 200.0,
        "init": "uniform",
        "stop": "steps",
        "linear_scope": "batch",
    },
    "run": {
        "methods": ["lego", "joint", "sequential", "leace", "adversarial"],
        "attackers": ["mlp", "linear"],
        "sweep": [],
        "adversarial_objective": "confusion",
        "adversarial_weight": 1.0,
        "devices": 1,
    },
}

# What every table and field of DEFAULTS is, one line each, and where it is not
# obvious why its default: `lego-jax config show` prints these beside the values,
# the typed views carry them, and docs/configuration.md lists them (the tests
# check that every field has one and the doc has every row).
DESCRIPTIONS: dict[str, str] = {
    "seed": "every random choice (split, backbone training, calibration keys, attackers) "
            "derives from it",

    "data": "which data, and how it is prepared (docs/data.md)",
    "data.name": "`ml-100k`, `ml-1m`, `lastfm-360k`, `synthetic`, or a folder path "
                 "(format detected)",
    "data.data_dir": "folder holding the named datasets (`DIR/ml-1m/...`); empty = "
                     "`$LEGO_DATA_DIR`; `--data-dir` sets it. Not part of the workdir's "
                     "identity (the data fingerprint is)",
    "data.format": "force a format: `movielens-100k`, `movielens-1m`, `recbole`, `lightgcn`, "
                   "`lastfm`; empty = detect from the files",
    "data.users_file": "the user-attribute file, where not the conventional one (relative to "
                       "the dataset folder unless it exists as given)",
    "data.attributes": "which attribute columns to keep; empty = all except identifying ones "
                       "(zip, signup, ...)",
    "data.rating_threshold": "keep interactions rated ≥ this; 0 = all (an error where the "
                             "data has no ratings)",
    "data.kcore": "drop users and items with fewer than this many distinct partners, "
                  "repeatedly; 0 = off",
    "data.age_bins": "`\"\"` = dataset default; `\"none\"` keeps raw values as classes; "
                     "`\"18,25,35,50\"` bins at those edges",
    "data.split": "`random` (per user, by `split_ratios`; a predefined split is kept), `loo` "
                  "(leave-one-out by time), `predefined`",
    "data.split_ratios": "train / valid / test shares per user for the random split",
    "data.synthetic_users": "users of the synthetic dataset",
    "data.synthetic_items": "items of the synthetic dataset (unpicked items are dropped)",
    "data.synthetic_density": "mean share of items a synthetic user interacts with",

    "model": "the backbone",
    "model.name": "`mf` (MF-BPR), `ncf` (NeuMF: GMF + MLP towers, BCE), `lightgcn`",
    "model.dim": "embedding size (NCF: per tower; the user table unlearned is both towers, "
                 "2 × dim)",
    "model.mlp_layers": "widths of NCF's MLP tower",
    "model.n_layers": "LightGCN propagation layers",

    "train": "backbone training",
    "train.epochs": "maximum epochs",
    "train.batch_size": "training pairs per minibatch",
    "train.lr": "Adam learning rate",
    "train.l2": "L2 weight on the batch's user and item embeddings",
    "train.eval_every": "epochs between validation evaluations",
    "train.patience": "stop after this many evaluations without improvement (the best params "
                      "are kept)",
    "train.metric": "validation metric for early stopping (`recall`, `ndcg` or `hr` at a K)",
    "train.negatives": "uniform negative items per positive (a user's own training items are "
                       "redrawn)",

    "eval": "ranking evaluation",
    "eval.ks": "cut-offs for Recall, NDCG and HR",
    "eval.batch_users": "users scored per batch (memory only); also the batch for top-T lists",

    "attack": "the attribute-inference attackers",
    "attack.hidden": "hidden units of the MLP attacker",
    "attack.l2": "L2 weight on the attacker's weights (the strongest MLP setting measured, "
                 "benchmarks/bench_attack.py)",
    "attack.lr": "Adam learning rate (full batch)",
    "attack.steps": "Adam steps (more overfit when measured)",
    "attack.val_frac": "> 0: share of each training fold held out to early-stop on; 0 = a "
                       "fixed budget of `steps` (stopping on validation stopped too early on "
                       "a planted non-linear signal)",
    "attack.folds": "folds of the `cv5` protocol",
    "attack.paper_splits": "random splits of the `paper` protocol",
    "attack.paper_train_frac": "training share per class in the `paper` protocol",
    "attack.max_users": "at most this many labelled users per attribute, a seeded sample equal "
                        "per class, so the attackers' cost stops growing with the table; 0 = all",
    "attack.repeats": "fold splits (class down-sampling and folds, seeds `seed`, `seed` + 1, ...) "
                      "the main job, `lego-jax grid` and `lego-jax attack` average over; above 1 "
                      "each result also gives their spread (`split_sd`): one split's leakage "
                      "moves by an sd of 0.004-0.02 on ML-1M, as much as a 0.02 bar; `lego-jax "
                      "sweep` reads one split per seed, its seeds being its repeats",

    "unlearn": "calibration (one brick per attribute) and the closed loop (docs/method.md)",
    "unlearn.attributes": "attributes to unlearn; empty = all of the dataset's",
    "unlearn.loss": "`mmd` (class vs marginal), `d2d` (PoT-AU's class vs anchor), "
                    "`adversarial` (prior-KL against an auxiliary classifier), `vclub` (the "
                    "paper's batch vCLUB bound under a classifier of the attribute trained "
                    "alternately with the table; `stop`, `hinge` and the kernels do not apply)",
    "unlearn.calibrator": "`table` (free per-user offset) or `residual` (one shared map "
                          "e ↦ e + g(e))",
    "unlearn.steps": "optimiser steps per brick; Adam moves a coordinate about `lr` spreads "
                     "per step whatever the gradient, so `lr × steps` bounds how far a user "
                     "moves (the closed loop extends a move that stopped short)",
    "unlearn.lr": "Adam learning rate in units of the table's spread (the RMS deviation of a "
                  "coordinate), so it means the same on every backbone (per attribute settable)",
    "unlearn.w_mi": "weight of the MI estimate in units of its null level (dimensionless; "
                    "per attribute settable; the closed loop raises it for an attribute whose "
                    "removal stalls)",
    "unlearn.lam_rank": "weight of the top-T ranking hinge, in units of the score spread "
                        "(per attribute settable); 0 everywhere leaves the hinge and the "
                        "backbone's scores out of the compiled step",
    "unlearn.l2": "weight of the pull toward the original row, in units of the table's "
                  "spread (per attribute settable): without it the minibatch noise of the MI "
                  "estimate drifts every row, and the bricks' drifts add up "
                  "(docs/findings.md); the closed loop loosens it where removal stalls",
    "unlearn.batch_users": "class-stratified minibatch size; 0 = `batch_fraction` of the users",
    "unlearn.batch_fraction": "the minibatch as a fraction of the users (at least 32) where "
                              "`batch_users` is 0: steps that see every user overshoot below "
                              "chance, and about a sixth served 943 and 6040 users alike "
                              "(docs/findings.md); 1 = every user",
    "unlearn.max_batch_users": "the largest minibatch `batch_fraction` may give: the kernel "
                               "estimate holds B x B matrices per attribute, so a fraction of a "
                               "million users (170,000) would need 116 GB each; 4096 is 64 MB",
    "unlearn.topk": "T: each user's original top-T unseen items keep their order",
    "unlearn.guard": "items after the top-T held below it by the same hinge",
    "unlearn.margin": "hinge margin, in units of the score spread",
    "unlearn.linear_kernel": "add a linear kernel (the class means), hinged on its own",
    "unlearn.linear_scope": "the linear kernel on the minibatch (`batch`), or `population` "
                            "(every user, O(n D))",
    "unlearn.centre": "RBF kernels on class-centred rows, so removing a nonlinear signal "
                      "cannot move the class means (which sent the linear probe below "
                      "chance, docs/findings.md)",
    "unlearn.units": "what the MI estimate (the calibration's and the combination's) "
                     "measures each coordinate in: `parts` (each part of the user table, "
                     "e.g. NCF's GMF and MLP towers, in its own spread; one part as is), "
                     "`coordinates` (each in its spread), `none` (raw); attackers "
                     "standardise, and raw kernels let NCF's narrow MLP tower hide gender "
                     "(docs/findings.md)",
    "unlearn.bandwidths": "RBF bandwidths beta * 2^j (beta: mean pairwise squared distance)",
    "unlearn.hinge": "`kernel`: each kernel stopped at its own null; `sum`: one hinge on the "
                     "sum of the kernels",
    "unlearn.stop": "`null` (penalise only the excess over the permuted-label level), "
                    "`two-sided` (also a deficit), `steps` (no stop)",
    "unlearn.estimator": "`kernel` (B x B matrices) or `features` (random Fourier features, "
                         "O(B F))",
    "unlearn.features": "random features per bandwidth (`estimator = \"features\"`)",
    "unlearn.part_kernels": "on a user table of two or more parts (NCF: the GMF and MLP "
                            "towers), the MI estimate's kernels on each part as well as on "
                            "the whole row, so one part's deficit cannot pay for another's "
                            "excess (docs/findings.md)",
    "unlearn.marginal_features": "random features per coordinate of one more "
                                 "kernel, additive over coordinates: it sees each coordinate's "
                                 "own class-conditional distribution, which trees splitting on "
                                 "single coordinates read (docs/findings.md); 0 = none",
    "unlearn.interaction": "two more linear kernels, on the centred rows scaled by their "
                           "standardised norms (the row's own and the original row's): a "
                           "class shift that follows the norm (docs/findings.md)",
    "unlearn.null_perms": "label permutations averaged for the null level",
    "unlearn.projection": "`ball`: after every step the table is projected back onto the L2 "
                          "ball of radius `epsilon` around E0 (the paper's utility guard; "
                          "`calibrator = \"table\"` only); `none`: no constraint",
    "unlearn.epsilon": "the ball's radius, in units of a typical row's deviation from the mean "
                       "row (spread × √D): a user may move by `epsilon` times that (`ball = "
                       "\"row\"`), or the whole table by `epsilon` times spread × √(n D), "
                       "the same RMS move per user (`\"table\"`)",
    "unlearn.ball": "`row`: one ball per user row (the default of docs/method.md's paper "
                    "variant); `table`: one ball around the whole table",
    "unlearn.vclub_hidden": "hidden units of the vCLUB classifier (one ReLU layer)",
    "unlearn.vclub_lr": "Adam learning rate of the vCLUB classifier, one likelihood step per "
                        "table step (it reads rows centred and in units of the spread)",
    "unlearn.ckpt_every": "steps between checkpoints of a calibration in progress (also the "
                          "compiled chunk)",
    "unlearn.control": "the closed loop: `probe` reads cross-fitted probes during "
                       "calibration (each attribute's MI weight and pull), after it and after "
                       "the combination (each attribute's gains); `none` keeps the "
                       "calibration's moves as they are",
    "unlearn.target_leakage": "the loop stops moving an attribute once every probe reads "
                              "within this of chance (BAcc - chance, both directions)",
    "unlearn.min_retention": "utility floor: the combined table's validation NDCG@10 over the "
                             "original's; where the loop's best table falls under it, the "
                             "best table read that keeps it is used (none: the loop's) and a "
                             "warning says so",
    "unlearn.probes": "steering attackers (`linear`, `mlp`, `knn`, `quadratic`), with the "
                      "`attack` settings; linear ones judge the class-mean gain, the others "
                      "the within-class gain",
    "unlearn.probe_folds": "cross-fitting folds of the probes; as many as the attackers that "
                           "judge (`attack.folds`), because how far below chance an "
                           "overshoot reads depends on the train/test ratio",
    "unlearn.probe_repeats": "fold splits averaged per reading; 0 = enough that about 10000 "
                             "users are scored (2 on ML-1M, 4 on ML-100K): one split's "
                             "reading varies more than the target",
    "unlearn.control_rounds": "search rounds per loop; each reads the probes on two tables",
    "unlearn.max_gain": "how far a move that stopped short may be extended",
    "unlearn.residual_means": "after the combination's gains, take back a share (0.25, 0.5 "
                              "or 0.75 per attribute: the smallest the probes read within "
                              "twice the target, else the closest) of each attribute's class "
                              "means left in the combined table, fitted jointly: correlated "
                              "bricks cross when added (docs/findings.md)",
    "unlearn.polish_steps": "steps of the polish (0 = off): where an attribute reads above "
                            "chance by more than the target after the class-mean step (one "
                            "below chance would go further below; the table read with "
                            "`polish_probes` too, as it will be kept), one free table "
                            "calibrated from the combined table for those attributes, with "
                            "the MMD on random features of every user, added at the gain "
                            "(0 to 1) where lines through the probes' readings put the worst "
                            "attribute closest to chance, kept only where the attribute "
                            "furthest from chance reads no further from it (docs/method.md)",
    "unlearn.polish_features": "random features per bandwidth of the polish's MMD (the bricks' "
                               "count is `features`): most of the polish's cost, about 40 s "
                               "of ML-1M MF's 100 s combination (docs/findings.md)",
    "unlearn.polish_probes": "attackers the polish reads beside `probes`, on the table as it "
                             "will be kept: which attributes it moves and at what gain. A "
                             "neighbour vote reads users surrounded by their own class, which "
                             "the combination re-leaks where the linear and MLP probes read "
                             "chance (ML-1M NCF, the 25-NN judge: gender +0.019 -> +0.005, "
                             "age +0.016 -> +0.002; docs/findings.md); [] = the steering "
                             "probes only",
    "unlearn.null_covariances": "last, before `null_shapes` and `null_means`: per attribute "
                                "and class, give the class's covariance about its mean (in "
                                "units of the covariance within classes) the spectrum one "
                                "permutation of the labels gives it, its directions kept: "
                                "covariances nearer each other than that read below chance "
                                "to a Gaussian discriminant, further apart above it (ML-1M: "
                                "the judges' largest 0.037 / 0.059 / 0.036 -> 0.028 / 0.053 "
                                "/ 0.019 on MF / NCF / LightGCN; docs/findings.md)",
    "unlearn.null_shapes": "last, before `null_means`: per attribute, class and coordinate, "
                           "bring the class's shape (its values about its mean) to its "
                           "permuted-label distance from the pooled one, the share taken "
                           "replaced by a permutation's draw (each user keeps their rank in "
                           "their class): what gradient-boosted trees read once the class "
                           "means are sized; off by default: the project's attackers then "
                           "read some tables below chance (docs/findings.md)",
    "unlearn.null_means": "last, scale each class's mean deviation (per attribute and class) "
                          "to its size under permuted labels, both ways: class means "
                          "equalised in sample read below chance to a cross-fitted attacker "
                          "(docs/findings.md)",
    "unlearn.mean_share": "below 1, the combined table is first tried at this share of "
                          "every brick's class-mean part, finished by the class-mean step "
                          "and the polish; kept where every attribute then reads within "
                          "twice the target above the floor, else where it keeps the floor "
                          "and the searched gains' table does not, or reads closer to "
                          "chance. The bricks' rigid class shifts cross and cost utility; "
                          "`null_means` sizes what a share leaves (ML-1M MF: 0.963 test "
                          "retention against 0.944 at 1, the judges alike; "
                          "docs/findings.md); 1 = off",
    "unlearn.per_attribute": "per-attribute `w_mi`, `lam_rank`, `l2`, `lr`, keyed by "
                             "attribute name (`--set unlearn.per_attribute.age.l2=1`)",

    "combine": "Flexible Combination (uses the `unlearn` estimator, minibatch, margin and "
               "guard, except for its own `stop` and `linear_scope`)",
    "combine.mode": "one weight per attribute (`scalar`: each brick keeps the direction its "
                    "calibration chose), per attribute and dimension (`dim`), or a convex "
                    "combination of the calibrated tables (`convex`)",
    "combine.steps": "Adam steps",
    "combine.lr": "Adam learning rate",
    "combine.w_mi": "weight of the active attributes' excess MI",
    "combine.lam_rank": "weight of the ranking hinge (0 leaves it out of the compiled step)",
    "combine.init": "starting weights: `uniform` (1/number of active bricks) or `ones`",
    "combine.stop": "the stopping rule of the combination's MI estimate (as `unlearn.stop`): "
                    "`steps` keeps pushing below the minibatch's permuted-label level, which "
                    "the weights (not free rows) cannot overfit",
    "combine.linear_scope": "where the combination measures the class means (as "
                            "`unlearn.linear_scope`): `population` sees every user, so its "
                            "permuted-label level is that of the attackers' data",

    "run": "the main job (`lego-jax run`, `lego-jax grid`)",
    "run.methods": "methods run and compared",
    "run.attackers": "attackers applied to every table (`mlp`, `linear`, `knn`, `quadratic`)",
    "run.sweep": "`lam_rank` values for the trade-off plot (`--sweep 1,10,100` sets it); each "
                 "runs LEGO with `unlearn.lam_rank` and `combine.lam_rank` set to the value",
    "run.adversarial_objective": "in-training adversarial baseline: `confusion` (embeddings "
                                 "pushed to uniform predictions) or `reverse` (gradient "
                                 "reversal, which leaked more when measured)",
    "run.adversarial_weight": "weight of the adversarial term",
    "run.devices": "devices the user axis is split over in calibration, combination and "
                   "evaluation (a one-axis mesh; it must divide the number of users); 1 = one "
                   "device. On a CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N makes N. "
                   "On several processes, all of their devices (docs/scaling.md)",
}


def paths(tree: Mapping = DEFAULTS, where: str = "") -> list[str]:
  """Dotted paths of every table and field of `tree`, in order (tables before their fields)."""
  out = []
  for key, value in tree.items():
    out.append(where + key)
    if isinstance(value, dict) and f"{where}{key}" not in KEYED:
      out += paths(value, f"{where}{key}.")
  return out


# ---------------------------------------------------------------------------
# Typed views: one frozen dataclass per section, generated from DEFAULTS (each
# field typed from its default, described by DESCRIPTIONS), for code that
# wants attributes and types; the dicts stay what is merged, saved and passed.


class Section(Mapping):
  """A frozen, typed view of a config section.

  Its fields are attributes (`view.steps`) and, as in the dict it was made
  from, keys (`view["steps"]`, `dict(view)`), so code written for the dicts
  takes a view as it is. Lists become tuples and tables read-only mappings.
  """
  section: ClassVar[str] = ""

  def __getitem__(self, key: str):
    if key not in self.__dataclass_fields__:
      raise KeyError(key)
    return getattr(self, key)

  def __iter__(self):
    return (f.name for f in dataclasses.fields(self))

  def __len__(self) -> int:
    return len(dataclasses.fields(self))


def _frozen(value):
  if isinstance(value, (list, tuple)):
    return tuple(_frozen(v) for v in value)
  if isinstance(value, Mapping):
    return types.MappingProxyType({k: _frozen(v) for k, v in value.items()})
  return value


def _thawed(value):
  """The plain JSON-like value (lists, dicts) of a view's field."""
  if isinstance(value, tuple):
    return [_thawed(v) for v in value]
  if isinstance(value, Mapping):
    return {k: _thawed(v) for k, v in value.items()}
  return value


def _field_type(default) -> Any:
  if isinstance(default, list):
    kinds = {type(v) for v in default}
    return tuple[kinds.pop(), ...] if len(kinds) == 1 else tuple
  if isinstance(default, dict):
    return Mapping[str, Mapping[str, Any]]
  return type(default)


def _section_type(name: str, fields: dict, bases=(Section,)) -> type:
  specs = []
  for field, default in fields.items():
    path = f"{name}.{field}" if name else field
    meta = {"description": DESCRIPTIONS.get(path, "")}
    if not name and field in SECTION_TYPES:
      kind = SECTION_TYPES[field]
      init = dataclasses.field(default_factory=kind, metadata=meta)
    elif isinstance(default, dict):
      kind = _field_type(default)
      init = dataclasses.field(default_factory=lambda d=default: _frozen(d), metadata=meta)
    else:
      kind = _field_type(default)
      init = dataclasses.field(default=_frozen(default), metadata=meta)
    specs.append((field, kind, init))
  title = "".join(p.capitalize() for p in name.split("_")) + "Config" if name else "Config"
  doc = (f"`{name}`: {DESCRIPTIONS.get(name, '')}." if name else "A whole config.") + "\n\n" + \
      "\n".join(f"  {f}: {DESCRIPTIONS.get(f'{name}.{f}' if name else f, '')}" for f in fields)
  return dataclasses.make_dataclass(title, specs, bases=bases, frozen=True,
                                    namespace={"__doc__": doc, "section": name,
                                               "__module__": __name__})


SECTION_TYPES: dict[str, type] = {}
SECTION_TYPES.update({name: _section_type(name, fields) for name, fields in DEFAULTS.items()
                      if isinstance(fields, dict)})
# The whole config: `seed` and one typed view per section.
Config = _section_type("", DEFAULTS)


def view(section: str, values: Mapping = types.MappingProxyType({})) -> Section:
  """The typed, frozen view of one section's `values`; fields it lacks take the
  defaults, and unknown fields or wrong types are refused (LegoError)."""
  if section not in SECTION_TYPES:
    raise unknown("config section", section, SECTION_TYPES)
  cls = SECTION_TYPES[section]
  if isinstance(values, cls):
    return values
  merged = merge(DEFAULTS[section], _thawed(values), f"{section}.")
  return cls(**{k: _frozen(v) for k, v in merged.items()})


def sections(config: Mapping) -> Section:
  """The typed view of a whole config: `seed` and a view per section (`cfg.unlearn.steps`)."""
  out = {k: view(k, config.get(k, {})) if k in SECTION_TYPES else config.get(k, DEFAULTS[k])
         for k in DEFAULTS}
  unknown_keys = set(config) - set(DEFAULTS)
  if unknown_keys:
    raise unknown("config field", sorted(unknown_keys)[0], DEFAULTS)
  return Config(**out)


# ---------------------------------------------------------------------------
# The resolved config as text: TOML with each field's description, and the
# rows of docs/configuration.md.

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def literal(value) -> str:
  """`value` as a TOML literal (what `--set` and a config file take)."""
  if isinstance(value, bool):
    return "true" if value else "false"
  if isinstance(value, (int, float)):
    return repr(value)   # inf, nan and 1e-05 are TOML as Python writes them
  if isinstance(value, str):
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
  if isinstance(value, Mapping):
    items = (f"{k if _BARE_KEY.fullmatch(k) else literal(k)} = {literal(v)}"
             for k, v in value.items())
    return "{" + ", ".join(items) + "}"
  return "[" + ", ".join(literal(v) for v in value) + "]"


def to_toml(config: Mapping) -> str:
  """The config as a TOML file, each field under a comment saying what it is;
  read back (`--config FILE`) it resolves to the same config."""
  lines = []
  for key, value in config.items():
    if isinstance(value, Mapping):
      continue
    lines += [f"# {DESCRIPTIONS.get(key, '')}", f"{key} = {literal(value)}"]
  for key, value in config.items():
    if not isinstance(value, Mapping):
      continue
    lines += ["", f"# {DESCRIPTIONS.get(key, '')}", f"[{key}]"]
    for field, v in value.items():
      lines += [f"# {DESCRIPTIONS.get(f'{key}.{field}', '')}", f"{field} = {literal(v)}"]
  return "\n".join(lines) + "\n"


def reference_rows(section: str = "") -> list[str]:
  """The rows of docs/configuration.md's table of `section` ("" = the top level)."""
  fields = DEFAULTS[section] if section else {k: v for k, v in DEFAULTS.items()
                                              if not isinstance(v, dict)}
  prefix = f"{section}." if section else ""
  return [f"| `{prefix}{k}` | `{literal(v)}` | {DESCRIPTIONS.get(prefix + k, '')} |"
          for k, v in fields.items()]



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


def apply_overrides(config: dict, overrides=()) -> dict:
  """A copy of `config` with each `key=value` of `overrides` merged in, in order
  (fields and types checked; values are checked by `validate`)."""
  config = copy.deepcopy(config)
  for text in overrides:
    config = merge(config, parse_override(text))
  return config


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
  config = apply_overrides(config, overrides)
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
LOSSES = ("mmd", "d2d", "adversarial", "vclub")            # unlearning.calibration.LOSSES
PROJECTIONS = ("none", "ball")                             # unlearning.calibration.PROJECTIONS
BALLS = ("row", "table")                                   # unlearning.calibration.BALLS
CALIBRATORS = ("table", "residual")                        # unlearning.calibrators.CALIBRATORS
STOPS = ("null", "two-sided", "steps")                     # unlearning.losses.STOPS
HINGES = ("kernel", "sum")                                 # unlearning.losses.HINGES
ESTIMATORS = ("kernel", "features")                        # unlearning.losses.ESTIMATORS
LINEAR_SCOPES = ("batch", "population")                    # unlearning.calibration.LINEAR_SCOPES
UNITS = ("parts", "coordinates", "none")                   # unlearning.calibration.UNITS
COMBINE_MODES = ("dim", "scalar", "convex")                # unlearning.combination.MODES
COMBINE_INITS = ("uniform", "ones")                        # unlearning.combination.INITS
ATTACKERS = ("mlp", "linear", "knn", "quadratic")         # evaluation.attackers.ATTACKERS
ADVERSARIAL_OBJECTIVES = ("reverse", "confusion")          # unlearning.adversarial.OBJECTIVES
RANKING_METRICS = ("recall", "ndcg", "hr")                 # evaluation.ranking.METRICS
FORMATS = ("movielens-100k", "movielens-1m", "recbole", "lightgcn", "lastfm")  # data.FORMATS
SPLIT_METHODS = ("random", "loo", "predefined")            # data.SPLIT_METHODS


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
  from lego_jax.data.load import parse_age_bins  # here: lego_jax.data imports this module
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
    "attack.max_users": NON_NEGATIVE_INT,
    "attack.repeats": POSITIVE_INT,
    "unlearn.loss": _one_of(*LOSSES),
    "unlearn.calibrator": _one_of(*CALIBRATORS),
    "unlearn.steps": POSITIVE_INT,
    "unlearn.lr": POSITIVE,
    "unlearn.w_mi": NON_NEGATIVE,
    "unlearn.lam_rank": NON_NEGATIVE,
    "unlearn.l2": NON_NEGATIVE,
    "unlearn.batch_users": NON_NEGATIVE_INT,  # 0 = unlearn.batch_fraction of the users
    "unlearn.batch_fraction": _range(0, 1, lo_open=True),
    "unlearn.max_batch_users": _range(32, integer=True),
    "unlearn.control": _one_of("probe", "none"),
    "unlearn.target_leakage": NON_NEGATIVE,
    "unlearn.min_retention": _range(0, 1),
    "unlearn.probes": _each(_one_of(*ATTACKERS), at_least=1),
    "unlearn.probe_folds": _range(2, integer=True),
    "unlearn.probe_repeats": NON_NEGATIVE_INT,
    "unlearn.control_rounds": POSITIVE_INT,
    "unlearn.polish_steps": NON_NEGATIVE_INT,
    "unlearn.polish_probes": _each(_one_of(*ATTACKERS)),
    "unlearn.polish_features": POSITIVE_INT,
    "unlearn.mean_share": _range(0, 1),
    "unlearn.max_gain": _range(1),
    "unlearn.topk": POSITIVE_INT,
    "unlearn.guard": NON_NEGATIVE_INT,
    "unlearn.margin": NON_NEGATIVE,
    "unlearn.linear_scope": _one_of(*LINEAR_SCOPES),
    "unlearn.units": _one_of(*UNITS),
    "unlearn.bandwidths": _each(_range()),  # empty: the linear kernel alone
    "unlearn.hinge": _one_of(*HINGES),
    "unlearn.stop": _one_of(*STOPS),
    "unlearn.estimator": _one_of(*ESTIMATORS),
    "unlearn.features": POSITIVE_INT,
    "unlearn.null_perms": POSITIVE_INT,
    "unlearn.marginal_features": NON_NEGATIVE_INT,
    "unlearn.projection": _one_of(*PROJECTIONS),
    "unlearn.epsilon": POSITIVE,
    "unlearn.ball": _one_of(*BALLS),
    "unlearn.vclub_hidden": POSITIVE_INT,
    "unlearn.vclub_lr": POSITIVE,
    "unlearn.ckpt_every": POSITIVE_INT,
    "combine.mode": _one_of(*COMBINE_MODES),
    "combine.steps": POSITIVE_INT,
    "combine.lr": POSITIVE,
    "combine.w_mi": NON_NEGATIVE,
    "combine.lam_rank": NON_NEGATIVE,
    "combine.init": _one_of(*COMBINE_INITS),
    "combine.stop": _one_of(*STOPS),
    "combine.linear_scope": _one_of(*LINEAR_SCOPES),
    "run.attackers": _each(_one_of(*ATTACKERS)),
    "run.sweep": _each(NON_NEGATIVE),
    "run.adversarial_objective": _one_of(*ADVERSARIAL_OBJECTIVES),
    "run.adversarial_weight": NON_NEGATIVE,
    "run.devices": POSITIVE_INT,
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
