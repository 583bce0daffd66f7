"""What each command does, on top of the library; the CLI only parses arguments.

`train_and_evaluate(config, workdir)` is the main job (`lego-jax run`):
data -> backbone -> attack original -> LEGO and the baselines -> evaluation
and attacks of every result -> results.json, report.md and plots.
"""

import json
import os
import pathlib

import numpy as np

from lego_jax import config as config_lib, data
from lego_jax.errors import LegoError
from lego_jax.report import ATTACK_KEYS, digest, format_table, ranking_keys
from lego_jax.requests import Unlearner
from lego_jax.workdir import Workdir, safe_name, writer_lock


def _overrides(args) -> list[str]:
  sets = list(getattr(args, "set", []) or [])
  if getattr(args, "data_dir", None):  # absolute: later commands may run from elsewhere
    sets.insert(0, f"data.data_dir={json.dumps(os.path.abspath(args.data_dir))}")
  return sets


def _resolve(args, name=None, overrides=None) -> dict:
  """The config of a one-dataset command; --data-dir with the synthetic dataset is refused."""
  config = config_lib.resolve(name, _overrides(args) if overrides is None else overrides)
  if getattr(args, "data_dir", None) and config["data"]["name"] == "synthetic":
    # Silently training on synthetic data is the worst answer to a user who
    # pointed at their own files.
    raise LegoError(f"--data-dir {args.data_dir} is ignored by the synthetic dataset; "
                    f"--data-dir is the folder holding ml-100k/, ml-1m/ or lastfm-360k/. "
                    f"To use your own files pass --set data.name={args.data_dir}")
  return config


# ---- data -------------------------------------------------------------------
def inspect_data(args):
  overrides = [f"data.name={json.dumps(args.name)}"] + _overrides(args)
  if args.format:
    overrides.append(f"data.format={json.dumps(args.format)}")
  if args.users:
    overrides.append(f"data.users_file={json.dumps(args.users)}")
  config = _resolve(args, None, overrides)
  ds, split = data.from_config(config)
  info = data.describe(ds, split)

  def table(info):
    head = (f"{info['dataset']}: {info['users']} users, {info['items']} items, "
            f"{info['interactions']} interactions; split train/valid/test "
            f"{info['split']['train']}/{info['split']['valid']}/{info['split']['test']}")
    rows = [(a, len(v["classes"]), ", ".join(f"{c}:{n}" for c, n in zip(v["classes"], v["counts"])),
             v["missing"]) for a, v in info["attributes"].items()]
    return head + "\n" + format_table(("attribute", "classes", "counts", "missing"), rows)

  return info, args.json, table


# ---- config -----------------------------------------------------------------
def show_config(args):
  return _resolve(args, args.config), args.json, config_lib.to_toml


# ---- backbone and evaluation ------------------------------------------------
def train(args):
  config = _resolve(args, getattr(args, "config", None))   # refused before anything is written
  with writer_lock(args.workdir):
    wd = Workdir.create(args.workdir, config)
    wd.train()
    return evaluate_workdir(wd), False, _ranking_table


def evaluate_workdir(wd: Workdir) -> dict:
  """{"original": metrics, "popularity": metrics, "combined": metrics (when present)}."""
  u = Unlearner(wd, progress=False)
  keys = ranking_keys(wd.config["eval"]["ks"])
  means = lambda result: {k: result[k] for k in keys}
  out = {"original": means(wd.evaluate()), "popularity": means(wd.evaluate_popularity())}
  if "combined" in u.stages():
    out["combined"] = means(wd.evaluate(u.table("combined")))
  return out


def _ranking_table(stages: dict) -> str:
  keys = tuple(next(iter(stages.values())))
  return format_table(("stage",) + keys,
                      [(s,) + tuple(m[k] for k in keys) for s, m in stages.items()])


def evaluate(args):
  return evaluate_workdir(Workdir.open(args.workdir)), args.json, _ranking_table


# ---- attack and export ------------------------------------------------------
def attack(args):
  wd = Workdir.open(args.workdir)
  table = Unlearner(wd).table(args.stage)
  repeats = wd.attack_repeats(args.repeats)
  keys = ATTACK_KEYS + (("split_sd",) if repeats > 1 else ())
  out = {"stage": args.stage, "attacker": args.attacker, "protocol": args.protocol,
         "repeats": repeats,
         "attributes": {a: {k: r[k] for k in keys}
                        for a, r in wd.attack(table, args.attacker, args.protocol,
                                              repeats=repeats).items()}}

  def text(o):
    return (f"stage {o['stage']}, attacker {o['attacker']}, protocol {o['protocol']}, "
            f"{o['repeats']} fold split(s)\n"
            + format_table(("attribute",) + keys,
                           [(a,) + tuple(m[k] for k in keys) for a, m in o["attributes"].items()]))

  return out, args.json, text


def export(args):
  wd = Workdir.open(args.workdir)
  table = np.asarray(Unlearner(wd).table(args.stage), np.float32)
  ds = wd.dataset
  arrays = {"embeddings": table, "user_ids": np.asarray(ds.user_ids).astype(str)}
  for name, attr in ds.attributes.items():
    arrays[f"attr_{safe_name(name)}"] = attr.codes.astype(np.int32)
    arrays[f"attr_{safe_name(name)}_classes"] = np.asarray(attr.classes, dtype=str)
  out = pathlib.Path(args.out)
  if out.suffix != ".npz":
    raise LegoError(f"--out must name a .npz file, got {out}")
  tmp = out.with_name(f".{out.stem}.tmp.npz")
  try:
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
  except OSError as e:
    raise LegoError(f"cannot write {out}: {e.strerror or e}") from None
  return (f"wrote {out}: {table.shape[0]} users x {table.shape[1]} dims, stage {args.stage}",
          False, str)


# ---- unlearning -------------------------------------------------------------
def requested(wd: Workdir, text=None) -> list[str]:
  if text:
    return [a.strip() for a in text.split(",") if a.strip()]
  return list(wd.config["unlearn"]["attributes"]) or wd.attribute_names()


def unlearn(args):
  Workdir.open(args.workdir)  # a missing workdir is named before anything is written
  # Held from before the overrides are saved to config.json until the bricks
  # are written, so a second writer cannot mix its settings into this run.
  with writer_lock(args.workdir):
    wd = Workdir.open(args.workdir, args.set)
    names = requested(wd, args.attributes)
    wd.labels(names)  # refuses unknown or unlabelled attributes before any work
    u = Unlearner(wd)
    u.unlearn(names)
    return _status(u, False)


def request(args):
  wd = Workdir.open(args.workdir)
  u = Unlearner(wd)
  if args.request_command == "status":
    return _status(u, args.json)
  with wd.writing():
    if args.request_command == "add":
      u.add(args.attribute)
    else:
      u.withdraw(args.attribute)
  return _status(u, False)


def _leak(report) -> str:
  """'mlp +0.004 [-0.010, +0.018] / linear ...' from a control report of one attribute."""
  if not report:
    return "-"
  return " / ".join(f"{p} {r['signed']:+.3f} [{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}]"
                    for p, r in report.items())


def _status(u: Unlearner, as_json: bool):
  def text(s):
    strength = lambda st: f"{st['w_mi']:.3g}/{st['l2']:.3g}" if st else "-"
    secs = lambda x: "-" if x is None else f"{x:.0f}"   # absent in workdirs made before it
    rows = [(a, "yes" if a in s["active"] else "no", m["steps"], strength(m.get("strength")),
             "/".join(f"{g:.2f}" for g in m["gain"]), _leak(m["leakage"]), secs(m.get("seconds")),
             m["created"])
            for a, m in s["bricks"].items()]
    out = (f"active: {', '.join(s['active']) or 'none'}\n"
           + format_table(("brick", "active", "steps", "MI weight/pull", "gains (mean/rest)",
                           "brick alone: probe leakage BAcc-chance [95%]", "seconds", "created"),
                          rows))
    out += "".join(f"\nstale: {a}, made under another value of {'; '.join(m['stale'])} "
                   "(`lego-jax unlearn` recalibrates it; requests reuse it)"
                   for a, m in s["bricks"].items() if m.get("stale"))
    comb = s.get("combination") or {}
    if comb.get("leakage"):
      shares = comb.get("residual_means") or {}
      rows = [(a, "/".join(f"{g:.2f}" for g in comb["gains"][a]), f"{shares.get(a, 0.0):.2f}",
               _leak(r))
              for a, r in comb["leakage"].items()]
      out += ("\n\ncombined table (validation NDCG@10 retention "
              f"{comb['retention_valid']:.3f}; every attribute within the target: "
              f"{'yes' if comb['within_target'] else 'no'}"
              + ("" if comb.get("seconds") is None else f"; combined in {comb['seconds']:.0f} s")
              + ("" if not comb.get("polish") else
                 f"; polish of {', '.join(comb['polish']['attributes'])} at "
                 f"{comb['polish']['gain']:.2f}")
              + ")\n"
              + format_table(("attribute", "gains", "class means taken back",
                              "probe leakage BAcc-chance [95%]"), rows))
      out += "".join(f"\nwarning: {w}" for w in comb.get("warnings") or [])
    return out
  return u.status(), as_json, text


# ---- the main job -----------------------------------------------------------
def run(args):
  from lego_jax import experiment
  name = args.config or "synthetic_mf"   # the main job's synthetic default
  config = _resolve(args, name)
  if args.sweep:
    try:
      config["run"]["sweep"] = [float(x) for x in args.sweep.split(",") if x]
    except ValueError:
      raise LegoError(f"--sweep expects comma-separated numbers, got {args.sweep!r}") from None
  workdir = args.workdir or os.path.join("runs", safe_name(pathlib.Path(name).stem))
  results = experiment.train_and_evaluate(config, workdir)
  return digest(results, workdir), False, lambda s: s


def grid(args):
  from lego_jax import experiment
  names = [c for c in args.configs.split(",") if c]
  table = experiment.grid(names, args.root, _overrides(args), args.out)
  return table, False, lambda s: s


def sweep(args):
  from lego_jax import sweep as sweep_lib
  from lego_jax.report import sweep_table
  wd = Workdir.open(args.workdir)
  grid = sweep_lib.parse_grid(args.grid, wd.config)
  names = requested(wd, args.attributes) if args.attributes else None
  result = sweep_lib.sweep(wd, grid, args.seeds, names, args.set, args.out)
  return result, args.json, sweep_table


COMMANDS = {"data": inspect_data, "config": show_config, "train": train, "evaluate": evaluate, "attack": attack,
            "export": export, "unlearn": unlearn, "request": request, "run": run, "grid": grid,
            "sweep": sweep}


def dispatch(args):
  return COMMANDS[args.command](args)
