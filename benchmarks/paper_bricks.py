"""Bricks alone under variations of a workdir's unlearn settings (how the paper preset was set).

  python benchmarks/paper_bricks.py WORKDIR '[{"lr": 0.002}, {"lr": 0.002, "epsilon": 0.1}]'
                                    [--attributes gender,age]

For each JSON object (fields of the `unlearn` section replacing the
workdir's), calibrates the attributes (one vmapped program, nothing stored in
the workdir) and reads each brick alone, E0 + D_a: the signed leakage
(balanced accuracy minus chance, 5-fold, the workdir's attack settings) of
the linear and MLP attackers on its own attribute, and test NDCG@10 over the
original's. Prints one line per variation with its calibration seconds.
"""

import argparse
import json
import pathlib
import sys
import time

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.requests import Unlearner, attribute_key  # noqa: E402
from lego_jax.unlearning import calibration  # noqa: E402
from lego_jax.workdir import Workdir  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("workdir")
  p.add_argument("variations", help="a JSON list of objects of unlearn fields")
  p.add_argument("--attributes", default="gender,age")
  args = p.parse_args(argv)
  wd = Workdir.open(args.workdir)
  u = Unlearner(wd, progress=False)
  target, bb = u.target(), wd.backbone(progress=False)
  names = args.attributes.split(",")
  labels, _ = wd.labels(names)
  keys = jnp.stack([attribute_key(wd.config["seed"], n) for n in names])
  base = {**u.cfg, "batch_users": u.batch_users()}
  original = wd.evaluate()["ndcg@10"]
  for over in json.loads(args.variations):
    cfg = {**base, **over}
    spec = calibration.Spec.from_config(cfg, u.num_classes())
    start = time.perf_counter()
    bricks, _, _ = calibration.calibrate(target, labels, calibration.HParams.from_config(cfg, names),
                                         keys, spec=spec, score_fn=bb.score)
    seconds = time.perf_counter() - start
    out = {}
    for k, name in enumerate(names):
      table = np.asarray(target.e0 + bricks[k])
      reads = {a: wd.attack(table, a, "cv5", [name])[name] for a in ("linear", "mlp")}
      out[name] = {a: round(r["bacc"] - r["chance"], 3) for a, r in reads.items()}
      out[name]["ndcg_retention"] = round(wd.evaluate(table)["ndcg@10"] / original, 3)
    print(json.dumps({"settings": over, "seconds": round(seconds, 1), "bricks": out}), flush=True)


if __name__ == "__main__":
  main()
