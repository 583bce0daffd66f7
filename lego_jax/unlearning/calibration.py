"""Embedding Calibration: one attribute's brick, vmapped over attributes.

`calibrate_one` is a pure function of one attribute's labels and
hyper-parameters: it runs `steps` optimiser steps (a `lax.scan`) from the
original table E0 and returns the calibrated table's offset D = E - E0 (a
"brick"). `calibrate` `jax.vmap`s it over the attribute axis, so K attributes
are one compiled program; per-attribute hyper-parameters are arrays on that
axis. The scan runs in chunks so a caller can checkpoint between them and an
interrupted calibration resumes where it stopped.
"""

import dataclasses
import functools
import itertools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import optax

from lego_jax import nn
from lego_jax.errors import LegoError, unknown
from lego_jax.unlearning import calibrators, losses

LOSSES = ("mmd", "d2d", "adversarial", "vclub")
LINEAR_SCOPES = ("batch", "population")
PROJECTIONS = ("none", "ball")
UNITS = ("parts", "coordinates", "none")
BALLS = ("row", "table")
ADV_HIDDEN = 64


@dataclasses.dataclass(frozen=True)
class Spec:
  """The static part of calibration (hashable: it selects the compiled program)."""
  num_classes: int            # classes padded to the largest attribute's count
  steps: int = 100
  batch_users: int = 1024     # class-stratified minibatch; 0 = all users
  loss: str = "mmd"
  calibrator: str = "table"
  stop: str = "null"          # null: no MI gradient once the MI estimate is at its permuted-label level
  margin: float = 0.05
  guard: int = 0              # items after the top-T that must stay below it (see losses.rank_hinge)
  chunk: int = 0              # steps per compiled chunk (0 = all at once)
  bandwidths: tuple = losses.BANDWIDTH_EXPONENTS  # RBF bandwidths beta * 2^j
  linear_kernel: bool = True  # also a linear kernel (class means), hinged on its own
  linear_scope: str = "batch"  # the linear kernel on the minibatch | on every user (O(n D))
  centre: bool = True         # RBF kernels on class-centred rows (shape only; see losses)
  units: str = "parts"        # what the MI estimate measures each coordinate in (see `units`)
  parts: tuple = ()           # widths of the user table's parts (the backbone's user_parts)
  part_kernels: bool = True   # the kernels on each part as well (tables of two or more parts)
  estimator: str = "kernel"   # kernel (B x B matrices) | features (random Fourier features)
  features: int = 512         # random features per bandwidth
  marginal_features: int = 0   # the additive per-coordinate kernel's features (0 = none)
  interaction: bool = False   # linear kernels on the rows scaled by their norms (see `mi`)
  hinge: str = "kernel"       # each kernel stopped at its own null | "sum" of kernels
  null_perms: int = 1         # permutations averaged for the null level
  projection: str = "none"    # ball: after every step, back onto the L2 ball around E0
  epsilon: float = 0.5        # the ball's radius, in units of a typical row's spread (see radius)
  ball: str = "row"           # the ball per user row | over the whole table
  vclub_hidden: int = 64      # hidden units of the vCLUB classifier q(a|e)
  vclub_lr: float = 1e-2      # its Adam learning rate (it reads rows in spread units)
  rank: bool = True           # the ranking hinge is computed (False: every lam_rank is 0)

  def __post_init__(self):
    if self.loss not in LOSSES:
      raise unknown("unlearning loss", self.loss, LOSSES)
    if self.stop not in losses.STOPS:
      raise unknown("stopping rule", self.stop, losses.STOPS)
    if self.estimator not in losses.ESTIMATORS:
      raise unknown("MI estimator", self.estimator, losses.ESTIMATORS)
    if self.hinge not in losses.HINGES:
      raise unknown("hinge", self.hinge, losses.HINGES)
    if self.linear_scope not in LINEAR_SCOPES:
      raise unknown("linear kernel scope", self.linear_scope, LINEAR_SCOPES)
    if self.units not in UNITS:
      raise unknown("unit", self.units, UNITS)
    if self.projection not in PROJECTIONS:
      raise unknown("projection", self.projection, PROJECTIONS)
    if self.ball not in BALLS:
      raise unknown("ball", self.ball, BALLS)
    if self.projection == "ball" and self.calibrator != "table":
      raise LegoError("unlearn.projection = \"ball\" projects a free table; it needs "
                      f"unlearn.calibrator = \"table\", not {self.calibrator!r}")
    if self.projection == "ball" and not self.epsilon > 0:
      raise LegoError(f"unlearn.epsilon must be > 0, got {self.epsilon}")
    calibrators.get(self.calibrator)
    if not (self.linear_kernel or self.bandwidths) and self.loss in losses.MI_LOSSES:
      raise LegoError("the MI estimate needs a kernel: set unlearn.linear_kernel = true "
                      "or give unlearn.bandwidths")
    if self.steps < 0:
      raise LegoError(f"unlearn.steps must be >= 0, got {self.steps}")

  @classmethod
  def from_config(cls, cfg: dict, num_classes: int, chunk: int = 0, parts=()) -> "Spec":
    """From config["unlearn"], whose fields have the same names; `parts` from the backbone."""
    fields = {f.name for f in dataclasses.fields(cls)} - {"num_classes", "chunk", "parts", "rank"}
    kw = {f: cfg[f] for f in fields}
    kw["bandwidths"] = tuple(kw["bandwidths"])
    # A weight of 0 everywhere skips the frozen backbone's scores of the top-T
    # lists: most of a step's cost on LightGCN, for a term that counts nothing.
    per = cfg.get("per_attribute", {}).values()
    weights = [cfg["lam_rank"], *(p.get("lam_rank", 0.0) for p in per)]
    return cls(num_classes=num_classes, chunk=chunk, parts=tuple(parts),
               rank=any(float(w) > 0 for w in weights), **kw)

  def mi(self, key, table, users, labels, units=None, e0=None):
    """MI estimate, null level and penalised excess (see `losses`) per attribute.

    `labels` (A, n) in `table` (n, D), estimated on the rows `users`, with
    each coordinate divided by `units` (D,) where given (see `units`); with
    `linear_scope="population"` the linear kernel (the class means) is
    measured on every row instead. It needs only the class means, so that
    costs O(n D), and its null level falls with n: the batch's null is high
    enough to stop while a probe trained on thousands of users still reads
    the class means.

    With `interaction`, two more linear kernels compare the class means of
    the centred rows scaled by each row's standardised norm: its own, and
    that of the row the calibration started from (`e0`; without it, its own
    twice). A class shift that is the same for every user removes a signal
    that grows with the row's norm on average only: light users are moved
    past chance, heavy ones not far enough, and the class means per norm
    range differ while the overall ones agree (ML-1M MF: docs/findings.md,
    session 17). Trees and nearest neighbours read that.

    With `part_kernels`, on a table of two or more parts (`parts`: NCF's GMF
    and MLP towers) each part's rows get the same kernels again, on their
    own. On the whole row one part's excess can be paid for by another
    part's deficit: ML-1M NCF's gender brick took the MLP tower below its
    permuted-label level and left the GMF tower's signal, which trees on the
    whole table read at +0.100 and on the GMF half at +0.104; measured part
    by part, +0.015 and +0.027 (docs/findings.md, session 23).
    """
    if units is not None:
      table = table / units
      e0 = None if e0 is None else e0 / units
    e, ys = table[users], labels[:, users]
    ms = (ys >= 0).astype(e.dtype)
    population = self.linear_kernel and self.linear_scope == "population"
    kw = dict(num_classes=self.num_classes, loss=self.loss, n_null=self.null_perms)
    estimates = []
    if population:
      key, k_pop = jax.random.split(key)
      estimates.append(losses.mi_estimate(k_pop, table, labels, (labels >= 0).astype(table.dtype),
                                          estimator="features", exponents=(), linear=True, **kw))
    if self.bandwidths or (self.linear_kernel and not population):
      estimates.append(losses.mi_estimate(
          key, e, ys, ms, estimator=self.estimator, exponents=self.bandwidths,
          linear=self.linear_kernel and not population, centre=self.centre,
          n_features=self.features, marginal=self.marginal_features, **kw))
      if self.part_kernels and len(self.parts) > 1:
        edges = [0, *itertools.accumulate(self.parts)]
        for lo, hi in zip(edges[:-1], edges[1:]):
          key, k_part = jax.random.split(key)
          estimates.append(losses.mi_estimate(
              k_part, e[:, lo:hi], ys, ms, estimator=self.estimator, exponents=self.bandwidths,
              linear=self.linear_kernel and not population, centre=self.centre,
              n_features=self.features, **kw))
    if self.interaction:
      centred = e - jnp.mean(e, axis=0)
      for rows in (e if e0 is None else e0[users], e):
        norm = jax.lax.stop_gradient(jnp.linalg.norm(rows - jnp.mean(rows, axis=0), axis=-1))
        scaled = centred * ((norm - jnp.mean(norm)) / jnp.maximum(jnp.std(norm), 1e-12))[:, None]
        key, k_int = jax.random.split(key)
        estimates.append(losses.mi_estimate(k_int, scaled, ys, ms, estimator="features",
                                            exponents=(), linear=True, **kw))
    mi, null = (jnp.concatenate(x, -1) for x in zip(*estimates))
    return mi, null, losses.excess_mi(mi, null, self.stop, self.hinge)


class HParams(NamedTuple):
  """Per-attribute weights; each leaf a scalar (one attribute) or (K,) array."""
  w_mi: Any
  lam_rank: Any
  l2: Any
  lr: Any

  @classmethod
  def from_config(cls, cfg: dict, names: Sequence[Optional[str]]) -> "HParams":
    """(K,) arrays, one entry per name: `cfg["per_attribute"][name][field]` where
    set, else `cfg[field]` (a name of None takes the section's values)."""
    per = cfg.get("per_attribute", {})
    return cls(*(jnp.asarray([float(per.get(n, {}).get(f, cfg[f])) for n in names], jnp.float32)
                 for f in cls._fields))


class Target(NamedTuple):
  """What calibration needs of the trained model, shared by all attributes."""
  e0: jax.Array               # (n, D) original user table
  topk: jax.Array             # (n, T + guard) each user's original best unseen items, best first
  scale: jax.Array            # () spread of the original top-T scores: the hinge's unit


class State(NamedTuple):
  params: Any                 # the calibrator's params
  opt_state: Any
  adv: Any                    # auxiliary classifier (adversarial loss), else ()
  adv_opt: Any
  key: jax.Array
  step: jax.Array


class Trace(NamedTuple):
  """Per-step values (steps, A) for monitoring and the stopping rule's report."""
  mi: jax.Array               # the MI estimate of each attribute in the table
  null: jax.Array             # its permuted-label level
  rank: jax.Array             # (steps,) the ranking hinge


# `score_fn(table, users (B,), items (B, T)) -> (B, T)`: the frozen backbone
# scoring with a substituted user table.
ScoreFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def spread(e0) -> jax.Array:
  """The table's scale: root-mean-square deviation of a coordinate from its mean."""
  return jax.lax.stop_gradient(jnp.sqrt(jnp.mean(jnp.var(e0, axis=0))))


def units(e0, spec: Spec) -> Optional[jax.Array]:
  """(D,) what the MI estimate divides each coordinate by (`unlearn.units`), or
  None where it reads the table as it is (so that program stays unchanged).

  `parts`: each part of the user table (`Spec.parts`, e.g. NCF's GMF and MLP
  towers) by its own spread, so every part counts alike whatever its scale; a
  table of one part is left as it is. `coordinates`: each coordinate by its
  spread. `none`: 1. Attackers standardise their inputs, so a narrow part is
  as visible to them as a wide one; raw kernels are not: NCF's MLP-tower half
  spreads 3 times narrower than its GMF half, weighed a ninth as much in the
  kernels, and kept the gender signal the MLP attacker read
  (docs/findings.md).
  """
  d = e0.shape[-1]
  if spec.units == "coordinates":
    return jax.lax.stop_gradient(jnp.maximum(jnp.std(e0, axis=0), 1e-12))
  if spec.units == "none" or len(spec.parts) <= 1:
    return None
  if sum(spec.parts) != d:
    raise LegoError(f"the backbone's user table parts {spec.parts} do not add up to its "
                    f"width {d}")
  var = jnp.var(e0, axis=0)
  edges = [0, *itertools.accumulate(spec.parts)]
  out = jnp.concatenate([jnp.full((b - a,), jnp.sqrt(jnp.mean(var[a:b])))
                         for a, b in zip(edges[:-1], edges[1:])])
  return jax.lax.stop_gradient(jnp.maximum(out, 1e-12)).astype(e0.dtype)


def stratified_batch(key, y, size: int):
  """`size` users drawn systematically from a class-sorted random order.

  Every class appears in proportion to its size (so the batch marginal matches
  the population's) and each step sees different users. Returns indices and a
  mask of users with a label.
  """
  n = y.shape[0]
  k1, k2 = jax.random.split(key)
  valid = y >= 0
  n_valid = jnp.maximum(valid.sum(), 1)
  sort_key = jnp.where(valid, y, jnp.iinfo(jnp.int32).max // 2).astype(jnp.float32)
  order = jnp.argsort(sort_key + jax.random.uniform(k1, (n,)))
  pos = jnp.floor((jnp.arange(size) + jax.random.uniform(k2)) * n_valid / size).astype(jnp.int32)
  users = order[jnp.minimum(pos, n - 1)]
  return users, valid[users].astype(jnp.float32)


def radius(e0, spec: Spec) -> jax.Array:
  """The ball's radius: `epsilon` times the norm of a typical row's deviation
  (spread * sqrt(D)) per row, or times that of the whole table (spread *
  sqrt(n D)), so one epsilon allows the same RMS move per user on any
  backbone and in either ball."""
  n, d = e0.shape
  return spec.epsilon * spread(e0) * jnp.sqrt(float(d if spec.ball == "row" else n * d))


def project_ball(delta, r, ball: str = "row") -> jax.Array:
  """`delta` (n, D) = E - E0 scaled back onto the L2 ball of radius `r` where it
  lies outside: per row (`row`) or as one vector (`table`); inside, unchanged."""
  norm = (jnp.linalg.norm(delta, axis=-1, keepdims=True) if ball == "row"
          else jnp.linalg.norm(delta))
  return delta * jnp.minimum(1.0, r / jnp.maximum(norm, 1e-30))


def classifier_input(e, e0) -> jax.Array:
  """What q(a|e) reads: rows centred on E0's mean, in units of its spread, so
  one classifier learning rate serves tables of any scale."""
  return (e - jax.lax.stop_gradient(jnp.mean(e0, axis=0))) / spread(e0)


def init_classifiers(key, dim: int, num_classes: int, hidden: int, count: int):
  """`count` vCLUB classifiers, stacked on a leading axis."""
  return jax.vmap(lambda k: nn.init_head(k, dim, num_classes, hidden))(jax.random.split(key, count))


def classifier_step(heads, opt_state, z, ys, lr):
  """One maximum-likelihood Adam step of each stacked classifier on rows z (B, D)
  (held fixed) and its attribute's labels ys (A, B)."""
  z = jax.lax.stop_gradient(z)
  nll = lambda hs: jnp.sum(jax.vmap(lambda h, y: nn.cross_entropy(nn.head_logits(h, z), y))(hs, ys))
  updates, opt_state = optax.adam(lr).update(jax.grad(nll)(heads), opt_state, heads)
  return optax.apply_updates(heads, updates), opt_state


def vclub_bounds(heads, z, ys) -> jax.Array:
  """(A,): each attribute's batch vCLUB bound under its classifier (`losses.vclub`)."""
  hi = jax.lax.Precision.HIGHEST
  return jax.vmap(lambda h, y: losses.vclub(nn.head_logits(h, z, precision=hi), y,
                                            (y >= 0).astype(z.dtype)))(heads, ys)


def init_state(key, e0, spec: Spec, lr, n_attrs: int = 1) -> State:
  """`n_attrs`: attributes sharing the table (the joint baseline), one vCLUB
  classifier each."""
  cal = calibrators.get(spec.calibrator)
  k_cal, k_adv, key = jax.random.split(key, 3)
  params = cal.init(k_cal, e0)
  if spec.loss == "adversarial":
    adv = nn.init_head(k_adv, e0.shape[-1], spec.num_classes, ADV_HIDDEN, gain=1.0)
    adv_opt = optax.adam(1e-2).init(adv)
  elif spec.loss == "vclub":
    adv = init_classifiers(k_adv, e0.shape[-1], spec.num_classes, spec.vclub_hidden, n_attrs)
    adv_opt = optax.adam(spec.vclub_lr).init(adv)
  else:
    adv, adv_opt = (), ()
  return State(params, optax.adam(lr).init(params), adv, adv_opt, key, jnp.zeros((), jnp.int32))


def run_steps(state: State, y, hp: HParams, target: Target, *, spec: Spec, score_fn: ScoreFn,
              n_steps: int) -> tuple[State, Trace]:
  """`n_steps` optimiser steps; steps past `spec.steps` are no-ops.

  `y` is one attribute's labels (n,) or several (A, n) whose MI terms are
  summed in one table (the joint baseline); batches are stratified by the first.
  """
  cal = calibrators.get(spec.calibrator)
  e0, topk, scale = target
  ys = y if y.ndim == 2 else y[None]
  if spec.loss == "adversarial" and ys.shape[0] != 1:
    raise LegoError("the adversarial surrogate calibrates one attribute per table")
  n = e0.shape[0]
  full = spec.batch_users <= 0 or spec.batch_users >= n
  # lr and l2 are in units of the table's spread, so one setting moves a
  # table of any scale alike: LightGCN's rows spread 2.3 times wider than
  # MF's, and in absolute units its pull was 5 times stronger (docs/findings.md).
  s = spread(e0)
  u = units(e0, spec)
  tx = optax.adam(hp.lr * s)
  r = radius(e0, spec)

  def objective(params, users, k_mi, adv):
    table = cal.table(params, e0)
    e = table[users]
    yb = ys[:, users]
    mb = (yb >= 0).astype(e.dtype)
    if spec.loss == "adversarial":
      mi = losses.prior_kl(nn.head_logits(adv, e), yb[0], mb[0], spec.num_classes)[None]
      null = jnp.zeros_like(mi)
      mi_term = mi[0]
    elif spec.loss == "vclub":
      # The classifiers are held fixed here: this step only moves the table.
      mi = vclub_bounds(adv, classifier_input(e, e0), yb)
      null = jnp.zeros_like(mi)
      mi_term = jnp.sum(mi)
    else:
      # Pushing the estimate below its permuted-label level is the overshoot of §7.
      mi, null, excess = spec.mi(k_mi, table, users, ys, u, e0)
      mi, null = mi.sum(-1), null.sum(-1)
      mi_term = jnp.sum(excess)
    rank = (losses.rank_hinge(score_fn(table, users, topk[users]) / scale, spec.margin, spec.guard)
            if spec.rank else jnp.zeros((), e.dtype))
    pull = losses.l2_pull(e, e0[users])
    total = hp.w_mi * mi_term + hp.lam_rank * rank + hp.l2 / s ** 2 * pull
    return total, (e, Trace(mi, null, rank))

  def step(state: State, _):
    key, k_batch, k_mi = jax.random.split(state.key, 3)
    if full:
      users = jnp.arange(n)
    else:
      users, _ = stratified_batch(k_batch, ys[0], spec.batch_users)
    live = state.step < spec.steps
    adv, adv_opt = state.adv, state.adv_opt
    if spec.loss == "vclub":
      # vCLUB alternates: q first ascends the likelihood on the current rows,
      # then the table descends the bound under the updated, frozen q.
      z = classifier_input(cal.table(state.params, e0)[users], e0)
      new = classifier_step(adv, adv_opt, z, ys[:, users], spec.vclub_lr)
      adv, adv_opt = jax.tree.map(lambda a, b: jnp.where(live, a, b), new, (adv, adv_opt))
    grads, (e, trace) = jax.grad(objective, has_aux=True)(state.params, users, k_mi, adv)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree.map(lambda p, u: p + jnp.where(live, u, 0.0), state.params, updates)
    if spec.projection == "ball":
      params = project_ball(params, r, spec.ball)
    opt_state = jax.tree.map(lambda new, old: jnp.where(live, new, old), opt_state, state.opt_state)
    if spec.loss == "adversarial":
      e = jax.lax.stop_gradient(e)
      yb = ys[0, users]
      g_adv = jax.grad(lambda a: nn.cross_entropy(nn.head_logits(a, e), yb))(adv)
      upd, adv_opt = optax.adam(1e-2).update(g_adv, adv_opt, adv)
      adv = optax.apply_updates(adv, upd)
    return State(params, opt_state, adv, adv_opt, key, state.step + live.astype(jnp.int32)), trace

  return jax.lax.scan(step, state, None, length=n_steps)


def calibrate_one(target: Target, y, hp: HParams, key, *, spec: Spec, score_fn: ScoreFn):
  """One attribute, all steps: returns (brick (n, D), final State, Trace)."""
  e0 = target.e0
  state = init_state(key, e0, spec, hp.lr, y.shape[0] if y.ndim == 2 else 1)
  state, trace = run_steps(state, y, hp, target, spec=spec, score_fn=score_fn, n_steps=spec.steps)
  return brick(state, e0, spec), state, trace


# Compiled once per spec and backbone, for callers (benchmarks) that run one
# calibration directly: run eagerly it would re-trace and re-compile its scan
# on every call.
jit_calibrate_one = jax.jit(calibrate_one, static_argnames=("spec", "score_fn"))


def brick(state: State, e0, spec: Spec) -> jax.Array:
  return calibrators.get(spec.calibrator).table(state.params, e0) - e0


@functools.partial(jax.jit, static_argnames=("spec", "score_fn", "n_steps"))
def _chunk(states, labels, hps, target, *, spec, score_fn, n_steps):
  run = functools.partial(run_steps, spec=spec, score_fn=score_fn, n_steps=n_steps)
  return jax.vmap(run, in_axes=(0, 0, 0, None))(states, labels, hps, target)


@functools.partial(jax.jit, static_argnames=("spec", "n_attrs"))
def init_states(keys, e0, lrs, *, spec, n_attrs: int = 1):
  """Stacked initial states, one per attribute key (each table serving `n_attrs`)."""
  return jax.vmap(lambda k, lr: init_state(k, e0, spec, lr, n_attrs))(keys, lrs)


@functools.partial(jax.jit, static_argnames=("spec",))
def bricks(states, e0, *, spec):
  """The bricks (K, n, D) of stacked states."""
  return jax.vmap(lambda s: brick(s, e0, spec))(states)


def calibrate(target: Target, labels, hps: HParams, keys, *, spec: Spec, score_fn: ScoreFn,
              state: Optional[State] = None,
              on_chunk: Optional[Callable[[State], None]] = None,
              adjust: Optional[Callable[[State, HParams], HParams]] = None,
              ) -> tuple[jax.Array, State, Trace]:
  """All attributes at once: labels (K, n), hps leaves (K,), keys (K, 2). Labels
  (K, A, n) make each of the K tables serve A attributes at once (the joint
  baseline).

  Returns bricks (K, n, D), the final stacked State and the Trace of the last
  chunk (K, chunk). A `state` from an interrupted run continues it; `on_chunk`
  is called with the state after every chunk (to checkpoint it), then
  `adjust(state, hps)`, whose hyper-parameters the next chunks use (a
  controller's; same shapes, so nothing is recompiled).
  """
  labels = jnp.asarray(labels, jnp.int32)
  chex.assert_rank(labels, {2, 3})   # (K, n), or (K, A, n): A attributes in each table (joint)
  chex.assert_equal_shape_prefix([labels, keys], 1)
  chex.assert_axis_dimension(labels, -1, target.e0.shape[0])
  if state is None:
    state = init_states(keys, target.e0, hps.lr, spec=spec,
                        n_attrs=labels.shape[1] if labels.ndim == 3 else 1)
  chunk = spec.chunk if 0 < spec.chunk < spec.steps else max(spec.steps, 1)
  trace = None
  while trace is None or int(jnp.min(state.step)) < spec.steps:
    state, trace = _chunk(state, labels, hps, target, spec=spec, score_fn=score_fn, n_steps=chunk)
    if on_chunk is not None:
      on_chunk(state)
    if adjust is not None and int(jnp.min(state.step)) < spec.steps:
      hps = adjust(state, hps)
  return bricks(state, target.e0, spec=spec), state, trace
