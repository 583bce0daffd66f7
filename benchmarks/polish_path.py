"""The polish along its gain: what the evaluation's attackers read as each
polish of a sweep's combined tables is scaled from 0 to past the gain the
loop kept.

  python benchmarks/polish_path.py --workdir W [--seeds 5] [--gains 0,0.25,0.5,1]
      [--attackers mlp,linear,knn] [--repeats 3] [--move recorded|centred|local]
      [--set KEY=VALUE ...] [--json]

Runs `lego-jax sweep --seeds N` on the workdir's trained backbone with every
polish recorded (the table it started from, its move, the attributes it
was for, the gain kept; `Recording`), then reads each polish's table as
the loop keeps it, `null_sized(T + g M)`, at every gain g of `--gains` and
the kept one: `--repeats` fold splits of each attacker, seeded as that
sweep run was, and the validation NDCG@10 retention. A sweep runs
both of a seed's combination paths (the lighter class-mean share and the
searched gains), so a seed can have two polishes; the sweep's result
keeps one.

`--move` replaces each recorded move before it is read: `centred` takes
its class-mean part out (`control.class_mean_parts`, every attribute
jointly), `local` recalibrates it with only the two smallest RBF
bandwidths and no linear kernel. ML-100K NCF (session 29,
docs/findings.md): the MLP's reading of gender falls below chance with
the gain under all three.
"""

import argparse
import json
import pathlib
import sys
import tempfile
from unittest import mock

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax import config as config_lib, sweep  # noqa: E402
from lego_jax.evaluation import attackers  # noqa: E402
from lego_jax.report import format_table  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.unlearning import control  # noqa: E402
from lego_jax.workdir import Workdir  # noqa: E402

MOVES = ("recorded", "centred", "local")


class Recording(Unlearner):
  """An Unlearner that keeps every polish it makes in `polishes`."""
  polishes: list = []

  def polish_move(self, table, names, seed=None, **settings):
    move = super().polish_move(table, names, seed, **settings)
    self._made = {"table": np.asarray(table), "move": np.asarray(move),
                  "attributes": list(names), "seed": seed}
    return move

  def _polish(self, active, table, reading, seeds, seed, floor, ret, weights=None):
    self._made = None
    out = super()._polish(active, table, reading, seeds, seed, floor, ret, weights)
    if self._made is not None:
      Recording.polishes.append({**self._made, "active": list(active), "gain": out[1]["gain"]})
    return out


def record(wd: Workdir, seeds: int, overrides=()) -> list[dict]:
  """Every polish of `lego-jax sweep --seeds seeds` on `wd` (its files go to a
  temporary folder)."""
  Recording.polishes = []
  with tempfile.TemporaryDirectory() as out, mock.patch.object(sweep, "Unlearner", Recording):
    sweep.sweep(wd, {}, seeds=seeds, overrides=overrides, out=pathlib.Path(out),
                progress=False)
  return list(Recording.polishes)


def moved(u: Unlearner, polish: dict, how: str) -> np.ndarray:
  """The polish's move as `--move` asks."""
  if how == "recorded":
    return polish["move"]
  if how == "centred":
    labels, num_classes = u.wd.labels(polish["active"])
    return polish["move"] - control.class_mean_parts(polish["move"], np.asarray(labels),
                                                     num_classes).sum(0)
  if how == "local":
    return u.polish_move(polish["table"], polish["attributes"], polish["seed"],
                         bandwidths=[-2, -1], linear_kernel=False)
  raise ValueError(f"unknown move {how!r}; valid: {', '.join(MOVES)}")


def path(u: Unlearner, polish: dict, gains, *, how: str, probes, repeats: int) -> list[dict]:
  """[{"gain", "retention", "read": {attacker: {attribute: signed}}}] along `gains`
  and the kept gain, in order."""
  active, seed = polish["active"], polish["seed"]
  labels, num_classes = u.wd.labels(active)
  move = moved(u, polish, how)
  rows = []
  for g in sorted(set(gains) | {polish["gain"]}):
    table = u.null_sized(polish["table"] + g * move, active, seed)
    read = {}
    for p in probes:
      res = attackers.attack(table, np.asarray(labels), num_classes, attacker=p, seed=seed,
                             config=u.config["attack"], names=active, repeats=repeats)
      read[p] = {a: res[a]["bacc"] - res[a]["chance"] for a in active}
    rows.append({"gain": g, "retention": u.retention(table), "read": read})
  return rows


def summary(polishes: list[dict], gains) -> dict:
  """{gain label: {attacker: {attribute: mean signed}}} over polishes; "kept" is
  each polish at its own gain."""
  out = {}
  for label, gain in [*((f"{g:g}", g) for g in gains), ("kept", None)]:
    rows = [next(r for r in p["path"] if r["gain"] == (p["gain"] if gain is None else gain))
            for p in polishes]
    probes = rows[0]["read"]
    out[label] = {"retention": float(np.mean([r["retention"] for r in rows])),
                  **{a: {n: float(np.mean([r["read"][a][n] for r in rows]))
                         for n in probes[a]} for a in probes}}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True, help="a workdir with a trained backbone")
  ap.add_argument("--seeds", type=int, default=5)
  ap.add_argument("--gains", default="0,0.25,0.5,1")
  ap.add_argument("--attackers", default="mlp,linear,knn")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--move", choices=MOVES, default="recorded")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  gains = [float(x) for x in args.gains.split(",") if x]
  probes = [p for p in args.attackers.split(",") if p]
  wd = Workdir.open(args.workdir)
  polishes = record(wd, args.seeds, args.set)
  if not polishes:
    raise SystemExit("polish_path.py: no attribute read above the target, so nothing was "
                     "polished")
  u = Unlearner(wd, progress=False, config=config_lib.apply_overrides(wd.config, args.set))
  for p in polishes:
    p["path"] = path(u, p, gains, how=args.move, probes=probes, repeats=args.repeats)
  out = {"move": args.move, "summary": summary(polishes, gains),
         "polishes": [{k: p[k] for k in ("seed", "attributes", "gain", "path")}
                      for p in polishes]}
  if args.json:
    print(json.dumps(out))
  else:
    names = polishes[0]["active"]
    print(f"{len(polishes)} polish(es), move {args.move}; means over them, signed BAcc - chance")
    print(format_table(
        ["gain", "retention"] + [f"{p}: " + " / ".join(names) for p in probes],
        [[label, f"{row['retention']:.4f}"]
         + [" / ".join(f"{row[p][n]:+.3f}" for n in names) for p in probes]
         for label, row in out["summary"].items()]))
  return out


if __name__ == "__main__":
  main()
