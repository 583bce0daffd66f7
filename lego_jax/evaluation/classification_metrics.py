"""Classification metrics for the attackers: BAcc, macro-F1, one-vs-rest AUC.

Plain numpy on small arrays (one fold's test rows), so the numbers can be read
against sklearn's definitions without pulling sklearn in.
"""

import math
from typing import Sequence

import numpy as np

# Two-sided 97.5% quantiles of Student's t by degrees of freedom (no scipy).
_T975 = {
    1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365,
    8: 2.306, 9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 13: 2.160,
    14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
    20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060,
    26: 2.056, 27: 2.052, 28: 2.048, 29: 2.045, 30: 2.042, 40: 2.021,
    50: 2.009, 60: 2.000, 80: 1.990, 100: 1.984, 120: 1.980,
}


def t975(df: int) -> float:
  """Student-t 0.975 quantile; between tabulated df the next smaller df is
  used (conservative), beyond 120 the normal 1.96."""
  if df < 1:
    return float("nan")
  if df > 120:
    return 1.96
  return _T975[max(k for k in _T975 if k <= df)]


def balanced_accuracy(y_true, y_pred) -> float:
  """Mean per-class recall over the classes present in `y_true` (as sklearn)."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  classes = np.unique(y_true)
  if classes.size == 0:
    return float("nan")
  return float(np.mean([np.mean(y_pred[y_true == c] == c) for c in classes]))


def macro_f1(y_true, y_pred) -> float:
  """Unweighted mean F1 over the classes seen in `y_true` or `y_pred` (as
  sklearn's default labels); a class never predicted has F1 = 0."""
  y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
  classes = np.union1d(y_true, y_pred)
  if classes.size == 0:
    return float("nan")
  scores = []
  for c in classes:
    tp = np.sum((y_pred == c) & (y_true == c))
    fp = np.sum((y_pred == c) & (y_true != c))
    fn = np.sum((y_pred != c) & (y_true == c))
    scores.append(2 * tp / (2 * tp + fp + fn))
  return float(np.mean(scores))


def rankdata(x) -> np.ndarray:
  """1-based ranks with ties given their average rank."""
  x = np.asarray(x)
  order = np.argsort(x, kind="mergesort")
  xs = x[order]
  # Runs of equal values share the mean of the ranks they span.
  starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
  ends = np.r_[starts[1:], xs.size]
  avg = (starts + ends + 1) / 2.0
  ranks = np.empty(x.size, dtype=np.float64)
  ranks[order] = np.repeat(avg, ends - starts)
  return ranks


def binary_auc(is_pos, score) -> float:
  """ROC AUC by the Mann-Whitney U statistic; a tied pair counts 1/2."""
  is_pos = np.asarray(is_pos, dtype=bool)
  n_pos, n_neg = int(is_pos.sum()), int((~is_pos).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  r = rankdata(score)
  u = r[is_pos].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def macro_auc_ovr(y_true, probs) -> float:
  """Macro one-vs-rest AUC over the classes present in `y_true`.

  `probs` is (n, C); for two classes this is the usual binary AUC (both
  one-vs-rest AUCs are equal then).
  """
  y_true, probs = np.asarray(y_true), np.asarray(probs)
  aucs = [binary_auc(y_true == c, probs[:, c]) for c in np.unique(y_true)]
  aucs = [a for a in aucs if not math.isnan(a)]
  return float(np.mean(aucs)) if aucs else float("nan")


def leakage(bacc: float, num_classes: int) -> float:
  """|BAcc - 1/C|: below chance is leakage too (docs/method.md, evaluation)."""
  return abs(float(bacc) - 1.0 / num_classes)


def ci95(values: Sequence[float]) -> list[float]:
  """mean +- t_{0.975, n-1} * sd / sqrt(n) over folds; [mean, mean] for one.

  Folds share training users, so this interval is a little too narrow; it is
  the customary one (and the 40 paper splits overlap even more).
  """
  v = np.asarray(values, dtype=np.float64)
  m = float(v.mean())
  if v.size < 2:
    return [m, m]
  half = t975(v.size - 1) * float(v.std(ddof=1)) / math.sqrt(v.size)
  return [m - half, m + half]
