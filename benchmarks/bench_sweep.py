"""A sweep's grid as one vmapped program versus a loop of runs, seconds and peak memory.

  python benchmarks/bench_sweep.py [--users 943 --items 1682 --dim 64 --steps 100]
                                   [--settings 4 --seeds 3 --attributes 3] [--repeats 2]

The grid of `lego-jax sweep` (settings x seeds, each unlearning K attributes):
  - vmapped: every (setting, seed, attribute) brick in one calibration program
    (`calibration.calibrate` over G*K tasks), every (setting, seed) combination
    in one `combination.fit_grid`, as the sweep runs them;
  - looped: one run per grid point, as a Python loop of `lego-jax unlearn`
    would: G calibrations of K bricks, then G combination fits.
The programs only (the closed loop's probe reads and the evaluation are the
same attacks either way; the sweep reads all tables of a seed in one vmapped
attack). An ML-100K-sized MF problem with a random table: calibration's cost
does not depend on how the table was trained. Each mode runs in its own
process, so each peak memory is its own (GPU: the device allocator's peak;
CPU: the process's max RSS). Times are steady state (best of --repeats after
a compiling call) and, separately, the first call with its compilation.
Prints one JSON object, then a table.
"""

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.config import DEFAULTS  # noqa: E402
from lego_jax.requests import attribute_key  # noqa: E402
from lego_jax.unlearning import calibration, combination  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# The same ML-sized random MF problem and class counts as the attribute-axis benchmark.
from bench_unlearning import CLASSES, problem  # noqa: E402


def grid(settings, seeds, k):
  """Per grid point: calibration and combination hyper-parameters and keys."""
  rng = np.random.default_rng(1)
  ucfg, ccfg = DEFAULTS["unlearn"], DEFAULTS["combine"]
  points = []
  for s in range(settings):
    w_mi, lam = ucfg["w_mi"] * 2.0 ** rng.uniform(-1, 1), ccfg["lam_rank"] * 2.0 ** rng.uniform(-1, 1)
    for seed in range(seeds):
      hp = calibration.HParams(*(jnp.full((k,), v, jnp.float32)
                                 for v in (w_mi, ucfg["lam_rank"], ucfg["l2"], ucfg["lr"])))
      keys = jnp.stack([attribute_key(seed, f"a{i}") for i in range(k)])
      points.append((hp, keys, combination.HParams(ccfg["w_mi"], lam, ccfg["lr"]),
                     jax.random.fold_in(jax.random.PRNGKey(seed), 1)))
  return points


def run_mode(args) -> dict:
  ucfg = dict(DEFAULTS["unlearn"], steps=args.steps)
  k = args.attributes
  target, labels, score = problem(args.users, args.items, args.dim, k, ucfg["topk"] + ucfg["guard"])
  batch = max(32, round(args.users * ucfg["batch_fraction"]))
  spec = calibration.Spec.from_config({**ucfg, "batch_users": batch}, max(CLASSES[:k]))
  cspec = combination.Spec.from_config(DEFAULTS["combine"], {**ucfg, "batch_users": batch},
                                       max(CLASSES[:k]))
  points = grid(args.settings, args.seeds, k)
  g = len(points)
  active = jnp.ones(k, jnp.float32)
  y = jnp.asarray(labels)

  if args.mode == "vmapped":
    hps = calibration.HParams(*(jnp.concatenate(x) for x in zip(*(p[0] for p in points))))
    keys = jnp.concatenate([p[1] for p in points])
    chps = combination.HParams(*(jnp.asarray(x, jnp.float32) for x in zip(*(p[2] for p in points))))
    ckeys = jnp.stack([p[3] for p in points])

    def run():
      bricks, _, _ = calibration.calibrate(target, np.tile(labels, (g, 1)), hps, keys, spec=spec,
                                           score_fn=score)
      return combination.fit_grid(target, bricks.reshape(g, k, *bricks.shape[1:]), y, active,
                                  ckeys, chps, spec=cspec, score_fn=score)[1]
  else:
    def run():
      out = []
      for hp, keys, chp, ckey in points:
        bricks, _, _ = calibration.calibrate(target, labels, hp, keys, spec=spec, score_fn=score)
        out.append(combination.fit(target, bricks, y, active, ckey, chp, spec=cspec,
                                   score_fn=score)[1])
      return jnp.stack(out)

  t = time.perf_counter()
  tables = jax.block_until_ready(run())
  first = time.perf_counter() - t
  best = float("inf")
  for _ in range(args.repeats):
    t = time.perf_counter()
    jax.block_until_ready(run())
    best = min(best, time.perf_counter() - t)
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    peak, kind = stats["peak_bytes_in_use"] / 2 ** 20, "device peak"
  else:
    peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"
  return {"mode": args.mode, "grid_points": g, "bricks": g * k, "seconds": best,
          "seconds_first_call": first, "peak_mb": peak, "memory": kind,
          "checksum": float(jnp.abs(tables).sum())}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--users", type=int, default=943)
  ap.add_argument("--items", type=int, default=1682)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--steps", type=int, default=100)
  ap.add_argument("--settings", type=int, default=4)
  ap.add_argument("--seeds", type=int, default=3)
  ap.add_argument("--attributes", type=int, default=3)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--mode", choices=("vmapped", "looped"), help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.mode:
    print(json.dumps(run_mode(args)))
    return
  rows = {}
  for mode in ("looped", "vmapped"):
    cmd = [sys.executable, __file__, "--mode", mode] + [
        f"--{f}={getattr(args, f)}" for f in ("users", "items", "dim", "steps", "settings",
                                              "seeds", "attributes", "repeats")]
    rows[mode] = json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                           text=True).stdout.strip().splitlines()[-1])
  out = {"device": str(jax.devices()[0]), "users": args.users, "items": args.items,
         "dim": args.dim, "steps": args.steps, "settings": args.settings, "seeds": args.seeds,
         "attributes": args.attributes, "modes": rows,
         "looped_over_vmapped_seconds": rows["looped"]["seconds"] / rows["vmapped"]["seconds"],
         "looped_over_vmapped_first_call": (rows["looped"]["seconds_first_call"]
                                            / rows["vmapped"]["seconds_first_call"]),
         "vmapped_over_looped_memory": rows["vmapped"]["peak_mb"] / rows["looped"]["peak_mb"],
         "same_tables": abs(rows["looped"]["checksum"] - rows["vmapped"]["checksum"])
         <= 1e-4 * abs(rows["looped"]["checksum"])}
  print(json.dumps(out))
  print(f"\n{args.settings} settings x {args.seeds} seeds x {args.attributes} attributes "
        f"({args.users} users, {args.steps} calibration steps) on {out['device']}")
  print("| mode    | grid points | seconds (steady) | seconds (first call) | peak MB |")
  print("|---------|-------------|------------------|----------------------|---------|")
  for mode, r in rows.items():
    print(f"| {mode:<7} | {r['grid_points']:>11} | {r['seconds']:>16.2f} | "
          f"{r['seconds_first_call']:>20.2f} | {r['peak_mb']:>7.0f} |")
  print(f"looped / vmapped: {out['looped_over_vmapped_seconds']:.2f}x steady, "
        f"{out['looped_over_vmapped_first_call']:.2f}x first call; memory vmapped / looped "
        f"{out['vmapped_over_looped_memory']:.2f}x; same tables: {out['same_tables']}")


if __name__ == "__main__":
  main()
