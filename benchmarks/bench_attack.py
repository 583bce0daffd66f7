"""Time to attack 3 attributes x 5 folds, one vmapped program versus a loop.

  python benchmarks/bench_attack.py [--embeddings FILE.npz] [--attacker mlp]
  python benchmarks/bench_attack.py --sweep-steps 50,100,200,300,600,1000

FILE.npz is what `lego-jax export` writes (`embeddings`, `attr_<name>`);
without it, random ML-1M-shaped data (6040 x 64; gender 2, age 7,
occupation 21 classes with ML-1M-like skew) is used, plus a planted signal
when --signal > 0. Each variant runs twice: the first call includes
compilation, the second is steady state. `--sweep-steps` instead reports the
attackers' BAcc against the training budget on the planted-signal data (how
the default `steps` was chosen); `--grid` does the same over a product of
steps, lr, l2 and val_frac, and `--sklearn` adds sklearn's MLPClassifier and
LogisticRegression on the same folds where sklearn is installed. Prints one
JSON object, then a table.

Tuning, H100, 6040 x 64, cv5, BAcc gender / age / occupation (chance .5 /
.143 / .048); "mixed" = class mean shifts (+ a spread shift for gender),
"spread" = per-class scaling of 16 dimensions, equal means:
                            mixed 0.15            spread 0.15
  linear, any l2/steps      .660 .212 .057        .516 .142 .05  (blind)
  mlp l2=1e-4 lr=1e-2 300   .613 .189 .058        .728 .182 .059
  mlp l2=1e-2 lr=1e-2 100   .634 .182 .059        .782 .218 .068
  mlp l2=1e-2 lr=1e-2 300   .629 .197 .061        .774 .216 .062
  mlp l2=1e-2 lr=1e-2 1000  .627 .185 .074        .771 .221 .060
  mlp l2=1e-1 lr=1e-2 300   .662 .196 .043        .552 .143 .044
  mlp l2=1e-2, early stop   .645 .192 .049        .762 .161 .043
  sklearn MLPClassifier     .618 .186 .051        -
  sklearn, early_stopping   .643 .191 .046        -
More steps than 100-300 find nothing more; l2 decides between the linear
and the non-linear signal, and l2 = 1e-2 is the strongest on the signal only
an MLP can see, while the linear probe covers the linear one.

On 64-d SVD embeddings of the real ML-1M interactions (CPU, cv5): linear
.747 / .406 / .073; mlp l2=1e-4 300 steps .699 / .346 / .063; mlp l2=1e-2 at
100 / 300 / 1000 steps .742 / .398 / .081, .737 / .386 / .071,
.734 / .380 / .068. After erasing gender's mean-difference direction
(whitened): linear .457 (below chance: leakage .043), mlp l2=1e-2 100 / 300 /
1000 steps .687 / .676 / .674, l2=1e-4 .627, l2=1e-1 .526.
"""

import argparse
import itertools
import json
import pathlib
import sys
import time

import jax
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from lego_jax.config import DEFAULTS  # noqa: E402
from lego_jax.evaluation import attackers as attack_lib  # noqa: E402

# Approximate ML-1M class shares (gender F/M; the 7 age codes; 21 occupations).
_ML1M = {
    "gender": [0.283, 0.717],
    "age": [0.037, 0.183, 0.347, 0.197, 0.083, 0.082, 0.063],
    "occupation": [0.118, 0.087, 0.044, 0.029, 0.126, 0.018, 0.040, 0.113,
                   0.003, 0.015, 0.032, 0.021, 0.063, 0.024, 0.050, 0.024,
                   0.040, 0.083, 0.012, 0.011, 0.047],
}


def synthetic(n=6040, dim=64, signal=0.0, seed=0, kind="mixed"):
  """Gaussian embeddings with ML-1M-like labels. With signal > 0 and kind
  "mixed", each class shifts the mean (a linear signal) and, for gender, the
  spread of a few dimensions too; with kind "spread", each class only scales
  a random subset of dimensions (means equal: a signal only a non-linear
  attacker can use)."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n, dim))
  names, labels, counts = [], [], []
  for name, p in _ML1M.items():
    p = np.asarray(p) / np.sum(p)
    y = rng.choice(p.size, size=n, p=p)
    if signal > 0 and kind == "spread":
      dims = rng.permutation(dim)[:16]
      scale = 1.0 + signal * rng.uniform(-1, 1, size=(p.size, dims.size)) * 3
      x[:, dims] *= scale[y]
    elif signal > 0:
      means = rng.normal(size=(p.size, dim)) * signal / np.sqrt(dim) * 4
      x = x + means[y]
      if name == "gender":
        x[:, :8] *= np.where(y == 1, 1.0 + signal, 1.0)[:, None]
    names.append(name)
    labels.append(y)
    counts.append(p.size)
  return x.astype(np.float32), np.stack(labels), counts, names


def load(path):
  data = np.load(path, allow_pickle=False)
  names = sorted(k[5:] for k in data.files
                 if k.startswith("attr_") and not k.endswith("_classes"))
  labels = np.stack([data[f"attr_{n}"] for n in names])
  counts = []
  for n in names:
    if f"attr_{n}_classes" in data.files:
      counts.append(len(data[f"attr_{n}_classes"]))
    else:
      counts.append(int(data[f"attr_{n}"].max()) + 1)
  return data["embeddings"].astype(np.float32), labels, counts, names


def timed(fn):
  t = time.perf_counter()
  out = fn()
  return out, time.perf_counter() - t


def bench(x, labels, counts, names, args, cfg):
  res = {}
  for mode, vmap in (("vmap", True), ("loop", False)):
    run = lambda: attack_lib.attack(x, labels, counts, attacker=args.attacker,
                                    protocol=args.protocol, seed=args.seed,
                                    config=cfg, names=names, vmap=vmap)
    out1, t1 = timed(run)
    out2, t2 = timed(run)
    res[mode] = {"first_s": t1, "steady_s": t2, "compile_s": max(t1 - t2, 0.0),
                 "result": out2}
  diff = max(abs(res["vmap"]["result"][n]["bacc"] - res["loop"]["result"][n]["bacc"])
             for n in names)
  return res, diff


def parse_grid(text):
  """"steps=100,300;lr=1e-3,1e-2" -> [{"steps": 100, "lr": 1e-3}, ...]."""
  axes = []
  for part in text.split(";"):
    if part.strip():
      key, values = part.split("=", 1)
      cast = int if key.strip() == "steps" else float
      axes.append([(key.strip(), cast(v)) for v in values.split(",") if v])
  return [dict(combo) for combo in itertools.product(*axes)]


def sweep(x, labels, counts, names, args, cfg, grid):
  """BAcc of both attackers at each grid point; one compile per attacker,
  since l2, lr and steps are traced (val_frac only changes weights)."""
  rows = []
  for attacker in ("mlp", "linear"):
    for point in grid:
      c = dict(cfg, **point)
      run = lambda: attack_lib.attack(x, labels, counts, attacker=attacker,
                                      protocol=args.protocol, seed=args.seed,
                                      config=c, names=names)
      out, t = timed(run)
      rows.append({"attacker": attacker, **point, "seconds": t,
                   **{f"bacc_{n}": out[n]["bacc"] for n in names},
                   **{f"auc_{n}": out[n]["auc"] for n in names}})
  return rows


def sklearn_reference(x, labels, counts, names, args, cfg):
  """BAcc of sklearn's MLPClassifier / LogisticRegression on the very same
  balanced folds (only where sklearn is installed; not a dependency)."""
  try:
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.preprocessing import StandardScaler
  except ImportError:
    return None
  from lego_jax.evaluation import classification_metrics as cm
  per_task, _, _ = attack_lib.make_tasks(labels, counts, args.protocol,
                                         attack_lib._config(cfg), args.seed, names)
  out = {}
  for kind in ("mlp", "mlp_es", "linear"):
    t = time.perf_counter()
    scores = {n: [] for n in names}
    for k, _f, _c, trr, trl, ter, tel, _val in per_task:
      sc = StandardScaler().fit(x[trr])
      if kind.startswith("mlp"):
        clf = MLPClassifier(hidden_layer_sizes=(cfg["hidden"],), random_state=0,
                            early_stopping=kind == "mlp_es")
      else:
        clf = LogisticRegression(max_iter=1000)
      clf.fit(sc.transform(x[trr]), trl)
      scores[names[k]].append(cm.balanced_accuracy(tel, clf.predict(sc.transform(x[ter]))))
    out[kind] = {"seconds": time.perf_counter() - t,
                 **{f"bacc_{n}": float(np.mean(v)) for n, v in scores.items()}}
  return out


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--embeddings", help="an exported FILE.npz")
  ap.add_argument("--attacker", default="mlp", choices=attack_lib.ATTACKERS)
  ap.add_argument("--protocol", default="cv5", choices=attack_lib.PROTOCOLS)
  ap.add_argument("--steps", type=int, default=DEFAULTS["attack"]["steps"])
  ap.add_argument("--signal", type=float, default=0.0,
                  help="planted signal strength for the synthetic data")
  ap.add_argument("--signal-kind", default="mixed", choices=["mixed", "spread"])
  ap.add_argument("--val-frac", type=float, default=None,
                  help="inner validation share for early stopping (0 = fixed budget)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--sweep-steps", default="",
                  help="comma-separated budgets: report BAcc per budget instead")
  ap.add_argument("--grid", default="",
                  help='e.g. "steps=100,300;lr=1e-3,1e-2;l2=1e-4;val_frac=0,0.2": '
                       "report BAcc over the product instead")
  ap.add_argument("--sklearn", action="store_true",
                  help="with --sweep-steps: also sklearn's attackers on the same folds")
  args = ap.parse_args(argv)

  if args.embeddings:
    x, labels, counts, names = load(args.embeddings)
    source = args.embeddings
  else:
    signal = args.signal
    x, labels, counts, names = synthetic(signal=signal, seed=args.seed,
                                         kind=args.signal_kind)
    source = f"synthetic {x.shape[0]}x{x.shape[1]} {args.signal_kind} signal={signal}"
  cfg = dict(DEFAULTS["attack"], steps=args.steps)
  if args.val_frac is not None:
    cfg["val_frac"] = args.val_frac
  info = {"device": str(jax.devices()[0]), "source": source,
          "attributes": dict(zip(names, counts)), "attacker": args.attacker,
          "protocol": args.protocol, "config": cfg}

  if args.sweep_steps or args.grid:
    grid = parse_grid(args.grid or f"steps={args.sweep_steps}")
    rows = sweep(x, labels, counts, names, args, cfg, grid)
    ref = sklearn_reference(x, labels, counts, names, args, cfg) if args.sklearn else None
    print(json.dumps({**info, "sweep": rows, "sklearn": ref}))
    keys = list(grid[0])
    print(f"\n{'attacker':9} " + " ".join(f"{k:>8}" for k in keys) + f" {'sec':>6} " +
          " ".join(f"{'bacc_' + n:>16}" for n in names))
    for r in rows:
      print(f"{r['attacker']:9} " + " ".join(f"{r[k]:8g}" for k in keys) +
            f" {r['seconds']:6.2f} " + " ".join(f"{r['bacc_' + n]:16.4f}" for n in names))
    for kind, r in (ref or {}).items():
      print(f"{'sk-' + kind:9} " + " ".join(f"{'-':>8}" for k in keys) +
            f" {r['seconds']:6.2f} " + " ".join(f"{r['bacc_' + n]:16.4f}" for n in names))
    return

  res, diff = bench(x, labels, counts, names, args, cfg)
  speedup = res["loop"]["steady_s"] / res["vmap"]["steady_s"]
  speedup_first = res["loop"]["first_s"] / res["vmap"]["first_s"]
  print(json.dumps({**info, "vmap": res["vmap"], "loop": res["loop"],
                    "speedup_steady": speedup, "speedup_first": speedup_first,
                    "max_abs_bacc_diff": diff}))
  print(f"\n{'mode':6} {'first call s':>13} {'compile s':>10} {'steady s':>9}")
  for mode in ("vmap", "loop"):
    r = res[mode]
    print(f"{mode:6} {r['first_s']:13.2f} {r['compile_s']:10.2f} {r['steady_s']:9.2f}")
  print(f"speed-up (loop / vmap): steady {speedup:.2f}x, first call {speedup_first:.2f}x;"
        f" max |BAcc vmap - loop| = {diff:.4f}")
  print(f"\n{'attribute':12} {'C':>3} {'n':>6} {'bacc':>7} {'chance':>7} {'leak':>7}"
        f" {'f1':>7} {'auc':>7}  ci95")
  for n, c in zip(names, counts):
    r = res["vmap"]["result"][n]
    print(f"{n:12} {c:3d} {r['n']:6d} {r['bacc']:7.4f} {r['chance']:7.4f} "
          f"{r['leakage']:7.4f} {r['macro_f1']:7.4f} {r['auc']:7.4f}  "
          f"[{r['ci95'][0]:.4f}, {r['ci95'][1]:.4f}]")


if __name__ == "__main__":
  main()
