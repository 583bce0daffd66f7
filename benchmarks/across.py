"""Leakage read across separately calibrated parts of the users.

  python benchmarks/across.py --workdir W [--attributes gender,age] [--parts 2]
                              [--split-seed 0] [--judges qda,logreg,gbdt] [--seeds 1]
                              [--set unlearn.FIELD=VALUE ...] [--out TABLE.npz] [--json]
  python benchmarks/across.py --table EXPORT.npz [--attributes ...] [--parts 2] [...]

A cross-validated attacker on a table balanced in sample reads two things
at once: a residual the calibration left in every user alike (above
chance), and the mirror of the balance itself (below: what the balance
left in the training folds is the opposite of what it left in the test
fold). Here the users are split at random (seeded) into parts, and each
part is unlearned on its own with the other parts' labels hidden
(`Unlearner.unlearn` under W's config and the --set overrides, on a copy
of W's trained backbone); the table takes each part's rows from its own
run. Each judge of `judge.py` is then fitted on one part and scored on
another ("across": no balance is shared between its training and test
users) and cross-validated inside each part ("within": judge.py's
protocol, residual plus mirror). On ML-1M MF gender the Gaussian
discriminant read +0.007 within and +0.076 across (--seeds 3;
docs/findings.md, session 21). Each part's run sees 1/parts of the
users, so its statistics are weaker than one run's on every user:
"across" tends to overstate what a run on every user keeps.

W (a trained workdir) is only read; the parts' runs go to a temporary
folder. With --out the composed table is written in `lego-jax export`'s
layout, for `judge.py`. --table reads a table as it is (an export, e.g.
the default run's, whose users were calibrated together) under the same
split: there "across" shows the mirror of one balance shared by the parts.
"""

import argparse
import itertools
import json
import pathlib
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from benchmarks import judge as judge_lib  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.workdir import Workdir, safe_name  # noqa: E402

# What a copy of a trained workdir needs to be unlearned afresh.
TRAINED = ("backbone", "config.json", "data.json")


class _Part(Workdir):
  """A workdir whose attribute labels outside `keep` (a user mask) are missing."""
  keep: np.ndarray

  def labels(self, names):
    codes, num_classes = super().labels(names)
    return np.where(self.keep[None], codes, -1).astype(codes.dtype), num_classes


def parts_of(n: int, parts: int, seed: int) -> np.ndarray:
  """(n,) the part of each user: a seeded random split into near-equal parts."""
  order = np.random.default_rng(seed).permutation(n)
  part = np.empty(n, np.int64)
  part[order] = np.arange(n) % parts
  return part


def unlearn_parts(wd: Workdir, names, part: np.ndarray, overrides=()) -> np.ndarray:
  """The combined table whose rows of part p come from unlearning `names` on
  a copy of `wd` where only part p's users carry labels."""
  table = np.asarray(wd.backbone(progress=False).table(), np.float64).copy()
  with tempfile.TemporaryDirectory() as tmp:
    for p in np.unique(part):
      d = pathlib.Path(tmp) / f"part{p}"
      d.mkdir()
      for item in TRAINED:
        src = wd.path / item
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, d / item)
      pwd = _Part.open(d, overrides)
      pwd.keep = part == p
      rows = np.asarray(Unlearner(pwd, progress=False).unlearn(list(names)))
      table[part == p] = rows[part == p]
  return table


def across(x: np.ndarray, codes: np.ndarray, part: np.ndarray, judges, seed: int = 1,
           seeds: int = 1) -> dict:
  """{judge: {"within", "across"}} for one attribute: the mean of `judge.judge`
  inside each part, and the mean balanced accuracy - chance of the judge fitted
  on part a (classes down-sampled to equal size) and scored on every other
  part b (all its labelled users); both under `seeds` seeds from `seed`."""
  from sklearn.metrics import balanced_accuracy_score
  present = np.unique(codes[codes >= 0])
  chance = 1.0 / len(present)
  out = {}
  for name in judges:
    within = [judge_lib.judge(x[part == p], codes[part == p], (name,), seed, seeds)[name]["signed"]
              for p in np.unique(part)]
    reads = []
    for s, a in itertools.product(range(seed, seed + seeds), np.unique(part)):
      # The same users for every judge.
      idx = judge_lib.balanced_users(np.where(part == a, codes, -1),
                                     np.random.default_rng((s, int(a))))
      model = judge_lib.make_judge(name, s).fit(x[idx], codes[idx])
      for b in np.unique(part):
        if b != a:
          test = (part == b) & (codes >= 0)
          reads.append(balanced_accuracy_score(codes[test], model.predict(x[test])) - chance)
    out[name] = {"within": float(np.mean(within)), "across": float(np.mean(reads))}
  return out


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  source = ap.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a trained workdir whose parts are unlearned apart")
  source.add_argument("--table", help="an export (embeddings, attr_<name>) judged as it is")
  ap.add_argument("--attributes", help="comma-separated (default: every attribute of W)")
  ap.add_argument("--parts", type=int, default=2)
  ap.add_argument("--split-seed", type=int, default=0, help="seeds the split into parts")
  ap.add_argument("--judges", default="qda,logreg,gbdt")
  ap.add_argument("--seeds", type=int, default=1,
                  help="down-samplings and fold splits per reading (their mean)")
  ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                  help="a config override for the parts' runs (repeatable)")
  ap.add_argument("--out", help="write the composed table here (export layout)")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  judges = [j for j in args.judges.split(",") if j]
  bad = [j for j in judges if j not in judge_lib.JUDGES]
  if bad:
    sys.exit(f"across.py: unknown judge {bad[0]!r}; valid: {', '.join(judge_lib.JUDGES)}")
  if args.seeds < 1:
    sys.exit(f"across.py: --seeds must be at least 1, not {args.seeds}")
  if args.parts < 2:
    sys.exit(f"across.py: --parts must be at least 2, not {args.parts}")
  if args.table:
    z = np.load(args.table)
    stored = [k[5:] for k in z.files if k.startswith("attr_") and not k.endswith("_classes")]
    names = args.attributes.split(",") if args.attributes else stored
    missing = [a for a in names if a not in stored]
    if missing:
      sys.exit(f"across.py: {args.table} has no attribute {missing[0]!r}; "
               f"it has: {', '.join(stored)}")
    codes = np.stack([z[f"attr_{a}"] for a in names])
    part = parts_of(codes.shape[1], args.parts, args.split_seed)
    table = z["embeddings"].astype(np.float64)
  else:
    wd = Workdir.open(args.workdir)
    names = args.attributes.split(",") if args.attributes else wd.attribute_names()
    codes, _ = wd.labels(names)
    part = parts_of(codes.shape[1], args.parts, args.split_seed)
    table = unlearn_parts(wd, names, part, args.set)
  if args.out:
    np.savez(args.out, embeddings=table.astype(np.float32),
             **{f"attr_{safe_name(a)}": y for a, y in zip(names, codes)})
  results = {a: across(table, y, part, judges, seeds=args.seeds) for a, y in zip(names, codes)}
  print(json.dumps(results))
  if not args.json:
    print()
    print("| attribute | " + " | ".join(f"{j} within / across" for j in judges) + " |")
    print("|---|" + "---|" * len(judges))
    for a, r in results.items():
      print(f"| {a} | " + " | ".join(f"{r[j]['within']:+.3f} / {r[j]['across']:+.3f}"
                                      for j in judges) + " |")
  return results


if __name__ == "__main__":
  main()
