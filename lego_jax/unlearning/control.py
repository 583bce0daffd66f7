"""Closed-loop control: how far each attribute's move goes, read from attackers.

No rule on the MI estimate can tell when an attribute is gone: a brick scaled
to half its size already put an attacker below chance on ML-100K while every
kernel still read 1.3-3.6 times its permuted-label level (docs/findings.md).
The overshoot lies in each user's own label-dependent move, which class
statistics do not see and attackers trained on other users do. So the amount
of that move is set by such attackers, per attribute, in both directions.

A brick's move D splits into its class-mean part M (every user moved by the
mean move of their class; `split_move`) and the rest R = D - M, which sums
to zero within each class. Only M moves the class means, which is what a
linear probe reads; R changes each class's shape, which only nonlinear
attackers read. The two overshoot apart (a linear probe below chance while an
MLP still reads the attribute, measured on ML-100K), so each attribute k gets
two gains, a_k on M_k and b_k on R_k: E0 + a_k M_k + b_k R_k for a brick, and
the combination's coefficients of each part times its gain for the combined
table.

The probes (attackers trained on some folds of the users and scored on the
others, `read`) give a signed leakage s_p = BAcc - chance per probe p. The
linear probes steer a, the nonlinear ones b: each gain is moved until the
mid-range (max_p s_p + min_p s_p) / 2 of its probes is zero, the point that
minimises the largest |s_p| where they disagree. s falls as the gain grows
and crosses zero where the move overshoots: gains above 1 extend a move that
stopped short (under-removal), gains below 1 take back an overshoot. `solve`
keeps the best gains it read.

The probes steer; they are not the judges. Results are judged by attackers
trained from scratch with other seeds and other model families
(`benchmarks/judge.py`).
"""

from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np

from lego_jax.evaluation import attackers


class Reading(NamedTuple):
  """Signed leakage (BAcc - chance) of each probe (P) for each attribute (K)."""
  signed: np.ndarray    # (P, K)
  lo: np.ndarray        # (P, K) 95% interval of the signed leakage
  hi: np.ndarray        # (P, K)
  probes: tuple         # probe names, length P

  def worst(self) -> np.ndarray:
    """(K,) the largest |signed leakage| over the probes."""
    return np.abs(self.signed).max(0)

  def report(self, names: Sequence[str]) -> dict:
    """{attribute: {probe: {"signed", "ci95"}}} with plain floats."""
    return {n: {p: {"signed": float(self.signed[i, k]),
                    "ci95": [float(self.lo[i, k]), float(self.hi[i, k])]}
                for i, p in enumerate(self.probes)}
            for k, n in enumerate(names)}


def read(tables, labels, num_classes, *, probes: Sequence[str], seed: int, config: dict,
         names: Sequence[str]) -> Reading:
  """Cross-fitted probes on `tables` ((n, D), or (K, n, D): attribute k in table k).

  `config` is the attackers' config (`config["attack"]` with the folds wanted).
  """
  rows = []
  for p in probes:
    res = attackers.attack(tables, labels, num_classes, attacker=p, protocol="cv5", seed=seed,
                           config=config, names=names)
    rows.append([(r["bacc"] - r["chance"], r["ci95"][0] - r["chance"], r["ci95"][1] - r["chance"])
                 for r in (res[n] for n in names)])
  arr = np.asarray(rows, np.float64)     # (P, K, 3)
  return Reading(arr[..., 0], arr[..., 1], arr[..., 2], tuple(probes))


class Step(NamedTuple):
  gains: np.ndarray     # (K,)
  reading: Reading


LINEAR = ("linear",)   # probes that read class means: they steer the class-mean gain


def channels(probes: Sequence[str]) -> list[list[int]]:
  """Probe indices steering each gain: [class-mean gain, within-class gain].

  Where the probes are all of one kind, they steer both.
  """
  lin = [i for i, p in enumerate(probes) if p in LINEAR]
  other = [i for i, p in enumerate(probes) if p not in LINEAR]
  return [lin or other, other or lin]


def split_move(delta: np.ndarray, codes: np.ndarray, num_classes: int):
  """(M, R): each labelled user's class-mean move and the rest (rows of
  unlabelled users are all R), for one brick delta (n, D) and its labels."""
  delta = np.asarray(delta)
  onehot = np.zeros((len(codes), num_classes), delta.dtype)
  labelled = codes >= 0
  onehot[np.flatnonzero(labelled), codes[labelled]] = 1.0
  means = onehot.T @ delta / np.maximum(onehot.sum(0), 1.0)[:, None]
  m = onehot @ means
  return m, delta - m


def _next_gain(points: list, max_gain: float) -> float:
  """The next gain to try from the (gain, f) points read so far.

  Between the largest gain that under-removes (f > 0) and the smallest that
  overshoots (f <= 0): false position, kept off the ends. Where nothing has
  overshot yet: a secant step through the last two points, at least 1.25x
  and at most 2x further.
  """
  under = sorted(p for p in points if p[1] > 0)
  over = sorted(p for p in points if p[1] <= 0)
  if over and under:
    (lo, flo), (hi, fhi) = under[-1], over[0]
    t = float(np.clip(flo / (flo - fhi), 0.1, 0.9))
    return lo + t * (hi - lo)
  (g, f) = under[-1]
  if g >= max_gain:
    return g
  if len(under) >= 2 and under[-2][1] <= f:
    # Going further made it worse (past a swap of the classes): back to the
    # best point read; `solve` stops once nothing changes.
    return min(under, key=lambda p: p[1])[0]
  if len(under) >= 2:
    (g0, f0) = under[-2]
    return float(np.clip(g + f * (g - g0) / (f0 - f), 1.25 * g, min(2.0 * g, max_gain)))
  return min(2.0 * g, max_gain)


def solve(read_fn: Callable[[np.ndarray], Reading], k: int, *, tol: float, max_gain: float,
          rounds: int, independent: bool) -> tuple[np.ndarray, list[Step]]:
  """Gains (K, 2) (class-mean part, within-class part) with every probe within
  `tol` of chance where reachable.

  `read_fn(gains)` reads the probes at those gains. With `independent` each
  attribute's table depends on its own gains only (bricks), so each attribute
  keeps its own best step; otherwise (one combined table) the best joint
  step is kept, the one whose worst attribute reads closest to chance.
  Returns the chosen gains and every step read (a read at gains 0, the
  original table, is made only where some gain overshoots at once).
  """
  g = np.ones((k, 2))
  points: list = [[[], []] for _ in range(k)]
  history: list[Step] = []
  groups = None
  for _ in range(max(int(rounds), 1)):
    reading = read_fn(g.copy())
    history.append(Step(g.copy(), reading))
    groups = groups or channels(reading.probes)
    todo = reading.worst() > tol
    if not todo.any():
      break
    f = np.stack([_mid(reading.signed[idx]) for idx in groups], 1)   # (K, 2)
    for a in range(k):
      for c in range(2):
        points[a][c].append((float(g[a, c]), float(f[a, c])))
    if any(all(p[1] <= 0 for p in points[a][c]) for a in np.flatnonzero(todo) for c in range(2)):
      zero = read_fn(np.zeros((k, 2)))   # the original table brackets every overshoot
      history.append(Step(np.zeros((k, 2)), zero))
      fz = np.stack([_mid(zero.signed[idx]) for idx in groups], 1)
      for a in range(k):
        for c in range(2):
          points[a][c].append((0.0, float(fz[a, c])))
    new = g.copy()
    for a in np.flatnonzero(todo):
      for c in range(2):
        if any(p[1] > 0 for p in points[a][c]):
          new[a, c] = _next_gain(points[a][c], max_gain)
    if any(np.array_equal(new, s.gains) for s in history):   # nowhere new to go
      break
    g = new
  if independent:
    best = np.stack([min(history, key=lambda s: s.reading.worst()[a]).gains[a] for a in range(k)])
  else:
    best = min(history, key=lambda s: s.reading.worst().max()).gains
  return best, history


def _mid(signed: np.ndarray) -> np.ndarray:
  """(K,) mid-range over the probes (rows) of their signed readings."""
  return (signed.max(0) + signed.min(0)) / 2


def reading_at(history: Sequence[Step], gains: np.ndarray, independent: bool) -> Reading:
  """The reading of each attribute at `gains` (which `solve` took from `history`)."""
  if not independent:
    return next(s.reading for s in history if np.array_equal(s.gains, gains))
  rows = []
  for a, g in enumerate(gains):
    r = next(s.reading for s in history if np.array_equal(s.gains[a], g))
    rows.append((r.signed[:, a], r.lo[:, a], r.hi[:, a]))
  signed, lo, hi = (np.stack(x, 1) for x in zip(*rows))
  return Reading(signed, lo, hi, history[0].reading.probes)
