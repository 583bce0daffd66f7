"""How stored bricks interfere when they are added: what the attackers read.

  python benchmarks/brick_interference.py --workdir W [--shares 0.4,1]
      [--covariances 0.5,1] [--only-combined] [--judges gbdt,knn25] [--json]

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
    (1: all of them removed);
  - the combined table with each attribute's class covariances moved a share
    of the way to the pooled within-class covariance, for each of
    `--covariances` (class by class, x -> mu_c + A_c (x - mu_c) with A_c =
    S^1/2 S_c^-1/2, S_c shrunk towards S by 64 pseudo-users; attributes in
    turn): what is left that a second-moment attacker reads;
  - the combined table plus a joint polish, for each loss of `--polish`: one
    free table calibrated from the combined table for every attribute at once
    (or those of `--polish-attributes`; `Unlearner.polish_move`:
    `--polish-steps` steps, the workdir's unlearn settings, `--polish-set`
    overrides; `features` = the MMD on random Fourier features of every
    user, whose null level is far below a minibatch's), added at each of
    `--polish-gains`; the steering probes' reading is shown beside it.
`--only-combined` skips the per-brick, plain-sum and projected tables;
`--judges` adds benchmarks/judge.py's attackers (needs scikit-learn).
Each brick alone at chance while the sum reads the attributes again means
the bricks cross: correlated attributes move each other's class means.
Prints one JSON object per table, then a table.
"""

import argparse
import json
import pathlib
import sys
import time
from typing import Optional

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax import config as config_lib  # noqa: E402
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


def match_covariances(x: np.ndarray, codes: np.ndarray, share: float, prior: float = 64.0,
                      null_draw: Optional[np.random.Generator] = None) -> np.ndarray:
  """x with each class's covariance moved `share` of the way to the pooled
  within-class covariance, class means kept; codes -1 = unlabelled (kept).

  With `null_draw`, each class is taken instead to a covariance drawn as an
  independent class of its size would have one (the sample covariance of
  n_c - 1 draws from N(0, S)): for Gaussian rows the class is then
  distributed as under independence, sampling noise included."""
  def root(s, power):
    w, v = np.linalg.eigh(s)
    return (v * np.maximum(w, 1e-10) ** power) @ v.T
  classes = [c for c in np.unique(codes[codes >= 0]) if (codes == c).sum() > 1]
  stats = {c: (x[codes == c].mean(0), np.cov(x[codes == c].T), (codes == c).sum())
           for c in classes}
  pooled = sum(n * s for _, s, n in stats.values()) / sum(n for *_, n in stats.values())
  out = x.copy()
  for c, (mu, s, n) in stats.items():
    a = root(pooled, 0.5) @ root((n * s + prior * pooled) / (n + prior), -0.5)
    if null_draw is not None:
      g = null_draw.multivariate_normal(np.zeros(len(mu)), pooled, size=n - 1)
      a = root(g.T @ g / (n - 1), 0.5) @ root(pooled, -0.5) @ a
    rows = codes == c
    out[rows] = x[rows] + share * ((x[rows] - mu) @ a.T + mu - x[rows])
  return out


def polish(u: Unlearner, table: np.ndarray, names, loss: str, steps: int, overrides=()):
  """`Unlearner.polish_move` with loss `features` (its own), `mmd` (the
  minibatch's kernels) or `vclub`, and `unlearn` overrides (FIELD=VALUE)."""
  settings = {"steps": steps}
  if loss != "features":
    settings.update(loss=loss, estimator="kernel", batch_users=u.batch_users())
  for text in overrides:
    settings.update(config_lib.parse_override(f"unlearn.{text}")["unlearn"])
  return np.asarray(u.polish_move(table, names, **settings), np.float64)


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--shares", default="1",
                  help="shares of the combined table's class means to take back, comma-separated")
  ap.add_argument("--covariances", default="",
                  help="shares of the way to the pooled class covariance, comma-separated")
  ap.add_argument("--null-draw", action="store_true",
                  help="--covariances: draw each class's covariance as independence would")
  ap.add_argument("--polish", default="",
                  help="losses of a joint polish of the combined table (mmd, features, vclub)")
  ap.add_argument("--polish-steps", type=int, default=100)
  ap.add_argument("--polish-gains", default="0.5,1")
  ap.add_argument("--polish-attributes", default="",
                  help="the attributes the polish removes, comma-separated (default: all)")
  ap.add_argument("--polish-set", action="append", default=[],
                  help="unlearn.FIELD=VALUE override of the polish, without `unlearn.`")
  ap.add_argument("--only-combined", action="store_true")
  ap.add_argument("--judges", default="", help="judges of benchmarks/judge.py, comma-separated")
  ap.add_argument("--save", help="an .npz keeping every table read, keyed by its row's name")
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
  tables = {}
  if not args.only_combined:
    tables = {f"brick {n} alone": e0 + bricks[n] for n in names}
    tables["plain sum"] = e0 + sum(bricks.values())
  tables["stored combination"] = combined
  if not args.only_combined:
    tables["sum of bricks off the others' classes"] = e0 + sum(
        off(bricks[n], indicators(labels, num_classes, others(k))) for k, n in enumerate(names))
  means = control.class_mean_parts(combined, labels, num_classes).sum(0)
  for share in (float(x) for x in args.shares.split(",") if x):
    tables[f"combination less {share:g} of its class means"] = combined - share * means
  for share in (float(x) for x in args.covariances.split(",") if x):
    table, draw = combined, np.random.default_rng(0) if args.null_draw else None
    for k in range(len(names)):
      table = match_covariances(table, labels[k], share, null_draw=draw)
    to = "a null draw" if args.null_draw else "the pooled"
    tables[f"combination, class covariances {share:g} of the way to {to}"] = table
  probed = set()
  for loss in (x for x in args.polish.split(",") if x):
    start = time.perf_counter()
    which = [a for a in args.polish_attributes.split(",") if a] or names
    move = polish(u, combined, which, loss, args.polish_steps, args.polish_set)
    print(json.dumps({"polish": loss, "seconds": round(time.perf_counter() - start, 1)}),
          flush=True)
    for g in (float(x) for x in args.polish_gains.split(",") if x):
      what = f"combination + {g:g} x {loss} polish ({args.polish_steps} steps)"
      tables[what] = combined + g * move
      probed.add(what)
  judges = [j for j in args.judges.split(",") if j]
  if judges:
    import judge  # benchmarks/judge.py, beside this script
  if args.save:
    np.savez(args.save, **{what: t.astype(np.float32) for what, t in tables.items()})
  orig = wd.evaluate()["ndcg@10"]
  rows = []
  for what, table in tables.items():
    table = table.astype(np.float32)
    row = {"table": what, "retention": round(wd.evaluate(table)["ndcg@10"] / orig, 4)}
    if what in probed or (probed and what == "stored combination"):
      row["probes"] = {n: round(float(s), 3)
                       for n, s in zip(names, u._read(table, names).worst_signed())}
    for attacker in ("mlp", "linear"):
      res = wd.attack(table, attacker=attacker, names=names)
      row[attacker] = {n: round(r["bacc"] - r["chance"], 3) for n, r in res.items()}
    for k, n in enumerate(names):
      for j, r in (judge.judge(table.astype(np.float64), labels[k], judges).items()
                   if judges else ()):
        row.setdefault(j, {})[n] = round(r["signed"], 3)
    rows.append(row)
    print(json.dumps(row), flush=True)
  if not args.json:
    who = ["mlp", "linear"] + judges
    heads = [f"{n} ({' / '.join(who)})" for n in names]
    steer = any("probes" in r for r in rows)
    print(f"\n| table | retention | {' | '.join(heads)} |" + (" probes' worst |" if steer else ""))
    print("|---|---|" + "---|" * (len(names) + steer))
    for r in rows:
      cells = [" / ".join(f"{r[w][n]:+.3f}" for w in who) for n in names]
      if steer:
        cells.append(" / ".join(f"{r['probes'][n]:+.3f}" for n in names) if "probes" in r else "")
      print(f"| {r['table']} | {r['retention']:.3f} | {' | '.join(cells)} |")


if __name__ == "__main__":
  try:
    main()
  except LegoError as e:
    raise SystemExit(f"brick_interference.py: {e}") from None
