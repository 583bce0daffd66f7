"""Why validation retention reads above test retention: the ranking protocol.

  python benchmarks/retention_protocol.py --workdir W [--stage combined] [--json]

The utility floor (`unlearn.min_retention`) reads NDCG@10 on the validation
split, whose ranking masks the train items only: a user's test items stay
in and compete as negatives. The test ranking masks train and validation
items. When unlearning lowers the held-out items' scores, the competing
test items drop too, and validation loses less. This reads the stage's
NDCG@10 retention (over the original's) four ways: each split under its
own protocol, and under the other's (the split with `valid` and `test`
exchanged), with a paired bootstrap sd over users. W is only read.
"""

import argparse
import dataclasses
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.evaluation import ranking  # noqa: E402
from lego_jax.report import format_table  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.workdir import Workdir  # noqa: E402

BOOTSTRAP = 1000


def retention(score_after, score_before, split, stage: str, rng) -> dict:
  """NDCG@10 after / before on `stage` of `split`, and its paired bootstrap sd over users."""
  after, before = (ranking.evaluate(fn, split, stage=stage, ks=(10,))["per_user"]["ndcg@10"]
                   for fn in (score_after, score_before))
  idx = rng.integers(0, len(after), (BOOTSTRAP, len(after)))
  boot = after[idx].mean(1) / before[idx].mean(1)
  return {"retention": float(after.mean() / before.mean()), "bootstrap_sd": float(boot.std())}


def reads(wd: Workdir, table, seed: int = 0) -> dict:
  """{what is read: {"retention", "bootstrap_sd"}} of `table` against the original."""
  bb = wd.backbone()
  after, before = bb.ranking_fn(np.asarray(table)), bb.ranking_fn(bb.table())
  split = wd.split
  swapped = dataclasses.replace(split, valid=split.test, test=split.valid)
  rng = np.random.default_rng(seed)
  # The "test" stage masks train + valid of the split it is given.
  ways = {"valid (test items compete)": (split, "valid"),
          "valid, test items masked": (swapped, "test"),
          "test (valid items masked)": (split, "test"),
          "test, valid items compete": (swapped, "valid")}
  return {k: retention(after, before, s, st, rng) for k, (s, st) in ways.items()}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--stage", default="combined")
  ap.add_argument("--seed", type=int, default=0, help="of the bootstrap")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  wd = Workdir.open(args.workdir)
  table = Unlearner(wd, progress=False).table(args.stage)
  out = {"workdir": args.workdir, "stage": args.stage, "reads": reads(wd, table, args.seed)}
  if args.json:
    print(json.dumps(out))
  else:
    print(format_table(("read", "NDCG@10 retention", "bootstrap sd"),
                       [(k, v["retention"], v["bootstrap_sd"]) for k, v in out["reads"].items()]))
  return out


if __name__ == "__main__":
  main()
