"""Loading a LastFM-360K-sized dataset (17 million lines): seconds and peak memory.

  python benchmarks/bench_large_load.py [--lines 17559530] [--whole-lines 2000000] [--keep DIR]

Uses `$LEGO_DATA_DIR/lastfm-360k` where it exists; otherwise writes a
synthetic folder of the same shape (359,347 users with a sha1 id, 160,000
artists with an mbid, 5% of lines without one, plays counts, a profile
file) of `--lines` lines. Each load runs `lego_jax.load_dataset` in a fresh
process, which reports its own peak RSS:
  - streamed: interaction files are read in blocks (`readers.BLOCK_BYTES`),
    as lego-jax does;
  - whole: the same parser on the whole file at once (`block_bytes = -1`, as
    before streaming), on `--whole-lines` lines, and the streamed reader on
    that file too, so the two are compared on equal input.
Prints one JSON object, then a table.
"""

import argparse
import hashlib
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

USERS, ARTISTS = 359_347, 160_000
PLAYS = "usersha1-artmbid-artname-plays.tsv"
PROFILE = "usersha1-profile.tsv"


def write_synthetic(folder: pathlib.Path, lines: int, seed: int = 0) -> None:
  rng = np.random.default_rng(seed)
  folder.mkdir(parents=True, exist_ok=True)
  users = [hashlib.sha1(str(i).encode()).hexdigest() for i in range(USERS)]
  mbids = []
  for i in range(ARTISTS):
    h = hashlib.md5(str(i).encode()).hexdigest()
    mbids.append("" if i % 20 == 0 else f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
  names = [f"Artist {i}" for i in range(ARTISTS)]
  with open(folder / PLAYS, "w") as f:
    for start in range(0, lines, 1_000_000):
      n = min(1_000_000, lines - start)
      u = np.sort(rng.integers(0, USERS, n))          # the real file is grouped by user
      a = np.minimum(rng.zipf(1.3, n) - 1, ARTISTS - 1)   # a few artists take most plays
      p = rng.integers(1, 2000, n)
      f.write("".join(f"{users[i]}\t{mbids[j]}\t{names[j]}\t{k}\n"
                      for i, j, k in zip(u.tolist(), a.tolist(), p.tolist())))
  genders = np.array(["m", "f", ""])[rng.integers(0, 3, USERS)]
  ages = rng.integers(14, 70, USERS)
  with open(folder / PROFILE, "w") as f:
    f.write("".join(f"{users[i]}\t{genders[i]}\t{ages[i]}\tNowhere\tJan 1, 2008\n"
                    for i in range(USERS)))


def child(folder: str, whole: bool) -> dict:
  from lego_jax.data import load_dataset, readers
  if whole:
    readers.BLOCK_BYTES = -1
  start = time.perf_counter()
  ds = load_dataset(folder)
  seconds = time.perf_counter() - start
  return {"seconds": seconds, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
          "users": ds.n_users, "items": ds.n_items, "interactions": ds.n_interactions}


def measure(folder: pathlib.Path, whole: bool) -> dict:
  out = subprocess.run([sys.executable, __file__, "--child", str(folder)] + (["--whole"] if whole else []),
                       check=True, capture_output=True, text=True).stdout
  return {"mode": "whole" if whole else "streamed", "lines": sum(1 for _ in open(folder / PLAYS, "rb")),
          "file_mb": (folder / PLAYS).stat().st_size / 2 ** 20, **json.loads(out.splitlines()[-1])}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--lines", type=int, default=17_559_530)
  ap.add_argument("--whole-lines", type=int, default=2_000_000)
  ap.add_argument("--keep", help="write the synthetic folders here and keep them")
  ap.add_argument("--child", help=argparse.SUPPRESS)
  ap.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
  args = ap.parse_args()
  if args.child:
    print(json.dumps(child(args.child, args.whole)))
    return
  real = pathlib.Path(os.environ.get("LEGO_DATA_DIR", "/nonexistent")) / "lastfm-360k"
  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(args.keep or tmp)
    rows = []
    small = root / "small"
    if not (small / PLAYS).exists():
      write_synthetic(small, args.whole_lines)
    rows += [measure(small, True), measure(small, False)]
    big = real if (real / PLAYS).exists() else root / "large"
    if big != real and not (big / PLAYS).exists():
      start = time.perf_counter()
      write_synthetic(big, args.lines)
      print(f"wrote {args.lines:,} synthetic lines in {time.perf_counter() - start:.0f} s",
            file=sys.stderr)
    rows.append(measure(big, False) | {"source": "real" if big == real else "synthetic"})
  print(json.dumps({"benchmark": "large_load", "block_bytes": _block_bytes(), "rows": rows}))
  print(f"\n| mode     | lines      | file MB | seconds | peak RSS MB | users   | items   |")
  print(f"|----------|------------|---------|---------|-------------|---------|---------|")
  for r in rows:
    print(f"| {r['mode']:<8} | {r['lines']:>10,} | {r['file_mb']:>7.0f} | {r['seconds']:>7.1f} | "
          f"{r['peak_rss_mb']:>11.0f} | {r['users']:>7,} | {r['items']:>7,} |")


def _block_bytes() -> int:
  from lego_jax.data import readers
  return readers.BLOCK_BYTES


if __name__ == "__main__":
  main()
