"""Training a backbone: one jit-compiled function per epoch, early stopping, resumable.

An epoch shuffles the training pairs, samples `negatives` uniform random items
per positive, and runs `lax.scan` over minibatches with an optax Adam step.
Every random choice derives from `config["seed"]`. With `ckpt_dir`, the whole
training state is saved with Orbax after every epoch and a later call resumes
from it, giving the same final params as an uninterrupted run.
"""

import functools
import math
import time
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from lego_jax import checkpoint
from lego_jax.data.dataset import Split
from lego_jax.errors import LegoError, unknown
from lego_jax.evaluation import ranking
from lego_jax.models.base import Model


class TrainResult(NamedTuple):
  params: Any          # the best params (by the validation metric)
  aux: Any
  history: list        # one dict per epoch: epoch, loss, seconds, and the metric where evaluated
  best_epoch: int      # 1-based; 0 where no epoch ran


def make_optimizer(train_cfg: dict) -> optax.GradientTransformation:
  return optax.adam(float(train_cfg["lr"]))


def positive_keys(train_pairs: np.ndarray, n_users: int, n_items: int) -> Optional[np.ndarray]:
  """Sorted int32 keys user * n_items + item of the training pairs, for rejecting sampled
  negatives that are positives; None where the keys would not fit in int32."""
  if n_users * n_items >= 2 ** 31:
    return None
  pairs = np.asarray(train_pairs, np.int64)
  return np.unique(pairs[:, 0] * n_items + pairs[:, 1]).astype(np.int32)


def sample_negatives(key, users, shape, n_items: int, positives=None, rounds: int = 4):
  """Uniform random items; with `positives` (see `positive_keys`), items the user trained
  on are redrawn up to `rounds` times (RecBole's sampler also avoids them)."""
  neg = jax.random.randint(key, shape, 0, n_items, dtype=jnp.int32)
  if positives is None:
    return neg
  users = jnp.broadcast_to(users.reshape(users.shape + (1,) * (len(shape) - users.ndim)), shape)

  def is_pos(items):
    k = users * n_items + items
    idx = jnp.clip(jnp.searchsorted(positives, k), 0, positives.shape[0] - 1)
    return positives[idx] == k

  for sub in jax.random.split(key, rounds):
    neg = jnp.where(is_pos(neg), jax.random.randint(sub, shape, 0, n_items, dtype=jnp.int32), neg)
  return neg


def epoch_batches(key, train_pairs, *, n_items: int, batch_size: int, negatives: int,
                  positives=None):
  """Shuffled minibatches (n_batches, B, 2) and negatives (n_batches, B, negatives).

  The last minibatch is filled up by wrapping around the shuffled order, so all
  minibatches have one shape and the scan compiles once.
  """
  n = train_pairs.shape[0]
  bs = min(batch_size, n)
  n_batches = -(-n // bs)
  k_perm, k_neg = jax.random.split(key)
  order = jnp.resize(jax.random.permutation(k_perm, n), (n_batches * bs,))
  batches = train_pairs[order].reshape(n_batches, bs, 2)
  neg = sample_negatives(k_neg, batches[..., 0], (n_batches, bs, negatives), n_items, positives)
  return batches, neg


def make_step(model: Model, optimizer: optax.GradientTransformation) -> Callable:
  """One optimiser step.

  (params, opt_state, aux, pairs (B,2), neg (B,N)) -> (params, opt_state, loss).
  """

  def step(params, opt_state, aux, pairs, neg):
    loss, grads = jax.value_and_grad(model.loss)(params, aux, pairs[:, 0], pairs[:, 1], neg)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def make_epoch(model: Model, optimizer: optax.GradientTransformation, *, n_items: int,
               batch_size: int, negatives: int) -> Callable:
  """An (unjitted) epoch: (params, opt_state, aux, train_pairs (k,2), key[, positives])
  -> (params, opt_state, mean loss).

  The same as `make_step` run over `epoch_batches(key, ...)` in order.
  """
  step = make_step(model, optimizer)

  def body(carry, batch):
    params, opt_state, aux = carry
    params, opt_state, loss = step(params, opt_state, aux, *batch)
    return (params, opt_state, aux), loss

  def epoch(params, opt_state, aux, train_pairs, key, positives=None):
    batches = epoch_batches(key, train_pairs, n_items=n_items, batch_size=batch_size,
                            negatives=negatives, positives=positives)
    (params, opt_state, _), losses = jax.lax.scan(body, (params, opt_state, aux), batches)
    return params, opt_state, jnp.mean(losses)

  return epoch


@functools.lru_cache(maxsize=16)
def _compiled(model: Model, lr: float, n_items: int, batch_size: int, negatives: int):
  # Cached so repeated `train` calls on one model (resume, sweeps, tests) compile once.
  epoch = make_epoch(model, make_optimizer({"lr": lr}), n_items=n_items, batch_size=batch_size,
                     negatives=negatives)
  return jax.jit(epoch), jax.jit(model.score)


def parse_metric(metric: str) -> tuple[str, int]:
  name, _, k = metric.partition("@")
  if name not in ranking.METRICS or not k.isdigit() or int(k) < 1:
    raise unknown("train.metric", metric, [f"{m}@10" for m in ranking.METRICS])
  return metric, int(k)


def _state_tree(params, opt_state, best, key):
  # Optax states are tuples of NamedTuples, which Orbax would restore as plain
  # containers: save leaves and rebuild from a fresh `optimizer.init`.
  return {"params": checkpoint.flatten(params), "best": checkpoint.flatten(best),
          "opt": checkpoint.flatten(opt_state), "key": key}


def train(model: Model, split: Split, config: dict, *, ckpt_dir=None, progress: bool = True,
          max_epochs_this_call: Optional[int] = None) -> TrainResult:
  """Trains `model` on `split.train`, early-stopping on `config["train"]["metric"]` on valid.

  The metric is evaluated every `eval_every` epochs (and after the last);
  training stops after `patience` evaluations without improvement and returns
  the best params. Without validation pairs the last params are returned.

  `max_epochs_this_call` stops after that many epochs without marking the run
  finished (a later call with the same `ckpt_dir` continues it).
  """
  tc = config["train"]
  metric, k = parse_metric(tc["metric"])
  epochs, patience = int(tc["epochs"]), int(tc["patience"])
  eval_every = max(1, int(tc["eval_every"]))
  batch_users = int(config["eval"]["batch_users"])
  n_users, n_items = split.n_users, split.n_items
  if len(split.train) == 0:
    raise LegoError("the training split is empty")

  key = jax.random.PRNGKey(int(config["seed"]))
  k_init, key = jax.random.split(key)
  params = model.init(k_init, n_users, n_items)
  aux = model.build_aux(np.asarray(split.train), n_users, n_items)
  optimizer = make_optimizer(tc)
  opt_state = optimizer.init(params)
  best = params
  meta = {"backbone": model.name, "split": split.fingerprint, "n_users": n_users,
          "n_items": n_items, "epoch": 0, "history": [], "best_epoch": 0,
          "best_metric": None, "bad": 0, "done": False,
          "settings": {k: config[k] for k in ("seed", "model", "train")}}

  if ckpt_dir is not None and checkpoint.exists(ckpt_dir):
    tree, saved = checkpoint.restore(ckpt_dir)
    # "settings" is absent from checkpoints of older versions: not compared there.
    fields = ("backbone", "split", "n_users", "n_items") + (("settings",) if "settings" in saved
                                                            else ())
    for field in fields:
      if saved.get(field) != meta[field]:
        raise LegoError(f"checkpoint {ckpt_dir} was made with {field}={saved.get(field)!r}, "
                        f"not {meta[field]!r}; use another workdir")
    opt_state = checkpoint.unflatten(opt_state, tree.get("opt", {}))
    params, best = (checkpoint.unflatten(params, tree[n]) for n in ("params", "best"))
    key = jnp.asarray(tree["key"], jnp.uint32)
    meta = saved

  history = list(meta["history"])
  best_metric = -math.inf if meta["best_metric"] is None else meta["best_metric"]
  has_valid = len(split.valid) > 0
  epoch_fn, score = _compiled(model, float(tc["lr"]), n_items, int(tc["batch_size"]),
                              int(tc["negatives"]))
  train_pairs = jnp.asarray(split.train, jnp.int32)
  positives = positive_keys(split.train, n_users, n_items)
  positives = None if positives is None else jnp.asarray(positives)

  bar = tqdm.tqdm(total=epochs, initial=meta["epoch"], disable=not progress,
                  desc=f"train {model.name}", unit="epoch")
  ran = 0
  while not meta["done"] and meta["epoch"] < epochs:
    if max_epochs_this_call is not None and ran >= max_epochs_this_call:
      break
    t0 = time.perf_counter()
    key, sub = jax.random.split(key)
    params, opt_state, loss = epoch_fn(params, opt_state, aux, train_pairs, sub, positives)
    loss = float(loss)
    ep = meta["epoch"] + 1
    record = {"epoch": ep, "loss": loss, "train_seconds": time.perf_counter() - t0}
    if not np.isfinite(loss):
      raise LegoError(f"training loss became {loss} at epoch {ep}; lower train.lr")
    if not has_valid:
      best, meta["best_epoch"] = params, ep
    elif ep % eval_every == 0 or ep == epochs:
      value = ranking.evaluate(lambda u: score(params, aux, u), split, stage="valid",
                               ks=(k,), batch_users=batch_users)[metric]
      record[metric] = value
      if value > best_metric:
        best, best_metric, meta["best_epoch"], meta["bad"] = params, value, ep, 0
      else:
        meta["bad"] += 1
      bar.set_postfix(loss=f"{loss:.4f}", **{metric: f"{value:.4f}"})
    else:
      bar.set_postfix(loss=f"{loss:.4f}")
    record["seconds"] = time.perf_counter() - t0
    history.append(record)
    meta.update(epoch=ep, history=history,
                best_metric=None if best_metric == -math.inf else best_metric,
                done=bool(ep >= epochs or (has_valid and meta["bad"] >= patience)))
    if ckpt_dir is not None:
      checkpoint.save(ckpt_dir, _state_tree(params, opt_state, best, key), meta)
    bar.update(1)
    ran += 1
  bar.close()
  return TrainResult(best, aux, history, int(meta["best_epoch"]))
