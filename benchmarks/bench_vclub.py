"""Cost per step of the vCLUB bound against the MMD estimator.

  python benchmarks/bench_vclub.py [--users 943,6040] [--dim 64] [--steps 50] [--repeats 3]

For each user count n (a random table; the cost does not depend on how it was
trained), with the default minibatch (a sixth of the users) and class counts
of ML-1M's attributes (2, 7, 21; padded to 21):
  - estimator: one value-and-gradient of the MI term with respect to the
    batch's rows; for vCLUB it includes the classifier's likelihood step that
    precedes it (the MMD: its default kernels, linear + 5 centred RBFs, and the
    permuted-label null);
  - step: one whole calibration step (calibrate_one over `steps` steps,
    divided), ranking hinge included, three attributes vmapped.
Steady state (compiled by a warm-up call), the best of `repeats`. Prints JSON
and a table.
"""

import argparse
import dataclasses
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.config import DEFAULTS  # noqa: E402
from lego_jax.requests import attribute_key  # noqa: E402
from lego_jax.unlearning import calibration  # noqa: E402

CLASSES = (2, 7, 21)


def best_of(fn, repeats):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--users", default="943,6040")
  p.add_argument("--items", type=int, default=2000)
  p.add_argument("--dim", type=int, default=64)
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args(argv)
  rows = []
  for n in map(int, args.users.split(",")):
    rng = np.random.default_rng(0)
    e0 = jnp.asarray(rng.normal(size=(n, args.dim)) * 0.3, jnp.float32)
    items = jnp.asarray(rng.normal(size=(args.items, args.dim)) * 0.3, jnp.float32)
    labels = jnp.asarray(np.stack([rng.integers(0, c, n) for c in CLASSES]), jnp.int32)
    topk = jax.lax.top_k(e0 @ items.T, 50)[1]
    target = calibration.Target(e0, topk, jnp.float32(1.0))
    score = lambda table, users, it: jnp.einsum("bd,btd->bt", table[users], items[it])
    batch = max(32, round(n * DEFAULTS["unlearn"]["batch_fraction"]))
    users = jnp.arange(batch)
    for loss in ("mmd", "vclub"):
      cfg = {**DEFAULTS["unlearn"], "loss": loss, "batch_users": batch, "steps": args.steps}
      spec = calibration.Spec.from_config(cfg, max(CLASSES))
      key = jax.random.PRNGKey(0)
      if loss == "mmd":
        @jax.jit
        def estimator(table):
          return jax.value_and_grad(lambda t: jnp.sum(spec.mi(key, t, users, labels[:1])[2]))(table)
        est = best_of(lambda: estimator(e0), args.repeats)
      else:
        heads = calibration.init_classifiers(key, args.dim, spec.num_classes, spec.vclub_hidden, 1)
        opt = calibration.optax.adam(spec.vclub_lr).init(heads)

        @jax.jit
        def estimator(table, heads, opt):
          z = calibration.classifier_input(table[users], e0)
          heads, opt = calibration.classifier_step(heads, opt, z, labels[:1, users], spec.vclub_lr)
          value = lambda t: jnp.sum(calibration.vclub_bounds(
              heads, calibration.classifier_input(t[users], e0), labels[:1, users]))
          return jax.value_and_grad(value)(table), heads, opt
        est = best_of(lambda: estimator(e0, heads, opt), args.repeats)
      hp = calibration.HParams(*(jnp.full((3,), v, jnp.float32) for v in (1.0, 300.0, 1.2, 0.0085)))
      keys = jnp.stack([attribute_key(0, str(c)) for c in CLASSES])
      run = lambda: calibration.calibrate(target, labels, hp, keys, spec=spec, score_fn=score)[0]
      step = best_of(run, args.repeats) / args.steps
      rows.append({"users": n, "batch": batch, "loss": loss, "estimator_ms": est * 1e3,
                   "step_ms": step * 1e3, "device": jax.devices()[0].platform})
      print(json.dumps(rows[-1]), flush=True)
  print("| users | batch | estimator | MI term + gradient, ms | calibration step (3 attributes), ms |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['users']} | {r['batch']} | {r['loss']} | {r['estimator_ms']:.2f} | {r['step_ms']:.2f} |")


if __name__ == "__main__":
  main()
