"""Independent judges of an exported table: attackers lego-jax never steers with.

  python benchmarks/judge.py FILE.npz [FILE.npz ...] [--seed 1] [--seeds 1] [--rotate]
                             [--principal K] [--json]
  python benchmarks/judge.py W/sweep_tables.npz --labels EXPORT.npz

FILE is what `lego-jax export` writes (embeddings, attr_<name> codes). With
--labels, every table in FILE (a `lego-jax sweep`'s `sweep_tables.npz`, one
combined table per run) is judged against that export's attr_<name> codes,
and a "mean" row averages the signed leakage over the tables. Per
attribute, classes are balanced by down-sampling (seeded) and each judge is
trained from scratch in stratified 5-fold cross-validation: scikit-learn's
gradient-boosted trees (HistGradientBoostingClassifier), an MLP of another
size than lego-jax's (256-128, early stopping), logistic regression, a
25-nearest-neighbour vote and a Gaussian quadratic discriminant (each class
its own Ledoit-Wolf covariance: it reads the classes' second moments).
None of them is a model family or a fold split that lego-jax's control
loop uses by default (its `quadratic` probe, which `unlearn.probes` can
add, is QDA's family). Reported: signed leakage BAcc - chance
with a 95% t-interval over the folds; positive = the attribute is still
there, negative = an overshoot below chance.

One reading depends on which users the down-sampling keeps: on ML-100K's
age (smallest class 36 users) one MF table read by the 256-128 MLP at
+0.100, -0.016 and +0.052 under seeds 1, 2 and 3. --seeds N judges each
table under N seeds (down-samplings and folds) and reports the mean with a
t-interval over all their folds; with --labels, table i is judged under seeds
offset by i * N, so the mean over tables does not share one down-sampling.

--rotate also judges each table standardised and turned by a random
rotation (seeded; row "FILE (rotated)"): the same information in another
basis. Smooth judges read it alike; trees split on single coordinates, so
what they read only in the stored basis lies along the table's own axes
(docs/findings.md, session 16). A diagnostic, not a remedy: a rotation hides
nothing from an attacker that learns directions.

--principal K also judges each table on its K leading principal components
(the table's own covariance, no labels; each component standardised; row
"FILE (K PCs)"): an attacker that reduces the dimension first, as is common
practice. What a table keeps in a few high-variance directions is diluted,
for a judge of the whole row, by the other D - K; here it is not (ML-1M NCF,
docs/findings.md, session 23).

Needs scikit-learn, which the test extra installs (`pip install '.[test]'`) and lego-jax
itself does not depend on.
"""

import argparse
import json
import math
import sys

import numpy as np

JUDGES = ("gbdt", "mlp256", "logreg", "knn25", "qda")


def make_judge(name: str, seed: int):
  from sklearn.discriminant_analysis import QuadraticDiscriminantAnalysis
  from sklearn.ensemble import HistGradientBoostingClassifier
  from sklearn.linear_model import LogisticRegression
  from sklearn.neighbors import KNeighborsClassifier
  from sklearn.neural_network import MLPClassifier
  from sklearn.pipeline import make_pipeline
  from sklearn.preprocessing import StandardScaler
  if name == "gbdt":
    return HistGradientBoostingClassifier(max_iter=200, learning_rate=0.1, random_state=seed)
  if name == "mlp256":
    return make_pipeline(StandardScaler(), MLPClassifier((256, 128), alpha=1e-3, max_iter=200,
                                                        early_stopping=True, random_state=seed))
  if name == "logreg":
    return make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=2000))
  if name == "qda":
    return make_pipeline(StandardScaler(),
                         QuadraticDiscriminantAnalysis(solver="eigen", shrinkage="auto"))
  return make_pipeline(StandardScaler(), KNeighborsClassifier(25))


def balanced_users(codes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Sorted indices of as many labelled users of each class as the smallest
  class has (-1 = missing), drawn by `rng`."""
  present = np.unique(codes[codes >= 0])
  m = min(int((codes == c).sum()) for c in present)
  return np.sort(np.concatenate([rng.choice(np.flatnonzero(codes == c), m, replace=False)
                                 for c in present]))


def judge(x: np.ndarray, codes: np.ndarray, judges=JUDGES, seed: int = 1, seeds: int = 1) -> dict:
  """{judge: {"signed", "ci95", "bacc", "chance", "n"}} for one attribute's codes (-1 =
  missing): the mean over `seeds` seeds (seed, seed + 1, ...: down-samplings and
  fold splits) of 5-fold cross-validation, with a t-interval over all their folds
  (repeated cross-validation; folds of different seeds share users, so with
  several seeds it is somewhat narrow)."""
  from sklearn.metrics import balanced_accuracy_score
  from sklearn.model_selection import StratifiedKFold
  present = np.unique(codes[codes >= 0])
  m = min(int((codes == c).sum()) for c in present)
  chance = 1.0 / len(present)
  scores = {name: [] for name in judges}
  for s in range(seed, seed + seeds):
    idx = balanced_users(codes, np.random.default_rng(s))
    xs, ys = x[idx], codes[idx]
    for name in judges:
      for tr, te in StratifiedKFold(5, shuffle=True, random_state=s).split(xs, ys):
        model = make_judge(name, s).fit(xs[tr], ys[tr])
        scores[name].append(balanced_accuracy_score(ys[te], model.predict(xs[te])))
  return {name: {**_mean(np.asarray(v) - chance), "bacc": float(np.mean(v)), "chance": chance,
                 "n": int(m * len(present))} for name, v in scores.items()}


def rotated(x: np.ndarray, seed: int) -> np.ndarray:
  """`x` standardised per column and turned by a random orthogonal matrix (seeded)."""
  rng = np.random.default_rng(seed)
  q, r = np.linalg.qr(rng.normal(size=(x.shape[1], x.shape[1])))
  q *= np.sign(np.diag(r))    # Haar-distributed, not biased by the QR's sign convention
  sd = x.std(0)
  return (x - x.mean(0)) / np.where(sd > 0, sd, 1.0) @ q


def principal(x: np.ndarray, k: int) -> np.ndarray:
  """(n, k) `x`'s coordinates on its k leading principal directions, each of unit variance."""
  c = x - x.mean(0)
  vals, vecs = np.linalg.eigh(np.cov(c, rowvar=False))
  top = np.argsort(vals)[::-1][:k]
  return c @ vecs[:, top] / np.sqrt(np.maximum(vals[top], 1e-30))


def _mean(values) -> dict:
  """The mean of per-run readings with the 95% t-interval of the mean over runs."""
  from scipy import stats  # comes with scikit-learn
  v = np.asarray(values)
  half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size)
  return {"signed": float(v.mean()), "ci95": [float(v.mean() - half), float(v.mean() + half)]}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("files", nargs="+")
  ap.add_argument("--seed", type=int, default=1)
  ap.add_argument("--seeds", type=int, default=1,
                  help="judge each table under this many seeds and report their mean")
  ap.add_argument("--judges", default=",".join(JUDGES))
  ap.add_argument("--labels", help="an export whose attr_<name> codes label every table in FILE")
  ap.add_argument("--rotate", action="store_true",
                  help="also judge each table standardised and randomly rotated")
  ap.add_argument("--principal", type=int, default=0, metavar="K",
                  help="also judge each table on its K leading principal components")
  ap.add_argument("--json", action="store_true")
  args = ap.parse_args(argv)
  judges = [j for j in args.judges.split(",") if j]
  unknown = [j for j in judges if j not in JUDGES]
  if args.seeds < 1:
    sys.exit(f"judge.py: --seeds must be at least 1, not {args.seeds}")
  if args.principal < 0:
    sys.exit(f"judge.py: --principal must be at least 1 (or 0: off), not {args.principal}")
  if unknown:
    sys.exit(f"judge.py: unknown judge {unknown[0]!r}; valid: {', '.join(JUDGES)}")
  results = {}
  for f in args.files:
    z = np.load(f)
    codes = np.load(args.labels) if args.labels else z
    names = [k[5:] for k in codes.files if k.startswith("attr_") and not k.endswith("_classes")]
    tables = {f"{f}:{k}": z[k] for k in z.files} if args.labels else {f: z["embeddings"]}
    views = [("", lambda x: x)] + ([(" (rotated)", lambda x: rotated(x, args.seed))]
                                   if args.rotate else [])
    if args.principal:
      views.append((f" ({args.principal} PCs)", lambda x: principal(x, args.principal)))
    for suffix, view in views:
      for i, (name, x) in enumerate(tables.items()):
        seed = args.seed + i * args.seeds     # each table its own down-samplings
        results[name + suffix] = {a: judge(view(x.astype(np.float64)), codes[f"attr_{a}"],
                                           judges, seed, args.seeds) for a in names}
      if args.labels and len(tables) > 1:
        results[f"{f}:mean{suffix}"] = {
            a: {j: _mean([results[t + suffix][a][j]["signed"] for t in tables]) for j in judges}
            for a in names}
  print(json.dumps(results))
  if not args.json:
    print()
    print("| file | attribute | " + " | ".join(judges) + " | max |")
    print("|---|---|" + "---|" * (len(judges) + 1))
    for f, res in results.items():
      for a, r in res.items():
        cells = [f"{r[j]['signed']:+.3f} [{r[j]['ci95'][0]:+.3f}, {r[j]['ci95'][1]:+.3f}]"
                 for j in judges]
        worst = max(abs(r[j]["signed"]) for j in judges)
        print(f"| {f} | {a} | " + " | ".join(cells) + f" | {worst:.3f} |")
  return results


if __name__ == "__main__":
  main()
