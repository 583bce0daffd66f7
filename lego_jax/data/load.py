"""Loading a dataset by name or folder, preprocessing it, and describing it.

Preprocessing, in order:
  1. `rating_threshold > 0` keeps interactions rated >= the threshold (an error
     where the source has no ratings); every kept interaction is a positive.
  2. Repeated (user, item) pairs are merged; `Dataset.counts` says how many.
     A merged pair keeps its earliest predefined fold and its latest timestamp.
  3. `kcore > 0` drops users and items with fewer than `kcore` distinct
     partners, repeated until nothing changes.
  4. Users and items get dense indices in raw-id order (numeric where all ids
     are integers); `Dataset.user_ids` / `item_ids` keep the raw ids.
  5. Only users with interactions are kept: a user without interactions has no
     embedding to unlearn. Users in the attribute file without interactions
     are dropped; users with interactions but no attribute row get MISSING.
  6. Attributes become codes with class names; missing or unknown labels
     (empty, NA, an implausible age) are MISSING (-1), never guessed. Classes
     no kept user has are left out.

Age binning (`age_bins`): "" uses the dataset default (ML-1M's 7 range codes
as classes "1", "18", ...; ages in years, as in ML-100K and LastFM, grouped
like the ML-1M codes: <18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+); "none"
keeps the raw values as classes; "a,b,c" bins at those integer edges.
"""

import os
import pathlib
from typing import Optional, Sequence, Union

import numpy as np

from lego_jax import config as config_lib
from lego_jax.data import readers, synthetic
from lego_jax.data.dataset import MISSING, Attribute, Dataset, Split, fingerprint
from lego_jax.errors import LegoError, unknown

DATASETS = ("ml-100k", "ml-1m", "lastfm-360k", "synthetic")
NAMED_FORMAT = {"ml-100k": None, "ml-1m": None, "lastfm-360k": "lastfm"}
YEAR_EDGES = (18, 25, 35, 45, 50, 56)
# Identifying or non-sensitive columns left out unless asked for by name.
NOT_ATTRIBUTES = {"zip", "zip_code", "zipcode", "signup", "registered", "timestamp"}
ATTRIBUTE_ORDER = ("gender", "age", "occupation", "country")
MISSING_LABELS = {"", "\\n", "na", "n/a", "nan", "null", "?"}
AGE_RANGE = (1, 110)  # ages in years outside this are unknown (LastFM has -1337, 0, 1002)
DATA_VERSION = "lego-data-1"  # bump when preprocessing semantics change


# ---------------------------------------------------------------------------
# Attributes.


def parse_age_bins(spec: str):
  """"" -> None (dataset default), "none" -> "none", "a,b" -> (a, b) increasing ints."""
  spec = (spec or "").strip()
  if spec == "" or spec.lower() == "none":
    return spec.lower() or None
  try:
    edges = tuple(int(x) for x in spec.split(","))
  except ValueError:
    raise LegoError(f"age_bins must be '', 'none' or increasing integers like '18,25,35', "
                    f"got {spec!r}") from None
  if any(b <= a for a, b in zip(edges, edges[1:])):
    raise LegoError(f"age_bins edges must increase, got {spec!r}")
  return edges


def bin_names(edges: Sequence[int]) -> list[str]:
  names = [f"<{edges[0]}"]
  names += [f"{a}-{b - 1}" if b - 1 > a else str(a) for a, b in zip(edges, edges[1:])]
  return names + [f"{edges[-1]}+"]


def _numeric(values: list[str]) -> Optional[np.ndarray]:
  try:
    return np.array([float(v) for v in values], np.float64)
  except ValueError:
    return None


def _class_key(names: list[str]):
  """Numeric order where every class is a number, else string order."""
  nums = _numeric(names)
  if nums is not None and np.isfinite(nums).all():
    return lambda n: (float(n), n)  # ties ("1" vs "01") broken by the string
  return lambda n: n


def _categorical(name, values: list[Optional[str]]) -> Attribute:
  seen = list({v for v in values if v is not None})
  present = sorted(seen, key=_class_key(seen))
  index = {c: k for k, c in enumerate(present)}
  codes = np.array([MISSING if v is None else index[v] for v in values], np.int32)
  return Attribute(name, codes, tuple(present))


def _age(values: list[Optional[str]], kind: str, bins) -> Attribute:
  """Numeric ages: ML-1M codes or years, binned by `bins` (see module doc)."""
  known = [v for v in values if v is not None]
  nums = _numeric(known)
  if nums is None or not np.isfinite(nums).all():  # labelled groups: keep as they are
    return _categorical("age", values)
  if not kind:
    kind = "codes" if set(nums.tolist()) <= set(readers.ML1M_AGE_CODES) else "years"
  ages = np.full(len(values), np.nan)
  ages[[k for k, v in enumerate(values) if v is not None]] = nums
  if kind == "years":
    ages[(ages < AGE_RANGE[0]) | (ages > AGE_RANGE[1])] = np.nan
  if bins is None:
    bins = "none" if kind == "codes" else YEAR_EDGES
  ok = ~np.isnan(ages)
  if bins == "none":
    raw = [f"{a:g}" for a in ages[ok]]
    out = [None] * len(values)
    for k, r in zip(np.flatnonzero(ok).tolist(), raw):
      out[k] = r
    return _categorical("age", out)
  group = np.searchsorted(np.asarray(bins, np.float64), ages, side="right")
  names = bin_names(bins)
  used = np.unique(group[ok])
  remap = np.full(len(names), MISSING, np.int32)
  remap[used] = np.arange(len(used), dtype=np.int32)
  codes = np.where(ok, remap[np.minimum(group, len(names) - 1)], MISSING).astype(np.int32)
  return Attribute("age", codes, tuple(names[g] for g in used.tolist()))


def _is_missing(value: str) -> bool:
  return value.strip().lower() in MISSING_LABELS


def encode_attributes(table: Optional[readers.UserTable], user_ids: Sequence[str],
                      names: Optional[Sequence[str]], age_bins) -> dict[str, Attribute]:
  """Codes per kept user for the selected attributes, in a canonical order."""
  available = list(table.columns) if table else []
  if names:
    for n in names:
      if n not in available:
        raise unknown("attribute", n, available)
    chosen = list(dict.fromkeys(names))
  else:
    chosen = [n for n in available if n.lower() not in NOT_ATTRIBUTES]
    rank = {n: k for k, n in enumerate(ATTRIBUTE_ORDER)}
    chosen.sort(key=lambda n: (rank.get(n, len(rank)), available.index(n)))
  if not chosen:
    return {}
  row = {u: r for r, u in enumerate(table.ids)}
  rows = [row.get(u) for u in user_ids]
  out = {}
  for n in chosen:
    column = table.columns[n]
    values = [None if r is None or _is_missing(column[r]) else column[r] for r in rows]
    out[n] = _age(values, table.age_kind, age_bins) if n == "age" else _categorical(n, values)
  return out


# ---------------------------------------------------------------------------
# Interactions.


def _id_order(ids: list[str]) -> np.ndarray:
  """A permutation putting ids in numeric order where all are integers, else string order."""
  try:
    keys = [(int(x), x) for x in ids]
  except ValueError:
    keys = ids
  return np.array(sorted(range(len(ids)), key=keys.__getitem__), np.int64)


def _rank(ids: list[str]) -> tuple[np.ndarray, list[str]]:
  perm = _id_order(ids)
  rank = np.empty(len(ids), np.int64)
  rank[perm] = np.arange(len(ids))
  return rank, [ids[k] for k in perm.tolist()]


def merge_pairs(users, items, n_items, fold=None, timestamps=None):
  """Sorted distinct (user, item) pairs with counts, earliest fold and latest time."""
  key = users * np.int64(max(n_items, 1)) + items
  order = np.argsort(key, kind="stable")
  key = key[order]
  starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]]) if len(key) else np.zeros(0, np.int64)
  counts = np.diff(np.r_[starts, len(key)]).astype(np.int32)
  pick = lambda a, f: f.reduceat(a[order], starts) if len(starts) else a[:0]
  fold = pick(fold, np.minimum) if fold is not None else None
  timestamps = pick(timestamps, np.maximum) if timestamps is not None else None
  u, i = np.divmod(key[starts], np.int64(max(n_items, 1)))
  return u, i, counts, fold, timestamps


def kcore_mask(users, items, k: int) -> np.ndarray:
  """Pairs kept by the k-core filter (every user and item has >= k partners)."""
  keep = np.ones(len(users), bool)
  if k <= 1:
    return keep
  while True:
    du = np.bincount(users[keep], minlength=users.max(initial=-1) + 1)
    di = np.bincount(items[keep], minlength=items.max(initial=-1) + 1)
    drop = keep & ((du[users] < k) | (di[items] < k))
    if not drop.any():
      return keep
    keep &= ~drop


def build(name: str, inter: readers.Interactions, table: Optional[readers.UserTable], *,
          fmt: str, rating_threshold: float = 0.0, kcore: int = 0, age_bins: str = "",
          attributes=None, extra=()) -> Dataset:
  """Applies the preprocessing in the module doc to raw data."""
  bins = parse_age_bins(age_bins)
  if kcore < 0:
    raise LegoError(f"kcore must be >= 0, got {kcore}")
  if isinstance(attributes, str):
    attributes = [a for a in attributes.split(",") if a]
  u_rank, u_ids = _rank(inter.user_ids)
  i_rank, i_ids = _rank(inter.item_ids)
  users, items = u_rank[inter.users], i_rank[inter.items]
  fold, stamps = inter.fold, inter.timestamps
  if rating_threshold > 0:
    if inter.ratings is None:
      raise LegoError(f"rating_threshold={rating_threshold} needs ratings, "
                      f"but {inter.source} has none; use rating_threshold=0")
    keep = inter.ratings >= rating_threshold
    users, items = users[keep], items[keep]
    fold = fold[keep] if fold is not None else None
    stamps = stamps[keep] if stamps is not None else None
  users, items, counts, fold, stamps = merge_pairs(users, items, len(i_ids), fold, stamps)
  keep = kcore_mask(users, items, kcore)
  if not keep.all():
    users, items, counts = users[keep], items[keep], counts[keep]
    fold = fold[keep] if fold is not None else None
    stamps = stamps[keep] if stamps is not None else None
  kept_u, users = np.unique(users, return_inverse=True)
  kept_i, items = np.unique(items, return_inverse=True)
  user_ids = np.array([u_ids[k] for k in kept_u.tolist()], dtype=str)
  item_ids = np.array([i_ids[k] for k in kept_i.tolist()], dtype=str)
  attrs = encode_attributes(table, user_ids.tolist(), attributes, bins)
  users, items = users.astype(np.int32), items.astype(np.int32)
  fold = fold.astype(np.int8) if fold is not None else None
  parts = [DATA_VERSION, fmt, user_ids, item_ids, users, items, counts,
           fold if fold is not None else "no-fold", stamps if stamps is not None else "no-ts"]
  for a in attrs.values():
    parts += [a.name, a.codes, a.classes]
  parts += [float(rating_threshold), int(kcore), str(age_bins), tuple(attributes or ()), *extra]
  return Dataset(name=name, user_ids=user_ids, item_ids=item_ids, users=users, items=items,
                 counts=counts, attributes=attrs, fold=fold, fingerprint=fingerprint(*parts),
                 timestamps=stamps)


# ---------------------------------------------------------------------------
# Public entry points.


def _dataset_folder(name: str, data_dir) -> pathlib.Path:
  base = data_dir or os.environ.get("LEGO_DATA_DIR")
  if not base:
    raise LegoError(f"dataset {name} needs a data folder: pass --data-dir DIR or set "
                    f"LEGO_DATA_DIR (the files go in DIR/{name}/)")
  # Absolute once, so a relative LEGO_DATA_DIR means the same from every file
  # and symlink made from this path.
  folder = pathlib.Path(os.path.abspath(base)) / name
  if not folder.is_dir():
    hint = f"set --data-dir or LEGO_DATA_DIR to the folder that holds {name}/"
    try:
      fmt = readers.detect_format(folder.parent)
    except (LegoError, OSError):
      fmt = None
    if fmt:  # the newcomer's mistake: --data-dir naming the dataset's own folder
      hint = (f"{folder.parent} itself holds a {fmt} dataset: to use it, give that folder "
              f"as the dataset, e.g. --set data.name={folder.parent}")
    raise LegoError(f"dataset {name}: folder {folder} does not exist ({hint})")
  return folder


# Fields of the config's `data` section that are not `load_dataset`'s options.
NOT_OPTIONS = ("name", "split", "split_ratios")


def load_dataset(name_or_path: Union[str, os.PathLike], *, seed: int = 0, **options) -> Dataset:
  """A dataset by name (ml-100k, ml-1m, lastfm-360k, synthetic) or folder path.

  `options` are fields of the config's `data` section (`config.DESCRIPTIONS`
  says what each does; None or a missing one takes its default): `data_dir`
  holds the named datasets in `data_dir/<name>` (default: $LEGO_DATA_DIR);
  `format` names one of `readers.FORMATS` (default: detected from the files);
  `users_file` is the user-attribute file where not the conventional one;
  `attributes`, `rating_threshold`, `kcore` and `age_bins` are the
  preprocessing in the module doc; the `synthetic_*` sizes and `seed` only
  affect the synthetic dataset.
  """
  for key in NOT_OPTIONS:
    if key in options:
      raise LegoError(f"load_dataset: {key!r} is not an option of loading (the dataset is the "
                      "first argument; a split is made by split_dataset)")
  d = config_lib.view("data", {k: os.fspath(v) if isinstance(v, os.PathLike) else v
                               for k, v in options.items() if v is not None})
  name = str(name_or_path)
  common = dict(rating_threshold=d.rating_threshold, kcore=d.kcore, age_bins=d.age_bins,
                attributes=list(d.attributes) or None)
  if name == "synthetic":
    inter, table = synthetic.generate(d.synthetic_users, d.synthetic_items, d.synthetic_density,
                                      seed)
    return build("synthetic", inter, table, fmt="synthetic",
                 extra=(d.synthetic_users, d.synthetic_items, d.synthetic_density, int(seed)),
                 **common)
  if d.format and d.format not in readers.FORMATS:
    raise unknown("format", d.format, readers.FORMATS)
  try:
    return _load_files(name, d.data_dir or None, d.format or None, d.users_file or None, common)
  except OSError as e:  # a folder or file we may not list or stat (reads say so themselves)
    raise LegoError(f"{e.filename or name}: cannot read: {e.strerror or e}") from None


def _load_files(name, data_dir, format, users_file, common) -> Dataset:
  if name in NAMED_FORMAT:
    folder = _dataset_folder(name, data_dir)
    format = format or NAMED_FORMAT[name]
  elif pathlib.Path(name).is_dir():
    folder = pathlib.Path(name)
  elif pathlib.Path(name).exists():
    raise LegoError(f"{name} is a file; give the folder that holds the dataset files")
  else:
    raise LegoError(f"{unknown('dataset', name, DATASETS)} (or an existing folder)")
  fmt = format or readers.detect_format(folder)
  inter, table = readers.read_folder(folder, fmt, users_file)
  title = name if name in NAMED_FORMAT else folder.resolve().name
  return build(title, inter, table, fmt=fmt, **common)


def from_config(config: dict) -> tuple[Dataset, Split]:
  """The dataset and split a resolved config (see config.DEFAULTS) asks for."""
  from lego_jax.data.split import split_dataset
  d, seed = config["data"], int(config["seed"])
  ds = load_dataset(d["name"], seed=seed, **{k: v for k, v in d.items() if k not in NOT_OPTIONS})
  ratios = tuple(float(r) for r in d["split_ratios"])
  return ds, split_dataset(ds, d["split"], ratios, seed=seed)


def describe(ds: Dataset, split: Split) -> dict:
  """Counts for `lego-jax data inspect --json`."""
  return {
      "dataset": ds.name,
      "users": int(ds.n_users),
      "items": int(ds.n_items),
      "interactions": int(ds.n_interactions),
      "attributes": {
          n: {"classes": list(a.classes), "counts": [int(c) for c in a.counts()],
              "missing": int(a.missing)}
          for n, a in ds.attributes.items()},
      "split": {"train": int(len(split.train)), "valid": int(len(split.valid)),
                "test": int(len(split.test))},
  }
