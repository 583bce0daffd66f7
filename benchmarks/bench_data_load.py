"""Times loading ML-1M (RecBole atomic files), ML-100K and the synthetic dataset.

Usage: LEGO_DATA_DIR=../shared/data python benchmarks/bench_data_load.py [--repeat N]
Prints one JSON object, then a table. A real dataset is skipped, with the
reason, where LEGO_DATA_DIR or its folder is absent. CPU only (numpy).
"""

import argparse
import json
import os
import pathlib
import platform
import sys
import time

from lego_jax.data import load_dataset, split_dataset


def _time(fn, repeat):
  times, out = [], None
  for _ in range(repeat):
    start = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - start)
  return min(times), sorted(times)[len(times) // 2], out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeat", type=int, default=3)
  parser.add_argument("--data-dir", default=os.environ.get("LEGO_DATA_DIR", ""))
  args = parser.parse_args(argv)
  data_dir = pathlib.Path(args.data_dir) if args.data_dir else None
  results = {}
  for name in ("ml-1m", "ml-100k", "synthetic"):
    if name != "synthetic":
      if data_dir is None:
        results[name] = {"skipped": "LEGO_DATA_DIR not set (and no --data-dir)"}
        continue
      if not (data_dir / name).is_dir():
        results[name] = {"skipped": f"{data_dir / name} does not exist"}
        continue
    best, median, ds = _time(lambda: load_dataset(name, data_dir=data_dir), args.repeat)
    split_best, _, _ = _time(lambda: split_dataset(ds), args.repeat)
    results[name] = {"load_s_best": round(best, 3), "load_s_median": round(median, 3),
                     "split_s_best": round(split_best, 3), "users": ds.n_users,
                     "items": ds.n_items, "interactions": ds.n_interactions}
  report = {"benchmark": "data_load", "repeat": args.repeat, "python": platform.python_version(),
            "cpus": os.cpu_count(), "results": results}
  print(json.dumps(report))
  print(f"\n{'dataset':<10} {'load best s':>11} {'median s':>9} {'split s':>8} "
        f"{'users':>7} {'items':>7} {'interactions':>13}")
  for name, r in results.items():
    if "skipped" in r:
      print(f"{name:<10} skipped: {r['skipped']}")
    else:
      print(f"{name:<10} {r['load_s_best']:>11.3f} {r['load_s_median']:>9.3f} "
            f"{r['split_s_best']:>8.3f} {r['users']:>7,} {r['items']:>7,} {r['interactions']:>13,}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
