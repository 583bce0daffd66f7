"""Calibration vmapped over K attributes versus a sequential loop; request cost.

  python benchmarks/bench_unlearning.py [--users 6040 --items 3706 --dim 64 --steps 100]
                                        [--ks 1,2,3,4,8] [--repeats 2]

An ML-1M-sized MF problem (6040 users x 3706 items, d = 64): the scores, top-20
lists and labels are what calibration consumes, and its cost does not depend
on how the table was trained, so a random table serves for timing. Labels
follow ML-1M's class counts (2, 7, 21 classes); K > 3 adds synthetic
attributes. Reported, all in one run on one machine:
  - calibration of K attributes: one vmapped program vs K sequential calls of
    the same program with K = 1 (steady state, after a warm-up call compiled it);
  - peak memory (GPU: the device allocator's peak; CPU: the process's max RSS);
  - serving `request add` of one attribute (calibrate it, re-combine all) vs
    re-running joint unlearning of all of them (one table, summed MI terms).
Prints one JSON object, then a table.
"""

import argparse
import json
import pathlib
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.config import DEFAULTS  # noqa: E402
from lego_jax.unlearning import calibration, combination  # noqa: E402
from lego_jax.requests import attribute_key  # noqa: E402

CLASSES = [2, 7, 21, 4, 3, 5, 10, 2]


def problem(n, m, d, k_max, t=20, seed=0):
  rng = np.random.default_rng(seed)
  e0 = jnp.asarray(rng.normal(size=(n, d)) * 0.3, jnp.float32)
  items = jnp.asarray(rng.normal(size=(m, d)) * 0.3, jnp.float32)
  topk = jax.lax.top_k(e0 @ items.T, t)[1]
  labels = np.stack([rng.integers(0, c, n) for c in CLASSES[:k_max]]).astype(np.int32)
  score = lambda table, users, it: jnp.einsum("bd,btd->bt", table[users], items[it])
  return calibration.Target(e0, topk, jnp.float32(1.0)), labels, score


def timed(fn, repeats):
  jax.block_until_ready(fn())  # compile
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - t)
  return best


def peak_memory_mb():
  dev = jax.devices()[0]
  stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return stats["peak_bytes_in_use"] / 2**20, "device peak"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "process max RSS"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--users", type=int, default=6040)
  ap.add_argument("--items", type=int, default=3706)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--steps", type=int, default=DEFAULTS["unlearn"]["steps"])
  ap.add_argument("--ks", default="1,2,3,4,8")
  ap.add_argument("--repeats", type=int, default=2)
  args = ap.parse_args()
  ks = [int(k) for k in args.ks.split(",")]
  ucfg = dict(DEFAULTS["unlearn"], steps=args.steps)
  target, labels, score = problem(args.users, args.items, args.dim, max(ks),
                                  ucfg["topk"] + ucfg["guard"])
  spec = calibration.Spec.from_config(ucfg, max(CLASSES[:max(ks)]))
  keys = jnp.stack([attribute_key(0, f"a{i}") for i in range(max(ks))])
  hps = calibration.HParams.from_config(ucfg, [f"a{i}" for i in range(max(ks))])

  def vmapped(k):
    return lambda: calibration.calibrate(target, labels[:k], jax.tree.map(lambda x: x[:k], hps),
                                         keys[:k], spec=spec, score_fn=score)[0]

  def looped(k):
    return lambda: [calibration.calibrate(target, labels[i:i + 1],
                                          jax.tree.map(lambda x: x[i:i + 1], hps), keys[i:i + 1],
                                          spec=spec, score_fn=score)[0] for i in range(k)]

  rows = []
  for k in ks:
    tv = timed(vmapped(k), args.repeats)
    tl = timed(looped(k), args.repeats)
    rows.append({"K": k, "vmapped_s": tv, "loop_s": tl, "speedup": tl / tv})
    print(f"K={k}: vmapped {tv:.2f}s loop {tl:.2f}s", file=sys.stderr, flush=True)
  mem, mem_kind = peak_memory_mb()

  # Serving a request: K=3 bricks exist; a 4th attribute arrives.
  k_req = min(4, max(ks))
  cspec = combination.Spec.from_config(DEFAULTS["combine"], ucfg, spec.num_classes)
  chp = combination.HParams.from_config(DEFAULTS["combine"])
  old = calibration.calibrate(target, labels[:k_req - 1], jax.tree.map(lambda x: x[:k_req - 1], hps),
                              keys[:k_req - 1], spec=spec, score_fn=score)[0]

  def add():
    new = calibration.calibrate(target, labels[k_req - 1:k_req],
                                jax.tree.map(lambda x: x[k_req - 1:k_req], hps),
                                keys[k_req - 1:k_req], spec=spec, score_fn=score)[0]
    bricks = jnp.concatenate([old, new])
    return combination.fit(target, bricks, jnp.asarray(labels[:k_req]), jnp.ones(k_req),
                           jax.random.PRNGKey(0), chp, spec=cspec, score_fn=score)[1]

  def joint():
    hp = jax.tree.map(lambda x: x[0], hps)
    return calibration.jit_calibrate_one(target, jnp.asarray(labels[:k_req]), hp, keys[0],
                                         spec=spec, score_fn=score)[0]

  t_add, t_joint = timed(add, args.repeats), timed(joint, args.repeats)
  out = {"device": str(jax.devices()[0]), "users": args.users, "items": args.items,
         "dim": args.dim, "steps": args.steps, "calibration": rows,
         "peak_memory_mb": mem, "memory_kind": mem_kind,
         "request": {"attributes_after": k_req, "add_one_s": t_add, "joint_rerun_s": t_joint,
                     "ratio_joint_over_add": t_joint / t_add}}
  print(json.dumps(out))
  print(f"\ncalibration, {args.users} users x {args.dim} dims, {args.steps} steps, on {out['device']}")
  print(f"{'K':>3} {'vmapped s':>10} {'loop s':>8} {'loop/vmap':>10}")
  for r in rows:
    print(f"{r['K']:>3} {r['vmapped_s']:>10.2f} {r['loop_s']:>8.2f} {r['speedup']:>10.2f}")
  print(f"peak memory: {mem:.0f} MB ({mem_kind})")
  print(f"request add (1 calibration + combination of {k_req}): {t_add:.2f}s; "
        f"joint re-run of {k_req}: {t_joint:.2f}s; ratio {t_joint / t_add:.2f}")


if __name__ == "__main__":
  main()
