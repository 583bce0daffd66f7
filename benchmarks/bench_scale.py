"""How LEGO's cost grows with users n and attributes K, on one device and on a mesh.

  python benchmarks/bench_scale.py [--users 10000,100000,1000000] [--ks 1,3,8]
                                   [--items 10000] [--dim 64] [--devices 1,8] [--steps 3]

For each (devices, n, K), in a fresh process per device count (on a CPU,
`XLA_FLAGS=--xla_force_host_platform_device_count=8` makes the mesh of 8):
seconds per calibration step (the default MMD estimate on the default
minibatch, `unlearn.max_batch_users` included), per combination step, the
top-(T + guard) precompute (every user against every item in chunks of
`eval.batch_users`, the cost of full-ranking evaluation too) and the peak
memory (GPU: the allocator's peak; CPU: the process's max RSS, which only
grows, so each process runs its sizes smallest first). A random table stands
in for a trained one: the costs do not depend on its values. Configurations
whose predicted memory exceeds `--budget-gb` are skipped and say so.

The memory model (float32): the table, top lists and labels, plus per
attribute the brick's params, two Adam moments, its gradient and the output
brick, plus the kernel estimate's B x B matrices:
  bytes ~ 4 [n d (1 + 5K) + n (T + guard) + K n] + 4 c K B^2 (bandwidths + 1)
with c = 3 (the forward matrices and their gradients); each row prints the
model beside the measured peak.
Prints one JSON object, then a table and the fitted growth.
"""

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.config import DEFAULTS  # noqa: E402

CLASSES = [2, 7, 21, 4, 3, 5, 10, 2]
U, C = DEFAULTS["unlearn"], DEFAULTS["combine"]
LIST = U["topk"] + U["guard"]


def batch(n: int) -> int:
  return min(n, U["max_batch_users"], max(32, round(n * U["batch_fraction"])))


def model_parts(n: int, k: int, d: int, c: float = 3.0) -> tuple[float, float]:
  """(bytes split over the users' devices, bytes of the minibatch's kernel matrices)."""
  b = batch(n)
  return (4.0 * (n * d * (1 + 5 * k) + n * LIST + k * n),
          4.0 * c * k * b * b * (len(U["bandwidths"]) + 1))


def model_bytes(n: int, k: int, d: int, devices: int = 1) -> float:
  """Per device: the per-user part divides over a mesh, the kernel matrices do not."""
  users, kernels = model_parts(n, k, d)
  return users / devices + kernels


def peak_mb() -> float:
  import jax
  stats = jax.devices()[0].memory_stats() if hasattr(jax.devices()[0], "memory_stats") else None
  if stats and "peak_bytes_in_use" in stats:
    return sum(d.memory_stats()["peak_bytes_in_use"] for d in jax.devices()) / 2 ** 20
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  from lego_jax import sharding
  from lego_jax.requests import attribute_key
  from lego_jax.unlearning import calibration, combination
  mesh = sharding.mesh(int(args.devices))
  rows = []
  sizes = [(int(n), int(k)) for n in args.users.split(",") for k in args.ks.split(",")]
  # Smallest model first: on a CPU the peak is the process's max RSS, which only grows.
  for n, k in sorted(sizes, key=lambda nk: model_bytes(*nk, args.dim)):
    need = model_bytes(n, k, args.dim, int(args.devices)) / 2 ** 30
    row = {"devices": int(args.devices), "users": n, "attributes": k, "batch": batch(n),
           "model_gb": need}
    if need > args.budget_gb:
      rows.append(row | {"skipped": f"model predicts {need:.1f} GB > --budget-gb"})
      continue
    rng = np.random.default_rng(0)
    place = lambda x, axis=0: sharding.over_users(jnp.asarray(x), mesh, axis)
    e0 = place(rng.normal(size=(n, args.dim)).astype(np.float32) * 0.3)
    items = jnp.asarray(rng.normal(size=(args.items, args.dim)).astype(np.float32) * 0.3)
    top = jax.jit(lambda e: jax.lax.top_k(e @ items.T, LIST)[1])
    chunk = DEFAULTS["eval"]["batch_users"]
    t = time.perf_counter()
    topk = np.concatenate([np.asarray(top(e0[s:s + chunk])) for s in range(0, n, chunk)])
    row["topk_seconds"] = time.perf_counter() - t
    score = lambda table, users, it: jnp.einsum("bd,btd->bt", table[users], items[it])
    target = calibration.Target(e0, place(topk), jnp.float32(1.0))
    labels = place(np.stack([rng.integers(0, c, n) for c in CLASSES[:k]]).astype(np.int32), 1)
    spec = calibration.Spec.from_config({**U, "batch_users": batch(n), "steps": args.steps},
                                        max(CLASSES[:k]))
    hps = calibration.HParams(*(jnp.full((k,), U[f], jnp.float32)
                                for f in calibration.HParams._fields))
    keys = jnp.stack([attribute_key(0, f"a{i}") for i in range(k)])
    run = lambda: calibration.calibrate(target, labels, hps, keys, spec=spec, score_fn=score)[0]
    bricks = jax.block_until_ready(run())       # compiles
    t = time.perf_counter()
    bricks = jax.block_until_ready(run())
    row["calibration_step_seconds"] = (time.perf_counter() - t) / args.steps
    cspec = combination.Spec.from_config({**C, "steps": args.steps},
                                         {**U, "batch_users": batch(n)}, max(CLASSES[:k]))
    fit = lambda: combination.fit(target, bricks, labels, jnp.ones(k), jax.random.PRNGKey(0),
                                  combination.HParams.from_config(C), spec=cspec,
                                  score_fn=score)[1]
    jax.block_until_ready(fit())
    t = time.perf_counter()
    jax.block_until_ready(fit())
    row["combination_step_seconds"] = (time.perf_counter() - t) / args.steps
    row["peak_mb"] = peak_mb()
    rows.append(row)
    del bricks, target, labels, e0
    print(json.dumps(row), file=sys.stderr, flush=True)
  return rows


def fit_growth(rows: list[dict], key: str) -> dict:
  """log(value) = a + b log(n) + c log(K) by least squares over the rows measured."""
  ok = [r for r in rows if key in r and r[key] > 0]
  if len(ok) < 3:
    return {}
  x = np.array([[1.0, np.log(r["users"]), np.log(r["attributes"])] for r in ok])
  coef, *_ = np.linalg.lstsq(x, np.log([r[key] for r in ok]), rcond=None)
  return {"exponent_users": float(coef[1]), "exponent_attributes": float(coef[2])}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--users", default="10000,100000,1000000")
  ap.add_argument("--ks", default="1,3,8")
  ap.add_argument("--items", type=int, default=10000)
  ap.add_argument("--dim", type=int, default=64)
  ap.add_argument("--devices", default="1,8")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--budget-gb", type=float, default=16.0)
  args = ap.parse_args()
  if os.environ.get("LEGO_SCALE_CHILD"):
    print(json.dumps(child(args)))
    return
  rows = []
  for devices in (int(x) for x in args.devices.split(",")):
    env = dict(os.environ, LEGO_SCALE_CHILD="1")
    if devices > 1:
      env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                          f" --xla_force_host_platform_device_count={devices}").strip()
    argv = [sys.executable, __file__, "--users", args.users, "--ks", args.ks, "--items",
            str(args.items), "--dim", str(args.dim), "--steps", str(args.steps),
            "--budget-gb", str(args.budget_gb), "--devices", str(devices)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    if out.returncode:   # keep the sizes it measured (one JSON line each on stderr)
      done = [json.loads(line) for line in out.stderr.splitlines() if line.startswith('{"devices"')]
      rows += done + [{"devices": devices, "failed": f"exit status {out.returncode} after "
                       f"{len(done)} sizes: {out.stderr.strip().splitlines()[-1:]}"}]
      continue
    rows += [r | {"devices": devices} for r in json.loads(out.stdout.strip().splitlines()[-1])]
  one = [r for r in rows if r.get("devices") == 1 and "peak_mb" in r]
  growth = {k: fit_growth(one, k) for k in ("calibration_step_seconds", "combination_step_seconds",
                                            "topk_seconds", "peak_mb")}
  print(json.dumps({"rows": rows, "growth": growth,
                    "predicted_gb_10M_users_8_attributes": model_bytes(10_000_000, 8, args.dim) / 2 ** 30,
                    "predicted_gb_per_device_mesh_8": model_bytes(10_000_000, 8, args.dim, 8) / 2 ** 30}))
  print("\n| devices | users | K | batch | calib s/step | combine s/step | top-T s | peak MB | model MB |")
  print("|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    if "peak_mb" in r:
      print(f"| {r['devices']} | {r['users']:,} | {r['attributes']} | {r['batch']} | "
            f"{r['calibration_step_seconds']:.3f} | {r['combination_step_seconds']:.3f} | "
            f"{r['topk_seconds']:.1f} | {r['peak_mb']:.0f} | {r['model_gb'] * 1024:.0f} |")
    else:
      print(f"| {r.get('devices')} | {r.get('users', '-')} | {r.get('attributes', '-')} | "
            f"{r.get('skipped') or r.get('failed')} |")
  for k, g in growth.items():
    if g:
      print(f"{k}: ~ n^{g['exponent_users']:.2f} K^{g['exponent_attributes']:.2f}")


if __name__ == "__main__":
  main()
