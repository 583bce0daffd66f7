"""Loss terms of the unlearning objective, as pure functions.

Attribute labels are int arrays with -1 where the label is missing; classes
are padded to a common count so that every attribute has the same shapes
(`num_classes` only enters through the label values). All losses take a batch
of user embeddings `e` (B, D) with their labels `y` (B,) and a validity mask
`m` (B,) in {0, 1}; a minibatch is just a smaller B.
"""

import jax
import jax.numpy as jnp

BANDWIDTH_EXPONENTS = (-2, -1, 0, 1, 2)


def rbf_kernel(e: jax.Array, m: jax.Array, exponents=BANDWIDTH_EXPONENTS) -> jax.Array:
  """Sum of RBF kernels at bandwidths beta * 2^j, beta = mean pairwise sq. distance.

  beta is computed over the valid rows and held constant (stop-gradient) so the
  optimiser cannot shrink the loss by inflating the bandwidth.
  """
  sq = jnp.sum(e * e, axis=-1)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * e @ e.T, 0.0)
  pair = m[:, None] * m[None, :]
  beta = jax.lax.stop_gradient(jnp.sum(d2 * pair) / jnp.maximum(jnp.sum(pair) - jnp.sum(m), 1.0))
  beta = jnp.maximum(beta, 1e-12)
  return sum(jnp.exp(-d2 / (beta * 2.0 ** j)) for j in exponents)


def class_weights(y: jax.Array, m: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Per-class sample weights W (C, B) (rows sum to 1 or 0) and class priors pi (C,)."""
  onehot = jax.nn.one_hot(y, num_classes) * m[:, None]        # (B, C); y = -1 -> zeros
  counts = onehot.sum(0)
  w = (onehot / jnp.maximum(counts, 1.0)).T
  return w, counts / jnp.maximum(counts.sum(), 1.0)


def mmd_mi(e, y, m, num_classes: int, kernel=None) -> jax.Array:
  """MI surrogate: sum_c pi_c MMD^2(class c, marginal) with a multi-bandwidth RBF.

  Zero exactly when every class-conditional distribution equals the marginal,
  which is the MI-zero condition of DESIGN.md §3.
  """
  k = rbf_kernel(e, m) if kernel is None else kernel
  w, pi = class_weights(y, m, num_classes)
  valid = jnp.sum(w, axis=1)                                  # 1 for present classes
  wm = m / jnp.maximum(m.sum(), 1.0)
  kw = w @ k                                                  # (C, B)
  within = jnp.sum(kw * w, axis=1)
  cross = kw @ wm
  marg = wm @ k @ wm
  return jnp.sum(pi * valid * (within - 2.0 * cross + marg))


def d2d_mi(e, y, m, num_classes: int, kernel=None) -> jax.Array:
  """PoT-AU's variant: sum over c >= 1 of MMD^2(class c, class 0)."""
  k = rbf_kernel(e, m) if kernel is None else kernel
  w, _ = class_weights(y, m, num_classes)
  valid = (jnp.sum(w, axis=1) > 0) & (jnp.sum(w[0]) > 0)
  kw = w @ k
  within = jnp.sum(kw * w, axis=1)
  cross = kw @ w[0]
  mmd = within - 2.0 * cross + within[0]
  return jnp.sum(jnp.where(valid.at[0].set(False), mmd, 0.0))


MI_LOSSES = {"mmd": mmd_mi, "d2d": d2d_mi}


def excess_mi(mi, null, stop_at_null: bool = True) -> jax.Array:
  """The MI estimate in units of its permuted-label (no-information) level.

  Dividing by the null level makes the weight comparable across attributes,
  class counts and batch sizes. With `stop_at_null` only the excess above the
  null is penalised, so the optimiser stops pushing once the attribute is
  indistinguishable from noise instead of overshooting below chance.
  """
  ratio = mi / jnp.maximum(null, 1e-12)
  return jax.nn.relu(ratio - 1.0) if stop_at_null else ratio


def prior_kl(logits, y, m, num_classes: int) -> jax.Array:
  """Adversarial surrogate: mean KL(prior || q(a|e)) over valid users.

  Driving the classifier's prediction to the class prior (not to a wrong
  class) is what keeps this surrogate from overshooting into a new leak.
  """
  _, pi = class_weights(y, m, num_classes)
  logq = jax.nn.log_softmax(logits, axis=-1)
  kl = jnp.sum(jnp.where(pi > 0, pi * (jnp.log(jnp.maximum(pi, 1e-12)) - logq), 0.0), axis=-1)
  return jnp.sum(kl * m) / jnp.maximum(m.sum(), 1.0)


def cross_entropy(logits, y, m) -> jax.Array:
  """The auxiliary classifier's own loss (masked)."""
  logq = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logq, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
  return jnp.sum(nll * m) / jnp.maximum(m.sum(), 1.0)


def rank_hinge(scores: jax.Array, margin: float) -> jax.Array:
  """Ranking preservation: order flips in each user's original top-T list.

  scores (B, T) are the current scores of the items that ranked 1..T under the
  original model. Returns the mean hinge over users and adjacent pairs (PoT-AU
  summed it; the mean keeps the weight comparable across datasets).
  """
  return jnp.mean(jax.nn.relu(scores[:, 1:] - scores[:, :-1] + margin))


def l2_pull(e, e0) -> jax.Array:
  return jnp.mean(jnp.sum((e - e0) ** 2, axis=-1))
