"""The in-memory dataset: dense user/item indices, merged interactions, attributes.

Everything is numpy; the arrays are handed to JAX by the stages that need them.
"""

import dataclasses
import hashlib
from typing import Optional

import numpy as np

MISSING = -1  # attribute code of a missing or unknown label


@dataclasses.dataclass(frozen=True, eq=False)
class Attribute:
  """One sensitive attribute: an int code per user (MISSING where unknown)."""
  name: str
  codes: np.ndarray            # (n_users,) int32, MISSING = -1
  classes: tuple[str, ...]     # class names, index = code

  @property
  def num_classes(self) -> int:
    return len(self.classes)

  def counts(self) -> list[int]:
    return np.bincount(self.codes[self.codes >= 0], minlength=self.num_classes).tolist()

  @property
  def missing(self) -> int:
    return int((self.codes < 0).sum())


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """Implicit-feedback interactions with dense ids and user attributes.

  `fold` is set where the source ships its own split (0 train, 1 valid, 2 test)
  and None otherwise. `fingerprint` hashes the content and preprocessing, so a
  checkpoint made from other data can be refused.
  """
  name: str
  user_ids: np.ndarray          # (n_users,) str, raw ids
  item_ids: np.ndarray          # (n_items,) str, raw ids
  users: np.ndarray             # (nnz,) int32 dense user index
  items: np.ndarray             # (nnz,) int32 dense item index
  counts: np.ndarray            # (nnz,) int32, repeated pairs merged
  attributes: dict[str, Attribute]
  fold: Optional[np.ndarray] = None
  fingerprint: str = ""
  timestamps: Optional[np.ndarray] = None  # (nnz,) float64, latest per pair, where known

  @property
  def n_users(self) -> int:
    return len(self.user_ids)

  @property
  def n_items(self) -> int:
    return len(self.item_ids)

  @property
  def n_interactions(self) -> int:
    return len(self.users)

  @property
  def attribute_names(self) -> list[str]:
    return list(self.attributes)


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """Train/valid/test (user, item) pairs over the dataset's dense indices."""
  train: np.ndarray             # (k, 2) int32
  valid: np.ndarray
  test: np.ndarray
  n_users: int
  n_items: int
  fingerprint: str = ""         # dataset fingerprint + split method and seed


def fingerprint(*parts) -> str:
  """A short stable hash of arrays and plain values."""
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, np.ndarray):
      h.update(str(p.dtype).encode())
      h.update(np.ascontiguousarray(p).tobytes() if p.dtype != object else "\x00".join(map(str, p)).encode())
    else:
      h.update(repr(p).encode())
    h.update(b"|")
  return h.hexdigest()[:16]
