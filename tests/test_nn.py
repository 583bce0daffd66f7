"""The classifier pieces shared by the attackers, the adversarial baseline and calibration."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lego_jax import nn
from lego_jax.errors import LegoError


def test_cross_entropy_is_the_mean_over_labelled_rows():
  logits = jnp.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0], [1.0, 0.0, 3.0]])
  y = jnp.array([0, 1, -1, 2])
  logp = np.log(np.exp(np.asarray(logits)) / np.exp(np.asarray(logits)).sum(1, keepdims=True))
  expected = -np.mean([logp[0, 0], logp[1, 1], logp[3, 2]])
  assert float(nn.cross_entropy(logits, y)) == pytest.approx(expected, rel=1e-6)
  # Weights replace the label mask: only rows 1 and 3, row 3 twice as much.
  weighted = nn.cross_entropy(logits, y, jnp.array([0.0, 1.0, 0.0, 2.0]))
  assert float(weighted) == pytest.approx(-(logp[1, 1] + 2 * logp[3, 2]) / 3, rel=1e-6)
  assert float(nn.cross_entropy(logits, jnp.full(4, -1))) == 0.0   # no label: 0, not NaN


def test_heads_have_the_requested_shapes_and_scales():
  key = jax.random.PRNGKey(0)
  linear = nn.init_head(key, 400, 3)
  assert set(linear) == {"w", "b"}
  assert float(jnp.std(linear["w"])) == pytest.approx((1 / 400) ** 0.5, rel=0.1)
  he, lecun = (nn.init_head(key, 400, 3, hidden=300, gain=g) for g in (2.0, 1.0))
  assert he["w1"].shape == (400, 300) and he["w2"].shape == (300, 3)
  assert float(jnp.std(he["w1"])) == pytest.approx((2 / 400) ** 0.5, rel=0.05)
  assert float(jnp.std(lecun["w1"])) == pytest.approx((1 / 400) ** 0.5, rel=0.05)
  x = jax.random.normal(key, (7, 400))
  assert nn.head_logits(he, x).shape == (7, 3)
  assert float(nn.weight_decay(linear)) == pytest.approx(float(jnp.sum(linear["w"] ** 2)))


def test_a_key_per_class_keeps_columns_when_classes_are_padded():
  key = jax.random.PRNGKey(3)
  small = nn.init_head(key, 5, 2, hidden=4, key_per_class=True)
  padded = nn.init_head(key, 5, 6, hidden=4, key_per_class=True)
  np.testing.assert_array_equal(small["w2"], padded["w2"][:, :2])
  shared = nn.init_head(key, 5, 6, hidden=4)
  assert not np.array_equal(nn.init_head(key, 5, 2, hidden=4)["w2"], shared["w2"][:, :2])


@pytest.mark.parametrize("labels,classes,kw,message", [
    ([[0, 1, 2]], [2], {}, "labels of attribute 0 must lie in -1..1"),
    ([[0, -2, 1]], [2], {"names": ["gender"]}, "labels of gender must lie in -1..1"),
    ([[0, 1]], [2, 3], {}, "1 label rows but 2 class counts"),
    ([[0, 1]], [2], {"n_users": 3}, r"labels must be \(attributes, 3 users\)"),
    ([[0, 0]], [1], {"min_classes": 2}, "attribute 0 needs at least 2 classes"),
    ([[0, 1], [1, 0]], [2, 2], {"names": ["a", "a"]}, "need 2 distinct attribute names"),
])
def test_bad_labels_are_refused_naming_the_caller(labels, classes, kw, message):
  with pytest.raises(LegoError, match=f"^who: {message}"):
    nn.check_labels(labels, classes, who="who", **kw)


def test_check_labels_takes_one_attribute_as_a_row():
  y, classes = nn.check_labels(np.array([0, -1, 1], np.int8), [2], who="x")
  assert y.shape == (1, 3) and y.dtype == np.int64 and classes == [2]
