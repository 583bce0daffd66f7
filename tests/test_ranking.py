"""Full-ranking metrics against a naive numpy computation."""

import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax.data.dataset import Split
from lego_jax.errors import LegoError
from lego_jax.evaluation import ranking


def tiny_split(seed=0, n_users=23, n_items=30):
  rng = np.random.default_rng(seed)
  pairs = []
  for u in range(n_users):
    items = rng.choice(n_items, size=rng.integers(3, 12), replace=False)
    pairs += [(u, i) for i in items]
  pairs = np.array(pairs, np.int32)
  fold = rng.choice(3, size=len(pairs), p=[0.6, 0.2, 0.2])
  # User 0 has no test items and must be skipped at the test stage.
  fold[(pairs[:, 0] == 0) & (fold == 2)] = 0
  return Split(pairs[fold == 0], pairs[fold == 1], pairs[fold == 2], n_users, n_items)


def naive(scores, split, stage, ks):
  target = split.test if stage == "test" else split.valid
  seen = np.concatenate([split.train, split.valid]) if stage == "test" else split.train
  users = np.unique(target[:, 0])
  out = {f"{m}@{k}": [] for k in ks for m in ("recall", "ndcg", "hr")}
  for u in users:
    s = scores[u].astype(np.float64).copy()
    s[seen[seen[:, 0] == u, 1]] = -np.inf
    truth = set(target[target[:, 0] == u, 1])
    ranked = np.argsort(-s, kind="stable")
    for k in ks:
      hits = np.array([i in truth for i in ranked[:k]], float)
      dcg = np.sum(hits / np.log2(np.arange(2, k + 2)))
      idcg = np.sum(1 / np.log2(np.arange(2, min(len(truth), k) + 2)))
      out[f"recall@{k}"].append(hits.sum() / len(truth))
      out[f"ndcg@{k}"].append(dcg / idcg)
      out[f"hr@{k}"].append(float(hits.sum() > 0))
  return users, {m: np.array(v) for m, v in out.items()}


@pytest.mark.parametrize("stage", ["valid", "test"])
@pytest.mark.parametrize("batch_users", [4, 1024])
def test_matches_naive(stage, batch_users):
  split = tiny_split()
  scores = np.random.default_rng(1).normal(size=(split.n_users, split.n_items)).astype(np.float32)
  res = ranking.evaluate(lambda u: jnp.asarray(scores)[u], split, stage=stage, ks=(3, 5),
                         batch_users=batch_users)
  users, want = naive(scores, split, stage, (3, 5))
  np.testing.assert_array_equal(res["users"], users)
  if stage == "test":
    assert 0 not in res["users"]
  for m, v in want.items():
    np.testing.assert_allclose(res["per_user"][m], v, rtol=1e-5, atol=1e-6)
    assert res[m] == pytest.approx(v.mean(), rel=1e-5)


def test_perfect_scores():
  split = tiny_split()
  scores = np.zeros((split.n_users, split.n_items), np.float32)
  scores[split.test[:, 0], split.test[:, 1]] = 1.0
  res = ranking.evaluate(lambda u: jnp.asarray(scores)[u], split, ks=(20,))
  assert res["ndcg@20"] == pytest.approx(1.0)
  assert res["recall@20"] == pytest.approx(1.0)
  assert res["hr@20"] == 1.0


def test_popularity_and_groups():
  split = tiny_split()
  pop = ranking.popularity_scores(split)
  np.testing.assert_array_equal(pop, np.bincount(split.train[:, 1], minlength=split.n_items))
  res = ranking.evaluate(ranking.popularity_score_fn(split), split, ks=(10,))
  assert 0 <= res["ndcg@10"] <= 1
  codes = np.arange(split.n_users) % 3 - 1  # -1 = missing
  groups = ranking.group_means(res["per_user"]["ndcg@10"], res["users"], codes, ("a", "b"))
  sel = codes[res["users"]] == 1
  assert groups["b"] == pytest.approx(res["per_user"]["ndcg@10"][sel].mean())
  assert set(groups) == {"a", "b"}


def test_bad_arguments():
  split = tiny_split()
  with pytest.raises(LegoError, match="valid: test, valid"):
    ranking.evaluate(lambda u: None, split, stage="train")
  with pytest.raises(LegoError, match="ks"):
    ranking.evaluate(lambda u: None, split, ks=(100,))
