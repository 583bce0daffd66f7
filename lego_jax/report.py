"""Results as text and figures: tables, report.md, the leakage and trade-off plots.

The last step of the flow (data -> backbone -> calibration -> combination ->
evaluation -> report): everything here reads result dicts (`results.json`) and
computes nothing new.
"""

import json
import pathlib

import numpy as np

HEADLINE_KS = (10, 20)   # always evaluated: the tables and retention are read at these


def ranking_keys(ks=()) -> tuple:
  """The metric keys of an evaluation at `ks` plus the headline @10 and @20."""
  return tuple(f"{m}@{k}" for k in sorted(set(ks) | set(HEADLINE_KS))
               for m in ("recall", "ndcg", "hr"))
ATTACK_KEYS = ("bacc", "macro_f1", "auc", "chance", "leakage", "ci95")


def format_table(headers, rows) -> str:
  """A plain aligned text/markdown table."""
  cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
  widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  return "\n".join([line(cells[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                   + [line(r) for r in cells[1:]])


def _fmt(c) -> str:
  if isinstance(c, float):
    return f"{c:.4f}"
  if isinstance(c, (list, tuple)):
    return "[" + ", ".join(_fmt(x) for x in c) + "]"
  return str(c)


def _attackers(results: dict) -> list[str]:
  """The attackers that read every table (`run.attackers`), in the config's order."""
  return list(results["methods"]["original"]["attack"])


def summary(results: dict) -> str:
  """report.md: one table of every method, then the config and the command."""
  names = results["attributes"]
  attackers = _attackers(results)
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
           f"({_protocol(results['config'])}); retention = metric after / original.", "",
           format_table(headers, rows), ""]
  lines += ["Balanced accuracy (chance in brackets):", "",
            format_table(["method"] + [f"{a} ({at})" for at in attackers for a in names],
                         [[m] + [f"{r['attack'][at][a]['bacc']:.3f} ({r['attack'][at][a]['chance']:.3f})"
                                 for at in attackers for a in names]
                          for m, r in results["methods"].items() if "attack" in r]), ""]
  control = (results["methods"].get("lego") or {}).get("control") or {}
  if control.get("leakage"):
    lines += [f"LEGO's closed loop: validation NDCG@10 retention {control['retention_valid']:.3f}; "
              f"every attribute within the target: {'yes' if control['within_target'] else 'no'}"]
    lines += [f"- warning: {w}" for w in control.get("warnings") or []] + [""]
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


def trust_warnings(results: dict) -> list[str]:
  """Where a run's numbers cannot be trusted as they stand, in plain words."""
  out = []
  methods = results["methods"]
  orig, pop = methods.get("original"), methods.get("popularity")
  if orig and pop and orig["ranking"]["ndcg@10"] < pop["ranking"]["ndcg@10"]:
    out.append(f"the backbone (NDCG@10 {orig['ranking']['ndcg@10']:.4f}) ranks worse than item "
               f"popularity ({pop['ranking']['ndcg@10']:.4f}): train it longer or check the data; "
               "retention against it means little")
  for name, r in ((orig or {}).get("attack") or {}).get("mlp", {}).items():
    half = (r["ci95"][1] - r["ci95"][0]) / 2
    if half > 0.04:
      out.append(f"{name}: the attackers' 95% interval is ±{half:.3f} ({r['n']} class-balanced "
                 "users): leakage smaller than that cannot be told from chance")
  cfg, n = results["config"]["unlearn"], results.get("users")
  if n and (cfg["batch_users"] >= n or (cfg["batch_users"] <= 0 and cfg["batch_fraction"] >= 1)):
    out.append(f"the unlearning minibatch covers all {n} users: calibration tends to overshoot "
               "below chance (docs/findings.md); lower unlearn.batch_users or batch_fraction")
  control = (methods.get("lego") or {}).get("control") or {}
  out += [f"LEGO: {w}" for w in control.get("warnings") or []]
  return out


def digest(results: dict, workdir) -> str:
  """What `lego-jax run` prints at the end: the results, the files, the verdict."""
  names = results["attributes"]
  attackers = _attackers(results)
  rows = []
  for m, r in results["methods"].items():
    if "attack" not in r:
      continue
    leaks = [max(r["attack"][at][a]["leakage"] for a in names) for at in attackers]
    rows.append([m, f"{r['ranking']['ndcg@10']:.4f}",
                 f"{(r.get('retention') or {}).get('ndcg@10', 1.0):.3f}"]
                + [f"{x:.3f}" for x in leaks] + [_seconds(r.get("seconds"))])
  text = [format_table(["method", "NDCG@10", "retention"]
                       + [f"max leakage ({at})" for at in attackers] + ["seconds"], rows), ""]
  control = (results["methods"].get("lego") or {}).get("control") or {}
  if control.get("leakage"):
    text.append("LEGO's closed loop: every attribute within "
                f"{results['config']['unlearn']['target_leakage']:g} of chance for its probes: "
                f"{'yes' if control['within_target'] else 'no'}")
  path = pathlib.Path(workdir)
  files = [p for p in ("results.json", "report.md", "leakage.png", "tradeoff.png")
           if (path / p).exists()]
  text.append(f"wrote {', '.join(str(path / p) for p in files)}")
  text += [f"warning: {w}" for w in results.get("warnings") or []]
  return "\n".join(text)


def plots(path: pathlib.Path, results: dict) -> None:
  """leakage.png (BAcc per attribute and method against chance); tradeoff.png when swept."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  names = results["attributes"]
  methods = [m for m, r in results["methods"].items() if "attack" in r]
  attackers = _attackers(results)
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


def _protocol(config: dict) -> str:
  att = config.get("attack", {})
  folds, repeats = att.get("folds", 5), att.get("repeats", 1)
  return f"{folds}-fold CV, classes balanced" + (
      f", mean over {repeats} fold splits" if repeats > 1 else "")


def _seconds(s) -> str:
  return "–" if not s else f"{s:.1f}" if s >= 1 else f"{s:.2f}"


def _pm(stats: dict, signed: bool = False) -> str:
  return f"{stats['mean']:{'+' if signed else ''}.3f} ± {stats['std']:.3f}"


def _setting(setting: dict) -> str:
  return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                  for k, v in setting.items()) or "(config)"


def sweep_table(result: dict) -> str:
  """A row per setting: mean ± std over seeds of NDCG@10 retention, the worst
  |BAcc - chance| and each attacker's signed leakage per attribute; * marks
  the Pareto front of (retention, worst leakage)."""
  names, ats = result["attributes"], result["attackers"]
  rows = [[("* " if s["pareto"] else "") + _setting(s["setting"]), _pm(s["retention"]),
           _pm(s["max_leakage"])]
          + [_pm(s["leakage"][a][n], True) for n in names for a in ats]
          + [f"{s['within_target']}/{len(s['seeds'])}"] for s in result["settings"]]
  headers = (["setting", "retention", "max |leak|"] + [f"{n} {a}" for n in names for a in ats]
             + ["within target"])
  return (f"{len(result['seeds'])} seeds ({', '.join(map(str, result['seeds']))}); vmapped: "
          f"{', '.join(result['vmapped']) or 'seeds only'}; looped: "
          f"{', '.join(result['looped']) or 'none'}\n\n" + format_table(headers, rows))


def sweep_plot(path: pathlib.Path, result: dict) -> None:
  """NDCG@10 retention against the worst |leakage|, one point per setting with
  seed std as error bars; the Pareto front joined."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for s in result["settings"]:
    ax.errorbar(s["max_leakage"]["mean"], s["retention"]["mean"], xerr=s["max_leakage"]["std"],
                yerr=s["retention"]["std"], fmt="o" if s["pareto"] else "s", capsize=3,
                color="C3" if s["pareto"] else "C0", alpha=1.0 if s["pareto"] else 0.6)
    ax.annotate(_setting(s["setting"]), (s["max_leakage"]["mean"], s["retention"]["mean"]),
                fontsize=6, xytext=(3, 3), textcoords="offset points")
  front = sorted((s for s in result["settings"] if s["pareto"]),
                 key=lambda s: s["max_leakage"]["mean"])
  ax.plot([s["max_leakage"]["mean"] for s in front], [s["retention"]["mean"] for s in front],
          "-", color="C3", label="Pareto front")
  ax.set_xlabel("worst |BAcc - chance| over attackers and attributes")
  ax.set_ylabel("NDCG@10 retention")
  ax.set_title(f"sweep: mean ± std over {len(result['seeds'])} seeds")
  ax.legend(fontsize=7)
  fig.tight_layout()
  tmp = path.with_name(f".{path.name}.tmp.png")
  fig.savefig(tmp, dpi=110)
  tmp.replace(path)
  plt.close(fig)
