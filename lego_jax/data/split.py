"""Train/valid/test splits of a dataset's (user, item) pairs.

Methods:
  random      per user, shuffled with the seed: n_valid = round(n * ratios[1])
              and n_test = round(n * ratios[2]) (halves round up), then valid
              and, if needed, test shrink until the user keeps >= 1 train pair.
              So every user keeps a train pair, and users with 1-4 pairs at
              80/10/10 get no valid/test pair. A dataset with a predefined
              split (`Dataset.fold`) keeps it; where that split has no valid
              part, valid is drawn from train the same way at
              ratios[1] / (ratios[0] + ratios[1]).
  loo         leave-one-out: per user with >= 3 pairs, the latest pair (by
              timestamp where known, ties and unknown times broken at random)
              is test and the one before it valid; the rest is train.
  predefined  `Dataset.fold` as is; an error where the dataset has none.
Each part is an (k, 2) int32 array of (user, item), sorted. `Split.fingerprint`
hashes the dataset fingerprint, the method, ratios and seed (a predefined
split used as is hashes as "predefined", whatever method and seed asked).
"""

from typing import Sequence

import numpy as np

from lego_jax.data.dataset import Dataset, Split, fingerprint
from lego_jax.errors import LegoError, unknown

METHODS = ("random", "loo", "predefined")


def _check_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
  ratios = tuple(float(r) for r in ratios)
  if len(ratios) != 3 or min(ratios) < 0 or ratios[0] <= 0 or abs(sum(ratios) - 1) > 1e-6:
    raise LegoError(f"split ratios must be 3 non-negative numbers (train > 0) summing to 1, "
                    f"got {list(ratios)}")
  return ratios


def _positions(users: np.ndarray, key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Each pair's rank within its user when sorted by `key`, and the user's size."""
  order = np.lexsort((key, users))
  sizes = np.bincount(users, minlength=users.max(initial=-1) + 1)
  starts = np.cumsum(sizes) - sizes
  pos = np.empty(len(users), np.int64)
  pos[order] = np.arange(len(users)) - starts[users[order]]
  return pos, sizes[users]


def _round(x: np.ndarray) -> np.ndarray:
  return np.floor(x + 0.5).astype(np.int64)


def random_folds(users: np.ndarray, ratios, rng: np.random.Generator) -> np.ndarray:
  """0/1/2 per pair (see the module doc for the rounding)."""
  pos, n = _positions(users, rng.random(len(users)))
  n_valid, n_test = _round(n * ratios[1]), _round(n * ratios[2])
  excess = np.maximum(n_valid + n_test - (n - 1), 0)  # keep >= 1 train pair
  cut = np.minimum(excess, n_valid)
  n_valid, n_test = n_valid - cut, n_test - (excess - cut)
  return np.where(pos < n_test, 2, np.where(pos < n_test + n_valid, 1, 0)).astype(np.int8)


def loo_folds(ds: Dataset, rng: np.random.Generator) -> np.ndarray:
  tie = rng.random(ds.n_interactions)
  stamps = ds.timestamps if ds.timestamps is not None else np.zeros(ds.n_interactions)
  stamps = np.where(np.isnan(stamps), -np.inf, stamps)
  # Latest first: sort by (-time, random tie-break) within each user.
  pos, n = _positions(ds.users, np.lexsort((tie, -stamps)).argsort())
  big = n >= 3
  return np.where(big & (pos == 0), 2, np.where(big & (pos == 1), 1, 0)).astype(np.int8)


def _pairs(ds: Dataset, mask: np.ndarray) -> np.ndarray:
  return np.stack([ds.users[mask], ds.items[mask]], axis=1).astype(np.int32).reshape(-1, 2)


def split_dataset(ds: Dataset, method: str = "random", ratios=(0.8, 0.1, 0.1),
                  seed: int = 0) -> Split:
  """Splits `ds` by `method` (see the module doc); seeded and deterministic."""
  if method not in METHODS:
    raise unknown("split method", method, METHODS)
  ratios = _check_ratios(ratios)
  rng = np.random.default_rng(seed)
  if method == "predefined" and ds.fold is None:
    raise LegoError(f"dataset {ds.name} has no predefined split; use split 'random' or 'loo'")
  key = (method, ratios, int(seed))
  if method == "loo":
    fold = loo_folds(ds, rng)
  elif ds.fold is not None:
    fold = ds.fold.astype(np.int8)
    key = ("predefined", None, 0)  # no randomness: same split whatever the seed
    if method == "random" and not (fold == 1).any() and ratios[1] > 0:
      key = ("predefined+valid", ratios, int(seed))
      train = np.flatnonzero(fold == 0)
      share = ratios[1] / (ratios[0] + ratios[1])
      sub = random_folds(ds.users[train], (1 - share, share, 0.0), rng)
      fold = fold.copy()
      fold[train[sub == 1]] = 1
  else:
    fold = random_folds(ds.users, ratios, rng)
  return Split(train=_pairs(ds, fold == 0), valid=_pairs(ds, fold == 1), test=_pairs(ds, fold == 2),
               n_users=ds.n_users, n_items=ds.n_items,
               fingerprint=fingerprint(ds.fingerprint, *key))
