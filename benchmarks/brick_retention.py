"""Where the utility goes: each stored brick alone, as calibrated and under gains.

  python benchmarks/brick_retention.py --workdir W [--json]

Reads the validation NDCG@10 retention (`Unlearner.retention`, what the
utility floor `unlearn.min_retention` bounds) of E0 plus each stored brick:
as calibrated, under the control loop's gains, and with its class-mean part
or its rest (`control.split_move`) at 0.75 and 1.25 of the calibrated move.
W is only read.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax import checkpoint  # noqa: E402
from lego_jax.report import format_table  # noqa: E402
from lego_jax.requests import Unlearner  # noqa: E402
from lego_jax.workdir import Workdir  # noqa: E402

# (gain on the class-mean part, gain on the rest); None: the loop's gains.
VARIANTS = {"calibrated": (1.0, 1.0), "loop's gains": None,
            "mean x0.75": (0.75, 1.0), "mean x1.25": (1.25, 1.0),
            "rest x0.75": (1.0, 0.75), "rest x1.25": (1.0, 1.25)}


def brick_reads(u: Unlearner, name: str) -> dict:
  """{variant: validation retention} of E0 plus brick `name` (`VARIANTS`), and its gains."""
  tree, meta = checkpoint.restore(u.brick_dir(name))
  gains = meta.get("gain", [1.0, 1.0])
  e0 = np.asarray(u.target().e0)
  out = {}
  for what, g in VARIANTS.items():
    move = u.with_gains([name], tree["delta"][None], [gains if g is None else g])[0]
    out[what] = u.retention(e0 + move)
  return {"gains": [float(x) for x in gains], "retention": out}


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  u = Unlearner(Workdir.open(args.workdir), progress=False)
  out = {"workdir": args.workdir,
         "bricks": {n: brick_reads(u, n) for n in u.brick_meta()}}
  if args.json:
    print(json.dumps(out))
  else:
    print(format_table(("brick", "loop's gains (mean/rest)", *VARIANTS),
                       [(n, "/".join(f"{g:.2f}" for g in b["gains"]),
                         *(f"{b['retention'][v]:.3f}" for v in VARIANTS))
                        for n, b in out["bricks"].items()]))
  return out


if __name__ == "__main__":
  main()
