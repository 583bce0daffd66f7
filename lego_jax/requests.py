"""Dynamic unlearning requests over a workdir: calibrate, combine, add, withdraw.

State lives in the workdir: one Orbax checkpoint per brick
(`bricks/<attr>/`) and one for the combination (`combination/`). A request
calibrates only attributes that have no brick yet (vmapped together), then
re-combines; withdrawing only re-combines. A calibration in progress is
checkpointed every `unlearn.ckpt_every` steps in `bricks/.in-progress/` and
resumed by the next call that asks for the same attributes and settings.
"""

import datetime
import functools
import sys
import time
import zlib
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from lego_jax import checkpoint, sharding
from lego_jax.errors import LegoError, unknown
from lego_jax.evaluation import ranking
from lego_jax.unlearning import calibration, combination, control, preservation
from lego_jax.workdir import Workdir, child

IN_PROGRESS = ".in-progress"
# Fields of `unlearn` that change what a brick is. They are stored in each
# brick's metadata; a request reuses a stored brick as it is, `unlearn` redoes
# one made under other values (as does `calibrate(..., force=True)`), and an
# interrupted calibration resumes only under the same values.
BRICK_FIELDS = ("loss", "calibrator", "steps", "lr", "w_mi", "lam_rank", "l2", "batch_users",
                "projection", "epsilon", "ball", "vclub_hidden", "vclub_lr",
                "batch_fraction", "max_batch_users", "topk", "guard", "margin", "stop",
                "bandwidths", "linear_kernel",
                "linear_scope", "centre", "units", "estimator", "features",
                "marginal_features", "part_kernels", "hinge", "null_perms",
                "control", "target_leakage", "probes", "probe_folds", "probe_repeats",
                "control_rounds", "max_gain")


class Finished(NamedTuple):
  """A combined table after the class-mean step and the polish (`Unlearner._finish`)."""
  table: np.ndarray
  shares: np.ndarray             # (K,) class-mean shares taken back
  polish: Optional[dict]         # {"attributes", "gain"}, or None where nothing was polished
  reading: control.Reading       # the steering probes'
  retention: float


class Lighter(NamedTuple):
  """The table at `unlearn.mean_share` of the class-mean parts, finished
  (`Unlearner._lighter_means`)."""
  gains: np.ndarray
  finished: Finished
  accepted: bool                 # every attribute within twice the target, above the floor


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

  def __init__(self, workdir: Workdir, progress: bool = True, config: Optional[dict] = None):
    """`config` replaces the workdir's for the unlearning sections and the seed
    (a sweep's setting, `lego_jax.sweep`); such an Unlearner only reads the
    workdir. By default the workdir's own config."""
    self.wd = workdir
    self.progress = progress
    self.config = workdir.config if config is None else config
    self.cfg = self.config["unlearn"]

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
    # The stored delta is the calibration's; the control loop's gains scale
    # its class-mean part and the rest.
    return self.with_gains([name], tree["delta"][None], [meta.get("gain", [1.0, 1.0])])[0]

  def active(self) -> list[str]:
    d = self.wd.path / "combination"
    return checkpoint.metadata(d)["active"] if checkpoint.exists(d) else []

  def status(self) -> dict:
    """Active set and bricks, with the leakage the control loop last measured
    and what each brick was made under otherwise (`why_stale`)."""
    out = {"active": self.active(),
           "bricks": {a: {"created": m.get("created"), "steps": m.get("steps"),
                          "seconds": m.get("seconds"),
                          "gain": m.get("gain", [1.0, 1.0]), "strength": m.get("strength"),
                          "leakage": m.get("leakage"), "stale": self.why_stale(a, m)}
                      for a, m in self.brick_meta().items()}}
    d = self.wd.path / "combination"
    if checkpoint.exists(d):
      meta = checkpoint.metadata(d)
      out["combination"] = {k: meta.get(k) for k in ("gains", "residual_means", "polish",
                                                       "leakage", "leakage_steered",
                                                       "retention_valid",
                                                       "within_target", "warnings", "seconds")}
    return out

  # ---- calibration -------------------------------------------------------
  def num_classes(self) -> int:
    """Classes are padded to the dataset's largest count, so a brick's program
    and result do not depend on which attributes it was calibrated with."""
    return max(2, *(a.num_classes for a in self.wd.dataset.attributes.values()))

  def batch_users(self) -> int:
    """The minibatch: `unlearn.batch_users` where set, else a fraction of the users.

    A fraction, not a count: steps that see every user overshoot below chance,
    and a sixth of the users worked on 943 and on 6040 users alike
    (docs/findings.md). Capped at `unlearn.max_batch_users`, so the kernel
    estimate's B x B matrices stay bounded however many users there are.
    """
    n = self.wd.split.n_users
    if self.cfg["batch_users"] > 0:
      return min(int(self.cfg["batch_users"]), n)
    return min(n, int(self.cfg["max_batch_users"]),
               max(32, round(n * float(self.cfg["batch_fraction"]))))

  def spec(self) -> calibration.Spec:
    cfg = {**self.cfg, "batch_users": self.batch_users()}
    return calibration.Spec.from_config(cfg, self.num_classes(), chunk=self.cfg["ckpt_every"],
                                        parts=self.wd.backbone().model.user_parts)

  # ---- the closed loop ---------------------------------------------------
  def _read(self, tables, names, probes=None, seeds=None, purpose: str = "control"
            ) -> control.Reading:
    """The steering probes on `tables` (see `control.read`). Their folds come
    from a seed of their own, so the evaluation's attack is not the one steered;
    another `purpose` draws other folds (`report`: the kept table read afresh).

    `seeds` gives each of the K tables (K, n, D) the config seed it belongs
    to (a sweep calibrates several seeds at once); default this config's.
    """
    seeds = [self.config["seed"]] * len(names) if seeds is None else [int(s) for s in seeds]
    out = np.zeros((3, len(probes or self.cfg["probes"]), len(names)))
    for s in dict.fromkeys(seeds):
      idx = [i for i, x in enumerate(seeds) if x == s]
      part = tables[np.asarray(idx)] if np.ndim(tables) == 3 else tables
      reading = self._read_seed(part, [names[i] for i in idx], probes, s, purpose)
      out[:, :, idx] = reading.signed, reading.lo, reading.hi
    return control.Reading(*out, reading.probes)

  def _read_seed(self, tables, names, probes, seed: int, purpose: str = "control"
                 ) -> control.Reading:
    labels, num_classes = self.wd.labels(names)
    cfg = {**self.config["attack"], "folds": int(self.cfg["probe_folds"])}
    seed = int(attribute_key(seed, purpose)[-1]) % (2 ** 31)
    # Names key the attackers' results only; a sweep reads one attribute in several tables.
    tags = [f"{n} (table {i})" for i, n in enumerate(names)]
    readings = [control.read(tables, labels, num_classes, probes=probes or self.cfg["probes"],
                             seed=seed + r, config=cfg, names=tags)
                for r in range(self.probe_repeats())]
    return control.Reading(*(np.mean([getattr(x, f) for x in readings], 0)
                             for f in ("signed", "lo", "hi")), readings[0].probes)

  def probe_repeats(self) -> int:
    """Cross-fittings averaged per reading: `unlearn.probe_repeats`, or where 0
    enough that about 10000 users are scored (two on ML-1M, four on ML-100K).

    One fold split's reading is noisier than the target: on a few hundred
    users it varies by +-0.04 (ML-100K MF: the probes read within 0.01 where
    the evaluation's attackers read -0.042), and on ML-1M's 6040 users by an
    sd of up to 0.02 (the linear probe on occupation). With one split on
    ML-1M the loop stopped where five fresh splits read up to 0.024 (NCF
    gender); with two, up to 0.020 (LightGCN gender; docs/findings.md)."""
    if self.cfg["probe_repeats"] > 0:
      return int(self.cfg["probe_repeats"])
    return int(np.clip(round(10000 / self.wd.split.n_users), 1, 4))

  def _say(self, text: str) -> None:
    if self.progress:
      tqdm.write(f"[lego-jax] {text}", file=sys.stderr)

  def _solve(self, read_fn, names, independent: bool):
    what = "bricks" if independent else "combined table"

    def read(gains):
      reading = read_fn(gains)
      self._say(f"control, {what}: " + "; ".join(
          f"{n} x{g[0]:.2f}/{g[1]:.2f} " + " ".join(
              f"{p} {reading.signed[i, a]:+.3f}" for i, p in enumerate(reading.probes))
          for a, (n, g) in enumerate(zip(names, gains))))
      return reading
    return control.solve(read, len(names), tol=float(self.cfg["target_leakage"]),
                         max_gain=float(self.cfg["max_gain"]),
                         rounds=int(self.cfg["control_rounds"]), independent=independent)

  def _parts(self, names, bricks) -> tuple[np.ndarray, np.ndarray]:
    """Each brick's class-mean move and the rest, (K, n, D) each (`control.split_move`)."""
    labels, num_classes = self.wd.labels(names)
    parts = [control.split_move(b, y, c)
             for b, y, c in zip(sharding.to_host(bricks), labels, num_classes)]
    return np.stack([p[0] for p in parts]), np.stack([p[1] for p in parts])

  def _control_bricks(self, names, bricks: np.ndarray, seeds=None
                      ) -> tuple[np.ndarray, Optional[control.Reading]]:
    """Gains (K, 2) taking each brick alone to chance, and what the probes read there."""
    if self.cfg["control"] == "none":
      return np.ones((len(names), 2)), None
    e0 = sharding.to_host(self.target().e0)
    mean, rest = self._parts(names, bricks)
    gains, history = self._solve(
        lambda g: self._read(e0[None] + g[:, :1, None] * mean + g[:, 1:, None] * rest, names,
                             seeds=seeds),
        names, True)
    return gains, control.reading_at(history, gains, True)

  def with_gains(self, names, bricks, gains) -> np.ndarray:
    """Bricks (K, n, D) with each one's class-mean part and rest scaled by its gains (K, 2)."""
    bricks = sharding.to_host(bricks)
    out = bricks.copy()
    scaled = [k for k, g in enumerate(np.asarray(gains)) if not g[0] == g[1] == 1.0]
    if scaled:
      mean, rest = self._parts([names[k] for k in scaled], bricks[scaled])
      g = np.asarray(gains, np.float64)[scaled]
      out[scaled] = (g[:, :1, None] * mean + g[:, 1:, None] * rest).astype(bricks.dtype)
    return out

  def _valid_ndcg(self, table) -> float:
    bb = self.wd.backbone()
    return ranking.evaluate(bb.ranking_fn(table), self.wd.split, stage="valid", ks=(10,),
                            batch_users=self.config["eval"]["batch_users"])["ndcg@10"]

  def retention(self, table) -> float:
    """`table`'s validation NDCG@10 over the original's (1 where that is 0):
    what the utility floor `unlearn.min_retention` bounds."""
    if not hasattr(self, "_original_ndcg"):
      self._original_ndcg = self._valid_ndcg(sharding.to_host(self.target().e0))
    return self._valid_ndcg(table) / self._original_ndcg if self._original_ndcg else 1.0

  def _control_combination(self, active, table_at, seed=None, weights=None
                           ) -> tuple[np.ndarray, dict]:
    """The combined table: every active attribute read within the target,
    above the utility floor.

    Gains on the bricks' parts searched by the probes (`control.solve`), then
    the class-mean step and the polish (`_finish`); with `unlearn.mean_share`
    < 1, the table at that share of the class-mean parts, finished, is tried
    first (`_lighter_means`) and kept where it reads within twice the target
    above the floor; refused, it is still kept where it keeps the floor and
    the searched gains' table does not, or reads further from chance (the
    mean over attributes of the worst probe, `control.score`); last, each
    attribute's class means are set to
    their permuted-label size, and with `unlearn.null_shapes` every
    coordinate's class shapes before them (`null_sized`). Where the target and the
    floor cannot both hold, the best table that keeps the floor is kept and
    the report says which attribute is left, how far, at what retention. The leakage it
    reports is read on folds the loop never compared gains on
    (`leakage_steered`: what the loop itself read).
    """
    k = len(active)
    tol, floor = float(self.cfg["target_leakage"]), float(self.cfg["min_retention"])
    if self.cfg["control"] == "none" or not k:
      return table_at(np.ones((k, 2))), {}
    seeds = None if seed is None else [seed] * k
    warnings, history = [], []
    light = self._lighter_means(active, table_at, seeds, seed, floor, weights)
    if light is not None and light.accepted:
      gains, (table, shares, polish, reading, ret) = light.gains, light.finished
    else:
      gains, history = self._solve(lambda g: self._read(table_at(g), active, seeds=seeds),
                                   active, False)
      retention = lambda g: self.retention(table_at(g))
      ret = retention(gains)
      if ret < floor:
        gains, ret = control.keep_floor(gains, ret, history, retention, floor)
        warnings.append(f"the utility floor (validation NDCG@10 retention {floor:.2f}) was "
                        "binding: " + (f"kept the table at retention {ret:.3f}" if ret >= floor
                                       else "no table read keeps it; kept the loop's, at "
                                       f"retention {ret:.3f}"))
      table, shares, polish, reading, ret = self._finish(
          active, table_at(gains), control.reading_at(history, gains, False), seeds, seed,
          floor, ret, weights)
      # Which path is taken turns on one reading at twice the target; where
      # the lighter table, refused, keeps the floor and the searched one does
      # not, or it reads closer to chance, it is the best table found (ML-1M
      # LightGCN: occupation +0.021 refused it, and the search ended with
      # gender at +0.041).
      if light is not None:
        done = light.finished
        if done.retention >= floor and (
            ret < floor or control.score(done.reading) < control.score(reading)):
          self._say("control: kept the lighter class-mean share's table (the searched "
                    "gains' reads further from chance, or under the floor)")
          gains, (table, shares, polish, reading, ret) = light.gains, done
          warnings = []   # the search's floor warnings: this table keeps it
    if self.null_sizing():
      table = self.null_sized(table, active, seed)
      ret = self.retention(table)
      if ret < floor:
        warnings.append(f"the table with its class statistics at their permuted-label size "
                        f"keeps validation NDCG@10 retention {ret:.3f}, under the utility "
                        f"floor {floor:.2f}")
    # The loop kept the table whose reading came closest to chance among those
    # it compared, on the same folds: the luckiest draw. Folds it never saw
    # report it (ML-1M NCF: the loop read gender's linear probe at -0.020,
    # five fresh splits at -0.035; docs/findings.md).
    steered, reading = reading, self._read(table, active, seeds=seeds, purpose="report")
    within = bool(np.all(reading.worst() <= tol))
    for a, name in enumerate(active):
      if reading.worst()[a] > tol:
        p = int(np.argmax(np.abs(reading.signed[:, a])))
        warnings.append(f"{name}: {reading.probes[p]} probe reads {reading.signed[p, a]:+.3f} "
                        f"(95% interval {reading.lo[p, a]:+.3f}..{reading.hi[p, a]:+.3f}), "
                        f"target within {tol:.3f} of chance, at retention {ret:.3f}")
    return table, {
        "gains": {a: [float(x) for x in g] for a, g in zip(active, gains)},
        "residual_means": {a: float(x) for a, x in zip(active, shares)},
        **({} if polish is None else {"polish": polish}),
        "leakage": reading.report(active), "leakage_steered": steered.report(active),
        "retention_valid": float(ret),
        "within_target": within, "warnings": warnings, "control_steps": len(history)}

  def _finish(self, active, table, reading, seeds, seed, floor, ret, weights=None
              ) -> Finished:
    """The class-mean step (`_take_back_means`), then the polish (`_polish`),
    each where an attribute still reads above the target and kept only at a
    retention of at least `floor` or the one it starts from, whichever is
    lower."""
    tol = float(self.cfg["target_leakage"])
    shares, polish = np.zeros(len(active)), None
    if self.cfg["residual_means"] and np.any(reading.worst() > tol):
      table, shares, reading, ret = self._take_back_means(active, table, reading, seeds,
                                                          min(floor, ret), ret)
    if self.cfg["polish_steps"] > 0:
      table, polish, reading, ret = self._polish(active, table, reading, seeds, seed,
                                                 min(floor, ret), ret, weights)
    return Finished(table, shares, polish, reading, ret)

  def null_sizing(self) -> bool:
    return any(self.cfg[k] for k in ("null_covariances", "null_shapes", "null_means"))

  def null_sized(self, table, names, seed=None) -> np.ndarray:
    """`table` with each attribute's class statistics at their permuted-label
    size: the class covariances (`unlearn.null_covariances`,
    `control.null_covariances`), every coordinate's class-conditional shape
    (`unlearn.null_shapes`, `control.null_shapes`), then the class means (`unlearn.null_means`,
    `control.null_means`); seeded by `seed` (default this config's). Applied
    last, so no step after it equalises them again."""
    labels, num_classes = self.wd.labels(names)
    labels, seed = np.asarray(labels), self.config["seed"] if seed is None else seed
    table = sharding.to_host(table)
    if self.cfg["null_covariances"]:
      table = control.null_covariances(table, labels, num_classes, seed=int(
          attribute_key(int(seed), "null_covariances")[-1]))
    if self.cfg["null_shapes"]:
      table = control.null_shapes(table, labels, num_classes,
                                  seed=int(attribute_key(int(seed), "null_shapes")[-1]))
    if self.cfg["null_means"]:
      table = control.null_means(table, labels, num_classes,
                                 seed=int(attribute_key(int(seed), "null_means")[-1]))
    return table

  def _lighter_means(self, active, table_at, seeds, seed, floor, weights=None
                     ) -> Optional[Lighter]:
    """`unlearn.mean_share` < 1: the combined table with that share of each
    brick's class-mean part (gains (share, 1)), finished (`_finish`),
    accepted where every attribute then reads within twice the target at a
    retention of at least `floor`; None where `mean_share` is 1.

    The bricks' class-mean parts carry the combination's utility cost: each
    is a rigid shift of a class fitted to one attribute, and added they
    cross. The jointly fitted class means taken back and the polish remove
    what a share of them leaves at a fraction of that cost (ML-1M MF: 0.958
    of validation retention at full class-mean gains, 0.981 at three
    quarters, finished), but leave more for independent judges to read
    (gradient-boosted trees on ML-1M NCF: 0.046 -> 0.063; docs/findings.md)."""
    share = float(self.cfg["mean_share"])
    if share >= 1.0:
      return None
    gains = np.tile([[share, 1.0]], (len(active), 1))
    table = table_at(gains)
    reading = self._read(table, active, seeds=seeds)
    self._say(f"control, class-mean parts x{share:.2f}: " + "; ".join(
        f"{n} {s:+.3f}" for n, s in zip(active, reading.worst_signed())))
    done = self._finish(active, table, reading, seeds, seed, floor, self.retention(table),
                        weights)
    tol = float(self.cfg["target_leakage"])
    left = [n for n, w in zip(active, done.reading.worst()) if w > 2 * tol]
    if not left and done.retention >= floor:
      return Lighter(gains, done, True)
    self._say(f"control, class-mean parts x{share:.2f}: " + (
        f"{', '.join(left)} beyond twice the target" if left else
        f"retention {done.retention:.3f} under the floor") + "; searching the gains")
    return Lighter(gains, done, False)

  def _take_back_means(self, active, table, reading, seeds, floor, ret):
    """`unlearn.residual_means`: the combined table less a share of what is left
    of each attribute's class means (`control.class_mean_parts`), per attribute
    the smallest share its probes read within twice the target, else the one
    they read closest to chance. Kept only where the probes read the result
    closer to chance on average than the table without it, at a retention
    (`retention`) of at least `floor`; returns (table, shares,
    reading, retention).

    Each brick alone reaches chance, but added they cross: correlated
    attributes shift each other's class means, and a shift no gain on the
    bricks' own moves lies along remains (ML-1M NCF, LightGCN;
    docs/findings.md).
    """
    labels, num_classes = self.wd.labels(active)
    parts = control.class_mean_parts(table, labels, num_classes)
    at = lambda s: table - np.tensordot(np.asarray(s, table.dtype), parts, 1)
    tol = float(self.cfg["target_leakage"])
    shares, best = np.zeros(len(active)), reading.worst()
    settled = best <= 2 * tol
    read = {}
    for share in control.RESIDUAL_SHARES:
      if settled.all():
        break
      r = read[share] = self._read(at(np.full(len(active), share)), active, seeds=seeds)
      self._say(f"control, class means taken back: x{share:.2f} " + "; ".join(
          f"{n} {s:+.3f}" for n, s in zip(active, r.worst_signed())))
      better = ~settled & (r.worst() < best)
      shares[better], best[better] = share, r.worst()[better]
      # The smallest share that comes within twice the target is kept: past it,
      # fresh attackers read the overshoot below chance more strongly than the
      # probes that chose it (ML-1M MF: probes -0.013, a new linear probe -0.045).
      settled |= best <= 2 * tol
    if shares.any():
      cand = at(shares)
      same = shares[0] if np.all(shares == shares[0]) else None
      r = read[same] if same in read else self._read(cand, active, seeds=seeds)
      cand_ret = self.retention(cand)
      if control.score(r) < control.score(reading) and cand_ret >= floor:
        return cand, shares, r, cand_ret
    return table, np.zeros(len(active)), reading, ret

  def _polish(self, active, table, reading, seeds, seed, floor, ret,
              weights=None):
    """`unlearn.polish_steps`: the combined table plus a gain of `polish_move`
    for the attributes above the target, at the gain `control.polish_gain`
    ranks first among those keeping a retention (`retention`) of at
    least `floor`; returns (table, {"attributes", "gain"} or None where no
    attribute is above the target, reading, retention).

    What is left after combining did not move under more minibatch steps
    (ML-1M NCF: MLP gender +0.042); on every user the estimate's
    permuted-label level is lower, and half the polish took it to chance.
    Only the attributes whose probe furthest from chance reads them above
    it by more than the target are polished: one at chance already is
    pushed below it, and one read below chance further below (ML-100K
    NCF: age -0.018 -> -0.027; docs/findings.md).

    Which attributes, and the gain, are read on the table as it will be
    kept (`null_sized`) by the steering probes and `unlearn.polish_probes`:
    a neighbour vote reads users surrounded by their own class, which adding
    the bricks brings back where the linear and MLP probes read chance
    (ML-1M NCF: the 25-NN judge read age at +0.037 on a table those probes
    read within 0.015; docs/findings.md). The reading
    returned is the steering probes' (`reading` where nothing is polished):
    what the loop's other steps compare.
    """
    tol = float(self.cfg["target_leakage"])
    steering = list(self.cfg["probes"])
    probes = list(dict.fromkeys(steering + list(self.cfg["polish_probes"])))
    # Read as it will be kept: a polish that equalises class means in sample
    # reads below chance until `null_means` sizes them (ML-1M MF gain 1:
    # linear gender -0.057), which would stop it short of the shapes.
    final = ((lambda t: self.null_sized(t, active, seed))
             if self.null_sizing() else (lambda t: t))

    def read(gain):
      r = self._read(final(table + gain * move) if gain else final(table), active,
                     probes=probes, seeds=seeds)
      what = f"polish of {', '.join(which)}: x{gain:.2f}" if gain else "before the polish:"
      self._say(f"control, {what} " + "; ".join(
          f"{n} {s:+.3f}" for n, s in zip(active, r.worst_signed())))
      return r
    before = read(0.0)
    which = [a for a, w in zip(active, before.worst_signed()) if w > tol]
    if not which:
      return table, None, reading, ret
    move = self.polish_move(table, which, seed, **(weights or {}))
    for gain, r in control.polish_gain(read, before, tol=tol):
      if gain == 0.0:
        break
      cand = final(table + gain * move)
      cand_ret = self.retention(cand)
      if cand_ret >= floor:
        return cand, {"attributes": which, "gain": gain}, r.select(steering), cand_ret
    return table, {"attributes": which, "gain": 0.0}, reading, ret

  def polish_move(self, table, names, seed=None, **settings) -> np.ndarray:
    """One free table's move from `table` (n, D), calibrated for every attribute
    of `names` at once: `unlearn.polish_steps` steps of the MMD on
    `unlearn.polish_features` random Fourier features of every user
    (`estimator = "features"`, O(n) per kernel), the ranking hinge against
    the original top-T lists and the pull to `table`, under the section's
    weights. `settings` replace `unlearn` fields (for measuring it); seeded
    by `seed` (default this config's)."""
    cfg = {**self.cfg, "steps": int(self.cfg["polish_steps"]), "loss": "mmd",
           "estimator": "features", "features": int(self.cfg["polish_features"]),
           "batch_users": 0, "per_attribute": {}, **settings}
    bb = self.wd.backbone()
    spec = calibration.Spec.from_config(cfg, self.num_classes(), parts=bb.model.user_parts)
    hp = calibration.HParams.from_config(cfg, [None])
    labels, _ = self.wd.labels(names)
    seed = self.config["seed"] if seed is None else seed
    key = attribute_key(int(seed), "polish:" + ",".join(names))
    target = self.target()._replace(e0=jnp.asarray(table, jnp.float32))
    move, _, _ = calibration.calibrate(target, jnp.asarray(labels)[None], hp, key[None],
                                       spec=spec, score_fn=bb.score)
    return sharding.to_host(move[0])

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
                                     self.config["eval"]["batch_users"])
      score = bb.score
      scale = preservation.score_scale(lambda u, i: score(e0, u, i), topk[:, :t])
      place = lambda x: sharding.over_users(jnp.asarray(x), self.mesh())
      self._target = calibration.Target(place(e0), place(topk), jnp.float32(scale))
    return self._target

  def mesh(self):
    """The devices the user axis is split over (`run.devices`); None for one."""
    if not hasattr(self, "_mesh"):
      self._mesh = sharding.mesh(int(self.config["run"]["devices"]))
    return self._mesh

  def labels(self, names) -> jax.Array:
    """(K, n) codes of `names`, their user axis on the mesh."""
    return sharding.over_users(jnp.asarray(self.wd.labels(names)[0]), self.mesh(), axis=1)

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
    start = time.perf_counter()
    spec = self.spec()
    hps = calibration.HParams.from_config(self.cfg, todo)
    keys = jnp.stack([attribute_key(self.config["seed"], n) for n in todo])
    settings = {"attributes": todo, "bricks": {n: self.brick_settings(n) for n in todo},
                "chunk": spec.chunk, **self._identity()}
    out = self.calibrate_tasks(todo, hps, keys, resume=settings)
    leakage = None if out.reading is None else out.reading.report(todo)
    # One vmapped program calibrates every brick of `todo`: they share its seconds
    # (this process's: a resumed run counts from its restart).
    seconds = round(time.perf_counter() - start, 1)
    for k, name in enumerate(todo):
      meta = {"attribute": name, "created": _now(), "steps": int(out.state.step[k]),
              "seconds": seconds,
              "settings": self.brick_settings(name), "gain": [float(x) for x in out.gains[k]],
              "strength": {f: out.strength[f][k] for f in ("w_mi", "l2")},
              "leakage": None if leakage is None else leakage[name],
              "final_mi": float(out.trace.mi[k, -1, 0]),
              "final_null": float(out.trace.null[k, -1, 0]),
              "final_rank": float(out.trace.rank[k, -1]), **self._identity()}
      tree = {"delta": out.bricks[k]}
      if spec.calibrator == "residual":
        tree["map"] = jax.tree.map(lambda x: sharding.to_host(x)[k], out.state.params)
      checkpoint.save(self.brick_dir(name), tree, meta)
    checkpoint.remove(self.bricks_dir / IN_PROGRESS)
    return todo

  def calibrate_tasks(self, names, hps: calibration.HParams, keys, *, seeds=None,
                      resume: Optional[dict] = None) -> "Calibrated":
    """One brick per task t: attribute `names[t]` (repeats allowed) under
    `hps` leaves [t] and `keys[t]`, its probes seeded by `seeds[t]` (default
    this config's seed); every task in one vmapped program, with the strength
    control during calibration and the gains after it. Nothing is stored,
    except with `resume` (the settings that identify a request): then the
    state is checkpointed in `bricks/.in-progress` and resumed from there.
    """
    spec = self.spec()
    target = self.target()
    labels = self.labels(names)
    state, strength = (self._resume(resume, calibration.init_states(keys, target.e0, hps.lr,
                                                                    spec=spec))
                       if resume is not None else (None, None))
    # The MI weight and pull the control loop has reached, and its last reading
    # (control.strength_step); stored with the state, so a resumed run goes on alike.
    strength = strength or {"w_mi": np.asarray(hps.w_mi).tolist(), "l2": np.asarray(hps.l2).tolist()}
    hps = hps._replace(w_mi=jnp.asarray(strength["w_mi"], jnp.float32),
                       l2=jnp.asarray(strength["l2"], jnp.float32))
    bb = self.wd.backbone(progress=False)
    bar = _progress(self.progress, spec.steps, f"calibrating {','.join(dict.fromkeys(names))}")
    at = [0 if state is None else int(np.min(state.step))]   # the step reached so far
    bar.update(at[0])
    checks = self._strength_checks(spec.steps)

    def adjust(st, hps):
      """The strength's dual step at each check the last chunk passed, then a checkpoint."""
      step = int(np.min(st.step))
      if any(at[0] < c <= step for c in checks):
        tables = target.e0[None] + calibration.bricks(st, target.e0, spec=spec)
        reading = self._read(sharding.to_host(tables), names, seeds=seeds)
        w_mi, l2 = np.asarray(hps.w_mi), np.asarray(hps.l2)
        if "previous" in strength:
          w_mi, l2 = control.strength_step(reading, strength["previous"], w_mi, l2,
                                           float(self.cfg["target_leakage"]))
        strength["previous"] = reading.worst_signed().tolist()
        self._say(f"control, step {step}: " + "; ".join(
            f"{n} " + " ".join(f"{p} {reading.signed[i, a]:+.3f}" for i, p in
                               enumerate(reading.probes)) + f" -> w_mi {w_mi[a]:.3g} l2 {l2[a]:.3g}"
            for a, n in enumerate(names)))
        hps = hps._replace(w_mi=jnp.asarray(w_mi, jnp.float32), l2=jnp.asarray(l2, jnp.float32))
      bar.update(step - at[0])
      at[0] = step
      strength.update(w_mi=[float(x) for x in hps.w_mi], l2=[float(x) for x in hps.l2])
      if resume is not None:
        checkpoint.save(self.bricks_dir / IN_PROGRESS, checkpoint.flatten(st),
                        {**resume, "strength": strength})
      return hps

    bricks, state, trace = calibration.calibrate(target, labels, hps, keys, spec=spec,
                                                 score_fn=bb.score, state=state, adjust=adjust)
    bar.update(spec.steps - at[0])
    bar.close()
    bricks = sharding.to_host(bricks)
    gains, reading = self._control_bricks(names, bricks, seeds)
    return Calibrated(bricks, gains, reading, strength, state, trace)

  def _resume(self, settings: dict, template) -> tuple[Optional[calibration.State], Optional[dict]]:
    """The interrupted calibration of the same attributes and settings, with the
    strength the control loop had reached; (None, None) where there is none."""
    d = self.bricks_dir / IN_PROGRESS
    if not checkpoint.exists(d):
      return None, None
    tree, meta = checkpoint.restore(d)
    strength = meta.pop("strength", None)
    if meta != settings:   # another request was interrupted: start afresh
      checkpoint.remove(d)
      return None, None
    return checkpoint.unflatten(template, tree), strength

  def _strength_checks(self, steps: int) -> list[int]:
    """The steps after which the probes set the strength (`control.strength_step`)."""
    if self.cfg["control"] == "none":
      return []
    return sorted({max(1, round(f * steps)) for f in control.STRENGTH_CHECKS})

  # ---- combination -------------------------------------------------------
  @_writes
  def combine(self, active) -> np.ndarray:
    """Combines the bricks of `active` (all stored bricks stacked, the rest masked)."""
    start = time.perf_counter()
    active = list(dict.fromkeys(active))
    stored = self.brick_meta()
    missing = [a for a in active if a not in stored]
    if missing:
      raise LegoError(f"no brick for {', '.join(missing)}; calibrate first "
                      f"(stored: {', '.join(stored) or 'none'})")
    bb = self.wd.backbone()
    e0 = bb.table()
    report = {}
    if not active:
      table, weights, names = np.asarray(e0), np.zeros((0, 1), np.float32), []
    else:
      order = [a for a in self.wd.attribute_names() if a in stored]
      bricks = sharding.over_users(jnp.stack([self._load_brick(a) for a in order]), self.mesh(), 1)
      mask = jnp.asarray([a in active for a in order], jnp.float32)
      spec = self.combination_spec()
      self._say(f"combining {', '.join(active)} ({spec.steps} steps)")
      w, _, _ = combination.fit(self.target(), bricks, self.labels(order), mask,
                                self.combination_key(self.config["seed"]),
                                combination.HParams.from_config(self.config["combine"]),
                                spec=spec, score_fn=bb.score)
      table, report = self.controlled_table(order, active, bricks, w)
      weights, names = sharding.to_host(w), order
    checkpoint.save(self.wd.path / "combination", {"table": table, "weights": weights},
                    {"active": active, "bricks": names, "mode": self.config["combine"]["mode"],
                     "created": _now(), "seconds": round(time.perf_counter() - start, 1),
                     **report, **self._identity()})
    return table

  def combination_spec(self) -> combination.Spec:
    return combination.Spec.from_config(self.config["combine"],
                                        {**self.cfg, "batch_users": self.batch_users()},
                                        self.num_classes(), self.wd.backbone().model.user_parts)

  @staticmethod
  def combination_key(seed: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(seed), 1)

  def controlled_table(self, order, active, bricks, w, seed=None, weights=None
                       ) -> tuple[np.ndarray, dict]:
    """The combined table of bricks (K, n, D) (attributes `order`) under the
    learned weights `w`, with the control loop's gains on the `active` ones
    (probes seeded by `seed`, default this config's), and its report.
    `weights` replace the `unlearn` weights the polish calibrates with (a
    sweep's grid point; `polish_move`)."""
    e0 = self.target().e0
    mask = jnp.asarray([a in active for a in order], jnp.float32)
    mode = self.config["combine"]["mode"]
    index = np.asarray([order.index(a) for a in active])
    mean, rest = (jnp.asarray(x) for x in self._parts(order, bricks))

    def table_at(g):
      gains = np.ones((len(order), 2), np.float32)
      gains[index] = g
      gains = jnp.asarray(gains)
      return sharding.to_host(combination.combine(w, e0, mean, mask, mode, gains[:, 0])
                              + combination.combine(w, jnp.zeros_like(e0), rest, mask, mode,
                                                    gains[:, 1]))
    return self._control_combination(active, table_at, seed, weights)

  # ---- requests ----------------------------------------------------------
  def brick_settings(self, name: str) -> dict:
    """The `unlearn` values that make brick `name`: its per-attribute ones where set."""
    return {**{f: self.cfg.get(f) for f in BRICK_FIELDS},
            **self.cfg.get("per_attribute", {}).get(name, {})}

  def stale(self, meta: Optional[dict] = None) -> list[str]:
    """Bricks calibrated under other `unlearn` settings than the current ones, or
    from another backbone."""
    meta = self.brick_meta() if meta is None else meta
    return [n for n, m in meta.items() if self.why_stale(n, m)]

  def why_stale(self, name: str, meta: dict) -> list[str]:
    """What brick `name` (its metadata `meta`) was made under otherwise: the
    `unlearn` fields whose values differ (a field added since counts), then
    how its backbone or data differ; empty where it is current."""
    have, want = meta.get("settings") or {}, self.brick_settings(name)
    return ([f"unlearn.{k}" for k in sorted(set(have) | set(want))
             if k not in have or k not in want or have[k] != want[k]] + self._foreign(meta))

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


class Calibrated(NamedTuple):
  """`Unlearner.calibrate_tasks`'s result, one entry per task (T tasks)."""
  bricks: np.ndarray                   # (T, n, D) the calibrated moves, before the gains
  gains: np.ndarray                    # (T, 2) the control loop's gains (class-mean part, rest)
  reading: Optional[control.Reading]   # what the probes read at those gains (None: no control)
  strength: dict                       # {"w_mi": [T], "l2": [T]} where the strength control left them
  state: calibration.State
  trace: calibration.Trace


def _progress(enabled: bool, total: int, desc: str):
  return tqdm(total=total, desc=desc, disable=not enabled, leave=False)
