"""Loss terms of the unlearning objective, as pure functions.

Attribute labels are int arrays with -1 where the label is missing; classes
are padded to a common count so that every attribute has the same shapes
(`num_classes` only enters through the label values). All losses take a batch
of user embeddings `e` (B, D) with their labels `y` (B,) and a validity mask
`m` (B,) in {0, 1}; a minibatch is just a smaller B.
"""

import functools

import jax
import jax.numpy as jnp

BANDWIDTH_EXPONENTS = (-2, -1, 0, 1, 2)

# Every product here runs in full float32. GPUs default to TF32 (10-bit
# mantissa) for float32 matmuls, and an MMD is a small difference of large
# kernel sums: under TF32 the estimate drowned in rounding noise, sat at its
# permuted-label level, and calibration removed almost nothing (ML-1M MF on an
# H200: gender leakage 0.21 after LEGO, against 0.007 on CPU).
mm = functools.partial(jnp.matmul, precision=jax.lax.Precision.HIGHEST)


def bandwidth(e: jax.Array, m: jax.Array) -> jax.Array:
  """beta = mean pairwise squared distance over the valid rows, as a constant.

  Held constant (stop-gradient) so the optimiser cannot shrink the loss by
  inflating the bandwidth.
  """
  wm = m / jnp.maximum(m.sum(), 1.0)
  centred = e - mm(wm, e)
  var = jnp.sum(wm * jnp.sum(centred * centred, axis=-1))
  # mean over distinct pairs of |e_i - e_j|^2 = 2 var * n / (n - 1)
  beta = 2.0 * var * m.sum() / jnp.maximum(m.sum() - 1.0, 1.0)
  return jax.lax.stop_gradient(jnp.maximum(beta, 1e-12))


def rbf_kernel(e: jax.Array, m: jax.Array, exponents=BANDWIDTH_EXPONENTS) -> jax.Array:
  """Sum of RBF kernels at bandwidths beta * 2^j (see `bandwidth`)."""
  return jnp.sum(kernels(e, m, exponents), axis=0)


def kernels(e: jax.Array, m: jax.Array, exponents=BANDWIDTH_EXPONENTS,
            linear: bool = False) -> jax.Array:
  """(J, B, B): the linear kernel e e^T / beta (if `linear`), then one RBF per bandwidth."""
  beta = bandwidth(e, m)
  sq = jnp.sum(e * e, axis=-1)
  gram = mm(e, e.T)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, 0.0)
  out = [gram / beta] if linear else []
  return jnp.stack(out + [jnp.exp(-d2 / (beta * 2.0 ** j)) for j in exponents])


def random_features(key, e: jax.Array, m: jax.Array, exponents=BANDWIDTH_EXPONENTS,
                    linear: bool = False, n_features: int = 512) -> list[jax.Array]:
  """Feature maps whose inner products approximate `kernels` (random Fourier features).

  With features an MMD costs O(n F D) instead of O(n^2 D), so the whole
  population fits in every step. Fresh frequencies are drawn from `key` each
  step, which keeps the estimate unbiased over steps.
  """
  beta = bandwidth(e, m)
  out = [e / jnp.sqrt(beta)] if linear else []
  freqs = frequencies(key, e.shape[-1], exponents, n_features, e.dtype)
  return out + [jnp.sqrt(2.0 / n_features) * jnp.cos(a) for a in angles(e, freqs, beta, exponents)]


def frequencies(key, d: int, exponents, n_features: int, dtype) -> list[tuple[jax.Array, jax.Array]]:
  """Per bandwidth, unit frequencies z (d, F) ~ N(0, 1) and phases b (F,) ~ U(0, 2 pi)."""
  keys = jax.random.split(key, 2 * len(exponents))
  return [(jax.random.normal(keys[2 * i], (d, n_features), dtype),
           jax.random.uniform(keys[2 * i + 1], (n_features,), dtype, 0.0, 2.0 * jnp.pi))
          for i in range(len(exponents))]


def angles(e, freqs, beta, exponents) -> list[jax.Array]:
  """Per bandwidth, the random features' angles e z / s + b (n, F) of rows at spread `beta`."""
  # exp(-d^2 / (beta 2^j)) = exp(-d^2 / (2 s^2)) with s^2 = beta 2^(j-1); z / s ~ N(0, 1/s^2)
  return [mm(e, z) / jnp.sqrt(beta * 2.0 ** (j - 1)) + b for (z, b), j in zip(freqs, exponents)]


def marginal_features(key, e: jax.Array, m: jax.Array, exponents=(0,),
                      n_features: int = 16) -> jax.Array:
  """(B, D J F) random Fourier features of an additive kernel: the mean over
  coordinates d of 1-D RBF kernels at bandwidths beta_d 2^j, with beta_d the
  coordinate's own mean pairwise squared distance (held constant). Its cost
  grows with B D J F, so the MI estimate uses one bandwidth (j = 0).

  Its MMD compares each coordinate's class-conditional distribution with the
  marginal one, which is what trees splitting on single coordinates read and
  what an RBF kernel on whole rows, dominated by the other D - 1
  coordinates, barely sees.
  """
  beta = jax.vmap(lambda col: bandwidth(col[:, None], m), in_axes=1)(e)   # (D,)
  d, j = e.shape[-1], len(exponents)
  # exp(-x^2 / (beta 2^j)) = exp(-x^2 / (2 s^2)) with s^2 = beta 2^(j-1); w ~ N(0, 1/s^2)
  s = jnp.sqrt(beta[:, None] * 2.0 ** (jnp.asarray(exponents, e.dtype)[None, :] - 1.0))
  k_w, k_b = jax.random.split(key)
  w = jax.random.normal(k_w, (d, j, n_features), e.dtype) / s[..., None]
  b = jax.random.uniform(k_b, (d, j, n_features), e.dtype, 0.0, 2.0 * jnp.pi)
  phi = jnp.cos(e[:, :, None, None] * w + b)
  return phi.reshape(e.shape[0], -1) * jnp.sqrt(2.0 / (n_features * d * j))


def class_weights(y: jax.Array, m: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Per-class sample weights W (C, B) (rows sum to 1 or 0) and class priors pi (C,)."""
  onehot = jax.nn.one_hot(y, num_classes) * m[:, None]        # (B, C); y = -1 -> zeros
  counts = onehot.sum(0)
  w = (onehot / jnp.maximum(counts, 1.0)).T
  return w, counts / jnp.maximum(counts.sum(), 1.0)


def quadratic_forms(k: jax.Array, v: jax.Array) -> jax.Array:
  """v K v^T for each kernel K of `k` (..., B, B), with v (R, B): (..., R, R).

  The kernels are stacked into one flat (J B, B) product: XLA's CPU batched
  matmul over a kernel axis was 5x slower, and this is most of a kernel MMD's
  cost.
  """
  kv = mm(k.reshape(-1, k.shape[-1]), v.T).reshape(*k.shape[:-1], v.shape[0])   # (..., B, R)
  return jnp.einsum("...br,sb->...sr", kv, v, precision=jax.lax.Precision.HIGHEST)


def mmd_mi(e, y, m, num_classes: int, kernel=None) -> jax.Array:
  """MI surrogate: sum_c pi_c MMD^2(class c, marginal) with a multi-bandwidth RBF.

  Zero exactly when every class-conditional distribution equals the marginal,
  which is the condition for zero mutual information. `kernel` (B, B), or a
  stack (J, B, B) giving one estimate per kernel.
  """
  k = rbf_kernel(e, m) if kernel is None else kernel
  w, pi = class_weights(y, m, num_classes)
  valid = jnp.sum(w, axis=1)                                  # 1 for present classes
  wm = m / jnp.maximum(m.sum(), 1.0)
  c = w.shape[0]
  p = quadratic_forms(k, jnp.concatenate([w, wm[None]]))
  within = jnp.diagonal(p[..., :c, :c], axis1=-2, axis2=-1)
  return jnp.sum(pi * valid * (within - 2.0 * p[..., :c, c] + p[..., c, c, None]), axis=-1)


def d2d_mi(e, y, m, num_classes: int, kernel=None) -> jax.Array:
  """PoT-AU's variant: sum over c >= 1 of MMD^2(class c, class 0)."""
  k = rbf_kernel(e, m) if kernel is None else kernel
  w, _ = class_weights(y, m, num_classes)
  valid = (jnp.sum(w, axis=1) > 0) & (jnp.sum(w[0]) > 0)
  p = quadratic_forms(k, w)
  within = jnp.diagonal(p, axis1=-2, axis2=-1)
  mmd = within - 2.0 * p[..., :, 0] + within[..., :1]
  return jnp.sum(jnp.where(valid.at[0].set(False), mmd, 0.0), axis=-1)


MI_LOSSES = {"mmd": mmd_mi, "d2d": d2d_mi}


def feature_mi(phi, y, m, num_classes: int, loss: str = "mmd") -> jax.Array:
  """`mmd_mi` or `d2d_mi` with the kernel given as features: k = phi phi^T.
  `m` marks the labelled rows (as `class_weights` counts them)."""
  w, pi = class_weights(y, m, num_classes)
  return means_mi(mm(w, phi), pi, jnp.sum(w, axis=1), loss)


def means_mi(means, pi, valid, loss: str = "mmd") -> jax.Array:
  """`feature_mi` from the class means of the features (C, F), the class
  priors pi and which classes are present (`valid`)."""
  if loss == "mmd":
    return jnp.sum(pi * valid * jnp.sum((means - mm(pi, means)) ** 2, axis=-1))
  gaps = jnp.sum((means - means[0]) ** 2, axis=-1) * valid * valid[0]
  return jnp.sum(gaps.at[0].set(0.0))


def centred_feature_mis(trig, freqs, beta, exponents, e, y, m, num_classes: int,
                        loss: str = "mmd") -> list[jax.Array]:
  """`feature_mi` of the random features of `class_centred(e, y, m)`, one per
  bandwidth, at the uncentred rows' `beta`.

  `trig` holds each bandwidth's [cos a | sin a] (n, 2F), a = e z / s + b,
  computed once for every labelling (each attribute and each null
  permutation): a row's centred feature is cos(a - t_c) = cos a cos t_c +
  sin a sin t_c, with t_c = (its class mean) z / s, so a labelling needs only
  its class sums of cos a and sin a and C x F cosines. On a CPU cosines are
  most of an MMD's cost (the polish's was 6 per row and feature).
  """
  w, pi = class_weights(y, m, num_classes)
  valid = jnp.sum(w, axis=1)
  centres = mm(w, e)                                           # (C, D)
  out = []
  for cs, (z, _), j in zip(trig, freqs, exponents):
    f = cs.shape[-1] // 2
    t = mm(centres, z) / jnp.sqrt(beta * 2.0 ** (j - 1))       # (C, F)
    sums = mm(w, cs)                                           # (C, 2F) class means
    means = jnp.sqrt(2.0 / f) * (sums[:, :f] * jnp.cos(t) + sums[:, f:] * jnp.sin(t))
    out.append(means_mi(means, pi, valid, loss))
  return out


ESTIMATORS = ("kernel", "features")


def class_centred(e, y, m, num_classes: int) -> jax.Array:
  """Each labelled row minus its class mean: what is left once location is removed.

  A loss of the centred rows cannot move any class mean: its gradient sums to
  zero over each class.
  """
  w, _ = class_weights(y, m, num_classes)
  return e - mm(jax.nn.one_hot(y, num_classes) * m[:, None], mm(w, e))


def mi_estimate(key, e, ys, ms, *, num_classes: int, loss: str = "mmd", estimator: str = "kernel",
                exponents=BANDWIDTH_EXPONENTS, linear: bool = False, centre: bool = False,
                n_features: int = 512, n_null: int = 1,
                marginal: int = 0) -> tuple[jax.Array, jax.Array]:
  """MI estimates of attributes `ys` (A, B) in embeddings `e` (B, D), per kernel.

  Returns (mi, null), each (A, J) with J the kernels (linear first if asked,
  then one RBF per bandwidth). `null` is the estimator's level on permuted
  labels, averaged over `n_null` permutations and held constant: what "no
  information" looks like at this batch size.

  With `centre` the RBF kernels compare the class-centred rows
  (`class_centred`): they measure differences in shape only, and the class
  means (what a linear probe reads) are left to the linear kernel alone, so
  pushing out a nonlinear signal cannot over-balance the means.

  With the features estimator the centred kernels take the uncentred rows'
  bandwidth for every labelling, so that one set of cosines serves them all
  (`centred_feature_mis`); the kernel estimator takes each labelling's
  centred rows'. They differ by the class means' share of the spread.

  `marginal` > 0 adds one more kernel, last: the additive kernel of
  `marginal_features` (that many features per coordinate, at each
  coordinate's own bandwidth), on the class-centred rows where `centre`.
  """
  k_feat, k_perm = jax.random.split(key)
  k_marg = jax.random.fold_in(key, 2)
  perms = jax.vmap(lambda k: jax.random.permutation(k, e.shape[0]))(
      jax.random.split(k_perm, n_null))
  ones = jnp.ones(e.shape[:1], e.dtype)
  if estimator == "kernel":
    mi_fn = MI_LOSSES[loss]
    shared = None if centre else kernels(e, ones, exponents, linear)

    def per_kernel(y, m):
      ks = shared
      if centre:
        ks = [kernels(e, ones, (), True)] if linear else []
        if exponents:
          ks.append(kernels(class_centred(e, y, m, num_classes), ones, exponents))
        ks = jnp.concatenate(ks)
      return mi_fn(e, y, m, num_classes, ks)
  elif not centre:
    phis = random_features(k_feat, e, ones, exponents, linear, n_features)

    def per_kernel(y, m):
      return jnp.stack([feature_mi(p, y, m, num_classes, loss) for p in phis])
  else:
    beta = bandwidth(e, ones)
    freqs = frequencies(k_feat, e.shape[-1], exponents, n_features, e.dtype)
    trig = [jnp.concatenate([jnp.cos(a), jnp.sin(a)], axis=-1)
            for a in angles(e, freqs, beta, exponents)]
    scaled = e / jnp.sqrt(beta)

    def per_kernel(y, m):
      mis = [feature_mi(scaled, y, m, num_classes, loss)] if linear else []
      mis += centred_feature_mis(trig, freqs, beta, exponents, e, y, m, num_classes, loss)
      return jnp.stack(mis)
  if marginal and exponents:
    joint = per_kernel

    def per_kernel(y, m):
      x = class_centred(e, y, m, num_classes) if centre else e
      phi = marginal_features(k_marg, x, ones, n_features=marginal)
      return jnp.concatenate([joint(y, m), feature_mi(phi, y, m, num_classes, loss)[None]])
  per_attr = jax.vmap(per_kernel)
  mi = per_attr(ys, ms)
  null = jnp.mean(jax.vmap(lambda p: per_attr(ys[:, p], ms[:, p]))(perms), axis=0)
  return mi, jax.lax.stop_gradient(null)


HINGES = ("kernel", "sum")
STOPS = ("null", "two-sided", "steps")


def excess_mi(mi, null, stop: str = "null", hinge: str = "kernel") -> jax.Array:
  """The MI estimate in units of its permuted-label (no-information) level, per attribute.

  `mi` and `null` are (..., J) over kernels; dividing by the null level makes
  the weight comparable across attributes, class counts and batch sizes.
  `stop` says what is penalised: "steps" the whole ratio; "null" only the
  excess above the null, so the optimiser stops pushing once the attribute is
  indistinguishable from noise; "two-sided" also a deficit below it. An
  estimate below its null means the classes are *more* alike than random
  labels would make them, which is how exact balancing shows up: held-out
  users then land on the other side and an attacker scores below chance
  (docs/findings.md). `hinge="kernel"` applies the rule to each kernel,
  `"sum"` to their sum.
  """
  if hinge == "sum":
    mi, null = jnp.sum(mi, axis=-1, keepdims=True), jnp.sum(null, axis=-1, keepdims=True)
  ratio = mi / jnp.maximum(null, 1e-12)
  if stop == "null":
    ratio = jax.nn.relu(ratio - 1.0)
  elif stop == "two-sided":
    ratio = jnp.abs(ratio - 1.0)
  return jnp.sum(ratio, axis=-1)


def prior_kl(logits, y, m, num_classes: int) -> jax.Array:
  """Adversarial surrogate: mean KL(prior || q(a|e)) over valid users.

  Driving the classifier's prediction to the class prior (not to a wrong
  class) is what keeps this surrogate from overshooting into a new leak.
  """
  _, pi = class_weights(y, m, num_classes)
  logq = jax.nn.log_softmax(logits, axis=-1)
  kl = jnp.sum(jnp.where(pi > 0, pi * (jnp.log(jnp.maximum(pi, 1e-12)) - logq), 0.0), axis=-1)
  return jnp.sum(kl * m) / jnp.maximum(m.sum(), 1.0)


def vclub(logits, y, m) -> jax.Array:
  """The batch vCLUB bound on I(e; a) (Cheng et al., 2020) under a classifier q(a|e).

    I_hat = (1/B) sum_i [log q(y_i|e_i) - (1/B) sum_j log q(y_j|e_i)]

  over the valid rows (m = 1). The inner mean over the batch's labels is a sum
  over classes weighted by their batch shares, so it costs O(B C), not O(B^2).
  With q near the true conditional it is an upper bound of the MI; when q can
  read nothing (it predicts the prior for everyone) it is 0. `logits` (B, C)
  from q, with C the padded class count; absent classes weigh nothing.
  """
  logq = jax.nn.log_softmax(logits, axis=-1)
  own = jnp.take_along_axis(logq, jnp.maximum(y, 0)[:, None], axis=-1)[:, 0]
  _, pi = class_weights(y, m, logits.shape[-1])
  others = mm(logq, pi)
  return jnp.sum(m * (own - others)) / jnp.maximum(m.sum(), 1.0)


def rank_hinge(scores: jax.Array, margin: float, guard: int = 0) -> jax.Array:
  """Ranking preservation: order flips in each user's original top-T list.

  scores (B, T + guard) are the current scores of the items that ranked
  1..T + guard under the original model. The first T must keep their order;
  the `guard` items after them (the next ones down the original ranking) must
  stay below the T-th. Most items that enter a calibrated user's top-10 come
  from just outside the original top-T (docs/findings.md), which adjacent pairs within
  it cannot see. Returns the mean hinge over users and pairs (PoT-AU summed
  it; the mean keeps the weight comparable across datasets).
  """
  t = scores.shape[1] - guard
  flips = jax.nn.relu(scores[:, 1:t] - scores[:, :t - 1] + margin)
  if guard:
    flips = jnp.concatenate([flips, jax.nn.relu(scores[:, t:] - scores[:, t - 1:t] + margin)], 1)
  return jnp.mean(flips)


def l2_pull(e, e0) -> jax.Array:
  return jnp.mean(jnp.sum((e - e0) ** 2, axis=-1))
