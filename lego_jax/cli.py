"""The `lego-jax` command line. Kept thin: the work is in lego_jax.runner."""

import argparse
import json
import sys
import traceback

from lego_jax.errors import LegoError


# Commands that run across several processes (docs/scaling.md): they write
# through process 0 or not at all. The others would each write their reports.
MULTI_PROCESS = ("unlearn", "request", "evaluate")


def _common(p, config=True, workdir_required=True):
  if config:
    p.add_argument("--config", help="a config name from configs/ (e.g. ml1m_mf) or a .toml path")
  p.add_argument("--workdir", required=workdir_required, help="the run's folder")
  p.add_argument("--data-dir", help="folder holding the datasets (default: $LEGO_DATA_DIR)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a config field, e.g. --set train.epochs=20 (repeatable)")


def parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="lego-jax", description=__doc__.split(".")[0] + ": "
                               "multi-attribute unlearning for recommenders (LEGO) in JAX.")
  ap.add_argument("--debug", action="store_true",
                  help="print the traceback of a failure inside lego-jax (not of a user mistake)")
  sub = ap.add_subparsers(dest="command", required=True)

  data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
  p = data.add_parser("inspect", help="print a dataset's counts")
  p.add_argument("name", help="ml-100k, ml-1m, lastfm-360k, synthetic, or a folder")
  p.add_argument("--data-dir")
  p.add_argument("--format", help="movielens-100k, movielens-1m, recbole, lightgcn, lastfm")
  p.add_argument("--users", help="the user-attribute file, where not the conventional one")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--json", action="store_true")

  p = sub.add_parser("config", help="configs").add_subparsers(dest="config_command",
                                                               required=True)
  p = p.add_parser("show", help="print the resolved config, each field with what it does "
                                "(TOML: save it and pass it back with --config FILE)")
  p.add_argument("--config", help="a config name from configs/ or a .toml path "
                                  "(default: the bare defaults)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--json", action="store_true")

  _common(sub.add_parser("train", help="train (or resume) the backbone in a workdir"))

  p = sub.add_parser("evaluate", help="ranking metrics of every stage on the test split")
  p.add_argument("--workdir", required=True)
  p.add_argument("--json", action="store_true")

  p = sub.add_parser("attack", help="attribute-inference attack on a stage's embeddings")
  p.add_argument("--workdir", required=True)
  p.add_argument("--stage", default="original", help="original, combined or brick:<attribute>")
  p.add_argument("--attacker", default="mlp", choices=("mlp", "linear", "knn", "quadratic"))
  p.add_argument("--protocol", default="cv5", choices=("cv5", "paper"))
  p.add_argument("--repeats", type=int, default=None,
                 help="fold splits averaged (seeds seed, seed+1, ...); reports their spread "
                      "(default: the config's attack.repeats)")
  p.add_argument("--json", action="store_true")

  p = sub.add_parser("export", help="write a stage's user embeddings with raw ids and attributes")
  p.add_argument("--workdir", required=True)
  p.add_argument("--stage", default="original")
  p.add_argument("--out", required=True, help="the .npz file to write")

  p = sub.add_parser("unlearn", help="LEGO: calibrate the attributes and combine")
  p.add_argument("--workdir", required=True)
  p.add_argument("--attributes", help="comma-separated (default: unlearn.attributes, else all)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

  req = sub.add_parser("request", help="dynamic requests").add_subparsers(
      dest="request_command", required=True)
  for verb in ("add", "withdraw"):
    p = req.add_parser(verb, help=f"{verb} an attribute to/from the active set")
    p.add_argument("attribute")
    p.add_argument("--workdir", required=True)
  p = req.add_parser("status", help="active attributes and stored bricks")
  p.add_argument("--workdir", required=True)
  p.add_argument("--json", action="store_true")

  p = sub.add_parser("run", help="the whole pipeline: train, unlearn, baselines, report")
  _common(p, workdir_required=False)
  p.add_argument("--sweep", help="comma-separated lam_rank values for the trade-off plot")

  p = sub.add_parser("grid", help="datasets x backbones x methods, one combined table")
  p.add_argument("--configs", required=True, help="comma-separated config names")
  p.add_argument("--root", required=True, help="folder for the runs' workdirs")
  p.add_argument("--data-dir")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  p.add_argument("--out", help="markdown file for the table (default: ROOT/grid.md)")

  p = sub.add_parser("sweep", help="LEGO over a grid of settings x seeds, vmapped where it can be; "
                                   "mean and std per setting")
  p.add_argument("--workdir", required=True, help="a workdir (its backbone is trained if needed)")
  p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2,...",
                 help="values of one config field (repeatable), e.g. --grid unlearn.w_mi=0.3,1,3")
  p.add_argument("--seeds", type=int, default=3, help="seeds per setting (default 3)")
  p.add_argument("--attributes", help="comma-separated (default: unlearn.attributes, else all)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="override a field for every point (not saved to the workdir)")
  p.add_argument("--out", help="folder for sweep.json, sweep.md, sweep.png (default: the workdir)")
  p.add_argument("--json", action="store_true")
  return ap


def _print(obj, as_json: bool, table) -> None:
  if as_json:
    print(json.dumps(obj))
  else:
    print(table(obj))


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  from lego_jax import runner, sharding  # after parsing, so --help stays fast
  try:
    # Before any JAX computation: joining other processes configures the backend.
    if sharding.initialize() and args.command not in MULTI_PROCESS:
      raise LegoError(f"`lego-jax {args.command}` runs on one process; of several "
                      f"({sharding.COORDINATOR} is set) only {', '.join(MULTI_PROCESS)} run")
    out = runner.dispatch(args)
  except LegoError as e:
    print(f"lego-jax: error: {e}", file=sys.stderr)
    bug = e.__cause__ if not isinstance(e.__cause__, (LegoError, type(None))) else None
    if bug is not None and args.debug:
      traceback.print_exception(bug, file=sys.stderr)
    elif bug is not None:
      print("lego-jax: this looks like a bug in lego-jax; rerun with `lego-jax --debug ...` for "
            "the traceback", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("lego-jax: interrupted; finished stages are saved, run the command again to resume",
          file=sys.stderr)
    return 130
  if out is not None:
    obj, as_json, table = out
    _print(obj, as_json, table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
