"""What the ranking regulariser preserves: each user's original top-T list."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lego_jax.data.dataset import Split
from lego_jax.evaluation.ranking import padded_lists


@functools.partial(jax.jit, static_argnames=("t",))
def _masked_top(scores, seen, t: int):
  rows = jnp.arange(scores.shape[0])[:, None]
  return jax.lax.top_k(scores.at[rows, seen].set(-jnp.inf, mode="drop"), t)[1]


def top_unseen(score_fn, split: Split, t: int = 20, batch_users: int = 1024) -> np.ndarray:
  """(n_users, t) int32: every user's t best items outside their training set, best first.

  score_fn(users (B,)) -> (B, n_items) is the original model.
  """
  users = np.arange(split.n_users, dtype=np.int32)
  seen = padded_lists(split.train, users, split.n_items)
  out = []
  for s in range(0, split.n_users, batch_users):
    u = users[s:s + batch_users]
    out.append(np.asarray(_masked_top(score_fn(jnp.asarray(u)), jnp.asarray(seen[u]), t)))
  return np.concatenate(out).astype(np.int32)


def score_scale(score_fn, topk, batch_users: int = 1024) -> float:
  """Std of the original scores over the top-T lists: the hinge's unit.

  Backbones score on different scales (dot products, logits); measuring the
  margin in this unit lets one `lam_rank` serve them all.
  """
  n = topk.shape[0]
  users = np.arange(min(n, batch_users), dtype=np.int32)
  return float(jnp.std(score_fn(jnp.asarray(users), jnp.asarray(topk[users]))))
