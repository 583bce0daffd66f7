"""A single-attribute dataset in the one-line-per-user format, unlearned with the defaults.

  LEGO_DATA_DIR=../shared/data python benchmarks/single_attribute.py \\
      [--source ml-1m] [--attribute gender] [--backbone mf] [--root runs/single] [--json]

Builds, from the source dataset under LEGO_DATA_DIR, a folder of
`train.txt`/`valid.txt`/`test.txt` (one `user item item ...` line per user,
the source's random 80/10/10 split) and a `users.tsv` holding only the one
attribute: the shape of a user's own data that lego-jax has never been tuned
on. It then trains the backbone, runs `lego-jax unlearn` with nothing but
the defaults, and judges the combined table twice: with lego-jax's own
attackers (seed of the config, 5-fold) and with the independent judges of
`benchmarks/judge.py` (scikit-learn GBDT, a 256-128 MLP, logistic
regression, 25-NN). The bar: the signed leakage's 95% interval contains 0 or
lies within 0.02 of it, for every attacker. The folder is written under
--root (MovieLens may not be redistributed: never commit it).
"""

import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks.judge import judge  # noqa: E402
from lego_jax import config as config_lib  # noqa: E402
from lego_jax.data import load_dataset, split_dataset  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.workdir import Workdir  # noqa: E402

EPOCHS = {"ml-1m": 60, "ml-100k": 100}


def write_folder(source: str, attribute: str, folder: pathlib.Path) -> None:
  ds = load_dataset(source, attributes=[attribute])
  split = split_dataset(ds, "random", (0.8, 0.1, 0.1), seed=0)
  folder.mkdir(parents=True, exist_ok=True)
  for name, pairs in (("train.txt", split.train), ("valid.txt", split.valid),
                      ("test.txt", split.test)):
    lines = {}
    for u, i in np.asarray(pairs).tolist():
      lines.setdefault(u, []).append(ds.item_ids[i])
    (folder / name).write_text("".join(f"{ds.user_ids[u]} {' '.join(items)}\n"
                                       for u, items in sorted(lines.items())))
  attr = ds.attributes[attribute]
  rows = [f"{uid}\t{attr.classes[c] if c >= 0 else ''}" for uid, c in zip(ds.user_ids, attr.codes)]
  (folder / "users.tsv").write_text(f"user_id\t{attribute}\n" + "\n".join(rows) + "\n")


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--source", default="ml-1m")
  ap.add_argument("--attribute", default="gender")
  ap.add_argument("--backbone", default="mf")
  ap.add_argument("--root", default="runs/single")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args()
  root = pathlib.Path(args.root) / f"{args.source}_{args.attribute}_{args.backbone}"
  folder = root / "data"
  if not (folder / "users.tsv").is_file():
    write_folder(args.source, args.attribute, folder)
  config = config_lib.resolve(None, [f"data.name={str(folder.resolve())!r}",
                                     f"model.name={args.backbone!r}",
                                     f"train.epochs={EPOCHS.get(args.source, 50)}"] + args.set)
  wd = Workdir.create(root / "run", config)
  wd.train()
  start = time.perf_counter()
  table = Unlearner(wd).unlearn([args.attribute])
  seconds = time.perf_counter() - start
  labels, _ = wd.labels([args.attribute])
  out = {"source": args.source, "attribute": args.attribute, "backbone": args.backbone,
         "users": wd.split.n_users, "seconds": seconds,
         "retention_ndcg@10": wd.evaluate(table)["ndcg@10"] / wd.evaluate()["ndcg@10"],
         "control": Unlearner(wd, progress=False).status().get("combination"), "attackers": {}}
  for stage, t in (("original", np.asarray(wd.backbone().table())), ("combined", table)):
    res = {}
    for at in ("mlp", "linear"):
      r = wd.attack(t, attacker=at)[args.attribute]
      res[at] = {"signed": r["bacc"] - r["chance"], "ci95": [c - r["chance"] for c in r["ci95"]]}
    res.update(judge(np.asarray(t, np.float64), labels[0]))
    out["attackers"][stage] = res
  ok = {a: r["ci95"][0] <= 0 <= r["ci95"][1] or abs(r["signed"]) <= 0.02
        for a, r in out["attackers"]["combined"].items()}
  out["no_overshoot"] = all(r["signed"] >= -0.02 or r["ci95"][1] >= 0
                            for r in out["attackers"]["combined"].values())
  out["meets_bar"] = all(ok.values())
  print(json.dumps(out))
  if not args.json:
    print(f"\n{args.source} / {args.attribute} only / {args.backbone}: {out['users']} users, "
          f"retention {out['retention_ndcg@10']:.3f}, {seconds:.1f} s")
    print("| attacker | original | combined | bar |")
    print("|---|---|---|---|")
    for a, r in out["attackers"]["combined"].items():
      o = out["attackers"]["original"][a]
      print(f"| {a} | {o['signed']:+.3f} | {r['signed']:+.3f} "
            f"[{r['ci95'][0]:+.3f}, {r['ci95'][1]:+.3f}] | {'met' if ok[a] else 'missed'} |")


if __name__ == "__main__":
  main()
