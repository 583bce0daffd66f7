"""Sweeps: LEGO under a grid of settings and seeds, one vmapped program where it can be.

  lego-jax sweep --workdir W --grid unlearn.w_mi=0.3,1,3 --grid combine.lam_rank=100,200 --seeds 5

A grid point is one setting (a value of every `--grid` field) under one seed.
Fields that are traced arrays of the compiled programs (`VMAPPED`: the
calibration's per-brick weights and the combination's) and the seed become
one leading axis: every (setting, seed, attribute) brick is calibrated in one
vmapped program, every (setting, seed) combination is fitted in another.
Any other field changes shapes or the program itself (steps, minibatch,
estimator, loss); its values are looped, one vmapped program each, and the
result says which fields were which. Seed r is the config with seed
`seed + r`: it draws the calibration's and the combination's keys and the
folds of both the steering probes and the attackers, so its spread is the
whole method's run-to-run spread on one trained backbone.

The control loop runs as in `lego-jax unlearn`: its probes read every brick of
a seed in one vmapped attack, and the combination's gain search (a host-side
search per table) and the evaluation run per grid point. Nothing is written
to the workdir but the sweep's own files: `sweep.json`, `sweep.md` (the
table), `sweep.png` (the plot) and `sweep_tables.npz` (every run's combined
table, for attackers of one's own).
"""

import copy
import itertools
import pathlib
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lego_jax import config as config_lib, sharding
from lego_jax.errors import LegoError
from lego_jax.evaluation import attackers, classification_metrics as cm
from lego_jax.report import sweep_plot, sweep_table
from lego_jax.requests import Unlearner, attribute_key
from lego_jax.unlearning import calibration, combination, control
from lego_jax.workdir import IDENTITY, Workdir, write_json

VMAPPED = (tuple(f"unlearn.{f}" for f in calibration.HParams._fields)
           + tuple(f"combine.{f}" for f in combination.HParams._fields))
ATTACKERS = ("mlp", "linear")


def parse_grid(items: Sequence[str], config: dict) -> dict[str, list]:
  """`["unlearn.w_mi=0.3,1,3", ...]` -> {"unlearn.w_mi": [0.3, 1.0, 3.0], ...},
  each value checked as `--set` would check it."""
  grid = {}
  for item in items:
    field, sep, raw = item.partition("=")
    field = field.strip()
    values = [v.strip() for v in raw.split(",") if v.strip()]
    if not sep or not values:
      raise LegoError(f"--grid expects field=value,value,..., got {item!r}")
    if field in grid:
      raise LegoError(f"--grid names {field} twice")
    if field.split(".")[0] in IDENTITY:
      raise LegoError(f"--grid {field}: the sweep runs on the workdir's trained backbone; the "
                      "seeds are --seeds, and data, model and train settings need their own workdir")
    checked = []
    for v in values:
      cfg = config_lib.merge(config, config_lib.parse_override(f"{field}={v}"))
      config_lib.validate(cfg)
      section, _, key = field.partition(".")
      checked.append(cfg[section][key] if key else cfg[section])
    grid[field] = checked
  return grid


def _apply(config: dict, point: dict, seed: int) -> dict:
  cfg = copy.deepcopy(config)
  for field, value in point.items():
    section, _, key = field.partition(".")
    cfg[section][key] = value
  cfg["seed"] = seed
  return cfg


def _stats(values) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "ci95": cm.ci95(v)}


def sweep(wd: Workdir, grid: dict[str, list], seeds: int = 3, names: Optional[list] = None,
          overrides: Sequence[str] = (), out: Optional[pathlib.Path] = None,
          progress: bool = True) -> dict:
  """Runs the grid on `wd`'s trained backbone; returns (and writes) the sweep's results."""
  if seeds < 1:
    raise LegoError(f"--seeds must be >= 1, got {seeds}")
  base = config_lib.apply_overrides(wd.config, overrides)
  config_lib.validate(base)
  names = list(names or base["unlearn"]["attributes"] or wd.attribute_names())
  Unlearner(wd, progress=False, config=base)._checked(names)
  # The combination's order (as `Unlearner.combine` stacks stored bricks).
  names = [a for a in wd.attribute_names() if a in names]
  vmapped = [f for f in grid if f in VMAPPED]
  looped = [f for f in grid if f not in VMAPPED]
  seed_list = [int(base["seed"]) + r for r in range(seeds)]
  bb = wd.backbone(progress=progress)
  original = wd.evaluate(bb.table())["ndcg@10"]
  runs, tables = [], []
  seconds = {"calibration": 0.0, "combination": 0.0, "evaluation": 0.0}
  for static in itertools.product(*(grid[f] for f in looped)):
    static_cfg = _apply(base, dict(zip(looped, static)), base["seed"])
    points = [dict(zip(looped, static)) | dict(zip(vmapped, v))
              for v in itertools.product(*(grid[f] for f in vmapped))]
    r, t = _run_points(wd, static_cfg, points, vmapped, seed_list, names, original, seconds,
                       progress)
    runs += r
    tables += t
  result = _summarise(grid, vmapped, looped, seed_list, names, runs, seconds)
  result["original_ndcg@10"] = original
  out = pathlib.Path(out) if out else wd.path
  out.mkdir(parents=True, exist_ok=True)
  # Every run's combined table, for attackers of one's own (`runs[i]` is `run<i>`).
  tmp = out / ".sweep_tables.npz.tmp.npz"
  np.savez(tmp, **{f"run{i}": np.asarray(t, np.float32) for i, t in enumerate(tables)})
  tmp.replace(out / "sweep_tables.npz")
  write_json(out / "sweep.json", result)
  tmp = out / ".sweep.md.tmp"
  tmp.write_text(sweep_table(result) + "\n")
  tmp.replace(out / "sweep.md")
  sweep_plot(out / "sweep.png", result)
  return result


def compiled_config(static_cfg: dict, points: list[dict], vmapped: list[str]) -> dict:
  """The config whose Specs compile the one program that serves every point:
  it computes the ranking hinge where any point weighs it (a weight of 0 alone
  would leave it out of the program)."""
  hinge = {f: max(p[f] for p in points) for f in ("unlearn.lam_rank", "combine.lam_rank")
           if f in vmapped}
  return _apply(static_cfg, hinge, static_cfg["seed"])


def _run_points(wd, static_cfg, points, vmapped, seed_list, names, original, seconds, progress):
  """Every (point, seed) of one looped setting: one vmapped calibration of all
  their bricks, one vmapped combination fit, then control and evaluation per point."""
  grid_cfgs = [(p, s, _apply(static_cfg, {f: p[f] for f in vmapped}, s))
               for p in points for s in seed_list]
  u = Unlearner(wd, progress=progress, config=compiled_config(static_cfg, points, vmapped))
  k = len(names)
  tasks = [n for _ in grid_cfgs for n in names]
  hps = calibration.HParams(*(jnp.concatenate(x) for x in zip(
      *(calibration.HParams.from_config(c["unlearn"], names) for _, _, c in grid_cfgs))))
  keys = jnp.stack([attribute_key(s, n) for _, s, _ in grid_cfgs for n in names])
  seeds = [s for _, s, _ in grid_cfgs for _ in names]
  start = time.perf_counter()
  cal = u.calibrate_tasks(tasks, hps, keys, seeds=seeds)
  bricks = u.with_gains(tasks, cal.bricks, cal.gains).reshape(len(grid_cfgs), k,
                                                                *cal.bricks.shape[1:])
  seconds["calibration"] += time.perf_counter() - start

  start = time.perf_counter()
  chps = combination.HParams(*(jnp.asarray(x, jnp.float32) for x in zip(
      *(combination.HParams.from_config(c["combine"]) for _, _, c in grid_cfgs))))
  ckeys = jnp.stack([u.combination_key(s) for _, s, _ in grid_cfgs])
  w, _, _ = combination.fit_grid(u.target(), sharding.over_users(jnp.asarray(bricks), u.mesh(), 2),
                                 u.labels(names),
                                 jnp.ones(k, jnp.float32), ckeys, chps,
                                 spec=u.combination_spec(), score_fn=wd.backbone().score)
  # The gain search reads only looped fields (target, floor, probes), and the
  # polish each point's own weights: one Unlearner serves all.
  tables, reports = zip(*(u.controlled_table(
      names, names, bricks[g], w[g], seed=s,
      weights={f: c["unlearn"][f] for f in calibration.HParams._fields})
      for g, (_, s, c) in enumerate(grid_cfgs)))
  seconds["combination"] += time.perf_counter() - start

  start = time.perf_counter()
  leak = _attack(wd, static_cfg, np.stack(tables), names, [s for _, s, _ in grid_cfgs])
  runs = []
  for g, (point, s, _) in enumerate(grid_cfgs):
    ndcg = wd.evaluate(tables[g])["ndcg@10"]
    part = slice(g * k, (g + 1) * k)
    brick = None if cal.reading is None else control.Reading(
        cal.reading.signed[:, part], cal.reading.lo[:, part], cal.reading.hi[:, part],
        cal.reading.probes).report(names)
    runs.append({"setting": point, "seed": s, "ndcg@10": ndcg,
                 "retention": ndcg / original if original else None,
                 "leakage": {a: {n: leak[a][g][n] for n in names} for a in ATTACKERS},
                 "within_target": reports[g].get("within_target"),
                 "warnings": reports[g].get("warnings", []),
                 "combination_control": {f: reports[g].get(f) for f in
                                         ("gains", "residual_means", "polish")},
                 "strength": {f: cal.strength[f][part] for f in ("w_mi", "l2")},
                 "brick_gains": cal.gains[part].tolist(), "brick_control": brick})
  seconds["evaluation"] += time.perf_counter() - start
  return runs, tables


def _attack(wd, cfg, tables, names, seeds) -> dict:
  """{attacker: [per table {attribute: {"signed", "ci95"}}]}: the evaluation's
  attackers (not the steering probes), every table of a seed in one vmapped call.
  One fold split per seed, whatever `attack.repeats` says: the seeds are the
  repeats, and the interval over them holds the split's noise."""
  labels, num_classes = wd.labels(names)
  out = {a: [None] * len(tables) for a in ATTACKERS}
  for s in dict.fromkeys(seeds):
    idx = [g for g, x in enumerate(seeds) if x == s]
    per_attr = np.repeat(tables[idx], len(names), axis=0)   # table g once per attribute
    tags = [(g, n, f"{n} (table {g})") for g in idx for n in names]
    for a in ATTACKERS:
      res = attackers.attack(per_attr, np.tile(labels, (len(idx), 1)), num_classes * len(idx),
                             attacker=a, protocol="cv5", seed=s, config=cfg["attack"],
                             names=[t for _, _, t in tags])
      for g, n, t in tags:
        r = res[t]
        out[a][g] = out[a][g] or {}
        out[a][g][n] = {"signed": r["bacc"] - r["chance"],
                        "ci95": [x - r["chance"] for x in r["ci95"]]}
  return out


def _summarise(grid, vmapped, looped, seed_list, names, runs, seconds) -> dict:
  """Per setting: mean, std and 95% interval over seeds of retention, each
  attacker's signed leakage per attribute and the worst |leakage|; the Pareto
  front of (retention, worst leakage) means."""
  settings = []
  for point in dict.fromkeys(tuple(sorted(r["setting"].items())) for r in runs):
    mine = [r for r in runs if tuple(sorted(r["setting"].items())) == point]
    point = [(f, mine[0]["setting"][f]) for f in grid]   # in the grid's order
    worst = [max(abs(r["leakage"][a][n]["signed"]) for a in ATTACKERS for n in names)
             for r in mine]
    settings.append({
        "setting": dict(point), "seeds": [r["seed"] for r in mine],
        "retention": _stats([r["retention"] for r in mine]),
        "max_leakage": _stats(worst),
        "leakage": {a: {n: _stats([r["leakage"][a][n]["signed"] for r in mine]) for n in names}
                    for a in ATTACKERS},
        "within_target": sum(bool(r["within_target"]) for r in mine)})
  for s in settings:
    s["pareto"] = not any(
        o["retention"]["mean"] >= s["retention"]["mean"]
        and o["max_leakage"]["mean"] <= s["max_leakage"]["mean"]
        and (o["retention"]["mean"] > s["retention"]["mean"]
             or o["max_leakage"]["mean"] < s["max_leakage"]["mean"]) for o in settings)
  return {"grid": grid, "vmapped": vmapped, "looped": looped, "seeds": seed_list,
          "attributes": names, "attackers": list(ATTACKERS), "settings": settings,
          "runs": runs, "seconds": seconds}
