"""Class means per norm range: what a class shift that is the same for every user leaves.

  python benchmarks/norm_interaction.py --original ORIGINAL.npz TABLE.npz [TABLE.npz ...]
      [--bins 3] [--perms 20] [--seed 0] [--json]

ORIGINAL and TABLE are what `lego-jax export` writes (embeddings, attr_<name>
codes). The users are cut into `--bins` equal ranges of a row norm (the
original row's, and the table's own), and in each range every attribute's
class separation is measured: sqrt(sum_c share_c |(mean_c - mean) / sd|^2),
the class means' spread in units of each coordinate's spread, against the
same statistic with the labels permuted within the range (the mean of
`--perms`, what no information gives at that size). A ratio near 1 in every
range: the classes agree whatever the norm. On ML-1M MF the gender signal
grows with the original row's norm; LEGO's table, whose class means agree
overall, reads it reversed among light users and left among heavy ones
(docs/findings.md, session 17).
"""

import argparse
import json

import numpy as np


def separation(x: np.ndarray, codes: np.ndarray) -> float:
  """sqrt(sum_c share_c |(mean_c - mean) / sd|^2) over the labelled rows (codes >= 0)."""
  has = codes >= 0
  x, codes = x[has], codes[has]
  mean, sd = x.mean(0), x.std(0) + 1e-12
  out = 0.0
  for c in np.unique(codes):
    rows = codes == c
    out += rows.mean() * float(np.sum(((x[rows].mean(0) - mean) / sd) ** 2))
  return float(np.sqrt(out))


def by_norm(x: np.ndarray, codes: np.ndarray, norm: np.ndarray, bins: int = 3, perms: int = 20,
            seed: int = 0) -> list[dict]:
  """Per range of `norm` (equal counts): the separation, its permuted-label level and their ratio."""
  rng = np.random.default_rng(seed)
  edges = np.quantile(norm, np.linspace(0, 1, bins + 1))
  which = np.clip(np.searchsorted(edges, norm, side="right") - 1, 0, bins - 1)
  out = []
  for b in range(bins):
    rows = which == b
    s = separation(x[rows], codes[rows])
    null = float(np.mean([separation(x[rows], rng.permutation(codes[rows])) for _ in range(perms)]))
    out.append({"range": [float(edges[b]), float(edges[b + 1])], "users": int(rows.sum()),
                "separation": s, "null": null, "ratio": s / null if null else float("nan")})
  return out


def row_norm(x: np.ndarray) -> np.ndarray:
  return np.linalg.norm(x - x.mean(0), axis=1)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("tables", nargs="+")
  ap.add_argument("--original", required=True, help="the export of the original table")
  ap.add_argument("--bins", type=int, default=3)
  ap.add_argument("--perms", type=int, default=20)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  orig = np.load(args.original)
  r0 = row_norm(orig["embeddings"].astype(np.float64))
  names = [k[5:] for k in orig.files if k.startswith("attr_") and not k.endswith("_classes")]
  results = {}
  for f in [args.original] + [t for t in args.tables if t != args.original]:
    x = np.load(f)["embeddings"].astype(np.float64)
    results[f] = {a: {by: by_norm(x, orig[f"attr_{a}"], norm, args.bins, args.perms, args.seed)
                      for by, norm in (("original norm", r0), ("own norm", row_norm(x)))}
                  for a in names}
  print(json.dumps(results))
  if not args.json:
    print()
    print("| table | attribute | ranges of | separation / permuted-label level, light to heavy |")
    print("|---|---|---|---|")
    for f, res in results.items():
      for a, per in res.items():
        for by, cells in per.items():
          print(f"| {f} | {a} | {by} | " + " / ".join(f"{c['ratio']:.2f}" for c in cells) + " |")
  return results


if __name__ == "__main__":
  main()
