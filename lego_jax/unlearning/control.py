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
others, `read`) give a signed leakage s_p = BAcc - chance per probe p.
`solve` moves the gains to where the worst |s_p| is smallest: gains above 1
extend a move that stopped short (under-removal), gains below 1 take back an
overshoot. It is a search for a minimum, not for a sign change: measured on
ML-1M, extending a nearly balanced move by a quarter raised the probes'
reading from +0.03 to +0.07 (the classes cross, and a probe reads them again
with the sides swapped), so a reading above chance does not say which way
to go.

Before any gain, the probes also set each brick's strength while it is
calibrated (`strength_step`): a gain only stretches or shrinks a finished
move, and where the calibration stopped short in the wrong direction
(ML-100K LightGCN age, before lr and the pull were scale-free) or the pull
held one attribute back (ML-1M age) no gain reached chance.

The probes steer; they are not the judges. Results are judged by attackers
trained from scratch with other seeds and other model families
(`benchmarks/judge.py`).
"""

from typing import Callable, NamedTuple, Sequence

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

  def worst_signed(self) -> np.ndarray:
    """(K,) the signed leakage of the probe furthest from chance, per attribute."""
    return self.signed[np.argmax(np.abs(self.signed), 0), np.arange(self.signed.shape[1])]

  def select(self, probes: Sequence[str]) -> "Reading":
    """The rows of `probes`, in that order."""
    rows = [self.probes.index(p) for p in probes]
    return Reading(self.signed[rows], self.lo[rows], self.hi[rows], tuple(probes))

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


# Where each brick's strength is checked during calibration (fractions of
# the steps; the first reading only sets the baseline), how much one check
# changes the MI weight and the pull, and what counts as a stall.
STRENGTH_CHECKS = (0.25, 0.5, 0.75)
MI_FACTOR, PULL_FACTOR = 2.0, 2.0
STALL = 0.5


def strength_step(reading: Reading, previous: np.ndarray, w_mi: np.ndarray, l2: np.ndarray,
                  tol: float) -> tuple[np.ndarray, np.ndarray]:
  """One dual step on each attribute's MI weight and pull toward E0.

  One setting cannot fit every attribute: on ML-1M MF, gender landed at
  chance under a pull of 10 while age (7 classes) needed 1 (docs/findings.md,
  "Utility"). So both follow the probes. Where the worst probe reads the
  attribute above chance by more than `tol` and the leakage has not at least
  halved (`STALL`) since the `previous` reading (its `Reading.worst_signed`),
  the MI term weighs `MI_FACTOR` times more and the pull `PULL_FACTOR` times
  less; where it reads
  it below chance by more than `tol`, the reverse; otherwise they stay. An
  attribute still on its way is left alone: loosening every attribute that
  read high early on (measured) moved rows that needed no move, and
  gradient-boosted trees and a kNN vote then read gender again (0.08).
  Unlike the gains applied after calibration, this lets the remaining steps
  find a new move with the ranking hinge in force, rather than stretch the old one.
  """
  now, before = reading.worst_signed(), np.asarray(previous)
  stalled = np.abs(now) > STALL * np.abs(before)
  d = np.where((now > tol) & stalled, 1.0, np.where(now < -tol, -1.0, 0.0))
  return w_mi * MI_FACTOR ** d, l2 / PULL_FACTOR ** d


class Step(NamedTuple):
  gains: np.ndarray     # (K,)
  reading: Reading


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


# Shares of the combined table's remaining class means the loop may take back
# (`unlearn.residual_means`): all of them sends a cross-fitted probe below
# chance (-0.07 on ML-1M NCF), as removing the class means of every user does.
RESIDUAL_SHARES = (0.25, 0.5, 0.75)
# The polish (`unlearn.polish_steps`) is read first at this share of its
# move: the whole of it overshoots, as calibration on every user does (ML-1M
# NCF gender, linear -0.036), and a quarter already did on ML-100K NCF
# (gender +0.063 -> -0.067). Gains closer than POLISH_SAME to one read are not
# read again.
POLISH_FIRST, POLISH_ROUNDS, POLISH_SAME = 0.25, 3, 0.02


def no_worse(before: Reading, after: Reading, tol: float) -> bool:
  """Whether the attribute furthest from chance in `after` reads no further
  from it than the one furthest in `before`, or than twice `tol`.

  The slack is the probes' noise: an attribute at 0.009 read again at 0.010
  (ML-1M LightGCN gender) has not left the target. Asking it of every
  attribute instead refused polishes that brought the worst one most of
  the way (ML-1M MF, a neighbour vote: gender +0.053 -> +0.023 while
  occupation went +0.017 -> +0.025; docs/findings.md)."""
  return bool(after.worst().max() <= max(before.worst().max(), 2 * tol))


def polish_gain(read_fn: Callable[[float], Reading], before: Reading, *, tol: float,
                first: float = POLISH_FIRST, rounds: int = POLISH_ROUNDS,
                max_gain: float = 1.0) -> list[tuple[float, Reading]]:
  """Gains on one polish move, with their readings, best first: those at which
  the attribute furthest from chance reads no further from it than before
  (`no_worse`).

  A polish is small, and every probe's reading of every attribute follows
  its gain nearly linearly (ML-100K NCF gender: -0.039, -0.065, -0.103 at
  0.25, 0.5, 1), so after `first` each round reads the gain in [0,
  `max_gain`] where lines through the last two readings put the worst
  attribute closest to chance. Polished attributes then stop at chance
  rather than cross it, and an attribute the move was not for stops it where
  it would leave the target (ML-1M LightGCN: read at 0.92, a polish of age
  and occupation took gender to +0.051). The gains read and 0 (`before`) are
  ranked by their worst attribute's distance from chance. An average over
  attributes is no guide: on ML-100K NCF a quarter of the polish took gender
  from +0.063 to -0.067 while the others moved toward chance, and the mean
  improved.
  """
  points = [(0.0, before)]
  gain = float(first)
  grid = np.linspace(0.0, max_gain, 201)
  for _ in range(max(int(rounds), 1)):
    if any(abs(gain - g) < POLISH_SAME for g, _ in points):
      break
    points.append((gain, read_fn(gain)))
    (x0, r0), (x1, r1) = sorted(points[-2:], key=lambda p: p[0])
    slope = (r1.signed - r0.signed) / (x1 - x0)                            # (P, K)
    lines = r0.signed[None] + (grid - x0)[:, None, None] * slope[None]     # (G, P, K)
    gain = round(float(grid[np.argmin(np.abs(lines).max(1).max(1))]), 6)
  ok = [(g, r) for g, r in points if no_worse(before, r, tol)]
  return sorted(ok, key=lambda p: (float(p[1].worst().max()), score(p[1])))


def class_indicators(labels, num_classes: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """(n, C) every attribute's one-hot class columns, centred (unlabelled users
  are zeros before centring), and (C,) the attribute each column belongs to."""
  cols, owner = [], []
  for k, (y, c) in enumerate(zip(labels, num_classes)):
    for cls in range(int(c)):
      cols.append((np.asarray(y) == cls).astype(np.float64))
      owner.append(k)
  z = np.stack(cols, 1)
  return z - z.mean(0), np.asarray(owner)


def class_mean_parts(table: np.ndarray, labels: np.ndarray, num_classes: Sequence[int]
                     ) -> np.ndarray:
  """(K, n, D) each attribute's part of the table's class means, fitted jointly.

  Least squares of the centred table on every attribute's centred class
  indicators at once (unlabelled users: zeros), split by attribute. Fitted
  one attribute at a time, correlated attributes would each claim the shift
  they share, and taking both back would count it twice: the crossing of
  the bricks this is for (docs/findings.md).
  """
  z, owner = class_indicators(labels, num_classes)
  x = np.asarray(table, np.float64)
  coef = np.linalg.lstsq(z, x - x.mean(0), rcond=None)[0]
  return np.stack([z[:, owner == k] @ coef[owner == k] for k in range(len(labels))]
                  ).astype(np.asarray(table).dtype)


def _class_means(rows: np.ndarray, y: np.ndarray, c: int) -> np.ndarray:
  """(C, D) mean row of each class of codes `y` (0 .. c - 1; an empty class's is 0)."""
  sums = np.zeros((c, rows.shape[1]))
  np.add.at(sums, y, rows)
  return sums / np.maximum(np.bincount(y, minlength=c), 1)[:, None]


def _passes(x: np.ndarray, labels, num_classes: Sequence[int], rounds: int):
  """`rounds` passes over the attributes: (classes, labelled users, their rows
  in `x` as it stands, their codes) for each attribute with two or more
  labelled users; the caller writes each pass's rows back into `x`."""
  for _ in range(rounds):
    for codes, c in zip(np.asarray(labels), num_classes):
      labelled = np.flatnonzero(codes >= 0)
      if len(labelled) >= 2:
        yield int(c), labelled, x[labelled], codes[labelled]


def null_means(table: np.ndarray, labels: np.ndarray, num_classes: Sequence[int], *,
               seed: int, rounds: int = 3) -> np.ndarray:
  """`table` (n, D) with each class's mean deviation set, per attribute and
  class, to the size it has under permuted labels: the first moments an
  independent table of these users would show.

  Class means made equal in sample are not what an independent table has:
  an attacker fitted on some folds then learns the mirror image of the
  held-out fold's deviation and reads below chance (isotropic noise, n =
  6040, D = 64: a linear probe at -0.090 once the class means are removed,
  -0.002 at this size; docs/findings.md). The size is n_c m_c' S^-1 m_c, for
  the deviation m_c of class c's mean row from the labelled users' and S
  their covariance within classes; over permutations of the N labelled
  users' codes its mean is (1 - n_c / N) D N / (N - 1) where the classes
  differ by no more than that, so it follows n, D and the class sizes of any
  dataset. A longer deviation is scaled down; a shorter one (an overshoot)
  gets the class's deviation under one permutation (seeded by `seed`) added,
  as much as brings it to the size: a draw of what independent labels give,
  so it grows even from zero. The deviations are then centred (weighted by
  class size) so the labelled users' mean stays; `rounds` passes over the
  attributes let correlated ones settle.
  """
  x = np.asarray(table, np.float64).copy()
  rng = np.random.default_rng(seed)
  for c, labelled, rows, y in _passes(x, labels, num_classes, rounds):
    n = len(labelled)
    counts = np.bincount(y, minlength=c).astype(np.float64)

    deviations = lambda y: _class_means(rows, y, c) - rows.mean(0)
    dev = deviations(y)
    # S within classes: what the step leaves unchanged, so one pass lands.
    vals, vecs = np.linalg.eigh(np.cov(rows - rows.mean(0) - dev[y], rowvar=False))
    keep = vals > 1e-9 * vals.max()
    w = vecs[:, keep] / np.sqrt(vals[keep])          # S^-1/2 on the table's span
    obs = counts * ((dev @ w) ** 2).sum(1)
    draw = deviations(rng.permutation(y))
    null = (1.0 - counts / n) * keep.sum() * n / (n - 1)
    # n_c |dev + t draw|^2_S = null, solved for t >= 0 where the deviation is short.
    a = counts * ((draw @ w) ** 2).sum(1)
    b = 2 * counts * ((dev @ w) * (draw @ w)).sum(1)
    t = (-b + np.sqrt(np.maximum(b * b - 4 * a * (obs - null), 0.0))) / np.maximum(2 * a, 1e-30)
    shrink = np.sqrt(null / np.maximum(obs, 1e-30))
    target = np.where((obs > null)[:, None], shrink[:, None] * dev, dev + t[:, None] * draw)
    target -= counts @ target / n
    x[labelled] += (target - dev)[y]               # unlabelled users do not move
  return x.astype(np.asarray(table).dtype)


def null_covariances(table: np.ndarray, labels: np.ndarray, num_classes: Sequence[int], *,
                     seed: int, rounds: int = 3) -> np.ndarray:
  """`table` (n, D) with each class's covariance about its own mean as far
  from the pooled one as under permuted labels: the second moments an
  independent table of these users would show.

  The bricks' kernels on class-centred rows leave the classes' covariances
  closer to each other in sample than independent labels would (ML-1M MF
  gender: 0.82 of the permuted-label size, NCF 0.89), and a Gaussian
  discriminant cross-validated on the table reads the mirror image of each
  held-out fold, below chance (MF -0.037, NCF -0.059); on LightGCN they
  stay further apart (1.33) and it reads +0.036 (docs/findings.md). Per
  attribute and class k, on the labelled users' rows less their class
  means, whitened by the covariance S within classes, the class's
  covariance C_k has its eigenvalues replaced, in order, by those of class
  k's covariance under one permutation of the labels (seeded by `seed`),
  its eigenvectors kept: one draw of what independent labels give, which
  shrinks a spread beyond it and fills a deficit with sampling noise of the
  right size. The rows move by the map between the two, U diag(sqrt(mu /
  lambda)) U' (the shortest move that does it, in S's units): class means
  stay, and each user keeps their place along each of the class's
  directions. The direction that stood out keeps the largest drawn value,
  so one strong, narrow difference is shrunk rather than removed (a
  widened direction planted in noise: a discriminant's +0.18 to +0.027;
  giving such directions a random value instead read no better on ML-1M
  and cost up to a point of retention). `rounds` passes over the
  attributes let correlated ones settle; unlabelled users do not move.
  """
  x = np.asarray(table, np.float64).copy()
  rng = np.random.default_rng(seed)
  for c, labelled, rows, y in _passes(x, labels, num_classes, rounds):
    means = _class_means(rows, y, c)
    dev = rows - means[y]
    vals, vecs = np.linalg.eigh(dev.T @ dev / len(dev))
    keep = vals > 1e-9 * vals.max()
    z = dev @ (vecs[:, keep] / np.sqrt(vals[keep]))            # whitened, on S's span
    back = (vecs[:, keep] * np.sqrt(vals[keep])).T
    shuffled = rng.permutation(y)
    for k in range(c):
      mine = np.flatnonzero(y == k)
      if len(mine) < 2:
        continue
      lam, u = np.linalg.eigh(z[mine].T @ z[mine] / len(mine))
      drawn = z[shuffled == k] - z[shuffled == k].mean(0)
      mu = np.linalg.eigvalsh(drawn.T @ drawn / len(drawn))
      # A class of n_k <= D rows spans n_k - 1 directions, and so does its
      # draw: the rest (eigenvalue 0 in both) stay as they are.
      scale = np.where(lam > 1e-9, np.sqrt(np.maximum(mu, 0.0) / np.maximum(lam, 1e-30)), 1.0)
      x[labelled[mine]] = means[k] + ((z[mine] @ u) * scale) @ u.T @ back
  return x.astype(np.asarray(table).dtype)


def _shapes(rows: np.ndarray, y: np.ndarray, c: int):
  """Per class k (a dict): its rows' deviations from its mean, sorted per
  coordinate, less the pooled deviations' quantiles at the same ranks, (n_k,
  D); and those quantiles plus the class's mean (the shape's centre)."""
  means = _class_means(rows, y, c)
  # Deviations from each row's own class mean: a pooled shape that held the
  # classes' mean differences would be wider than any class's.
  dev = rows - means[y]
  pooled, n = np.sort(dev, axis=0), len(rows)
  gaps, centre = {}, {}
  for k in range(c):
    mine = np.flatnonzero(y == k)
    if len(mine):
      q = pooled[np.minimum(((np.arange(len(mine)) + 0.5) / len(mine) * n).astype(int), n - 1)]
      gaps[k], centre[k] = np.sort(dev[mine], axis=0) - q, q + means[k]
  return gaps, centre


def _sizes(gaps: dict, c: int, var: np.ndarray) -> np.ndarray:
  """(C, D): n_k times the mean square of class k's gaps, in units of each coordinate's variance."""
  out = np.zeros((c, len(var)))
  for k, g in gaps.items():
    out[k] = len(g) * (g ** 2).mean(0) / var
  return out


def null_shapes(table: np.ndarray, labels: np.ndarray, num_classes: Sequence[int], *,
                seed: int, rounds: int = 2, perms: int = 4) -> np.ndarray:
  """`table` (n, D) with each class's shape on each coordinate (its
  distribution about its own mean) no further from the pooled shape than
  under permuted labels.

  Trees split on one coordinate at a time and add many weak splits: with
  the class means sized (`null_means`), what gradient-boosted trees still
  read (ML-1M NCF gender +0.046) lies in many coordinates' class-conditional
  shapes, each a little beyond its permuted-label level (docs/findings.md).
  Per attribute, class k and coordinate d, the class's gap is its sorted
  deviations from its mean less the pooled deviations' quantiles at the
  same ranks, and its size n_k times the gap's mean square over the
  coordinate's variance. The permuted-label level is not one number: over
  `perms` label permutations (seeded by `seed`) each coordinate's sizes, over
  their mean, pool into one distribution per class, and the class's D
  coordinates, ranked by the same ratio, are given its D quantiles in that
  order. Where a size exceeds its quantile (by 1/r), the gap keeps r of
  itself (r times the quantile in size) and a gap drawn under one more
  permutation makes up the rest: shrinking alone shrinks the sampling
  noise with the signal, and class shapes nearly equal in sample read
  below chance to cross-fitted trees (a planted spread, 2000 users: -0.08;
  with the draw -0.007); keeping sqrt(r) of the gap left ML-1M NCF's trees
  at +0.029 (r: +0.026, none: +0.046). Each class's new values are sorted
  and given to its users in their old order (every user keeps their rank
  within their class, each class its mean); `rounds` passes over the
  attributes let correlated ones settle; unlabelled users do not move.
  """
  x = np.asarray(table, np.float64).copy()
  rng = np.random.default_rng(seed)
  ranks = lambda v: np.argsort(np.argsort(v))
  for c, labelled, rows, y in _passes(x, labels, num_classes, rounds):
    var = np.maximum(rows.var(0), 1e-30)
    gaps, centre = _shapes(rows, y, c)
    sizes = _sizes(gaps, c, var)
    draws = np.stack([_sizes(_shapes(rows, rng.permutation(y), c)[0], c, var)
                      for _ in range(perms)])
    level = np.maximum(draws.mean(0), 1e-30)                       # (C, D)
    d = rows.shape[1]
    target = np.stack([np.quantile((draws[:, k] / level[k]).ravel(), (np.arange(d) + 0.5) / d)
                       [ranks(sizes[k] / level[k])] for k in range(c)]) * level
    ratio = np.minimum(1.0, target / np.maximum(sizes, 1e-30))
    # Kept: r of the gap, r * target of the size; drawn: the rest of the target.
    fresh = np.sqrt(target * (1.0 - ratio) / level)
    noise, _ = _shapes(rows, rng.permutation(y), c)
    for k, q in centre.items():
      mine = np.flatnonzero(y == k)
      new = np.sort(q + ratio[k] * gaps[k] + fresh[k] * noise[k], 0)
      moved = np.empty_like(new)
      np.put_along_axis(moved, np.argsort(rows[mine], axis=0, kind="stable"), new, 0)
      x[labelled[mine]] = moved
  return x.astype(np.asarray(table).dtype)


LINEAR = ("linear",)   # probes that read class means: they judge the class-mean gain


def channels(probes: Sequence[str]) -> list[list[int]]:
  """Probe indices judging each gain: [class-mean gain, within-class gain].

  Where the probes are all of one kind, they judge both.
  """
  lin = [i for i, p in enumerate(probes) if p in LINEAR]
  other = [i for i, p in enumerate(probes) if p not in LINEAR]
  return [lin or other, other or lin]


def _merge(old: Reading, new: Reading, take: np.ndarray) -> Reading:
  """`old` with the attributes in `take` read from `new` (the readings at the gains kept)."""
  pick = lambda a, b: np.where(take[None], b, a)
  return Reading(pick(old.signed, new.signed), pick(old.lo, new.lo), pick(old.hi, new.hi),
                 old.probes)


def score(reading: Reading) -> float:
  """How far a joint step is from chance: the mean over attributes of the worst probe."""
  return float(reading.worst().mean())


def solve(read_fn: Callable[[np.ndarray], Reading], k: int, *, tol: float, max_gain: float,
          rounds: int, independent: bool, step: float = 0.25) -> tuple[np.ndarray, list[Step]]:
  """Gains (K, 2) (class-mean part, within-class part) that bring every probe
  closest to chance, by a compass search per attribute.

  Leakage is not monotone in a gain: past the balance point a probe reads
  the attribute again (the classes have swapped sides), so the search
  minimises |s| rather than looking for a sign change. Each round moves one
  part (the class-mean part, judged by the linear probes, then the other,
  judged by the rest; `channels`): every attribute is read at its gain minus
  and plus its step, keeps the best of the three, and its step grows by half where
  the best was an end (the minimum lies further out) and halves where it
  stayed. Attributes already within
  `tol` for every probe stay where they are. `read_fn(gains)` reads the
  probes at gains (K, 2); with `independent` each attribute's table depends
  on its own gains only (bricks). On one shared table (the combination) the
  per-attribute choices are read together once more at the end, and the best
  joint step read is kept. Returns the gains and every step read.
  """
  g = np.ones((k, 2))
  centre = read_fn(g.copy())
  # Far from chance, the minimum is likely far from 1 too: start with twice the step.
  steps = np.repeat(np.where(centre.worst() > 0.05, 2 * step, step)[:, None], 2, 1)
  history = [Step(g.copy(), centre)]
  groups = channels(centre.probes)
  part = lambda reading, c: np.abs(reading.signed[groups[c]]).max(0)   # (K,) its probes' worst
  for r in range(max(int(rounds), 0)):
    todo = centre.worst() > tol
    if not todo.any():
      break
    c = r % 2
    best = part(centre, c)
    tried = {}
    for sign in (-1.0, 1.0):
      cand = g.copy()
      cand[todo, c] = np.clip(g[todo, c] + sign * steps[todo, c], 0.0, max_gain)
      if any(np.array_equal(cand, s.gains) for s in history):
        continue
      reading = read_fn(cand.copy())
      history.append(Step(cand.copy(), reading))
      tried[sign] = (cand, reading)
    moved = np.zeros(k, bool)
    for cand, reading in tried.values():
      better = todo & (part(reading, c) < best)
      g[better], best[better] = cand[better], part(reading, c)[better]
      centre = _merge(centre, reading, better)
      moved |= better
    steps[todo & moved, c] = np.minimum(1.5 * steps[todo & moved, c], max_gain)
    steps[todo & ~moved, c] /= 2
  if not independent and not any(np.array_equal(g, s.gains) for s in history):
    history.append(Step(g.copy(), read_fn(g.copy())))
  if independent:
    return g, history
  return min(history, key=lambda s: score(s.reading)).gains, history


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


def keep_floor(gains: np.ndarray, retained: float, history: Sequence[Step],
               retention: Callable[[np.ndarray], float], floor: float, *, tries: int = 4
               ) -> tuple[np.ndarray, float]:
  """(gains, retention) of the combined table under the utility floor, where
  the loop's `gains` (of `history`, `solve` on one shared table) keep only
  `retained`: the steps read, closest to chance first (at most `tries`
  more), until one keeps `floor` by `retention(gains)`; of those that do,
  the one closest to chance. Where none does, `gains` stay: a step further
  from chance that still misses the floor gives up leakage for nothing
  (synthetic data: the step with the most retention, 0.941, left gender's
  linear probe at +0.055; from the loop's table, at 0.891, the class-mean
  step and the polish ended within 0.016)."""
  tried = [(gains, retained)]
  for step in sorted(history, key=lambda s: score(s.reading))[:tries]:
    if not any(np.array_equal(step.gains, g) for g, _ in tried):
      tried.append((step.gains, retention(step.gains)))
    if tried[-1][1] >= floor:
      break
  ok = [t for t in tried if t[1] >= floor]
  return min(ok, key=lambda t: score(reading_at(history, t[0], False))) if ok else tried[0]
