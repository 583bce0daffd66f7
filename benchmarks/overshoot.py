"""Where a reading below chance lies: the evaluation's attackers on each table
with its labels and with permuted ones, and its class-mean sizes in three
metrics against permuted labels.

  python benchmarks/overshoot.py --workdir W TABLES.npz [--perms 4] [--json]

TABLES.npz is `lego-jax export`'s layout (`embeddings`, read with the
workdir's seed) or a sweep's `sweep_tables.npz` (`run<i>`, read with seed
`seed + i`, as `lego-jax sweep` read it). For each attacker and attribute:
the signed leakage (BAcc - chance, one fold split) on the labels, and its
mean and sd over `--perms` label permutations of the same table: near 0
where the protocol itself is unbiased, so a reading below it lies in the
table. Then, per attribute, the summed class-mean size over its mean under
permutations (`null_means.class_sizes`) within classes (what
`control.null_means` sizes), per standardised coordinate (what the
attackers see) and Euclidean: all near 1 where the class means are what
independent labels give, below 1 where they were made equal in sample.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.null_means import METRICS, size_ratio  # noqa: E402
from lego_jax.evaluation import attackers  # noqa: E402
from lego_jax.report import format_table  # noqa: E402
from lego_jax.workdir import Workdir  # noqa: E402

ATTACKERS = ("mlp", "linear")


def tables(path: str, seed: int) -> dict[str, tuple[np.ndarray, int]]:
  """{name: (table, the seed its evaluation used)} of an export or a sweep's tables."""
  z = np.load(path)
  if "embeddings" in z.files:
    return {"table": (z["embeddings"], seed)}
  runs = sorted((k for k in z.files if k.startswith("run")), key=lambda k: int(k[3:]))
  if not runs:
    raise SystemExit(f"overshoot.py: {path} holds neither `embeddings` nor `run<i>` tables")
  return {k: (z[k], seed + int(k[3:])) for k in runs}


def readings(table, labels, num_classes, names, *, attacker, seed, config, perms):
  """{name: (signed on the labels, [signed under each of `perms` permutations])}."""
  read = lambda y: attackers.attack(table, y, num_classes, attacker=attacker, seed=seed,
                                    config=config, names=names)
  real = read(labels)
  rng = np.random.default_rng(seed)
  null = [read(np.stack([rng.permutation(l) for l in labels])) for _ in range(perms)]
  signed = lambda r, n: r[n]["bacc"] - r[n]["chance"]
  return {n: (signed(real, n), [signed(r, n) for r in null]) for n in names}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("tables")
  ap.add_argument("--workdir", required=True, help="the workdir whose labels and attack settings "
                                                   "read the tables")
  ap.add_argument("--perms", type=int, default=4)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  wd = Workdir.open(args.workdir)
  names = wd.attribute_names()
  labels, num_classes = wd.labels(names)
  labels = np.asarray(labels)
  per_table = {}
  for key, (table, seed) in tables(args.tables, int(wd.config["seed"])).items():
    table = np.asarray(table, np.float64)
    per_table[key] = {
        "attack": {a: readings(table, labels, num_classes, names, attacker=a, seed=seed,
                               config=wd.config["attack"], perms=args.perms) for a in ATTACKERS},
        "sizes": {n: {m: size_ratio(table, labels[i], metric=m) for m in METRICS}
                  for i, n in enumerate(names)}}
  out = {}
  for n in names:
    out[n] = {"sizes": {m: float(np.mean([t["sizes"][n][m] for t in per_table.values()]))
                        for m in METRICS}}
    for a in ATTACKERS:
      real = [t["attack"][a][n][0] for t in per_table.values()]
      null = [x for t in per_table.values() for x in t["attack"][a][n][1]]
      out[n][a] = {"signed": float(np.mean(real)), "permuted": float(np.mean(null)),
                   "permuted_sd": float(np.std(null, ddof=1)) if len(null) > 1 else 0.0}
  if args.json:
    print(json.dumps(out))
  else:
    print(f"{len(per_table)} table(s), {args.perms} permutation(s) each; means over tables")
    print(format_table(
        ["attribute"] + [f"{a}: labels / permuted (sd)" for a in ATTACKERS]
        + [f"class-mean size / null, {m}" for m in METRICS],
        [[n] + [f"{v[a]['signed']:+.3f} / {v[a]['permuted']:+.3f} ({v[a]['permuted_sd']:.3f})"
                for a in ATTACKERS] + [f"{v['sizes'][m]:.2f}" for m in METRICS]
         for n, v in out.items()]))
  return out


if __name__ == "__main__":
  main()
