"""How stored bricks interfere when they are added: what the attackers read.

  python benchmarks/brick_interference.py --workdir W [--shares 0.4,1] [--json]

W is a workdir where `lego-jax unlearn` has made a brick per attribute and a
combination; it is only read. The evaluation attackers (MLP and linear,
cv5, signed leakage BAcc - chance) and test NDCG@10 retention are measured on:
  - each brick alone, E0 + D_k;
  - the plain sum E0 + sum_k D_k, and the stored combined table;
  - each brick projected off the other attributes' class indicators
    (least squares on the centred one-hot columns), then summed: a brick
    that no longer moves the other attributes' class means;
  - the combined table less a share of every attribute's class means,
    fitted jointly (`control.class_mean_parts`), for each of `--shares`
    (1: all of them removed).
Each brick alone at chance while the sum reads the attributes again means
the bricks cross: correlated attributes move each other's class means.
Prints one JSON object per table, then a table.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.errors import LegoError  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.unlearning import control  # noqa: E402
from lego_jax.workdir import Workdir  # noqa: E402


def indicators(labels, num_classes, which) -> np.ndarray:
  """Centred one-hot columns of the attributes `which` (-1 = missing: all zero)."""
  z, owner = control.class_indicators(labels, num_classes)
  return z[:, np.isin(owner, list(which))]


def off(x: np.ndarray, z: np.ndarray) -> np.ndarray:
  """x minus its least-squares fit on the columns z."""
  return x - z @ np.linalg.lstsq(z, x, rcond=None)[0]


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--shares", default="1",
                  help="shares of the combined table's class means to take back, comma-separated")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args()
  wd = Workdir.open(args.workdir)
  u = Unlearner(wd, progress=False)
  names = [s.split(":", 1)[1] for s in u.stages() if s.startswith("brick:")]
  if "combined" not in u.stages() or not names:
    raise SystemExit(f"{args.workdir} has no bricks and combination; run `lego-jax unlearn` first")
  labels, num_classes = wd.labels(names)
  e0 = np.asarray(wd.backbone(progress=False).table(), np.float64)
  bricks = {n: u.table(f"brick:{n}") - e0 for n in names}
  combined = u.table("combined").astype(np.float64)
  others = lambda k: [j for j in range(len(names)) if j != k]
  tables = {f"brick {n} alone": e0 + bricks[n] for n in names}
  tables["plain sum"] = e0 + sum(bricks.values())
  tables["stored combination"] = combined
  tables["sum of bricks off the others' classes"] = e0 + sum(
      off(bricks[n], indicators(labels, num_classes, others(k))) for k, n in enumerate(names))
  means = control.class_mean_parts(combined, labels, num_classes).sum(0)
  for share in (float(x) for x in args.shares.split(",")):
    tables[f"combination less {share:g} of its class means"] = combined - share * means
  orig = wd.evaluate()["ndcg@10"]
  rows = []
  for what, table in tables.items():
    table = table.astype(np.float32)
    row = {"table": what, "retention": round(wd.evaluate(table)["ndcg@10"] / orig, 4)}
    for attacker in ("mlp", "linear"):
      res = wd.attack(table, attacker=attacker, names=names)
      row[attacker] = {n: round(r["bacc"] - r["chance"], 3) for n, r in res.items()}
    rows.append(row)
    print(json.dumps(row), flush=True)
  if not args.json:
    print(f"\n| table | retention | {' | '.join(n + ' (MLP / linear)' for n in names)} |")
    print("|---|---|" + "---|" * len(names))
    for r in rows:
      cells = [f"{r['mlp'][n]:+.3f} / {r['linear'][n]:+.3f}" for n in names]
      print(f"| {r['table']} | {r['retention']:.3f} | {' | '.join(cells)} |")


if __name__ == "__main__":
  try:
    main()
  except LegoError as e:
    raise SystemExit(f"brick_interference.py: {e}") from None
