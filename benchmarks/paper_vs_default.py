"""The paper's formulation of LEGO against lego-jax's default, side by side.

  python benchmarks/paper_vs_default.py --pairs ml100k_mf,ml100k_ncf,ml100k_lightgcn \
      --runs /work/runs --root /tmp/paper_cmp [--presets default,paper] \
      [--set unlearn.epsilon=0.2 ...] [--json out.json] [--out table.md]

For each dataset/backbone pair and preset (`default` = configs/PAIR.toml,
`paper` = configs/PAIR_paper.toml; `original` = no unlearning) it copies a trained backbone from
RUNS/PAIR (backbone/, config.json, data.json; the source is never written),
replaces the copy's unlearn/combine/attack/eval/run sections with the
preset's (`--set` overrides apply to the paper preset only, for measuring its
settings), unlearns every attribute (calibration and combination, timed:
`seconds`), and reads the combined table: test NDCG@10 and Recall@10 over the
original's (retention), and the signed leakage (balanced accuracy minus
chance, 5-fold, the workdir's attack settings) of the MLP and linear
attackers per attribute. Needs the datasets under $LEGO_DATA_DIR. Prints a
Markdown table; `--json` keeps every number.
"""

import argparse
import json
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax import config as config_lib  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.workdir import Workdir  # noqa: E402

SECTIONS = ("unlearn", "combine", "attack", "eval", "run")
ATTACKERS = ("mlp", "linear")


def prepare(source: pathlib.Path, dest: pathlib.Path, config: dict) -> Workdir:
  """A fresh copy of a trained workdir with `config`'s non-identity sections."""
  shutil.rmtree(dest, ignore_errors=True)
  dest.mkdir(parents=True)
  shutil.copytree(source / "backbone", dest / "backbone")
  for f in ("config.json", "data.json"):
    shutil.copy(source / f, dest / f)
  stored = json.loads((dest / "config.json").read_text())
  # The stored config holds the unlearning settings of when it was trained.
  stored.update({s: config[s] for s in SECTIONS})
  (dest / "config.json").write_text(json.dumps(stored, indent=2, sort_keys=True))
  return Workdir.open(dest)


def measure(wd: Workdir, unlearn: bool = True) -> dict:
  names = wd.config["unlearn"]["attributes"] or wd.attribute_names()
  u = Unlearner(wd, progress=False)
  wd.backbone(progress=False)
  u.target()   # the top-T lists are the backbone's, not the method's time
  start = time.perf_counter()
  table = u.unlearn(names) if unlearn else u.table("original")
  seconds = time.perf_counter() - start
  original, after = wd.evaluate(), wd.evaluate(table)
  out = {"seconds": seconds,
         "retention": {k: after[k] / original[k] for k in ("ndcg@10", "recall@10")},
         "ranking": {k: after[k] for k in ("ndcg@10", "recall@10")}, "leakage": {}}
  for attacker in ATTACKERS:
    res = wd.attack(table, attacker, "cv5", names)
    out["leakage"][attacker] = {a: r["bacc"] - r["chance"] for a, r in res.items()}
  return out


def table(rows: list[dict]) -> str:
  attrs = list(rows[0]["leakage"]["mlp"])
  head = (["pair", "preset", "NDCG@10 ret.", "Recall@10 ret."]
          + [f"{at} {a}" for at in ATTACKERS for a in attrs] + ["seconds"])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["pair"], r["preset"], f"{r['retention']['ndcg@10']:.3f}",
             f"{r['retention']['recall@10']:.3f}"]
    cells += [f"{r['leakage'][at].get(a, float('nan')):+.3f}" for at in ATTACKERS for a in attrs]
    lines.append("| " + " | ".join(cells + [f"{r['seconds']:.0f}"]) + " |")
  return "\n".join(lines)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--pairs", default="ml100k_mf,ml100k_ncf,ml100k_lightgcn")
  p.add_argument("--presets", default="default,paper")
  p.add_argument("--runs", default="runs", help="folder of trained workdirs, one per pair")
  p.add_argument("--root", required=True, help="where the copies are made")
  p.add_argument("--set", action="append", default=[], dest="overrides",
                 help="section.field=value for the paper preset (repeatable)")
  p.add_argument("--json")
  p.add_argument("--out")
  args = p.parse_args(argv)
  rows = []
  for pair in args.pairs.split(","):
    for preset in args.presets.split(","):
      name = pair if preset in ("default", "original") else f"{pair}_{preset}"
      config = config_lib.resolve(name, args.overrides if preset == "paper" else ())
      wd = prepare(pathlib.Path(args.runs) / pair, pathlib.Path(args.root) / name, config)
      row = {"pair": pair, "preset": preset, "overrides": args.overrides if preset == "paper" else [], **measure(wd, preset != "original")}
      print(json.dumps(row), file=sys.stderr, flush=True)
      rows.append(row)
  text = table(rows)
  print(text)
  if args.json:
    pathlib.Path(args.json).write_text(json.dumps(rows, indent=2))
  if args.out:
    pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
