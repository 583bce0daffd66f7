"""Class-mean and class-covariance sizes against their permuted-label level, and
`control.null_means` (with --covariances, `control.null_covariances` first) on a table.

  python benchmarks/null_means.py FILE.npz [FILE.npz ...] [--covariances] [--out DIR]
                                  [--seed 0] [--json]
  python benchmarks/null_means.py --simulate [--users 6040 --dims 64 --runs 5]

For each exported table (`lego-jax export`'s layout) and attribute: the
ratio of n_c m_c' S^-1 m_c summed over classes (m_c a class's mean row
less all labelled users', S the covariance within classes) to its mean
under label permutations: about 1 where the labels say nothing about the
rows' means, far above it for a leak, below it where the class means were
made equal in sample (an overshoot a cross-fitted attacker reads below
chance). The same for the classes' covariances: n_c |C_c - I|^2 summed
over classes, C_c a class's covariance about its own mean in units of S
(what a Gaussian discriminant reads). With --out, each table after the
steps is written to DIR/<name> in the same layout, for
`benchmarks/judge.py`.

--simulate shows why the size matters on data with nothing to find:
isotropic Gaussian rows with 30/70 labels drawn independently, read by
scikit-learn's logistic regression (balanced class weights) in stratified
5-fold cross-validation (balanced accuracy - chance, mean +- sd over --runs
draws) as drawn, with the class means removed, and after
`control.null_means`. Needs scikit-learn (the test extra) for --simulate
only.
"""

import argparse
import json
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.report import format_table  # noqa: E402
from lego_jax.unlearning import control  # noqa: E402


METRICS = ("within", "coordinates", "euclidean")


def class_sizes(x: np.ndarray, codes: np.ndarray, perms: int = 32, seed: int = 0,
                metric: str = "within") -> tuple[np.ndarray, np.ndarray]:
  """Each class's n_c m_c' S^-1 m_c in `x` for `codes` (-1 = missing), and its
  mean over `perms` label permutations: (C,) each, estimated afresh rather
  than by `control.null_means`'s closed form, so that it checks it.

  `metric` "within" is S the covariance within classes (what `null_means`
  sizes); "coordinates" its diagonal, each coordinate standardised, as the
  attackers see the table; "euclidean" the identity. A size at the null in
  one metric and above it in another is a deviation whose directions are
  not those of independent labels."""
  lab = codes >= 0
  rows, y = np.asarray(x, np.float64)[lab], codes[lab]
  c = int(y.max()) + 1
  counts = np.bincount(y, minlength=c)

  def deviations(y):
    dev = np.stack([rows[y == k].mean(0) if counts[k] else rows.mean(0) for k in range(c)])
    return dev - rows.mean(0)
  dev = deviations(y)
  if metric == "within":
    vals, vecs = np.linalg.eigh(np.cov(rows - rows.mean(0) - dev[y], rowvar=False))
    keep = vals > 1e-9 * vals.max()
    w = vecs[:, keep] / np.sqrt(vals[keep])
  elif metric == "coordinates":
    sd = rows.std(0)
    w = np.diag(1.0 / np.where(sd > 0, sd, np.inf))   # a constant coordinate counts 0
  elif metric == "euclidean":
    w = np.eye(rows.shape[1])
  else:
    raise ValueError(f"metric {metric!r}; valid: {', '.join(METRICS)}")
  size = lambda d: counts * ((d @ w) ** 2).sum(1)
  rng = np.random.default_rng(seed)
  return size(dev), np.mean([size(deviations(rng.permutation(y))) for _ in range(perms)], 0)


def covariance_sizes(x: np.ndarray, codes: np.ndarray, perms: int = 32, seed: int = 0
                     ) -> tuple[np.ndarray, np.ndarray]:
  """Each class's n_c |C_c - I|^2 in `x` for `codes` (C_c its covariance about
  its own mean, whitened by the covariance within classes), and its mean
  over `perms` label permutations: (C,) each."""
  lab = codes >= 0
  rows, y = np.asarray(x, np.float64)[lab], codes[lab]
  c = int(y.max()) + 1

  def size(y):
    dev = rows - np.stack([rows[y == k].mean(0) if np.any(y == k) else rows.mean(0)
                           for k in range(c)])[y]
    vals, vecs = np.linalg.eigh(dev.T @ dev / len(dev))
    keep = vals > 1e-9 * vals.max()
    z = dev @ (vecs[:, keep] / np.sqrt(vals[keep]))
    eye = np.eye(z.shape[1])
    return np.array([np.sum(y == k) * np.sum((z[y == k].T @ z[y == k] / max(np.sum(y == k), 1)
                                               - eye) ** 2) if np.any(y == k) else 0.0
                     for k in range(c)])
  rng = np.random.default_rng(seed)
  return size(y), np.mean([size(rng.permutation(y)) for _ in range(perms)], 0)


def size_ratio(x: np.ndarray, codes: np.ndarray, perms: int = 32, seed: int = 0,
               sizes=class_sizes, **kwargs) -> float:
  """Summed class-mean size (or another of `sizes`, given `kwargs`) of `codes`
  in `x` over its permuted-label mean."""
  observed, null = sizes(x, codes, perms, seed, **kwargs)
  return float(observed.sum() / null.sum())


def _linear_cv(x, y, seed):
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import balanced_accuracy_score
  from sklearn.model_selection import StratifiedKFold
  pred = np.zeros_like(y)
  for tr, te in StratifiedKFold(5, shuffle=True, random_state=seed).split(x, y):
    pred[te] = LogisticRegression(max_iter=1000, class_weight="balanced").fit(x[tr], y[tr]).predict(x[te])
  return balanced_accuracy_score(y, pred) - 0.5


def simulate(users: int, dims: int, runs: int) -> dict:
  rng = np.random.default_rng(0)
  out = {"as drawn": [], "class means removed": [], "null_means": []}
  for r in range(runs):
    x = rng.normal(size=(users, dims))
    y = (rng.random(users) < 0.3).astype(np.int64)
    removed = x - np.stack([x[y == k].mean(0) for k in (0, 1)])[y] + x.mean(0)
    sized = control.null_means(removed, y[None], [2], seed=r)
    for name, t in (("as drawn", x), ("class means removed", removed), ("null_means", sized)):
      out[name].append((_linear_cv(t, y, r), size_ratio(t, y)))
  return {k: {"signed": float(np.mean([a for a, _ in v])), "sd": float(np.std([a for a, _ in v])),
              "size": float(np.mean([b for _, b in v]))} for k, v in out.items()}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("files", nargs="*")
  ap.add_argument("--out", help="folder for the tables after the steps")
  ap.add_argument("--covariances", action="store_true",
                  help="control.null_covariances before control.null_means")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--simulate", action="store_true")
  ap.add_argument("--users", type=int, default=6040)
  ap.add_argument("--dims", type=int, default=64)
  ap.add_argument("--runs", type=int, default=5)
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  if args.simulate:
    res = simulate(args.users, args.dims, args.runs)
    rows = [[k, f"{v['signed']:+.3f} ± {v['sd']:.3f}", f"{v['size']:.2f}"] for k, v in res.items()]
    header = ["isotropic table", "logistic regression, BAcc - chance", "class-mean size / null"]
  else:
    if not args.files:
      sys.exit("null_means.py: name exported tables (FILE.npz), or pass --simulate")
    res, rows = {}, []
    for f in args.files:
      z = dict(np.load(f))
      names = [k[5:] for k in z if k.startswith("attr_") and not k.endswith("_classes")]
      codes = np.stack([z[f"attr_{n}"] for n in names])
      nc = [len(z[f"attr_{n}_classes"]) if f"attr_{n}_classes" in z else int(c.max()) + 1
            for n, c in zip(names, codes)]
      sized = z["embeddings"]
      if args.covariances:
        sized = control.null_covariances(sized, codes, nc, seed=args.seed)
      sized = control.null_means(sized, codes, nc, seed=args.seed)
      ratios = lambda t, i: {"means": size_ratio(t, codes[i]),
                             "covariances": size_ratio(t, codes[i], sizes=covariance_sizes)}
      res[f] = {n: {"before": ratios(z["embeddings"], i), "after": ratios(sized, i)}
                for i, n in enumerate(names)}
      rows += [[f, n] + [f"{v[w][m]:.2f}" for w in ("before", "after")
                         for m in ("means", "covariances")] for n, v in res[f].items()]
      if args.out:
        out = pathlib.Path(args.out) / pathlib.Path(f).name
        out.parent.mkdir(parents=True, exist_ok=True)
        np.savez(out, **{**z, "embeddings": sized})
    steps = "null_covariances, null_means" if args.covariances else "null_means"
    header = ["file", "attribute", "class-mean size / null", "class-covariance size / null",
              f"means after {steps}", "covariances after"]
  print(json.dumps(res) if args.json else format_table(header, rows))
  return res


if __name__ == "__main__":
  main()
