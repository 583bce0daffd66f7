"""Attribute-inference attackers: how much of each attribute the embeddings leak.

Per attribute, users with a missing label are dropped and classes are
down-sampled to the smallest class (seeded), so chance is 1/C and BAcc is
comparable across attributes. Each (attribute, fold) pair is one *task*; all
tasks are padded to common shapes (rows with a zero weight, classes with a
large negative logit) and trained by one `jax.vmap`-ed, jitted function, so
three attributes x five folds is a single compiled program.

On a large table each attribute's balanced set is a seeded sample of at
most `attack.max_users` users, equal per class (the sampled protocol): the
attackers' cost then stops growing with the users, and BAcc's standard
error at the default 20,000 (4,000 test users per fold) is about 0.008.

Leakage is |BAcc - chance|, two-sided: an attacker that is reliably *wrong*
has learned the attribute as well (docs/method.md, evaluation).

Budget: full-batch Adam for `steps` steps at lr 1e-2. Tuned on ML-1M-shaped
planted signals (6040 x 64; `benchmarks/bench_attack.py --grid`, whose
docstring has the table) and on 64-d SVD embeddings of the real ML-1M
interactions: 300 or 1000 steps never found more than 100 (at most +0.015
BAcc, within the fold interval), and found less on the real embeddings. The
MLP's L2 weight matters more: l2 = 1e-2 is the strongest MLP on a signal a
linear probe cannot see (real ML-1M gender after linear erasure: BAcc .687
at l2 = 1e-2, .627 at 1e-4, .526 at 1e-1; the linear probe .457), and close
to the linear probe on the real embeddings (gender .742 against .747), where
1e-4 overfits (.699). Hence attack.steps = 100 and attack.l2 = 1e-2.
"""

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lego_jax import config as config_lib, nn
from lego_jax.errors import LegoError, unknown
from lego_jax.evaluation import classification_metrics as cm

ATTACKERS = ("mlp", "linear", "knn", "quadratic")
KNN_K = 15   # neighbours of the knn attacker
PROTOCOLS = ("cv5", "paper")
_NEG = -1e9  # logit of a padded class: exp() is exactly 0, no inf - inf NaNs


class Tasks(NamedTuple):
  """Stacked (attribute, fold) tasks; rows index into the embedding matrix."""
  train_idx: np.ndarray   # (T, Ntr) int32
  train_y: np.ndarray     # (T, Ntr) int32
  train_w: np.ndarray     # (T, Ntr) float32, 1 on rows fitted, 0 on val / padding
  val_w: np.ndarray       # (T, Ntr) float32, 1 on the inner validation rows
  test_idx: np.ndarray    # (T, Nte) int32
  test_y: np.ndarray      # (T, Nte) int32
  test_w: np.ndarray      # (T, Nte) float32, 0 on padding
  class_mask: np.ndarray  # (T, Cmax) bool, True for the attribute's classes
  fold: np.ndarray        # (T,) int32, fold / split number
  attr: np.ndarray        # (T,) int32, attribute number


# --------------------------------------------------------------------------
# Balancing and splits (numpy, seeded)


def balance(codes: np.ndarray, rng: np.random.Generator, max_users: int = 0) -> np.ndarray:
  """Indices of a class-balanced subset: every present class down-sampled to
  the smallest present class, and to max_users // classes where max_users >
  0; missing labels (< 0) dropped. Sorted."""
  codes = np.asarray(codes)
  present = np.unique(codes[codes >= 0])
  if present.size == 0:
    return np.zeros(0, dtype=np.int64)
  groups = [np.flatnonzero(codes == c) for c in present]
  m = min(g.size for g in groups)
  if max_users > 0:
    m = min(m, max(max_users // present.size, 1))
  keep = [rng.choice(g, size=m, replace=False) for g in groups]
  return np.sort(np.concatenate(keep))


def stratified_kfold(y: np.ndarray, folds: int, rng: np.random.Generator):
  """[(train_pos, test_pos)] * folds; each class spread over folds round-robin
  after a shuffle, so fold sizes per class differ by at most one."""
  fold_of = np.empty(y.size, dtype=np.int64)
  for c in np.unique(y):
    pos = rng.permutation(np.flatnonzero(y == c))
    # Rotate the start so leftover rows do not all land in fold 0.
    fold_of[pos] = (np.arange(pos.size) + rng.integers(folds)) % folds
  return [(np.flatnonzero(fold_of != f), np.flatnonzero(fold_of == f))
          for f in range(folds)]


def stratified_splits(y: np.ndarray, n_splits: int, train_frac: float,
                      rng: np.random.Generator):
  """[(train_pos, test_pos)] * n_splits random stratified splits, with
  round(train_frac * n_c) training rows per class (at least one each side)."""
  out = []
  classes = np.unique(y)
  for _ in range(n_splits):
    train = []
    for c in classes:
      pos = np.flatnonzero(y == c)
      k = int(np.clip(round(train_frac * pos.size), 1, pos.size - 1))
      train.append(rng.choice(pos, size=k, replace=False))
    train = np.sort(np.concatenate(train))
    out.append((train, np.setdiff1d(np.arange(y.size), train)))
  return out


def inner_validation(y: np.ndarray, val_frac: float,
                     rng: np.random.Generator) -> np.ndarray:
  """A stratified boolean mask of round(val_frac * n_c) rows per class (kept
  below n_c), for early stopping inside a training fold."""
  val = np.zeros(y.size, dtype=bool)
  if val_frac <= 0:
    return val
  for c in np.unique(y):
    pos = np.flatnonzero(y == c)
    k = min(int(round(val_frac * pos.size)), pos.size - 1)
    val[rng.choice(pos, size=k, replace=False)] = True
  return val


def _config(attack_cfg: Optional[dict]):
  return config_lib.view("attack", attack_cfg or {})


def _check(embeddings, labels, num_classes, names, attacker, protocol):
  if attacker not in ATTACKERS:
    raise unknown("attacker", attacker, ATTACKERS)
  if protocol not in PROTOCOLS:
    raise unknown("attack protocol", protocol, PROTOCOLS)
  x = np.asarray(embeddings, dtype=np.float32)
  if x.ndim not in (2, 3):
    raise LegoError(f"attack: embeddings must be (users, dim) or (attributes, users, dim), "
                    f"got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise LegoError("attack: embeddings contain NaN or inf")
  if names is None:
    names = [f"attr{k}" for k in range(np.shape(labels)[0] if np.ndim(labels) > 1 else 1)]
  y, num_classes = nn.check_labels(labels, num_classes, who="attack", n_users=x.shape[-2],
                                   names=names)
  if x.ndim == 3 and x.shape[0] != y.shape[0]:
    raise LegoError(f"attack: {x.shape[0]} tables for {y.shape[0]} attributes")
  return x, y, num_classes, list(names)


def _attribute_tasks(codes, protocol, cfg, seed):
  """(balanced indices, [(train_rows, train_y, test_rows, test_y)]) for one
  attribute; a fresh rng per attribute keeps its result independent of
  which other attributes are attacked alongside it."""
  rng = np.random.default_rng(seed)
  idx = balance(codes, rng, int(cfg["max_users"]))
  y = codes[idx]
  if protocol == "cv5":
    splits = stratified_kfold(y, int(cfg["folds"]), rng)
  else:
    splits = stratified_splits(y, int(cfg["paper_splits"]),
                               float(cfg["paper_train_frac"]), rng)
  val_frac = float(cfg["val_frac"])
  return idx, [(idx[tr], y[tr], idx[te], y[te], inner_validation(y[tr], val_frac, rng))
               for tr, te in splits]


def _pad(rows: list[np.ndarray], width: int, dtype) -> np.ndarray:
  out = np.zeros((len(rows), width), dtype=dtype)
  for i, r in enumerate(rows):
    out[i, :r.size] = r
  return out


def _stack(per_task: list, cmax: int) -> Tasks:
  """per_task: [(attr, fold, present_classes, train_rows, train_y, test_rows,
  test_y, is_val)]."""
  ntr = max(t[3].size for t in per_task)
  nte = max(t[5].size for t in per_task)
  mask = np.zeros((len(per_task), cmax), dtype=bool)
  for i, t in enumerate(per_task):
    mask[i, t[2]] = True
  return Tasks(
      train_idx=_pad([t[3] for t in per_task], ntr, np.int32),
      train_y=_pad([t[4] for t in per_task], ntr, np.int32),
      train_w=_pad([~t[7] for t in per_task], ntr, np.float32),
      val_w=_pad([t[7] for t in per_task], ntr, np.float32),
      test_idx=_pad([t[5] for t in per_task], nte, np.int32),
      test_y=_pad([t[6] for t in per_task], nte, np.int32),
      test_w=_pad([np.ones(t[5].size) for t in per_task], nte, np.float32),
      class_mask=mask,
      fold=np.array([t[1] for t in per_task], dtype=np.int32),
      attr=np.array([t[0] for t in per_task], dtype=np.int32))


def make_tasks(labels, num_classes, protocol, cfg, seed, names):
  """All (attribute, fold) tasks as a flat list plus the balanced size per
  attribute. Raises LegoError where an attribute is too small to split."""
  cmax = max(num_classes)
  per_task, sizes = [], []
  need = int(cfg["folds"]) if protocol == "cv5" else 2
  for k, codes in enumerate(labels):
    present = np.unique(codes[codes >= 0])
    counts = [int((codes == c).sum()) for c in present]
    if present.size < 2 or min(counts) < need:
      raise LegoError(
          f"attack: attribute {names[k]} needs at least 2 classes with >= {need} "
          f"labelled users each for protocol {protocol}; class counts {counts}")
    idx, splits = _attribute_tasks(codes, protocol, cfg, seed)
    sizes.append(idx.size)
    for f, (trr, trl, ter, tel, val) in enumerate(splits):
      per_task.append((k, f, present, trr, trl, ter, tel, val))
  return per_task, sizes, cmax


# --------------------------------------------------------------------------
# The attacker (one task; vmapped over tasks)


class Settings(NamedTuple):
  """The training budget of an attacker; traced, so one compiled program serves any values."""
  l2: jax.Array      # weight of 0.5 * ||weights||^2 (biases not penalised)
  lr: jax.Array      # Adam learning rate (full batch)
  steps: jax.Array   # Adam steps

  @classmethod
  def from_config(cls, cfg) -> "Settings":
    return cls(jnp.float32(cfg["l2"]), jnp.float32(cfg["lr"]), jnp.int32(cfg["steps"]))


def _init(key, dim: int, cmax: int, hidden: int, attacker: str):
  if attacker == "linear":
    # Convex problem: zero init, the optimum does not depend on the key.
    return {"w": jnp.zeros((dim, cmax)), "b": jnp.zeros(cmax)}
  return nn.init_head(key, dim, cmax, hidden, key_per_class=True)


def _logits(params, x):
  # Full float32 products: TF32 on a GPU would make results device-dependent.
  return nn.head_logits(params, x, precision=jax.lax.Precision.HIGHEST)


def _standardise(x, task: Tasks):
  """(fitted rows, test rows) of x standardised by the fitted rows; a constant feature stays 0."""
  xtr, xte = x[task.train_idx], x[task.test_idx]
  w = task.train_w
  wsum = jnp.maximum(w.sum(), 1.0)
  mu = (w[:, None] * xtr).sum(0) / wsum
  sd = jnp.sqrt((w[:, None] * (xtr - mu) ** 2).sum(0) / wsum + 1e-12)
  sd = jnp.where(sd > 1e-6, sd, 1.0)
  return (xtr - mu) / sd, (xte - mu) / sd


def train_and_predict(x, task: Tasks, key, settings: Settings, *, attacker: str, hidden: int):
  """Fits one attacker on the rows `task.train_idx` of `x` and returns the
  predicted class probabilities (Nte, Cmax) of the rows `task.test_idx`.

  `task` is one task of `Tasks` (one row of each field). Rows with `train_w`
  = 1 are fitted; rows with `val_w` = 1 (an inner validation split of the
  training fold) pick the step whose parameters are returned: the one with
  the lowest validation cross-entropy (early stopping). Without validation
  rows the last step's parameters are used. Features are standardised with
  the fitted rows' mean and standard deviation; the loss is mean
  cross-entropy plus 0.5 * l2 * ||weights||^2, minimised by at most `steps`
  full-batch Adam steps (`settings`). Padded classes get a -1e9 logit, so
  they never receive probability.
  """
  xtr, xte = _standardise(x, task)
  offset = jnp.where(task.class_mask, 0.0, _NEG)
  params = _init(key, x.shape[1], task.class_mask.shape[0], hidden, attacker)
  vsum = task.val_w.sum()

  def losses(p):
    """(penalised training loss, validation cross-entropy)."""
    ce = nn.nll(_logits(p, xtr) + offset, task.train_y)
    return (nn.weighted_mean(ce, task.train_w) + 0.5 * settings.l2 * nn.weight_decay(p),
            nn.weighted_mean(ce, task.val_w))

  opt = optax.adam(settings.lr)

  def step(_, carry):
    p, s, best, best_val = carry
    # The validation loss of `p` comes with its gradient pass for free.
    g, val = jax.grad(losses, has_aux=True)(p)
    better = val < best_val
    best = jax.tree.map(lambda a, b: jnp.where(better, a, b), p, best)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s, best, jnp.minimum(val, best_val)

  init = (params, opt.init(params), params, jnp.float32(jnp.inf))
  last, _, best, _ = jax.lax.fori_loop(0, settings.steps, step, init)
  final = jax.tree.map(lambda a, b: jnp.where(vsum > 0, a, b), best, last)
  return jax.nn.softmax(_logits(final, xte) + offset)


def knn_predict(x, task: Tasks, key, settings: Settings, *, attacker: str = "knn",
                hidden: int = 0):
  """A k-nearest-neighbour vote (`KNN_K` neighbours among the fitted rows,
  Euclidean on standardised features): the class shares among each test row's
  neighbours, as probabilities (Nte, Cmax). It reads local structure (users
  surrounded by their own class) that smooth attackers miss. The signature is
  `train_and_predict`'s, so the two share the task machinery; the key and the
  training settings are unused.
  """
  del key, settings, attacker, hidden
  xtr, xte = _standardise(x, task)
  d2 = (jnp.sum(xte ** 2, 1)[:, None] + jnp.sum(xtr ** 2, 1)[None, :]
        - 2.0 * jnp.matmul(xte, xtr.T, precision=jax.lax.Precision.HIGHEST))
  # Padding and held-out rows are no neighbours.
  d2 = jnp.where(task.train_w[None, :] > 0, d2, jnp.inf)
  _, nearest = jax.lax.top_k(-d2, KNN_K)
  votes = jax.nn.one_hot(task.train_y[nearest], task.class_mask.shape[0]).sum(1)
  return votes / KNN_K


def _shrunk_covariance(z, n):
  """Ledoit-Wolf covariance of the centred rows `z` (N, D) of which `n` are
  real (the rest zeros): the sample covariance shrunk toward a multiple of
  the identity by the closed-form amount (Ledoit & Wolf 2004). With fewer
  rows than columns the sample covariance is singular."""
  hi = jax.lax.Precision.HIGHEST
  eye = jnp.eye(z.shape[1], dtype=z.dtype)
  s = jnp.matmul(z.T, z, precision=hi) / n
  m = jnp.trace(s) / z.shape[1]
  sq = (z ** 2).sum(1)
  beta = (((sq ** 2).sum() - 2 * (jnp.matmul(z, s, precision=hi) * z).sum()) / n ** 2
          + (s ** 2).sum() / n)
  delta = jnp.maximum(((s - m * eye) ** 2).sum(), 1e-30)
  rho = jnp.clip(beta, 0.0, delta) / delta
  return (1.0 - rho) * s + rho * m * eye


def quadratic_predict(x, task: Tasks, key, settings: Settings, *, attacker: str = "quadratic",
                      hidden: int = 0):
  """A Gaussian quadratic discriminant: each class its own mean and
  covariance (`_shrunk_covariance`) from the fitted rows, equal priors; the
  class posteriors of the test rows (Nte, Cmax). It reads the classes'
  second moments, their spreads and correlations, which the linear probe
  does not see: on ML-1M NCF a table the linear and MLP probes read within
  0.02 of chance read -0.042 for gender to it, reliably wrong, which is
  leakage too (docs/findings.md). The signature is `train_and_predict`'s;
  the key and settings are unused.
  """
  del key, settings, attacker, hidden
  xtr, xte = _standardise(x, task)
  cmax, d = task.class_mask.shape[0], x.shape[1]
  w = task.train_w[:, None] * jax.nn.one_hot(task.train_y, cmax)          # (Ntr, C)
  n = jnp.maximum(w.sum(0), 1.0)
  mu = jnp.matmul(w.T, xtr, precision=jax.lax.Precision.HIGHEST) / n[:, None]

  def loglik(wk, nk, mk):
    cov = _shrunk_covariance((xtr - mk) * wk[:, None], nk)
    chol = jnp.linalg.cholesky(cov + 1e-6 * jnp.eye(d, dtype=cov.dtype))
    r = jax.scipy.linalg.solve_triangular(chol, (xte - mk).T, lower=True)
    return -0.5 * (r ** 2).sum(0) - jnp.log(jnp.diag(chol)).sum()

  ll = jax.vmap(loglik, in_axes=(1, 0, 0))(w, n, mu).T                   # (Nte, C)
  return jax.nn.softmax(ll + jnp.where(task.class_mask, 0.0, _NEG))


_PREDICT = {"knn": knn_predict, "quadratic": quadratic_predict}


@functools.lru_cache(maxsize=8)
def _compiled(attacker: str, hidden: int, vmapped: bool, per_task_table: bool = False):
  fn = functools.partial(_PREDICT.get(attacker, train_and_predict),
                         attacker=attacker, hidden=hidden)
  if vmapped:
    fn = jax.vmap(fn, in_axes=(0 if per_task_table else None, 0, 0, None))
  return jax.jit(fn)


def _keys(seed: int, folds: np.ndarray):
  base = jax.random.PRNGKey(seed)
  return jax.vmap(lambda f: jax.random.fold_in(base, f))(jnp.asarray(folds))


def predict_vmapped(x, tasks: Tasks, seed: int, cfg: dict, attacker: str):
  """Probabilities (T, Nte, Cmax) of every task in one compiled call.

  `x` is one table (n, D), or one per attribute (K, n, D): task t then reads
  table `tasks.attr[t]`.
  """
  per_task = np.ndim(x) == 3
  fn = _compiled(attacker, int(cfg["hidden"]), True, per_task)
  x = jnp.asarray(x)[jnp.asarray(tasks.attr)] if per_task else jnp.asarray(x)
  return fn(x, tasks, _keys(seed, tasks.fold), Settings.from_config(cfg))


def predict_looped(x, per_task: list, cmax: int, seed: int, cfg: dict,
                   attacker: str):
  """The same per-task function in a Python loop; tasks of one attribute are
  padded to a common shape among themselves only (one compile per attribute),
  as a loop-based implementation would. Returns [(Tasks_of_attr, probs)]."""
  fn = _compiled(attacker, int(cfg["hidden"]), False)
  settings = Settings.from_config(cfg)
  x = jnp.asarray(x)
  out = []
  for k in sorted({t[0] for t in per_task}):
    tasks = _stack([t for t in per_task if t[0] == k], cmax)
    keys = _keys(seed, tasks.fold)
    xk = x[k] if x.ndim == 3 else x
    probs = [fn(xk, jax.tree.map(lambda a: a[i], tasks), keys[i], settings)
             for i in range(len(tasks.fold))]
    out.append((tasks, jnp.stack(probs)))
  return out


# --------------------------------------------------------------------------
# Metrics and the public entry point


def _summarise(per_attr_folds, n_classes_present, sizes, names):
  out = {}
  for k, name in enumerate(names):
    rows = np.array(per_attr_folds[k], dtype=np.float64)  # (folds, 3)
    bacc = float(rows[:, 0].mean())
    chance = 1.0 / n_classes_present[k]
    lo, hi = cm.ci95(rows[:, 0])
    out[name] = {
        "bacc": bacc,
        "macro_f1": float(rows[:, 1].mean()),
        "auc": float(np.nanmean(rows[:, 2])),
        "chance": float(chance),
        "leakage": cm.leakage(bacc, n_classes_present[k]),
        "ci95": [float(lo), float(hi)],
        "n": int(sizes[k]),
        "folds": int(rows.shape[0]),
    }
  return out


def attack_probs(embeddings, labels, num_classes, *, attacker="mlp",
                 protocol="cv5", seed=0, config=None, names=None, vmap=True):
  """The raw attacker output, before metrics: ([(tasks, probs)], labels,
  balanced sizes, names). One (tasks, probs (T, Nte, Cmax)) pair for the
  vmapped path, one per attribute for the looped path."""
  x, y, num_classes, names = _check(embeddings, labels, num_classes, names,
                                    attacker, protocol)
  cfg = _config(config)
  per_task, sizes, cmax = make_tasks(y, num_classes, protocol, cfg, seed, names)
  if vmap:
    tasks = _stack(per_task, cmax)
    results = [(tasks, predict_vmapped(x, tasks, seed, cfg, attacker))]
  else:
    results = predict_looped(x, per_task, cmax, seed, cfg, attacker)
  return results, y, sizes, names


def attack(embeddings, labels, num_classes: Sequence[int], *, attacker: str = "mlp",
           protocol: str = "cv5", seed: int = 0, config: Optional[dict] = None,
           names: Optional[Sequence[str]] = None, vmap: bool = True,
           repeats: int = 1) -> dict[str, dict]:
  """Attacks every attribute; returns {name: {"bacc", "macro_f1", "auc",
  "chance", "leakage", "ci95", "n", "folds"}} with plain Python numbers.

  embeddings: (n, D), or (K, n, D) to attack attribute k in table k;
  labels: (K, n) ints, -1 = missing; num_classes: K ints;
  config: fields of config["attack"] (missing ones from the defaults).
  Metrics are means over folds (cv5) or splits (paper); ci95 is a t-interval
  of BAcc over them; leakage = |mean BAcc - chance|, chance = 1/(number of
  classes with labelled users). `vmap=False` runs the same per-task function
  in a Python loop (for checks and benchmarks).

  `repeats` > 1 draws that many fold splits (seeds `seed`, `seed` + 1, ...)
  and averages over all their folds, adding "split_sd": the spread of BAcc
  between splits. On ML-1M one split's leakage differs from the next by an
  sd of 0.004-0.02 (docs/findings.md), as much as the bar it is held to.
  """
  if int(repeats) < 1:
    raise LegoError(f"attack repeats must be at least 1, got {repeats}")
  runs = [attack_probs(embeddings, labels, num_classes, attacker=attacker, protocol=protocol,
                       seed=seed + r, config=config, names=names, vmap=vmap)
          for r in range(int(repeats))]
  out = summarise([res for run in runs for res in run[0]], *runs[0][1:])
  if len(runs) > 1:
    split = [summarise(*run) for run in runs]
    for name, row in out.items():
      row["split_sd"] = float(np.std([s[name]["bacc"] for s in split], ddof=1))
  return out


def attack_loop(embeddings, labels, num_classes, **kwargs) -> dict[str, dict]:
  """`attack` with one compiled call per (attribute, fold), in a Python loop."""
  return attack(embeddings, labels, num_classes, vmap=False, **kwargs)


def summarise(results, labels, sizes, names) -> dict[str, dict]:
  """Per-fold metrics from attacker probabilities, averaged per attribute."""
  per_attr = {k: [] for k in range(len(names))}
  for tasks, probs in results:
    probs = np.asarray(probs)
    for i in range(len(tasks.fold)):
      keep = tasks.test_w[i] > 0
      yt = tasks.test_y[i][keep]
      p = probs[i][keep].astype(np.float64)
      pred = np.argmax(p, axis=1)
      per_attr[int(tasks.attr[i])].append(
          (cm.balanced_accuracy(yt, pred), cm.macro_f1(yt, pred),
           cm.macro_auc_ovr(yt, p)))
  present = [np.unique(labels[k][labels[k] >= 0]).size for k in range(len(names))]
  return _summarise(per_attr, present, sizes, names)
