"""File-format readers: raw interactions and raw user-attribute tables.

Each reader returns plain data with raw ids and raw attribute strings; the
dataset builder in `load.py` does thresholds, merging, k-core, dense indexing
and attribute coding. Parsing splits blocks of whole lines in C
(`bytes.split`), so ML-1M's million lines load in about a second; a line with
the wrong number of fields raises `LegoError("FILE:LINE: ...")`. Interaction
files are read in blocks of `BLOCK_BYTES` (`iter_blocks`), each turned into
numpy codes before the next is read, so memory is bounded by one block's
Python tokens plus the numpy columns (LastFM-360K's 17 million lines:
docs/data.md); user tables are small and read whole.

Formats (see `FORMATS`):
  movielens-100k  u.data (tab: user item rating ts), u.user (`|`: id|age|gender|occupation|zip)
  movielens-1m    ratings.dat[.gz], users.dat (`::`, latin-1)
  recbole         <name>.inter[.gz], <name>.user[.gz] (tab, header `field:type`)
  lightgcn        train.txt [valid.txt] test.txt (`user item item ...`) + a user TSV with a header
  lastfm          usersha1-artmbid-artname-plays.tsv, usersha1-profile.tsv
"""

import dataclasses
import gzip
import itertools
import os
import pathlib
import re
import zlib
from typing import Optional, Sequence

import numpy as np

from lego_jax.errors import LegoError, unknown

FORMATS = ("movielens-100k", "movielens-1m", "recbole", "lightgcn", "lastfm")
ML1M_AGE_CODES = (1, 18, 25, 35, 45, 50, 56)
BOM = b"\xef\xbb\xbf"
# An id is printable text: a control character (or a BOM inside the file) means
# binary data or a broken export, which would otherwise become a ghost user.
CONTROL = re.compile("[\x00-\x1f\x7f\ufeff]")
# The same in raw bytes, for whitespace-separated files (tab, \r, \n separate).
CONTROL_BYTES = re.compile(b"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\xef\xbb\xbf")
EXCERPT = 20  # characters of a file quoted in a message: enough to recognise, not to leak
BLOCK_BYTES = 1 << 25  # 32 MiB of an interaction file at a time


@dataclasses.dataclass
class Interactions:
  """Raw interactions: codes into `user_ids` / `item_ids` (raw ids, str)."""
  users: np.ndarray                 # (n,) int64
  items: np.ndarray                 # (n,) int64
  user_ids: list[str]
  item_ids: list[str]
  ratings: Optional[np.ndarray] = None     # (n,) float64
  timestamps: Optional[np.ndarray] = None  # (n,) float64
  fold: Optional[np.ndarray] = None        # (n,) int8: 0 train, 1 valid, 2 test
  source: str = ""                         # file name, for messages


@dataclasses.dataclass
class UserTable:
  """Raw user attributes: one row per user id, one str column per attribute.

  `age_kind` says how to read an `age` column: "codes" (ML-1M range codes),
  "years", or "" (detect from the values).
  """
  ids: list[str]
  columns: dict[str, list[str]]
  age_kind: str = ""
  source: str = ""


# ---------------------------------------------------------------------------
# Low-level parsing.


def read_bytes(path: os.PathLike) -> bytes:
  """The whole file (gunzipped where it ends in .gz), with \\r\\n normalised."""
  return b"".join(block for block, _ in iter_blocks(path, block_bytes=-1))


def iter_blocks(path: os.PathLike, block_bytes: Optional[int] = None):
  """The file (gunzipped where it ends in .gz) in blocks of whole lines, each
  with the 1-based number of its first line; \\r\\n normalised, a leading
  BOM dropped. `block_bytes` -1 reads it whole (default `BLOCK_BYTES`)."""
  path = pathlib.Path(path)
  size = BLOCK_BYTES if block_bytes is None else block_bytes
  line = 1
  try:
    with (gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")) as f:
      # A leading BOM is encoding metadata (Excel, Notepad), not part of the first id.
      tail = f.read(len(BOM)).removeprefix(BOM)
      while True:
        chunk = f.read(size)
        data = tail + chunk
        cut = data.rfind(b"\n") + 1 if chunk else len(data)
        block, tail = data[:cut], data[cut:]
        if block:
          yield block.replace(b"\r\n", b"\n"), line
          line += block.count(b"\n")
        if not chunk:
          return
  except FileNotFoundError:
    raise LegoError(f"{path}: file not found") from None
  except (OSError, EOFError, zlib.error) as e:
    raise LegoError(f"{path}: cannot read: {e}") from None


def decode(token: bytes, encoding: str = "utf-8") -> str:
  try:
    return token.decode(encoding).strip()
  except UnicodeDecodeError:
    return token.decode("latin-1").strip()


def _show(line: bytes) -> str:
  text = decode(line)
  return repr(text[:EXCERPT]) + ("..." if len(text) > EXCERPT else "")


def _sep(sep: bytes) -> str:
  return repr(sep.decode("latin-1"))  # decode() would strip a tab to ''


def _check_printable(names: Sequence[str], path, lines, rows, what: str) -> None:
  """Refuses an id holding a control character; `rows(k)` is a row holding names[k]."""
  if CONTROL.search("".join(names)):
    k = next(k for k, n in enumerate(names) if CONTROL.search(n))
    raise LegoError(f"{path}:{lines[rows(k)]}: {what} holds a control character "
                    f"(binary data?): {names[k][:EXCERPT]!r}")


def split_fields(data: bytes, sep: bytes, ncols: int, path, skip: int = 0, first: int = 1,
                 ) -> tuple[list[list[bytes]], np.ndarray]:
  """Splits lines of exactly `ncols` fields into columns; blank lines are skipped.

  Returns (columns, line_numbers): columns[c][r] is field c of row r (bytes),
  line_numbers[r] the 1-based line number of row r in the file, whose line
  `first` is the first of `data`.
  """
  lines = data.split(b"\n")[skip:]
  counts = np.fromiter(map(bytes.count, lines, itertools.repeat(sep)), np.int64, len(lines))
  odd = np.flatnonzero(counts != ncols - 1)
  blank = [i for i in odd.tolist() if not lines[i].strip()]
  if len(blank) != len(odd):
    i = next(i for i in odd.tolist() if lines[i].strip())
    raise LegoError(f"{path}:{i + skip + first}: expected {ncols} fields separated by "
                    f"{_sep(sep)}, got {counts[i] + 1}: {_show(lines[i])}")
  keep = np.arange(len(lines))
  if blank:
    keep = np.delete(keep, blank)
    lines = [lines[i] for i in keep.tolist()]
  tokens = sep.join(lines).split(sep) if lines else []
  columns = [tokens[c::ncols] for c in range(ncols)]
  return columns, keep + skip + first


def to_float(column: list[bytes], lines: np.ndarray, path, what: str) -> np.ndarray:
  """Parses a numeric column; a bad value names its file and line."""
  try:
    out = np.array(column, dtype=np.float64) if column else np.zeros(0)
  except ValueError:  # find the culprit the slow way
    out = np.zeros(len(column))
    for r, token in enumerate(column):
      try:
        out[r] = float(token)
      except ValueError:
        raise LegoError(f"{path}:{lines[r]}: {what} is not a number: {_show(token)}") from None
  bad = np.flatnonzero(~np.isfinite(out))
  if len(bad):
    r = int(bad[0])
    raise LegoError(f"{path}:{lines[r]}: {what} is not a finite number: {_show(column[r])}")
  return out


class Factorizer:
  """Raw id tokens -> integer codes, over any number of blocks; `finish` checks
  the ids (an empty one or a control character names its first line) and
  merges ids differing only in surrounding spaces."""

  def __init__(self, path, what: str, encoding: str = "utf-8"):
    self.path, self.what, self.encoding = path, what, encoding
    self.index: dict[bytes, int] = {}
    self.first_line: list[int] = []   # per code, the line it first appeared on

  def __call__(self, column: Sequence[bytes], lines: np.ndarray) -> np.ndarray:
    known = len(self.index)
    index = self.index
    codes = np.fromiter((index.setdefault(t, len(index)) for t in column), np.int64, len(column))
    new, first = np.unique(codes[codes >= known], return_index=True)
    self.first_line += np.asarray(lines)[np.flatnonzero(codes >= known)[first]].tolist()
    return codes

  def finish(self) -> tuple[Optional[np.ndarray], list[str]]:
    """(a code remap, or None where none is needed; the unique ids as str)."""
    names = [decode(t, self.encoding) for t in self.index]
    _check_printable(names, self.path, self.first_line, lambda k: k, self.what)
    if "" in names:
      raise LegoError(f"{self.path}:{self.first_line[names.index('')]}: empty {self.what}")
    if len(set(names)) == len(names):
      return None, names
    uniq = {n: k for k, n in enumerate(dict.fromkeys(names))}
    return np.array([uniq[n] for n in names], np.int64), list(uniq)


def _cat(blocks: list, dtype) -> np.ndarray:
  return np.concatenate(blocks) if blocks else np.zeros(0, dtype)


def _coded(ids: Factorizer, blocks: list) -> tuple[np.ndarray, list[str]]:
  """(every block's codes from `ids`, merged ids remapped; the unique ids)."""
  remap, names = ids.finish()
  codes = _cat(blocks, np.int64)
  return (codes if remap is None else remap[codes]), names


def read_header(data: bytes, path) -> list[str]:
  """RecBole header `name:type\\t...` -> field names (types dropped)."""
  first = data.split(b"\n", 1)[0]
  fields = [decode(f).split(":", 1)[0].strip() for f in first.split(b"\t")]
  if not first.strip() or any(not f for f in fields) or len(set(fields)) != len(fields):
    raise LegoError(f"{path}:1: expected a header of distinct `name:type` fields, got {_show(first)}")
  return fields


def _need(path: pathlib.Path, fmt: str, expected: str) -> pathlib.Path:
  if not path.is_file():
    raise LegoError(f"{fmt}: missing {path.name} in {path.parent} (expected {expected})")
  return path


def first_existing(folder: pathlib.Path, names: Sequence[str]) -> Optional[pathlib.Path]:
  for n in names:
    if (folder / n).is_file():
      return folder / n
  return None


# ---------------------------------------------------------------------------
# Interactions.


def read_interactions(path, sep: bytes, ncols: int, *, skip: int = 0, user=0, item=1,
                      rating=None, ts=None, encoding="utf-8", item_of=None,
                      block_bytes: Optional[int] = None) -> Interactions:
  """A delimited interaction file, block by block (`iter_blocks`): only numpy
  columns and the id dictionaries outlive a block. `item_of(columns)` gives
  the item tokens where they are not one column (LastFM)."""
  fu, fi = Factorizer(path, "user id", encoding), Factorizer(path, "item id", encoding)
  parts: dict[str, list] = {"users": [], "items": [], "ratings": [], "stamps": []}
  for block, first in iter_blocks(path, block_bytes):
    columns, lines = split_fields(block, sep, ncols, path, skip=skip if first == 1 else 0,
                                  first=first)
    parts["users"].append(fu(columns[user], lines))
    parts["items"].append(fi(item_of(columns) if item_of else columns[item], lines))
    if rating is not None:
      parts["ratings"].append(to_float(columns[rating], lines, path, "rating"))
    if ts is not None:
      parts["stamps"].append(to_float(columns[ts], lines, path, "timestamp"))
    del columns
  (users, user_ids), (items, item_ids) = _coded(fu, parts["users"]), _coded(fi, parts["items"])
  return Interactions(users, items, user_ids, item_ids,
                      _cat(parts["ratings"], np.float64) if rating is not None else None,
                      _cat(parts["stamps"], np.float64) if ts is not None else None,
                      source=str(path))


def read_ml100k_ratings(path) -> Interactions:
  return read_interactions(path, b"\t", 4, rating=2, ts=3)


def read_ml1m_ratings(path) -> Interactions:
  return read_interactions(path, b"::", 4, rating=2, ts=3, encoding="latin-1")


def read_atomic_inter(path) -> Interactions:
  """RecBole `.inter`: needs user_id and item_id; uses rating and timestamp if present."""
  first = next(iter_blocks(path, block_bytes=1 << 16), (b"", 1))[0]
  fields = read_header(first, path)
  for need in ("user_id", "item_id"):
    if need not in fields:
      raise LegoError(f"{path}:1: header lacks {need!r}; fields: {', '.join(fields)}")
  pick = lambda f: fields.index(f) if f in fields else None
  return read_interactions(path, b"\t", len(fields), skip=1, user=pick("user_id"),
                           item=pick("item_id"), rating=pick("rating"), ts=pick("timestamp"))


def read_lightgcn(folder: pathlib.Path, block_bytes: Optional[int] = None) -> Interactions:
  """train.txt / valid.txt / test.txt, one `user item item ...` line per user,
  block by block (`iter_blocks`), as `read_interactions` reads its files."""
  _need(folder / "train.txt", "lightgcn", "train.txt [valid.txt] test.txt")
  fu, fi = Factorizer(folder, "user id"), Factorizer(folder, "item id")
  users, items, fold = [], [], []
  for f, name in enumerate(("train.txt", "valid.txt", "test.txt")):
    path = folder / name
    if not path.is_file():
      continue
    for block, first in iter_blocks(path, block_bytes):
      _check_text(block, path, "expected `user item item ...` lines of text", first)
      user_tok, item_tok, line_of = [], [], []
      for k, line in enumerate(block.split(b"\n")):
        tokens = line.split()
        if len(tokens) > 1:
          user_tok.extend(itertools.repeat(tokens[0], len(tokens) - 1))
          item_tok.extend(tokens[1:])
          line_of.extend(itertools.repeat(first + k, len(tokens) - 1))
      line_of = np.asarray(line_of, np.int64)
      users.append(fu(user_tok, line_of))
      items.append(fi(item_tok, line_of))
      fold.append(np.full(len(user_tok), f, np.int8))
  (users, user_ids), (items, item_ids) = _coded(fu, users), _coded(fi, items)
  return Interactions(users, items, user_ids, item_ids, fold=_cat(fold, np.int8),
                      source=str(folder / "train.txt"))


def _check_text(data: bytes, path, expected: str, first: int = 1) -> None:
  """Refuses control bytes and invalid UTF-8, naming the first bad line
  (`data` starts on line `first` of the file)."""
  bad = CONTROL_BYTES.search(data)
  start = bad.start() if bad else None
  try:
    data.decode("utf-8")
  except UnicodeDecodeError as e:
    start = e.start if start is None else min(start, e.start)
  if start is not None:
    line = first + data.count(b"\n", 0, start)
    text = data[data.rfind(b"\n", 0, start) + 1:].split(b"\n", 1)[0]
    raise LegoError(f"{path}:{line}: {expected}, got binary data: "
                    f"{repr(text[:EXCERPT])[1:]}{'...' if len(text) > EXCERPT else ''}")


def read_lastfm_plays(path) -> Interactions:
  """user-sha1 \\t artist-mbid \\t artist-name \\t plays; the artist is its mbid, else its name."""
  artists = lambda c: [m if m.strip() else b"name:" + n for m, n in zip(c[1], c[2])]
  return read_interactions(path, b"\t", 4, rating=3, item_of=artists)


# ---------------------------------------------------------------------------
# User-attribute tables.


def _table(columns, lines, path, names, encoding="utf-8", age_kind="") -> UserTable:
  ids = [decode(t, encoding) for t in columns[0]]
  _check_printable(ids, path, lines, lambda k: k, "user id")
  seen: dict[str, int] = {}
  for r, u in enumerate(ids):
    if not u:
      raise LegoError(f"{path}:{lines[r]}: empty user id")
    if u in seen:
      raise LegoError(f"{path}:{lines[r]}: user {u[:EXCERPT]!r} repeats line {lines[seen[u]]}")
    seen[u] = r
  cols = {n: [decode(t, encoding) for t in columns[c]] for c, n in enumerate(names) if c and n}
  return UserTable(ids, cols, age_kind, str(path))


def read_ml100k_users(path) -> UserTable:
  columns, lines = split_fields(read_bytes(path), b"|", 5, path)
  return _table(columns, lines, path, ["user_id", "age", "gender", "occupation", "zip"],
                age_kind="years")


def read_ml1m_users(path) -> UserTable:
  columns, lines = split_fields(read_bytes(path), b"::", 5, path)
  return _table(columns, lines, path, ["user_id", "gender", "age", "occupation", "zip"],
                encoding="latin-1", age_kind="codes")


def read_atomic_user(path) -> UserTable:
  data = read_bytes(path)
  fields = read_header(data, path)
  if "user_id" not in fields:
    raise LegoError(f"{path}:1: header lacks 'user_id'; fields: {', '.join(fields)}")
  columns, lines = split_fields(data, b"\t", len(fields), path, skip=1)
  k = fields.index("user_id")
  order = [k] + [c for c in range(len(fields)) if c != k]
  return _table([columns[c] for c in order], lines, path, [fields[c] for c in order])


def read_tsv_users(path) -> UserTable:
  """A header line (`user_id` first, then one column per attribute); tab or comma separated."""
  data = read_bytes(path)
  first = data.split(b"\n", 1)[0]
  sep = b"\t" if b"\t" in first or b"," not in first else b","
  names = [decode(f) for f in first.split(sep)]
  if len(names) < 1 or names[0].lower() not in ("user_id", "user", "userid", "uid"):
    raise LegoError(f"{path}:1: expected a header starting with user_id, got {_show(first)}")
  if any(not n for n in names) or len(set(names)) != len(names):
    raise LegoError(f"{path}:1: header fields must be distinct and non-empty, got {_show(first)}")
  columns, lines = split_fields(data, sep, len(names), path, skip=1)
  return _table(columns, lines, path, ["user_id"] + names[1:])


def read_lastfm_users(path) -> UserTable:
  """usersha1-profile.tsv: sha1, gender (m/f), age (years), country, signup date."""
  columns, lines = split_fields(read_bytes(path), b"\t", 5, path)
  return _table(columns, lines, path, ["user_id", "gender", "age", "country", "signup"],
                age_kind="years")


def read_users_file(path) -> UserTable:
  """A user-attribute file in the format its name implies."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise LegoError(f"user-attribute file {path} does not exist")
  name = path.name
  if name in ("u.user", "u.user.gz"):
    return read_ml100k_users(path)
  if name.endswith((".user", ".user.gz")):
    return read_atomic_user(path)
  if name in ("users.dat", "users.dat.gz"):
    return read_ml1m_users(path)
  if name == "usersha1-profile.tsv":
    return read_lastfm_users(path)
  return read_tsv_users(path)


# ---------------------------------------------------------------------------
# Formats: detection and reading a folder.

EXPECTED = {
    "movielens-100k": "u.data and u.user",
    "movielens-1m": "ratings.dat[.gz] and users.dat",
    "recbole": "<name>.inter[.gz] and optionally <name>.user[.gz]",
    "lightgcn": "train.txt, test.txt, optionally valid.txt and a user TSV with a user_id header",
    "lastfm": "usersha1-artmbid-artname-plays.tsv and usersha1-profile.tsv",
}


def _atomic_inter(folder: pathlib.Path) -> Optional[pathlib.Path]:
  preferred = first_existing(folder, [f"{folder.name}.inter", f"{folder.name}.inter.gz"])
  if preferred:
    return preferred
  found = sorted(folder.glob("*.inter")) + sorted(folder.glob("*.inter.gz"))
  return found[0] if found else None


def detect_format(folder: pathlib.Path) -> str:
  """The format of a dataset folder, from the files it holds."""
  if _atomic_inter(folder):
    return "recbole"
  if (folder / "u.data").is_file():
    return "movielens-100k"
  if first_existing(folder, ["ratings.dat", "ratings.dat.gz"]):
    return "movielens-1m"
  if (folder / "train.txt").is_file():
    return "lightgcn"
  if (folder / "usersha1-artmbid-artname-plays.tsv").is_file():
    return "lastfm"
  listing = "; ".join(f"{k}: {v}" for k, v in EXPECTED.items())
  raise LegoError(f"no dataset files found in {folder}; expected one of: {listing}")


def _lightgcn_users(folder: pathlib.Path) -> Optional[pathlib.Path]:
  """A .tsv/.csv in the folder whose header starts with user_id."""
  for path in sorted(folder.glob("*.tsv")) + sorted(folder.glob("*.csv")):
    with open(path, "rb") as f:
      head = f.readline().removeprefix(BOM).strip().lower()
    if head.startswith((b"user_id\t", b"user_id,")):
      return path
  return None


def read_folder(folder: pathlib.Path, fmt: str, users_file: Optional[str] = None,
                ) -> tuple[Interactions, Optional[UserTable]]:
  """Reads the interactions and the user table (None where there is none)."""
  users_path = pathlib.Path(users_file) if users_file else None
  if users_path is not None and not users_path.is_absolute() and not users_path.is_file():
    users_path = folder / users_path
  if fmt == "movielens-100k":
    inter = read_ml100k_ratings(_need(folder / "u.data", fmt, EXPECTED[fmt]))
    users_path = users_path or _need(folder / "u.user", fmt, EXPECTED[fmt])
  elif fmt == "movielens-1m":
    ratings = first_existing(folder, ["ratings.dat", "ratings.dat.gz"])
    inter = read_ml1m_ratings(ratings or _need(folder / "ratings.dat", fmt, EXPECTED[fmt]))
    users_path = users_path or _need(folder / "users.dat", fmt, EXPECTED[fmt])
  elif fmt == "recbole":
    path = _atomic_inter(folder)
    if path is None:
      raise LegoError(f"recbole: no <name>.inter or <name>.inter.gz in {folder}")
    inter = read_atomic_inter(path)
    stem = path.name[: path.name.index(".inter")]
    users_path = users_path or first_existing(folder, [f"{stem}.user", f"{stem}.user.gz"])
  elif fmt == "lightgcn":
    inter = read_lightgcn(folder)
    if not (folder / "test.txt").is_file():
      raise LegoError(f"lightgcn: missing test.txt in {folder} (expected {EXPECTED[fmt]})")
    users_path = users_path or _lightgcn_users(folder)
  elif fmt == "lastfm":
    plays = _need(folder / "usersha1-artmbid-artname-plays.tsv", fmt, EXPECTED[fmt])
    inter = read_lastfm_plays(plays)
    users_path = users_path or _need(folder / "usersha1-profile.tsv", fmt, EXPECTED[fmt])
  else:
    raise unknown("format", fmt, FORMATS)
  return inter, (read_users_file(users_path) if users_path else None)
