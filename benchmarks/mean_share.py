"""The combination's loop at several shares of the bricks' class-mean parts.

  python benchmarks/mean_share.py --workdir W [--shares 1,0.875,0.75,0.5] [--out DIR]
                                  [--set unlearn.FIELD=VALUE ...] [--json]

For each share, `Unlearner.controlled_table` on W's stored bricks and
combination weights with `unlearn.mean_share` set to it (1: the gains
searched, then the class-mean step and the polish): the table's validation
and test NDCG@10 retention, what the loop kept (gains, class-mean shares,
polish gain) and the evaluation's MLP and linear attackers (`lego-jax
attack`'s split). With --out, each table is written to DIR/share_<s>.npz
in `lego-jax export`'s layout, for `benchmarks/judge.py`. --set changes
what the loop reads with (e.g. `unlearn.probes=["linear","mlp","knn"]`,
`unlearn.marginal_features=16` for the polish), never the stored bricks.
W is only read.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax import checkpoint  # noqa: E402
from lego_jax import config as config_lib  # noqa: E402
from lego_jax.report import format_table  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.workdir import Workdir, safe_name  # noqa: E402

ATTACKERS = ("mlp", "linear")


def share_reads(wd: Workdir, share: float, out=None, overrides=()) -> dict:
  """The combined table the loop keeps at `share`: retention, its choices,
  leakage; written to `out`/share_<share>.npz (embeddings, attr_<name>) if given.
  `overrides` (`key=value`) change the config the loop runs under."""
  config = config_lib.apply_overrides(wd.config, overrides)
  config = {**config, "unlearn": {**config["unlearn"], "mean_share": share}}
  config_lib.validate(config)
  u = Unlearner(wd, progress=False, config=config)
  tree, meta = checkpoint.restore(wd.path / "combination")
  order, active = meta["bricks"], meta["active"]
  bricks = np.stack([u._load_brick(a) for a in order])
  table, report = u.controlled_table(order, active, bricks, tree["weights"])
  original = wd.evaluate()["ndcg@10"]
  if out is not None:
    labels, _ = wd.labels(active)
    pathlib.Path(out).mkdir(parents=True, exist_ok=True)
    np.savez(pathlib.Path(out) / f"share_{share:g}.npz", embeddings=np.asarray(table),
             **{f"attr_{safe_name(a)}": np.asarray(y, np.int32)
                for a, y in zip(active, labels)})
  # Without the loop (`unlearn.control = "none"`) there is no report: the table as combined.
  valid = report["retention_valid"] if "retention_valid" in report else u.retention(table)
  return {"share": share, "retention_valid": valid,
          "retention_test": wd.evaluate(table)["ndcg@10"] / original,
          "gains": report.get("gains", {a: [1.0, 1.0] for a in active}),
          "residual_means": report.get("residual_means", {a: 0.0 for a in active}),
          "polish": (report.get("polish") or {}).get("gain", 0.0),
          "leakage": {at: {a: r["bacc"] - r["chance"]
                           for a, r in wd.attack(table, at, names=active).items()}
                      for at in ATTACKERS}}


def main(argv=None) -> list:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--shares", default="1,0.875,0.75,0.5")
  ap.add_argument("--out", help="folder for each share's table (export layout)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override for the loop (repeatable)")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  wd = Workdir.open(args.workdir)
  out = [share_reads(wd, float(s), args.out, args.set) for s in args.shares.split(",")]
  if args.json:
    print(json.dumps(out))
  else:
    names = list(out[0]["gains"]) if out else []
    print(format_table(
        ("share", "retention (valid / test)", "class means taken back", "polish",
         *(f"{a} {at}" for at in ATTACKERS for a in names)),
        [(f"{r['share']:g}", f"{r['retention_valid']:.3f} / {r['retention_test']:.3f}",
          " / ".join(f"{r['residual_means'][a]:g}" for a in names), f"{r['polish']:.3f}",
          *(f"{r['leakage'][at][a]:+.3f}" for at in ATTACKERS for a in names)) for r in out]))
  return out


if __name__ == "__main__":
  main()
