"""The main job and the experiment grid.

`train_and_evaluate(config, workdir)`: data -> backbone -> attack of the
original -> each configured method (LEGO and the baselines) -> ranking
metrics and attacks of every result -> results.json, report.md, plots. Every
stage's outcome is stored in the workdir as it finishes (`stages/<name>.json`,
besides the checkpoints), so an interrupted or failed run resumes where it
stopped; a failure names the stage.
"""

import copy
import json
import pathlib
import shlex
import shutil
import sys
import time

from lego_jax import config as config_lib
from lego_jax.errors import LegoError, unknown
from lego_jax.report import grid_table, plots, ranking_keys, summary, trust_warnings
from lego_jax.methods import METHODS
from lego_jax.requests import Unlearner
from lego_jax.workdir import Workdir, safe_name, write_json, writer_lock

# Config sections a stage's stored outcome depends on beyond the workdir's
# identity (data, backbone, seed) and the attributes: a stage is redone only
# when one of its own sections changes (new unlearning settings do not retrain
# the in-training adversarial baseline).
STAGE_FIELDS = {
    "original": ("attack", "eval"),
    "popularity": ("eval",),
    "method:lego": ("unlearn", "combine", "attack", "eval"),
    "method:joint": ("unlearn", "attack", "eval"),
    "method:sequential": ("unlearn", "attack", "eval"),
    "method:leace": ("attack", "eval"),
    "method:adversarial": ("run.adversarial_weight", "run.adversarial_objective", "attack",
                           "eval"),
}


class StageError(LegoError):
  """A stage of the main job failed; earlier stages are kept in the workdir."""


def _settings(config: dict, stage: str, names) -> dict:
  out = {"attributes": list(names), "attackers": config["run"]["attackers"]}
  for field in STAGE_FIELDS[stage]:
    section, _, key = field.partition(".")
    out[field] = config[section][key] if key else config[section]
  return out


def _stage(wd: Workdir, name: str, fn, progress, names):
  """Runs `fn` once per settings: a stored outcome with the same settings is reused."""
  path = wd.path / "stages" / f"{name.replace(':', '_')}.json"
  settings = _settings(wd.config, name, names)
  if path.is_file():
    stored = json.loads(path.read_text())
    if stored.get("settings") == settings:
      return stored["outcome"]
  progress(name)
  try:
    outcome = fn()
  except LegoError as e:
    raise StageError(f"stage {name!r} failed: {e}; finished stages are kept in {wd.path}") from e
  except Exception as e:
    raise StageError(f"stage {name!r} failed with {type(e).__name__}: {e}; finished stages are "
                     f"kept in {wd.path} (rerun to resume)") from e
  path.parent.mkdir(parents=True, exist_ok=True)
  write_json(path, {"settings": settings, "outcome": outcome})
  return outcome


def _assess(wd: Workdir, table, backbone, names, seconds: float, original=None) -> dict:
  """Ranking metrics (with retention against the original) and both attackers' results."""
  backbone = backbone or wd.backbone()
  table = backbone.table() if table is None else table
  res = wd.evaluate(table, backbone=backbone)
  ranking = {k: res[k] for k in ranking_keys(wd.config["eval"]["ks"])}
  out = {"ranking": ranking, "seconds": seconds,
         "attack": {a: wd.attack(table, a, "cv5", names)
                    for a in wd.config["run"]["attackers"]}}
  if original is not None:
    out["retention"] = {k: ranking[k] / original["ranking"][k] if original["ranking"].get(k) else None
                        for k in ranking}
  return out


def train_and_evaluate(config: dict, workdir, progress: bool = True) -> dict:
  """The whole pipeline; returns the results dict also written to results.json."""
  for m in config["run"]["methods"]:   # refused before anything is written
    if m not in METHODS:
      raise unknown("method", m, METHODS)
  with writer_lock(workdir):
    return _train_and_evaluate(config, workdir, progress)


def _train_and_evaluate(config: dict, workdir, progress: bool) -> dict:
  say = (lambda s: print(f"[lego-jax] {s}", file=sys.stderr, flush=True)) if progress else (
      lambda s: None)
  methods = list(config["run"]["methods"])
  wd = Workdir.create(workdir, config)
  names = list(config["unlearn"]["attributes"]) or wd.attribute_names()
  wd.labels(names)  # unknown attributes fail here, before any training
  results = {"command": "lego-jax " + " ".join(shlex.quote(a) for a in sys.argv[1:])
             if sys.argv and "lego" in sys.argv[0] else None,
             "config": config, "dataset": wd.dataset.name, "attributes": names,
             "users": wd.split.n_users, "methods": {}}

  start = time.perf_counter()
  say("stage backbone: train or reuse")
  wd.train(progress=progress)  # checkpointed every epoch by training itself
  results["seconds_backbone"] = time.perf_counter() - start

  original = _stage(wd, "original", lambda: _assess(wd, None, None, names, 0.0), say, names)
  results["methods"]["original"] = original
  results["methods"]["popularity"] = _stage(
      wd, "popularity", lambda: {"ranking": {k: v for k, v in wd.evaluate_popularity().items()
                                             if k in ranking_keys(config["eval"]["ks"])}},
      say, names)
  for m in methods:
    def run_method(m=m):
      out = METHODS[m](wd, names)
      say(f"method:{m}: ranking metrics and {', '.join(config['run']['attackers'])} attacks")
      res = _assess(wd, out.table, out.backbone, names, out.seconds, original)
      if m == "lego":   # what the closed loop read and whether it reached its target
        res["control"] = Unlearner(wd, progress=False).status().get("combination")
      return res
    results["methods"][m] = _stage(wd, f"method:{m}", run_method, say, names)
    _write(wd, results)

  if config["run"]["sweep"]:
    results["sweep"] = _sweep(wd, names, config["run"]["sweep"], original, say)
  _write(wd, results)
  for w in results["warnings"]:
    say(f"warning: {w}")
  return results


def _sweep(wd: Workdir, names, values, original, say) -> list[dict]:
  """LEGO with each ranking weight in `values`, in sub-workdirs sharing the backbone."""
  from lego_jax.methods import lego
  out = []
  for v in values:
    cfg = copy.deepcopy(wd.config)
    cfg["unlearn"]["lam_rank"] = cfg["combine"]["lam_rank"] = float(v)
    sub = wd.path / "sweep" / f"lam_rank={v:g}"
    if not (sub / "backbone").exists():
      sub.mkdir(parents=True, exist_ok=True)
      shutil.copytree(wd.path / "backbone", sub / "backbone")
      shutil.copy(wd.path / "data.json", sub / "data.json")
    swd = Workdir.create(sub, cfg)

    def run(swd=swd):
      o = lego(swd, names)
      return _assess(swd, o.table, None, names, o.seconds, original)
    res = _stage(swd, "method:lego", run, say, names)
    out.append({"lam_rank": float(v), **res})
  return out


def _write(wd: Workdir, results: dict) -> None:
  results["warnings"] = trust_warnings(results)
  results["summary"] = summary(results)
  write_json(wd.path / "results.json", {k: v for k, v in results.items() if k != "summary"})
  tmp = wd.path / ".report.md.tmp"
  tmp.write_text(results["summary"])
  tmp.replace(wd.path / "report.md")
  plots(wd.path, results)


def grid(config_names, root, overrides=(), out=None) -> str:
  """Runs each config into root/<name> and writes one combined markdown table."""
  root = pathlib.Path(root)
  results = [train_and_evaluate(config_lib.resolve(name, overrides),
                                root / safe_name(pathlib.Path(name).stem))
             for name in config_names]
  text = (f"Produced by: lego-jax grid --configs {','.join(config_names)} --root {root}\n\n"
          + grid_table(results) + "\n")
  target = pathlib.Path(out) if out else root / "grid.md"
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(text)
  return text


