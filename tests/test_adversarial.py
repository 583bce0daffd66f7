"""In-training adversarial heads: gradient reversal, training, effect on leakage."""

import copy
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax import config as config_lib
from lego_jax import models, training
from lego_jax.data.load import load_dataset
from lego_jax.data.split import split_dataset
from lego_jax.errors import LegoError
from lego_jax.evaluation.attackers import attack
from lego_jax.unlearning import adversarial

EPOCHS = 20


@functools.lru_cache(maxsize=1)
def planted():
  """The built-in synthetic data at a tiny size: gender shapes the users' taste."""
  ds = load_dataset("synthetic", synthetic_users=300, synthetic_items=200,
                    synthetic_density=0.05, seed=0)
  split = split_dataset(ds, "random", (0.8, 0.1, 0.1), seed=0)
  names = ds.attribute_names
  labels = np.stack([ds.attributes[n].codes for n in names])
  return split, labels, [ds.attributes[n].num_classes for n in names], names


def tiny_config(epochs=EPOCHS):
  cfg = copy.deepcopy(config_lib.DEFAULTS)
  cfg["model"].update(name="mf", dim=16)
  # Evaluate only at the end, so the returned params are the last epoch's.
  cfg["train"].update(epochs=epochs, batch_size=256, lr=0.01, patience=100, eval_every=epochs)
  cfg["eval"]["batch_users"] = 128
  return cfg


def mf(cfg):
  return models.get("mf", cfg["model"], cfg["train"])


class TestReverseGradient(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_identity_forward_negated_scaled_backward(self):
    x = jnp.array([[0.5, -1.0, 2.0]])
    f = lambda v: jnp.sum(jnp.sin(v) * v)
    rev = self.variant(jax.grad(lambda v: f(adversarial.reverse_gradient(v, 3.0))))
    np.testing.assert_allclose(adversarial.reverse_gradient(x, 3.0), x)
    np.testing.assert_allclose(rev(x), -3.0 * jax.grad(f)(x), rtol=1e-6)


@pytest.mark.slow
def test_reversal_flips_embedding_gradients_only():
  split, labels, classes, _ = planted()
  base = mf(tiny_config())
  weight = 2.0
  plain = adversarial.make(base, labels, classes, weight=0.0)
  adv = adversarial.make(base, labels, classes, weight=weight)
  params = adv.init(jax.random.PRNGKey(0), split.n_users, split.n_items)
  users = jnp.asarray(split.train[:64, 0])
  pos = jnp.asarray(split.train[:64, 1])
  neg = jnp.zeros((64, 1), jnp.int32)
  g0 = jax.jit(jax.grad(plain.loss))(params, None, users, pos, neg)
  gw = jax.jit(jax.grad(adv.loss))(params, None, users, pos, neg)
  # The heads minimise their cross-entropy whatever the weight; items do not see the heads.
  chex.assert_trees_all_close(g0["heads"], gw["heads"], rtol=1e-6)
  np.testing.assert_allclose(g0["base"]["item"], gw["base"]["item"], rtol=1e-6)

  def head_ce(table):
    return jnp.sum(adversarial.head_losses(params["heads"], table[users],
                                           jnp.asarray(labels)[:, users]))

  ce_grad = jax.jit(jax.grad(head_ce))(params["base"]["user"])
  assert float(jnp.abs(ce_grad).max()) > 1e-4
  # Weight 0 stops the heads' gradient at the table; weight w sends back -w times it.
  np.testing.assert_allclose(gw["base"]["user"] - g0["base"]["user"], -weight * ce_grad,
                             atol=1e-6)


@pytest.mark.slow
def test_wrapper_delegates_to_base_and_trains():
  split, labels, classes, _ = planted()
  cfg = tiny_config(epochs=3)
  base = mf(cfg)
  model = adversarial.make(base, labels, classes, weight=1.0, hidden=8)
  assert model.name == "adversarial-mf"
  res = training.train(model, split, cfg, progress=False)
  assert len(res.history) == 3 and all(np.isfinite(h["loss"]) for h in res.history)
  assert len(res.params["heads"]) == len(classes)
  chex.assert_shape(res.params["heads"][2]["w2"], (8, classes[2]))
  users = jnp.arange(5)
  np.testing.assert_array_equal(model.score(res.params, res.aux, users),
                                base.score(res.params["base"], res.aux, users))
  table = model.user_table(res.params)
  chex.assert_shape(table, (split.n_users, 16))
  swapped = model.with_user_table(res.params, jnp.zeros_like(table))
  assert float(jnp.abs(model.user_table(swapped)).max()) == 0.0
  assert swapped["heads"] is res.params["heads"]


@functools.lru_cache(maxsize=None)
def _train(weight, objective="reverse"):
  """MF trained against a gender head (weight 0: the heads only watch; both
  objectives then train the same params, so one run serves both)."""
  split, labels, classes, _ = planted()
  cfg = tiny_config()
  base = mf(cfg)
  model = adversarial.make(base, labels[:1], classes[:1], weight=weight, objective=objective)
  res = training.train(model, split, cfg, progress=False)
  return base, res.params, labels[:1], classes[:1]


@pytest.mark.slow
def test_weight_zero_trains_the_backbone_as_without_heads():
  split, _, _, _ = planted()
  base, params, _, _ = _train(0.0)
  alone = training.train(base, split, tiny_config(), progress=False)
  chex.assert_trees_all_close(params["base"], alone.params, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_reversal_raises_the_heads_cross_entropy():
  base, p0, y, _ = _train(0.0)
  _, p1, _, _ = _train(1.0, "reverse")
  ce0 = float(adversarial.adversary_losses(base, p0, y)[0])
  ce1 = float(adversarial.adversary_losses(base, p1, y)[0])
  assert ce1 > ce0 + 0.05, (ce0, ce1)


@pytest.mark.slow
def test_confusion_lowers_linear_leakage():
  base, p0, y, c = _train(0.0)
  _, p1, _, _ = _train(1.0, "confusion")
  leak = [attack(np.asarray(base.user_table(p["base"])), y, c, attacker="linear",
                 names=["gender"], seed=0)["gender"]["leakage"] for p in (p0, p1)]
  assert leak[0] > 0.1 and leak[1] < leak[0] - 0.08, leak


def test_bad_arguments_raise_lego_error():
  split, labels, classes, _ = planted()
  base = mf(tiny_config())
  with pytest.raises(LegoError, match="objective"):
    adversarial.make(base, labels, classes, objective="nope")
  with pytest.raises(LegoError, match="class counts"):
    adversarial.make(base, labels, classes[:2])
  with pytest.raises(LegoError, match=r"-1\.\.1"):
    adversarial.make(base, np.full((1, 10), 2), [2])
  with pytest.raises(LegoError, match="weight"):
    adversarial.make(base, labels, classes, weight=-1.0)
  model = adversarial.make(base, labels[:, :10], classes)
  with pytest.raises(LegoError, match="300"):
    model.init(jax.random.PRNGKey(0), split.n_users, split.n_items)
