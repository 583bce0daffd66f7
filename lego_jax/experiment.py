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

import numpy as np

from lego_jax import config as config_lib
from lego_jax.errors import LegoError, unknown
from lego_jax.runner import RANKING_KEYS, attack_table, format_table
from lego_jax.unlearning.baselines import METHODS
from lego_jax.workdir import Workdir, write_json

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
  backbone = backbone or wd.backbone(progress=False)
  table = backbone.table() if table is None else table
  res = _evaluate_with(wd, backbone, table)
  ranking = {k: res[k] for k in RANKING_KEYS}
  out = {"ranking": ranking, "seconds": seconds,
         "attack": {a: attack_table(wd, table, a, "cv5", names)
                    for a in wd.config["run"]["attackers"]}}
  if original is not None:
    out["retention"] = {k: ranking[k] / original["ranking"][k] if original["ranking"][k] else None
                        for k in RANKING_KEYS}
  return out


def _evaluate_with(wd: Workdir, backbone, table):
  from lego_jax.evaluation import ranking
  ec = wd.config["eval"]
  return ranking.evaluate(backbone.ranking_fn(table), wd.split, ks=tuple(ec["ks"]),
                          batch_users=ec["batch_users"])


def train_and_evaluate(config: dict, workdir, progress: bool = True) -> dict:
  """The whole pipeline; returns the results dict also written to results.json."""
  say = (lambda s: print(f"[lego-jax] {s}", file=sys.stderr, flush=True)) if progress else (
      lambda s: None)
  methods = list(config["run"]["methods"])
  for m in methods:
    if m not in METHODS:
      raise unknown("method", m, METHODS)
  wd = Workdir.create(workdir, config)
  names = list(config["unlearn"]["attributes"]) or wd.attribute_names()
  wd.labels(names)  # unknown attributes fail here, before any training
  results = {"command": "lego-jax " + " ".join(shlex.quote(a) for a in sys.argv[1:])
             if sys.argv and "lego" in sys.argv[0] else None,
             "config": config, "dataset": wd.dataset.name, "attributes": names, "methods": {}}

  start = time.perf_counter()
  say("stage backbone: train or reuse")
  wd.backbone(progress=progress)  # checkpointed every epoch by training itself
  results["seconds_backbone"] = time.perf_counter() - start

  original = _stage(wd, "original", lambda: _assess(wd, None, None, names, 0.0), say, names)
  results["methods"]["original"] = original
  results["methods"]["popularity"] = _stage(
      wd, "popularity", lambda: {"ranking": {k: wd.evaluate_popularity()[k] for k in RANKING_KEYS}},
      say, names)
  for m in methods:
    def run_method(m=m):
      out = METHODS[m](wd, names)
      return _assess(wd, out.table, out.backbone, names, out.seconds, original)
    results["methods"][m] = _stage(wd, f"method:{m}", run_method, say, names)
    _write(wd, results)

  if config["run"]["sweep"]:
    results["sweep"] = _sweep(wd, names, config["run"]["sweep"], original, say)
  _write(wd, results)
  return results


def _sweep(wd: Workdir, names, values, original, say) -> list[dict]:
  """LEGO with each ranking weight in `values`, in sub-workdirs sharing the backbone."""
  from lego_jax.unlearning.baselines import lego
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


def summary(results: dict) -> str:
  """report.md: one table of every method, then the config and the command."""
  names = results["attributes"]
  attackers = [a for a in ("mlp", "linear") if a in results["methods"]["original"]["attack"]]
  headers = ["method", "NDCG@10", "Recall@10", "retention NDCG@10"]
  headers += [f"leak {a} ({at})" for at in attackers for a in names] + ["seconds"]
  rows = []
  for m, r in results["methods"].items():
    row = [m, r["ranking"]["ndcg@10"], r["ranking"]["recall@10"],
           (r.get("retention") or {}).get("ndcg@10", 1.0 if m == "original" else "")]
    for at in attackers:
      row += [r["attack"][at][a]["leakage"] if "attack" in r else "" for a in names]
    row.append(f"{r['seconds']:.2f}" if r.get("seconds") else "–")
    rows.append(row)
  lines = [f"# lego-jax results: {results['dataset']}, backbone {results['config']['model']['name']}",
           "", "Leakage = |balanced accuracy - chance| of an attribute-inference attacker "
           "(5-fold CV, classes balanced); retention = metric after / original.", "",
           format_table(headers, rows), ""]
  lines += ["Balanced accuracy (chance in brackets):", "",
            format_table(["method"] + [f"{a} ({at})" for at in attackers for a in names],
                         [[m] + [f"{r['attack'][at][a]['bacc']:.3f} ({r['attack'][at][a]['chance']:.3f})"
                                 for at in attackers for a in names]
                          for m, r in results["methods"].items() if "attack" in r]), ""]
  if results.get("sweep"):
    lines += ["Trade-off sweep (LEGO, ranking weight):", "",
              format_table(["lam_rank", "retention NDCG@10"] + [f"leak {a} (mlp)" for a in names],
                           [[s["lam_rank"], s["retention"]["ndcg@10"]]
                            + [s["attack"]["mlp"][a]["leakage"] for a in names]
                            for s in results["sweep"]]), ""]
  if results.get("command"):
    lines += ["Produced by:", "", f"    {results['command']}", ""]
  lines += ["Config:", "", "```json", json.dumps(results["config"], indent=1, sort_keys=True),
            "```", ""]
  return "\n".join(lines)


def _write(wd: Workdir, results: dict) -> None:
  results["summary"] = summary(results)
  write_json(wd.path / "results.json", {k: v for k, v in results.items() if k != "summary"})
  tmp = wd.path / ".report.md.tmp"
  tmp.write_text(results["summary"])
  tmp.replace(wd.path / "report.md")
  plots(wd.path, results)


def plots(path: pathlib.Path, results: dict) -> None:
  """leakage.png (BAcc per attribute and method against chance); tradeoff.png when swept."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = results["attributes"]
  methods = [m for m, r in results["methods"].items() if "attack" in r]
  attackers = [a for a in ("mlp", "linear") if a in results["methods"]["original"]["attack"]]
  fig, axes = plt.subplots(1, len(attackers), figsize=(5.5 * len(attackers), 3.8), squeeze=False)
  width = 0.8 / max(len(methods), 1)
  for ax, at in zip(axes[0], attackers):
    x = np.arange(len(names))
    for i, m in enumerate(methods):
      att = results["methods"][m]["attack"][at]
      bacc = [att[a]["bacc"] for a in names]
      err = np.array([[att[a]["bacc"] - att[a]["ci95"][0], att[a]["ci95"][1] - att[a]["bacc"]]
                      for a in names]).T
      ax.bar(x + (i - (len(methods) - 1) / 2) * width, bacc, width, yerr=err, label=m, capsize=2)
    for j, a in enumerate(names):
      chance = results["methods"]["original"]["attack"][at][a]["chance"]
      ax.hlines(chance, j - 0.45, j + 0.45, colors="k", linestyles="--",
                label="chance" if j == 0 else None)
    ax.set_xticks(x, names)
    ax.set_ylabel("balanced accuracy")
    ax.set_title(f"{at} attacker")
  axes[0][0].legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path / ".leakage.png.tmp.png", dpi=110)
  (path / ".leakage.png.tmp.png").replace(path / "leakage.png")
  plt.close(fig)
  if results.get("sweep"):
    fig, ax = plt.subplots(figsize=(5, 3.8))
    sw = sorted(results["sweep"], key=lambda s: s["lam_rank"])
    for a in names:
      ax.plot([s["retention"]["ndcg@10"] for s in sw], [s["attack"]["mlp"][a]["leakage"] for s in sw],
              "o-", label=a)
    for s in sw:
      ax.annotate(f"{s['lam_rank']:g}", (s["retention"]["ndcg@10"],
                                         max(s["attack"]["mlp"][a]["leakage"] for a in names)),
                  fontsize=7)
    ax.set_xlabel("NDCG@10 retention")
    ax.set_ylabel("leakage |BAcc - chance| (mlp)")
    ax.set_title("LEGO trade-off over the ranking weight")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path / ".tradeoff.png.tmp.png", dpi=110)
    (path / ".tradeoff.png.tmp.png").replace(path / "tradeoff.png")
    plt.close(fig)


def grid(config_names, root, overrides=(), out=None) -> str:
  """Runs each config into root/<name> and writes one combined markdown table."""
  root = pathlib.Path(root)
  results = [train_and_evaluate(config_lib.resolve(name, overrides), root / pathlib.Path(name).stem)
             for name in config_names]
  text = (f"Produced by: lego-jax grid --configs {','.join(config_names)} --root {root}\n\n"
          + grid_table(results) + "\n")
  target = pathlib.Path(out) if out else root / "grid.md"
  target.parent.mkdir(parents=True, exist_ok=True)
  target.write_text(text)
  return text


def grid_table(results: list[dict]) -> str:
  """One markdown table of several runs' `results.json`: a row per backbone and method."""
  names_seen = list(dict.fromkeys(a for res in results for a in res["attributes"]))
  attackers = list(dict.fromkeys(at for res in results for at in res["config"]["run"]["attackers"]))
  rows = []
  for res in results:
    order = ["original"] + list(res["config"]["run"]["methods"])
    for m in sorted(res["methods"], key=lambda m: order.index(m) if m in order else len(order)):
      r = res["methods"][m]
      if m == "popularity":
        continue
      leak = r.get("attack", {})
      cells = [" / ".join(f"{leak[at][a]['leakage']:.3f}" for at in attackers if at in leak)
               if a in res["attributes"] else "" for a in names_seen]
      worst = max((leak[at][a]["leakage"] for at in leak for a in res["attributes"]), default=None)
      rows.append([res["dataset"], res["config"]["model"]["name"], m,
                   f"{r['ranking']['ndcg@10']:.4f}",
                   f"{(r.get('retention') or {}).get('ndcg@10', 1.0):.3f}"] + cells
                  + ["" if worst is None else f"{worst:.3f}",
                     _seconds(r.get("seconds"))])
  headers = ["dataset", "backbone", "method", "NDCG@10", "retention"] + \
            [f"leak {a} ({' / '.join(attackers)})" for a in names_seen] + ["max leak", "seconds"]
  return format_table(headers, rows)


def _seconds(s) -> str:
  return "–" if not s else f"{s:.1f}" if s >= 1 else f"{s:.2f}"
