"""Seconds per training epoch for each backbone (and the full-ranking test eval).

  python benchmarks/bench_backbones.py [--dataset ml-1m] [--epochs 3] [--backbones mf,ncf,lightgcn]

Reads the dataset from $LEGO_DATA_DIR; where a named dataset is absent it falls
back to the synthetic one and says so in the output. The first epoch (which
includes compilation) is reported apart from the steady-state mean.
Prints one JSON object, then a table.
"""

import argparse
import copy
import json
import os
import sys
import time

import jax
import jax.numpy as jnp

from lego_jax import config as config_lib
from lego_jax import models, training
from lego_jax.data import load_dataset, split_dataset
from lego_jax.errors import LegoError
from lego_jax.evaluation import ranking


def load(name: str, seed: int):
  note = ""
  try:
    ds = load_dataset(name, seed=seed)
  except LegoError as e:
    if name == "synthetic":
      raise
    note = f"{name} not available ({e}); fell back to the synthetic dataset"
    print(note, file=sys.stderr)
    ds = load_dataset("synthetic", seed=seed)
  return ds, split_dataset(ds, "random", (0.8, 0.1, 0.1), seed=seed), note


def bench(name: str, split, epochs: int, batch_size: int) -> dict:
  cfg = copy.deepcopy(config_lib.DEFAULTS)
  cfg["model"]["name"] = name
  cfg["train"]["batch_size"] = batch_size
  model = models.get(name, cfg["model"], cfg["train"])
  tc = cfg["train"]
  opt = training.make_optimizer(tc)
  params = model.init(jax.random.PRNGKey(0), split.n_users, split.n_items)
  opt_state = opt.init(params)
  aux = model.build_aux(split.train, split.n_users, split.n_items)
  epoch = jax.jit(training.make_epoch(model, opt, n_items=split.n_items, batch_size=batch_size,
                                      negatives=int(tc["negatives"])))
  pairs = jnp.asarray(split.train)
  positives = jnp.asarray(training.positive_keys(split.train, split.n_users, split.n_items))
  key = jax.random.PRNGKey(1)
  times = []
  for _ in range(epochs):
    key, sub = jax.random.split(key)
    t0 = time.perf_counter()
    params, opt_state, loss = epoch(params, opt_state, aux, pairs, sub, positives)
    jax.block_until_ready(loss)
    times.append(time.perf_counter() - t0)
  score = jax.jit(model.score)
  bu = 256 if name == "ncf" else 1024
  ranking.evaluate(lambda u: score(params, aux, u), split, batch_users=bu)  # compile
  t0 = time.perf_counter()
  res = ranking.evaluate(lambda u: score(params, aux, u), split, batch_users=bu)
  eval_s = time.perf_counter() - t0
  steady = times[1:] or times
  return {"backbone": name, "first_epoch_s": times[0], "epoch_s": sum(steady) / len(steady),
          "epochs_timed": len(steady), "final_loss": float(loss), "test_eval_s": eval_s,
          f"test_ndcg@10_after_{epochs}_epochs": res["ndcg@10"]}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", default="ml-1m")
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--batch-size", type=int, default=2048)
  p.add_argument("--backbones", default=",".join(models.NAMES))
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  ds, split, note = load(args.dataset, args.seed)
  rows = [bench(b, split, max(1, args.epochs), args.batch_size) for b in args.backbones.split(",")]
  out = {"dataset": ds.name, "note": note, "n_users": split.n_users, "n_items": split.n_items,
         "n_train": int(len(split.train)), "batch_size": args.batch_size,
         "device": str(jax.devices()[0]), "cpu_count": os.cpu_count(), "results": rows}
  print(json.dumps(out))
  print(f"\n{ds.name}: {split.n_users} users, {split.n_items} items,"
        f" {len(split.train)} train pairs, batch {args.batch_size}, {out['device']}")
  print(f"{'backbone':<10} {'s/epoch':>9} {'1st epoch':>10} {'eval s':>8} {'loss':>8}")
  for r in rows:
    print(f"{r['backbone']:<10} {r['epoch_s']:>9.3f} {r['first_epoch_s']:>10.3f}"
          f" {r['test_eval_s']:>8.3f} {r['final_loss']:>8.4f}")


if __name__ == "__main__":
  main()
