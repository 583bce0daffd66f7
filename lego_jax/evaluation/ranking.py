"""Full-ranking evaluation: Recall, NDCG and HR at K over all items.

Each evaluated user's already-seen items (train, and valid when testing) are
masked out before the top-K, as RecBole's full-sort protocol does. Per-user
values are returned so results can be split by attribute group.
"""

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lego_jax import sharding
from lego_jax.data.dataset import Split
from lego_jax.errors import LegoError, unknown

METRICS = ("recall", "ndcg", "hr")


def padded_lists(pairs: np.ndarray, users: np.ndarray, pad: int) -> np.ndarray:
  """Each of `users`' items in `pairs` as one row, padded with `pad`; (len(users), max len)."""
  pairs = np.asarray(pairs).reshape(-1, 2)
  order = np.argsort(pairs[:, 0], kind="stable")
  u, i = pairs[order, 0], pairs[order, 1]
  starts = np.searchsorted(u, users, "left")
  ends = np.searchsorted(u, users, "right")
  lens = ends - starts
  out = np.full((len(users), max(int(lens.max(initial=0)), 1)), pad, np.int32)
  rows = np.repeat(np.arange(len(users)), lens)
  cols = np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens)
  out[rows, cols] = i[np.repeat(starts, lens) + cols]
  return out


@functools.partial(jax.jit, static_argnames=("ks",))
def batch_metrics(scores, seen, targets, ks: tuple[int, ...]):
  """Per-user metrics for one batch.

  scores (B, n_items); seen (B, L) and targets (B, T) are item ids padded with
  n_items (out of range: dropped by the scatters). Returns {"ndcg@10": (B,), ...}.
  """
  b, n_items = scores.shape
  rows = jnp.arange(b)[:, None]
  masked = scores.astype(jnp.float32).at[rows, seen].set(-jnp.inf, mode="drop")
  is_target = jnp.zeros((b, n_items), bool).at[rows, targets].set(True, mode="drop")
  n_tgt = jnp.sum(targets < n_items, axis=1)
  _, top = jax.lax.top_k(masked, max(ks))
  hits = jnp.take_along_axis(is_target, top, axis=1).astype(jnp.float32)
  disc = 1.0 / jnp.log2(jnp.arange(2, max(ks) + 2, dtype=jnp.float32))
  out = {}
  for k in ks:
    h = hits[:, :k]
    idcg = jnp.cumsum(disc[:k])[jnp.clip(jnp.minimum(n_tgt, k) - 1, 0, k - 1)]
    out[f"recall@{k}"] = h.sum(1) / jnp.maximum(n_tgt, 1)
    out[f"ndcg@{k}"] = (h * disc[:k]).sum(1) / idcg
    out[f"hr@{k}"] = (h.sum(1) > 0).astype(jnp.float32)
  return out


def evaluate(score_fn: Callable, split: Split, *, stage: str = "test",
             ks: Sequence[int] = (10, 20), batch_users: int = 1024) -> dict:
  """Mean and per-user Recall/NDCG/HR at each K for `stage` ("valid" or "test").

  score_fn(users (B,) int32) -> (B, n_items) scores. Users without target
  items in the stage are skipped. Batches are padded to `batch_users` so one
  compiled program serves every batch.
  """
  if stage not in ("valid", "test"):
    raise unknown("evaluation stage", stage, ("valid", "test"))
  ks = tuple(sorted(int(k) for k in ks))
  if not ks or ks[0] < 1 or ks[-1] > split.n_items:
    raise LegoError(f"evaluation ks {list(ks)} must lie in 1..{split.n_items} (the item count)")
  target_pairs = split.test if stage == "test" else split.valid
  seen_pairs = np.concatenate([split.train, split.valid]) if stage == "test" else split.train
  users = np.unique(np.asarray(target_pairs)[:, 0]).astype(np.int32)
  per_user = {f"{m}@{k}": [] for k in ks for m in METRICS}
  if len(users):
    seen = padded_lists(seen_pairs, users, split.n_items)
    targets = padded_lists(target_pairs, users, split.n_items)
    bsz = min(batch_users, len(users))
    for start in range(0, len(users), bsz):
      sl = slice(start, start + bsz)
      n = len(users[sl])
      pad = lambda a: np.concatenate([a, np.repeat(a[:1], bsz - n, 0)]) if n < bsz else a
      scores = score_fn(jnp.asarray(pad(users[sl])))
      out = batch_metrics(scores, jnp.asarray(pad(seen[sl])), jnp.asarray(pad(targets[sl])), ks)
      for name, v in out.items():
        per_user[name].append(sharding.to_host(v)[:n])
  per_user = {m: np.concatenate(v) if v else np.zeros(0, np.float32) for m, v in per_user.items()}
  result = {m: float(v.mean()) if len(v) else float("nan") for m, v in per_user.items()}
  result["per_user"] = per_user
  result["users"] = users
  return result


def popularity_scores(split: Split) -> np.ndarray:
  """Each item's training interaction count, as float32 scores (n_items,)."""
  return np.bincount(np.asarray(split.train)[:, 1], minlength=split.n_items).astype(np.float32)


def popularity_score_fn(split: Split) -> Callable:
  """A score_fn ranking every user's items by training popularity."""
  pop = jnp.asarray(popularity_scores(split))
  return lambda users: jnp.broadcast_to(pop, (users.shape[0], pop.shape[0]))


def group_means(per_user_metric: np.ndarray, users: np.ndarray, codes: np.ndarray,
                classes: Sequence[str]) -> dict:
  """{class name: mean of the metric over evaluated users of that class} (NaN if none).

  `codes` is the attribute's (n_users,) code array; users with a missing code
  (negative) are left out.
  """
  values = np.asarray(per_user_metric)
  user_codes = np.asarray(codes)[np.asarray(users)]
  out = {}
  for c, name in enumerate(classes):
    sel = user_codes == c
    out[name] = float(values[sel].mean()) if sel.any() else float("nan")
  return out
