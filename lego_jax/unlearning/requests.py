"""Dynamic unlearning requests over a workdir: calibrate, combine, add, withdraw.

State lives in the workdir (DESIGN.md §6): one Orbax checkpoint per brick
(`bricks/<attr>/`) and one for the combination (`combination/`). A request
calibrates only attributes that have no brick yet (vmapped together), then
re-combines; withdrawing only re-combines. A calibration in progress is
checkpointed every `unlearn.ckpt_every` steps in `bricks/.in-progress/` and
resumed by the next call that asks for the same attributes and settings.
"""

import datetime
import functools
import shutil
import zlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lego_jax import checkpoint
from lego_jax.errors import LegoError, unknown
from lego_jax.unlearning import calibration, combination, preservation
from lego_jax.workdir import Workdir, child

IN_PROGRESS = ".in-progress"
# Fields of `unlearn` that change what a brick is. They are stored in each
# brick's metadata; a request reuses a stored brick as it is, `unlearn` redoes
# one made under other values (as does `calibrate(..., force=True)`), and an
# interrupted calibration resumes only under the same values.
BRICK_FIELDS = ("loss", "calibrator", "steps", "lr", "w_mi", "lam_rank", "l2", "batch_users",
                "topk", "guard", "margin", "stop", "bandwidths", "linear_kernel", "linear_scope",
                "centre", "estimator", "features", "hinge", "null_perms")


def attribute_key(seed: int, name: str) -> jax.Array:
  """A brick's key depends on the seed and its attribute only, not on its batch-mates."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), zlib.crc32(name.encode()))


def _writes(method):
  """Runs an Unlearner method under the workdir's writer lock."""
  @functools.wraps(method)
  def run(self, *args, **kwargs):
    with self.wd.writing():
      return method(self, *args, **kwargs)
  return run


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


class Unlearner:
  """LEGO on one workdir. Example:

    u = Unlearner(Workdir.open("runs/synthetic"))
    u.unlearn(["gender", "age"])        # calibrate both (one vmapped program), combine
    u.add("occupation")                 # calibrate occupation only, re-combine
    u.withdraw("age")                   # re-combine only
    table = u.table("combined")
  """

  def __init__(self, workdir: Workdir, progress: bool = True):
    self.wd = workdir
    self.progress = progress
    self.cfg = workdir.config["unlearn"]

  # ---- stored state ------------------------------------------------------
  @property
  def bricks_dir(self):
    return self.wd.path / "bricks"

  def _identity(self) -> dict:
    """What a brick or combination is made from: the trained backbone itself (a
    hash of its params, so a brick copied from a workdir trained otherwise is
    refused), its split and shape."""
    bb = self.wd.backbone()
    return {"split": self.wd.split.fingerprint, "backbone": bb.model.name,
            "backbone_fingerprint": bb.fingerprint, "shape": list(bb.table().shape)}

  def _foreign(self, meta: dict) -> list[str]:
    """How a brick's identity differs from this workdir's (empty when it matches)."""
    return [f"{k}: brick has {meta.get(k)!r}, workdir has {v!r}"
            for k, v in self._identity().items() if meta.get(k) != v]

  def brick_dir(self, name: str):
    """The folder of attribute `name`'s brick. Attribute names come from data
    files, so they are mapped to safe folder names (`workdir.safe_name`)."""
    return child(self.bricks_dir, name)

  def brick_meta(self) -> dict[str, dict]:
    """Metadata of every finished brick, by attribute."""
    out = {}
    if self.bricks_dir.is_dir():
      for d in sorted(self.bricks_dir.iterdir()):
        if not d.name.startswith(".") and checkpoint.exists(d):
          meta = checkpoint.metadata(d)
          out[meta.get("attribute", d.name)] = meta
    return out

  def _load_brick(self, name: str) -> np.ndarray:
    d = self.brick_dir(name)
    tree, meta = checkpoint.restore(d)
    diffs = self._foreign(meta)
    if diffs:
      raise LegoError(f"brick {d} was made from another model or data; differs: "
                      f"{'; '.join(diffs)} (`lego-jax unlearn` recalibrates it)")
    if "delta" not in tree:
      raise LegoError(f"checkpoint {d} is not a brick (no delta array)")
    return tree["delta"]

  def active(self) -> list[str]:
    d = self.wd.path / "combination"
    return checkpoint.metadata(d)["active"] if checkpoint.exists(d) else []

  def status(self) -> dict:
    return {"active": self.active(),
            "bricks": {a: {"created": m.get("created"), "steps": m.get("steps")}
                       for a, m in self.brick_meta().items()}}

  # ---- calibration -------------------------------------------------------
  def num_classes(self) -> int:
    """Classes are padded to the dataset's largest count, so a brick's program
    and result do not depend on which attributes it was calibrated with."""
    return max(self.wd.labels(self.wd.attribute_names())[1])

  def spec(self) -> calibration.Spec:
    return calibration.Spec.from_config(self.cfg, self.num_classes(), chunk=self.cfg["ckpt_every"])

  def target(self) -> calibration.Target:
    """E0, each user's original top-(T + guard) list and the score scale (computed once)."""
    if not hasattr(self, "_target"):
      bb = self.wd.backbone(progress=self.progress)
      e0 = bb.table()
      t = self.cfg["topk"]
      if t + self.cfg["guard"] > self.wd.split.n_items:
        raise LegoError(f"unlearn.topk + unlearn.guard = {t + self.cfg['guard']} exceeds the "
                        f"{self.wd.split.n_items} items of this dataset; lower them")
      topk = preservation.top_unseen(bb.ranking_fn(e0), self.wd.split, t + self.cfg["guard"],
                                     self.wd.config["eval"]["batch_users"])
      score = bb.score
      scale = preservation.score_scale(lambda u, i: score(e0, u, i), topk[:, :t])
      self._target = calibration.Target(e0, jnp.asarray(topk), jnp.float32(scale))
    return self._target

  def _checked(self, names) -> list[str]:
    """`names` without repeats; an unknown one, here or in per-attribute settings, is refused."""
    valid = self.wd.attribute_names()
    for n in names:
      if n not in valid:
        raise unknown("attribute", n, valid)
    for n in self.cfg.get("per_attribute", {}):
      if n not in valid:
        raise unknown("attribute (in unlearn.per_attribute)", n, valid)
    return list(dict.fromkeys(names))

  @_writes
  def calibrate(self, names, force: bool = False) -> list[str]:
    """Calibrates the named attributes that have no brick yet (all of them with `force`)."""
    names = self._checked(names)
    done = self.brick_meta()
    todo = [n for n in names if force or n not in done]
    if not todo:
      return []
    spec = self.spec()
    target = self.target()
    labels, _ = self.wd.labels(todo)
    hps = calibration.HParams.from_config(self.cfg, todo)
    keys = jnp.stack([attribute_key(self.wd.config["seed"], n) for n in todo])
    settings = {"attributes": todo, "bricks": {n: self.brick_settings(n) for n in todo},
                "chunk": spec.chunk, **self._identity()}
    state = self._resume(settings, calibration.init_states(keys, target.e0, hps.lr, spec=spec))
    bb = self.wd.backbone(progress=False)
    bar = _progress(self.progress, spec.steps, f"calibrating {','.join(todo)}")
    start = 0 if state is None else int(np.min(state.step))
    bar.update(start)

    def on_chunk(st):
      step = int(np.min(st.step))
      bar.update(step - bar.n)
      if step < spec.steps:
        checkpoint.save(self.bricks_dir / IN_PROGRESS, checkpoint.flatten(st), settings)

    bricks, state, trace = calibration.calibrate(target, labels, hps, keys, spec=spec,
                                                 score_fn=bb.score, state=state,
                                                 on_chunk=on_chunk)
    bar.close()
    bricks = np.asarray(bricks)
    for k, name in enumerate(todo):
      meta = {"attribute": name, "created": _now(), "steps": int(state.step[k]),
              "settings": self.brick_settings(name),
              "final_mi": float(trace.mi[k, -1, 0]), "final_null": float(trace.null[k, -1, 0]),
              "final_rank": float(trace.rank[k, -1]), **self._identity()}
      tree = {"delta": bricks[k]}
      if spec.calibrator == "residual":
        tree["map"] = jax.tree.map(lambda x: np.asarray(x[k]), state.params)
      checkpoint.save(self.brick_dir(name), tree, meta)
    shutil.rmtree(self.bricks_dir / IN_PROGRESS, ignore_errors=True)
    return todo

  def _resume(self, settings: dict, template) -> Optional[calibration.State]:
    d = self.bricks_dir / IN_PROGRESS
    if not checkpoint.exists(d):
      return None
    tree, meta = checkpoint.restore(d)
    if meta != settings:   # another request was interrupted: start afresh
      shutil.rmtree(d, ignore_errors=True)
      return None
    return checkpoint.unflatten(template, tree)

  # ---- combination -------------------------------------------------------
  @_writes
  def combine(self, active) -> np.ndarray:
    """Combines the bricks of `active` (all stored bricks stacked, the rest masked)."""
    active = list(dict.fromkeys(active))
    stored = self.brick_meta()
    missing = [a for a in active if a not in stored]
    if missing:
      raise LegoError(f"no brick for {', '.join(missing)}; calibrate first "
                      f"(stored: {', '.join(stored) or 'none'})")
    bb = self.wd.backbone(progress=False)
    e0 = bb.table()
    if not active:
      table, weights, names = np.asarray(e0), np.zeros((0, 1), np.float32), []
    else:
      order = [a for a in self.wd.attribute_names() if a in stored]
      bricks = jnp.stack([self._load_brick(a) for a in order])
      labels, _ = self.wd.labels(order)
      mask = jnp.asarray([a in active for a in order], jnp.float32)
      ccfg = self.wd.config["combine"]
      spec = combination.Spec.from_config(ccfg, self.cfg, self.num_classes())
      key = jax.random.fold_in(jax.random.PRNGKey(self.wd.config["seed"]), 1)
      w, table, _ = combination.fit(self.target(), bricks, jnp.asarray(labels), mask, key,
                                    combination.HParams.from_config(ccfg), spec=spec,
                                    score_fn=bb.score)
      table, weights, names = np.asarray(table), np.asarray(w), order
    checkpoint.save(self.wd.path / "combination", {"table": table, "weights": weights},
                    {"active": active, "bricks": names, "mode": self.wd.config["combine"]["mode"],
                     "created": _now(), **self._identity()})
    return table

  # ---- requests ----------------------------------------------------------
  def brick_settings(self, name: str) -> dict:
    """The `unlearn` values that make brick `name`: its per-attribute ones where set."""
    return {**{f: self.cfg.get(f) for f in BRICK_FIELDS},
            **self.cfg.get("per_attribute", {}).get(name, {})}

  def stale(self, meta: Optional[dict] = None) -> list[str]:
    """Bricks calibrated under other `unlearn` settings than the current ones, or
    from another backbone."""
    meta = self.brick_meta() if meta is None else meta
    return [n for n, m in meta.items()
            if m.get("settings") != self.brick_settings(n) or self._foreign(m)]

  @_writes
  def unlearn(self, names) -> np.ndarray:
    """Calibrates what is missing or stale of `names`, then combines exactly `names`.

    A brick made under other settings is redone here, so a run with new
    settings means what it says; requests (`add`, `withdraw`) reuse bricks as
    they are.
    """
    names = self._checked(names)
    done = self.brick_meta()
    stale = set(self.stale(done))
    redo = [n for n in names if n not in done or n in stale]
    if redo:
      self.calibrate(redo, force=True)
    return self.combine(names)

  @_writes
  def add(self, name: str) -> np.ndarray:
    active = self.active()
    if name in active:
      raise LegoError(f"attribute {name!r} is already active (active: {', '.join(active)})")
    self.calibrate([name])
    return self.combine(active + [name])

  @_writes
  def withdraw(self, name: str) -> np.ndarray:
    active = self.active()
    if name not in active:
      raise LegoError(f"attribute {name!r} is not active (active: {', '.join(active) or 'none'})")
    return self.combine([a for a in active if a != name])

  # ---- stages ------------------------------------------------------------
  def stages(self) -> list[str]:
    out = ["original"]
    if checkpoint.exists(self.wd.path / "combination"):
      out.append("combined")
    return out + [f"brick:{a}" for a in self.brick_meta()]

  def table(self, stage: str) -> np.ndarray:
    """The user table of a stage: original, combined or brick:<attribute>."""
    if stage not in self.stages():
      raise unknown("stage", stage, self.stages())
    e0 = np.asarray(self.wd.backbone(progress=False).table())
    if stage == "original":
      return e0
    if stage == "combined":
      return checkpoint.restore(self.wd.path / "combination")[0]["table"]
    return e0 + self._load_brick(stage.split(":", 1)[1])


def _progress(enabled: bool, total: int, desc: str):
  return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
