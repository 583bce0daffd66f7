"""Closed-loop control: how far each attribute's move goes, read from attackers.

No rule on the MI estimate can tell when an attribute is gone: a brick scaled
to half its size already put an attacker below chance on ML-100K while every
kernel still read 1.3-3.6 times its permuted-label level (docs/findings.md).
The overshoot lies in each user's own label-dependent move, which class
statistics do not see and attackers trained on other users do. So the amount
of that move is set by such attackers, per attribute, in both directions.

Each attribute k gets a gain g_k on its move: E0 + g_k D_k for a brick, the
combination's coefficients of brick k times g_k for the combined table. The
probes (attackers trained on some folds of the users and scored on the
others, `read`) give a signed leakage s_p(g) = BAcc - chance per probe p. It
falls as g grows and crosses zero where the move overshoots. `solve` finds,
per attribute, the gain where f(g) = (max_p s_p + min_p s_p) / 2 is zero,
the point that minimises the largest |s_p| where probes disagree; gains above
1 extend a move that stopped short (under-removal), gains below 1 take back
an overshoot. It keeps the best gains it evaluated.

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

  def mid(self) -> np.ndarray:
    """(K,) the mid-range of the probes' readings: zero where they straddle chance."""
    return (self.signed.max(0) + self.signed.min(0)) / 2

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


def _next_gain(points: list, max_gain: float) -> float:
  """The next gain to try for one attribute from the (gain, f) points read so far.

  Between the largest gain that under-removes (f > 0) and the smallest that
  overshoots (f < 0): false position, kept off the ends. Where nothing has
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
  if len(under) >= 2 and under[-2][1] > f:
    (g0, f0) = under[-2]
    step = f * (g - g0) / (f0 - f)
    return float(np.clip(g + step, 1.25 * g, 2.0 * g)) if g < max_gain else g
  return min(2.0 * g, max_gain)


def solve(read_fn: Callable[[np.ndarray], Reading], k: int, *, tol: float, max_gain: float,
          rounds: int, independent: bool) -> tuple[np.ndarray, list[Step]]:
  """Per-attribute gains g (K,) with every probe within `tol` of chance where reachable.

  `read_fn(gains)` reads the probes at those gains. With `independent` each
  attribute's table depends on its own gain only (bricks), so each attribute
  keeps its own best step; otherwise (one combined table) the best joint
  step is kept, the one whose worst attribute reads closest to chance.
  Returns the chosen gains and every step read (a read at gains 0, the
  original table, is made only where some attribute overshoots at once).
  """
  g = np.ones(k)
  points: list[list] = [[] for _ in range(k)]
  history: list[Step] = []
  for _ in range(max(int(rounds), 1)):
    reading = read_fn(g.copy())
    history.append(Step(g.copy(), reading))
    f, worst = reading.mid(), reading.worst()
    todo = worst > tol
    if not todo.any():
      break
    for a in range(k):
      points[a].append((float(g[a]), float(f[a])))
    if any(all(p[1] <= 0 for p in points[a]) for a in np.flatnonzero(todo)):
      zero = read_fn(np.zeros(k))   # the original table brackets every overshoot
      history.append(Step(np.zeros(k), zero))
      for a in range(k):
        points[a].append((0.0, float(zero.mid()[a])))
    new = g.copy()
    for a in np.flatnonzero(todo):
      if any(p[1] > 0 for p in points[a]):
        new[a] = _next_gain(points[a], max_gain)
    if np.allclose(new, g):   # nowhere left to go (at max_gain, or no bracket)
      break
    g = new
  if independent:
    best = np.array([min(history, key=lambda s: s.reading.worst()[a]).gains[a] for a in range(k)])
  else:
    best = min(history, key=lambda s: s.reading.worst().max()).gains
  return best, history


def reading_at(history: Sequence[Step], gains: np.ndarray, independent: bool) -> Reading:
  """The reading of each attribute at `gains` (which `solve` took from `history`)."""
  if not independent:
    return next(s.reading for s in history if np.array_equal(s.gains, gains))
  rows = []
  for a, g in enumerate(gains):
    r = next(s.reading for s in history if s.gains[a] == g)
    rows.append((r.signed[:, a], r.lo[:, a], r.hi[:, a]))
  signed, lo, hi = (np.stack(x, 1) for x in zip(*rows))
  return Reading(signed, lo, hi, history[0].reading.probes)
