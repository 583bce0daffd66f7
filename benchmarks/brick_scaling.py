"""One stored brick scaled by s: what the MI estimate and the attackers each see.

  python benchmarks/brick_scaling.py --workdir W --attribute gender
                                     [--scales 0.25,0.5,0.75,1] [--perms 64]

For each s the table E0 + s * D (D the attribute's stored brick in W, which
`lego-jax unlearn` made) is measured two ways, on every user:
  - the calibration's own MI estimate (the workdir's `unlearn` settings) as a
    ratio to its permuted-label level per kernel (linear first, then each RBF
    bandwidth), the level averaged over `--perms` permutations: 1 is "as
    independent as random labels", below 1 is the over-balancing that the
    stopping rule is meant to prevent;
  - the signed leakage (BAcc - chance) of the MLP attacker and the linear
    probe (cv5), negative = below chance.
If the attackers go below chance while every ratio is still above 1, the
overshoot is one the estimate cannot see, and no stopping rule on it can
prevent it. Prints one JSON object per scale, then a table. W is only read.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.errors import LegoError  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.unlearning import calibration  # noqa: E402
from lego_jax.workdir import Workdir  # noqa: E402


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--attribute", required=True)
  ap.add_argument("--scales", default="0.25,0.5,0.75,1")
  ap.add_argument("--perms", type=int, default=64)
  args = ap.parse_args()
  wd = Workdir.open(args.workdir)
  u = Unlearner(wd, progress=False)
  e0 = np.asarray(wd.backbone(progress=False).table())
  try:  # an attribute without a brick (or unknown) lists the ones there are
    brick = u.table(f"brick:{args.attribute}") - e0
  except LegoError as e:
    raise SystemExit(str(e)) from None
  labels, _ = wd.labels([args.attribute])
  spec = dataclasses.replace(u.spec(), null_perms=args.perms)
  orig = wd.evaluate()["ndcg@10"]
  rows = []
  for s in (float(x) for x in args.scales.split(",")):
    table = jnp.asarray(e0 + s * brick)
    mi, null, _ = spec.mi(jax.random.PRNGKey(wd.config["seed"]), table,
                          jnp.arange(table.shape[0]), jnp.asarray(labels),
                          calibration.units(jnp.asarray(e0), spec))
    row = {"scale": s, "retention": round(wd.evaluate(table)["ndcg@10"] / orig, 4),
           "mi_over_null": [round(float(r), 2) for r in np.asarray(mi[0] / null[0])]}
    for attacker in ("mlp", "linear"):
      r = wd.attack(table, attacker, "cv5", [args.attribute])[args.attribute]
      row[attacker] = round(r["bacc"] - r["chance"], 4)
    rows.append(row)
    print(json.dumps(row), flush=True)
  print(f"\n{'scale':>5}  {'retention':>9}  {'mlp':>7}  {'linear':>7}  MI / null per kernel")
  for r in rows:
    print(f"{r['scale']:5.2f}  {r['retention']:9.3f}  {r['mlp']:+7.3f}  {r['linear']:+7.3f}  "
          + " ".join(f"{x:.2f}" for x in r["mi_over_null"]))


if __name__ == "__main__":
  main()
