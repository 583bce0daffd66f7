"""LEGO on one trained workdir under several settings: utility and leakage of each.

  python benchmarks/sweep_unlearning.py --workdir W --settings FILE [--out F.jsonl]
                                        [--bricks] [--attributes a,b] [--deadline SECONDS]

FILE has one setting per line: `--set`-style overrides separated by spaces
(`unlearn.per_attribute.age.lam_rank=100 combine.lam_rank=300`); an empty
line (or `-`) is the workdir's own settings; `#` starts a comment. Every
setting starts from the workdir's config. Settings run in order on a copy of
the workdir in a temporary folder (W is never written), so a brick whose
settings match (W's stored bricks, or the previous line's) is reused, as a
request would, and only the stale ones are recalibrated: order lines to share
bricks.

Each setting reports the combined table's test NDCG@10 retention and the
signed leakage (BAcc - chance; negative = overshoot) of every attribute for
the MLP attacker and the linear probe (cv5), the unlearning seconds, and with
`--bricks` the same for each brick alone against its own attribute.
`--attributes` unlearns only those (default: every attribute of the data). One JSON
object per setting goes to `--out` as it finishes (so a run cut short keeps
what it measured); a table follows at the end.
"""

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

import jax

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax import config as config_lib  # noqa: E402
from lego_jax.errors import LegoError  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.workdir import IDENTITY, Workdir  # noqa: E402


def read_settings(path: str) -> list[list[str]]:
  out = []
  for line in pathlib.Path(path).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line == "-":
      out.append([])
    elif line:
      out.append(line.split())
  return out or [[]]


def leakage(wd: Workdir, table, names, attackers) -> dict:
  """Signed leakage (BAcc - chance) per attacker and attribute."""
  return {a: {n: round(r["bacc"] - r["chance"], 4)
              for n, r in wd.attack(table, a, "cv5", names).items()}
          for a in attackers}


def copy_workdir(src: pathlib.Path, dst: pathlib.Path) -> None:
  """The trained backbone and the stored bricks (reused where their settings match)."""
  dst.mkdir(parents=True)
  for f in ("config.json", "data.json"):
    shutil.copy(src / f, dst / f)
  for d in ("backbone", "bricks"):
    if (src / d).is_dir():
      shutil.copytree(src / d, dst / d, ignore=shutil.ignore_patterns(".*"))


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--settings", required=True)
  ap.add_argument("--out", default="")
  ap.add_argument("--attackers", default="mlp,linear")
  ap.add_argument("--bricks", action="store_true", help="also attack each brick alone")
  ap.add_argument("--attributes", default="", help="comma-separated; default: all")
  ap.add_argument("--deadline", type=float, default=0, help="stop starting settings after this")
  args = ap.parse_args()
  start = time.time()
  settings = read_settings(args.settings)
  attackers = args.attackers.split(",")
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    path = pathlib.Path(tmp) / "run"
    copy_workdir(pathlib.Path(args.workdir), path)
    wd = Workdir.open(path)
    base_config = wd.config
    names = args.attributes.split(",") if args.attributes else wd.attribute_names()
    try:
      wd.labels(names)
    except LegoError as e:
      raise SystemExit(str(e)) from None
    orig = wd.evaluate()["ndcg@10"]
    for overrides in settings:
      if args.deadline and time.time() - start > args.deadline:
        print(f"deadline: {len(settings) - len(rows)} settings not run", file=sys.stderr)
        break
      # One Workdir object throughout, so its backbone (and every program
      # compiled against it) is shared; only its non-identity config changes.
      wd.config = base_config
      for text in overrides:
        if text.split(".", 1)[0] in IDENTITY:
          raise SystemExit(f"{text}: a sweep changes unlearning settings, not the trained model")
        wd.config = config_lib.merge(wd.config, config_lib.parse_override(text))
      u = Unlearner(wd, progress=False)
      t = time.time()
      stale = [n for n in names if n not in u.brick_meta() or n in u.stale()]
      table = jax.block_until_ready(u.unlearn(names))
      seconds = time.time() - t
      row = {"settings": overrides, "recalibrated": stale, "seconds": round(seconds, 2),
             "retention": round(wd.evaluate(table)["ndcg@10"] / orig, 4),
             "leakage": leakage(wd, table, names, attackers)}
      if args.bricks:
        row["bricks"] = {}
        for n in names:
          brick = u.table(f"brick:{n}")
          row["bricks"][n] = {"retention": round(wd.evaluate(brick)["ndcg@10"] / orig, 4),
                              **{a: v[n] for a, v in leakage(wd, brick, [n], attackers).items()}}
      rows.append(row)
      print(json.dumps(row), flush=True)
      if args.out:
        with open(args.out, "a") as f:
          f.write(json.dumps(row) + "\n")
  print(f"\n{'retention':>9}  " + "  ".join(f"{n[:6]:>15}" for n in names) + "   seconds  settings")
  for r in rows:
    cells = [f"{r['leakage'][attackers[0]][n]:+.3f}/{r['leakage'][attackers[-1]][n]:+.3f}"
             for n in names]
    print(f"{r['retention']:9.3f}  " + "  ".join(f"{c:>15}" for c in cells)
          + f"   {r['seconds']:7.1f}  {' '.join(r['settings']) or '(workdir settings)'}")


if __name__ == "__main__":
  main()
