"""LEGO and the baselines behind one interface, on a workdir (the stateful shell).

Each method is `method(workdir, attributes) -> Outcome`: the unlearned user
table and the backbone that scores it (the original one, except for
in-training adversarial learning, which trains its own). The runner treats
them alike.
"""

import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lego_jax import models, training
from lego_jax.unlearning import calibration, leace as leace_lib
from lego_jax.requests import Unlearner, attribute_key
from lego_jax.workdir import Backbone, Workdir, safe_name


class Outcome(NamedTuple):
  table: np.ndarray
  backbone: Backbone
  seconds: float


def _timed(fn: Callable) -> Callable:
  def run(wd: Workdir, names) -> Outcome:
    wd.backbone(progress=False)   # training time is not the method's
    start = time.perf_counter()
    table, backbone = fn(wd, list(names))
    table = np.asarray(jax.block_until_ready(table))
    return Outcome(table, backbone, time.perf_counter() - start)
  run.__name__ = fn.__name__
  run.__doc__ = fn.__doc__
  return run


def _one_table(wd: Workdir, u: Unlearner, target, labels, key, what: str):
  """A single free table optimised for every attribute in `labels` at once
  (labels (A, n), or (n,) for one), with a progress bar over its chunks."""
  spec = u.spec()
  # One table serves every attribute, so it takes the section's values, not per-attribute ones.
  hp = calibration.HParams.from_config(u.cfg, [None])
  bar = tqdm(total=spec.steps, desc=what, disable=not u.progress, leave=False)
  on_chunk = lambda state: bar.update(int(state.step[0]) - bar.n)
  bricks, _, _ = calibration.calibrate(target, jnp.asarray(labels)[None], hp, key[None],
                                       spec=spec, score_fn=wd.backbone().score, on_chunk=on_chunk)
  bar.close()
  return target.e0 + bricks[0]


@_timed
def lego(wd: Workdir, names):
  """LEGO: vmapped calibration per attribute, then Flexible Combination (stored bricks reused)."""
  u = Unlearner(wd)
  return u.unlearn(names), wd.backbone(progress=False)


@_timed
def joint(wd: Workdir, names):
  """PoT-AU extended: one table, the sum of all attributes' MI terms, one optimisation."""
  u = Unlearner(wd)
  labels, _ = wd.labels(names)
  key = attribute_key(wd.config["seed"], "joint:" + ",".join(names))
  return _one_table(wd, u, u.target(), labels, key, "joint"), wd.backbone(progress=False)


@_timed
def sequential(wd: Workdir, names):
  """One attribute after another on the same table, each from the previous result."""
  u = Unlearner(wd)
  target = u.target()
  table = target.e0
  for i, name in enumerate(names):
    labels, _ = wd.labels([name])
    table = _one_table(wd, u, target._replace(e0=table), labels[0],
                       attribute_key(wd.config["seed"], "sequential:" + name),
                       f"sequential {i + 1}/{len(names)}: {name}")
  return table, wd.backbone(progress=False)


@_timed
def leace(wd: Workdir, names):
  """Closed-form linear erasure (LEACE) per attribute, composed."""
  labels, num_classes = wd.labels(names)
  bb = wd.backbone(progress=False)
  return leace_lib.erase(np.asarray(bb.table()), labels, num_classes), bb


@_timed
def adversarial(wd: Workdir, names):
  """In-training adversarial learning: one gradient-reversal head per attribute."""
  from lego_jax.unlearning import adversarial as adv
  cfg = wd.config
  labels, num_classes = wd.labels(names)
  base = models.get(cfg["model"]["name"], cfg["model"], cfg["train"])
  model = adv.make(base, jnp.asarray(labels), num_classes, weight=cfg["run"]["adversarial_weight"],
                   objective=cfg["run"]["adversarial_objective"])
  # One folder per setting: a model trained with another weight or objective
  # must not be reported under this one's name.
  key = safe_name(f"{cfg['run']['adversarial_objective']}-w{cfg['run']['adversarial_weight']:g}")
  result = training.train(model, wd.split, cfg, ckpt_dir=wd.path / "methods" / "adversarial" / key
                          / "backbone", progress=False)
  bb = Backbone.build(model, jax.tree.map(jnp.asarray, result.params), result.aux)
  return bb.table(), bb


METHODS = {"lego": lego, "joint": joint, "sequential": sequential, "leace": leace,
           "adversarial": adversarial}
