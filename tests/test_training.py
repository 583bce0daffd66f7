"""Training: loss decreases, jit epoch equals unjitted, resume equals uninterrupted."""

import copy
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax import config as config_lib
from lego_jax import models, training
from lego_jax.data.dataset import Split
from lego_jax.errors import LegoError


def tiny_split(seed=0, n_users=40, n_items=50):
  # Two taste groups, so there is structure to learn.
  rng = np.random.default_rng(seed)
  pairs = []
  for u in range(n_users):
    pool = np.arange(n_items // 2) + (n_items // 2) * (u % 2)
    pairs += [(u, i) for i in rng.choice(pool, size=10, replace=False)]
  pairs = np.array(pairs, np.int32)
  fold = rng.choice(3, size=len(pairs), p=[0.7, 0.15, 0.15])
  return Split(pairs[fold == 0], pairs[fold == 1], pairs[fold == 2], n_users, n_items, "tiny")


def tiny_config(name, **train):
  cfg = copy.deepcopy(config_lib.DEFAULTS)
  cfg["model"].update(name=name, dim=8, mlp_layers=[16, 8])
  cfg["train"].update(epochs=5, batch_size=64, lr=0.02, patience=100, negatives=2)
  cfg["train"].update(train)
  cfg["eval"]["batch_users"] = 16
  return cfg


@functools.cache
def tiny_model(name):
  # One model object per backbone, so `train`'s compile cache is shared across tests.
  cfg = tiny_config(name)
  return models.get(name, cfg["model"], cfg["train"])


def build(name, **train):
  return tiny_model(name), tiny_config(name, **train)


@pytest.mark.slow
@pytest.mark.parametrize("name", models.NAMES)
def test_loss_decreases(name):
  model, cfg = build(name)
  res = training.train(model, tiny_split(), cfg, progress=False)
  losses = [h["loss"] for h in res.history]
  assert len(losses) == 5
  assert losses[-1] < 0.9 * losses[0]
  assert all("ndcg@10" in h for h in res.history)
  best = max(res.history, key=lambda h: h["ndcg@10"])
  assert res.best_epoch == best["epoch"]


# NCF is left out only for time: op-by-op execution compiles every primitive
# of its flax tower separately (~30 s on 2 cores); its scan is the same code.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["mf", "lightgcn"])
def test_jit_epoch_equals_unjitted_steps(name):
  model, cfg = build(name, batch_size=32)
  split = tiny_split()
  opt = training.make_optimizer(cfg["train"])
  sizes = dict(n_items=split.n_items, batch_size=32, negatives=2)
  params = model.init(jax.random.PRNGKey(0), split.n_users, split.n_items)
  opt_state = opt.init(params)
  aux = model.build_aux(split.train, split.n_users, split.n_items)
  pairs, key = jnp.asarray(split.train), jax.random.PRNGKey(3)
  jitted = jax.jit(training.make_epoch(model, opt, **sizes))(params, opt_state, aux, pairs, key)
  batches, negs = training.epoch_batches(key, pairs, **sizes)
  step = training.make_step(model, opt)
  losses = []
  with jax.disable_jit():
    for b, n in zip(batches, negs):
      params, opt_state, loss = step(params, opt_state, aux, b, n)
      losses.append(loss)
  chex.assert_trees_all_close(jitted, (params, opt_state, np.mean(losses)), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mf", "lightgcn"])
def test_resume_equals_uninterrupted(name, tmp_path):
  model, cfg = build(name, epochs=5, eval_every=2)
  split = tiny_split()
  full = training.train(model, split, cfg, progress=False)
  ck = tmp_path / "backbone"
  part = training.train(model, split, cfg, ckpt_dir=ck, progress=False, max_epochs_this_call=2)
  assert len(part.history) == 2
  resumed = training.train(model, split, cfg, ckpt_dir=ck, progress=False)
  chex.assert_trees_all_close(resumed.params, full.params, rtol=1e-6, atol=1e-7)
  assert [h["loss"] for h in resumed.history] == pytest.approx([h["loss"] for h in full.history])
  assert resumed.best_epoch == full.best_epoch
  # A finished run is returned from its checkpoint without training again.
  again = training.train(model, split, cfg, ckpt_dir=ck, progress=False)
  chex.assert_trees_all_equal(again.params, resumed.params)
  assert len(again.history) == 5


def test_early_stopping_and_mismatch(tmp_path):
  model, cfg = build("mf", epochs=30, lr=0.02, patience=2)
  split = tiny_split()
  ck = tmp_path / "backbone"
  res = training.train(model, split, cfg, ckpt_dir=ck, progress=False)
  assert len(res.history) < 30
  assert len(res.history) - res.best_epoch == 2
  other, cfg2 = build("lightgcn")
  with pytest.raises(LegoError, match="backbone='mf'"):
    training.train(other, split, cfg2, ckpt_dir=ck, progress=False)


def test_bad_metric():
  model, cfg = build("mf", metric="auc@5")
  with pytest.raises(LegoError, match="train.metric"):
    training.train(model, tiny_split(), cfg, progress=False)


def test_negatives_avoid_positives():
  split = tiny_split()  # every user trains on ~7 of the 25 items in its half
  pos = training.positive_keys(split.train, split.n_users, split.n_items)
  users = jnp.asarray(split.train[:, 0])
  neg = training.sample_negatives(jax.random.PRNGKey(0), users, (len(users), 8), split.n_items,
                                  jnp.asarray(pos))
  chex.assert_shape(neg, (len(users), 8))
  keys = np.asarray(users)[:, None] * split.n_items + np.asarray(neg)
  assert np.isin(keys, pos).mean() < 0.001
  assert 0 <= int(neg.min()) and int(neg.max()) < split.n_items
