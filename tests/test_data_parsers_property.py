"""Property tests: parsers fed random and corrupted lines either parse or raise LegoError."""

import collections
import pathlib
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lego_jax.data import describe, load_dataset, split_dataset
from lego_jax.errors import LegoError

SETTINGS = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ident = st.integers(0, 30).map(str)
number = st.one_of(st.integers(-5, 10**9).map(str),
                   st.floats(allow_nan=True, allow_infinity=True).map(repr))
label = st.sampled_from(["M", "F", "m", "f", "", "NA", "none", "student", "18", "25", "56",
                         "7", "-1337", "1e400", "x y", "é"])
junk = st.text(alphabet=st.sampled_from(list("0123456789abc:|\t ,.-_é\x00\r\n\\")), max_size=30)


def row(sep, *fields):
  return st.tuples(*fields).map(lambda t: sep.join(t))


def mutate(line_strategy):
  """A valid line with a random insertion or deletion, or plain junk."""
  def edit(args):
    line, pos, text, cut = args
    pos %= len(line) + 1
    return line[:pos] + text + line[pos + cut:]
  return st.one_of(line_strategy, line_strategy, line_strategy,
                   st.tuples(line_strategy, st.integers(0, 40), junk, st.integers(0, 3)).map(edit),
                   junk)


def content(line_strategy, header=None):
  lines = st.lists(mutate(line_strategy), max_size=15)
  text = lines.map(lambda ls: "\n".join(([header] if header else []) + ls).encode())
  return st.one_of(text, text, text, st.binary(max_size=80))


SPECS = {
    "movielens-100k": {
        "u.data": content(row("\t", ident, ident, number, number)),
        "u.user": content(row("|", ident, label, label, label, label)),
    },
    "movielens-1m": {
        "ratings.dat": content(row("::", ident, ident, number, number)),
        "users.dat": content(row("::", ident, label, label, label, label)),
    },
    "recbole": {
        "d.inter": content(row("\t", ident, ident, number, number),
                           "user_id:token\titem_id:token\trating:float\ttimestamp:float"),
        "d.user": content(row("\t", ident, label, label),
                          "user_id:token\tgender:token\tage:token"),
    },
    "lightgcn": {
        "train.txt": content(st.lists(ident, min_size=1, max_size=6).map(" ".join)),
        "test.txt": content(st.lists(ident, min_size=1, max_size=6).map(" ".join)),
        "users.tsv": content(row("\t", ident, label, label), "user_id\tgender\tage"),
    },
    "lastfm": {
        "usersha1-artmbid-artname-plays.tsv": content(row("\t", ident, label, label, number)),
        "usersha1-profile.tsv": content(row("\t", ident, label, label, label, label)),
    },
}


def _load(fmt, files):
  with tempfile.TemporaryDirectory() as d:
    for name, data in files.items():
      (pathlib.Path(d) / name).write_bytes(data)
    try:
      ds = load_dataset(d, format=fmt, age_bins="")
      sp = split_dataset(ds, "random", seed=1)
      describe(ds, sp)
      split_dataset(ds, "loo")
      return ds
    except LegoError as e:
      assert str(e) and "\n" not in str(e), str(e)  # one line for the CLI
      return None


@pytest.mark.parametrize("fmt", sorted(SPECS))
@SETTINGS
@given(data=st.data())
def test_parsers_parse_or_raise_lego_error(fmt, data):
  files = {name: data.draw(strategy, label=name) for name, strategy in SPECS[fmt].items()}
  _load(fmt, files)


valid_pairs = st.lists(st.tuples(ident, ident), min_size=1, max_size=30)


@SETTINGS
@given(pairs=valid_pairs, seed=st.integers(0, 3))
def test_valid_u_data_parses_exactly(pairs, seed):
  lines = [f"{u}\t{i}\t{(k % 5) + 1}\t{880000000 + k}" for k, (u, i) in enumerate(pairs)]
  users = {u for u, _ in pairs}
  user_lines = [f"{u}|30|M|other|00000" for u in sorted(users)]
  ds = _load("movielens-100k", {"u.data": "\n".join(lines).encode(),
                                "u.user": "\n".join(user_lines).encode()})
  assert ds is not None
  got = collections.Counter()
  for u, i, c in zip(ds.users, ds.items, ds.counts):
    got[(ds.user_ids[u], ds.item_ids[i])] = int(c)
  assert got == collections.Counter(pairs)
  assert ds.attributes["gender"].missing == 0


@SETTINGS
@given(lines=st.lists(st.lists(ident, min_size=1, max_size=6), min_size=1, max_size=10))
def test_valid_lightgcn_parses_exactly(lines):
  text = "\n".join(" ".join(t) for t in lines).encode()
  ds = _load("lightgcn", {"train.txt": text, "test.txt": b""})
  assert ds is not None
  want = {(t[0], i) for t in lines for i in t[1:]}
  assert {(ds.user_ids[u], ds.item_ids[i]) for u, i in zip(ds.users, ds.items)} == want


def _read(path, block_bytes):
  from lego_jax.data import readers
  try:
    inter = readers.read_interactions(path, b"\t", 4, rating=2, ts=3, block_bytes=block_bytes)
  except LegoError as e:
    return str(e)
  return (inter.users.tolist(), inter.items.tolist(), inter.user_ids, inter.item_ids,
          inter.ratings.tolist(), inter.timestamps.tolist())


@SETTINGS
@given(text=content(row("\t", ident, ident, number, number)), crlf=st.booleans(),
       bom=st.booleans(), block=st.integers(1, 64))
def test_reading_in_blocks_equals_reading_whole(text, crlf, bom, block):
  """Any block size gives the same codes, ids and values, or an error naming a
  line of the file (interaction files are streamed: readers.iter_blocks). The
  error may differ: blocks report the first bad line in file order, a whole
  file its first malformed line before any bad value."""
  if crlf:
    text = text.replace(b"\n", b"\r\n")
  if bom:
    text = b"\xef\xbb\xbf" + text
  with tempfile.TemporaryDirectory() as d:
    path = pathlib.Path(d) / "u.data"
    path.write_bytes(text)
    whole, blocks = _read(path, -1), _read(path, block)
    if isinstance(whole, str):
      assert isinstance(blocks, str) and blocks.startswith(f"{path}:")
    else:
      assert blocks == whole


def _read_lightgcn(folder, block_bytes):
  from lego_jax.data import readers
  try:
    inter = readers.read_lightgcn(folder, block_bytes=block_bytes)
  except LegoError as e:
    return str(e)
  return inter.users.tolist(), inter.items.tolist(), inter.user_ids, inter.item_ids, \
      inter.fold.tolist()


@SETTINGS
@given(train=SPECS["lightgcn"]["train.txt"], test=SPECS["lightgcn"]["test.txt"],
       block=st.integers(1, 64))
def test_lightgcn_files_in_blocks_equal_reading_whole(train, test, block):
  """The one-line-per-user files are streamed too: any block size gives the
  same codes, ids and folds as the whole files, or the same error."""
  with tempfile.TemporaryDirectory() as d:
    folder = pathlib.Path(d)
    (folder / "train.txt").write_bytes(train)
    (folder / "test.txt").write_bytes(test)
    assert _read_lightgcn(folder, block) == _read_lightgcn(folder, -1)
