"""Configs: merging, type checks, per-attribute tables, older saved configs, the table of
descriptions, `lego-jax config show` and the typed views."""

import dataclasses
import itertools
import json
import pathlib
import re
import tomllib

import jax
import pytest

from lego_jax import cli, config as config_lib, data, models
from lego_jax.errors import LegoError
from lego_jax.unlearning import calibration


def test_per_attribute_values_are_set_field_by_field():
  cfg = config_lib.resolve(None, ["unlearn.per_attribute.age.lam_rank=100",
                                  "unlearn.per_attribute.age.lr=0.01",
                                  "unlearn.per_attribute.gender.w_mi=2"])
  assert cfg["unlearn"]["per_attribute"] == {"age": {"lam_rank": 100.0, "lr": 0.01},
                                             "gender": {"w_mi": 2.0}}
  assert isinstance(cfg["unlearn"]["per_attribute"]["gender"]["w_mi"], float)
  hp = calibration.HParams.from_config(cfg["unlearn"], ["gender", "age", "occupation", None])
  lam = cfg["unlearn"]["lam_rank"]
  assert hp.lam_rank.tolist() == [lam, 100.0, lam, lam]
  assert hp.w_mi.tolist() == [2.0, 1.0, 1.0, 1.0]
  assert hp.lr.tolist() == pytest.approx([cfg["unlearn"]["lr"], 0.01] + [cfg["unlearn"]["lr"]] * 2)


@pytest.mark.parametrize("override,message", [
    ("unlearn.per_attribute.age.steps=5", "unknown config field 'unlearn.per_attribute.age.steps'"),
    ("unlearn.per_attribute.age.lam_rank=lots", "expects float"),
    ("unlearn.per_attribute.age=3", "must be a table of w_mi, lam_rank, l2, lr"),
])
def test_bad_per_attribute_values_are_refused(override, message):
  with pytest.raises(LegoError, match=message):
    config_lib.resolve(None, [override])


def test_per_attribute_fields_are_the_calibration_weights():
  # config cannot import the unlearning package, so the list is kept twice.
  assert config_lib.KEYED["unlearn.per_attribute"][1] == calibration.HParams._fields


def test_fill_defaults_adds_fields_an_older_config_lacks():
  old = config_lib.resolve(None)
  del old["unlearn"]["per_attribute"], old["combine"]["init"]
  old["unlearn"]["lam_rank"] = 5.0
  filled = config_lib.fill_defaults(old)
  assert filled["unlearn"]["per_attribute"] == {} and filled["combine"]["init"] == "uniform"
  assert filled["unlearn"]["lam_rank"] == 5.0


# ---------------------------------------------------------------- one table


def test_every_table_and_field_has_a_description_and_every_description_a_field():
  paths = config_lib.paths()
  assert "unlearn.steps" in paths and "unlearn" in paths and "seed" in paths
  missing = [p for p in paths if not config_lib.DESCRIPTIONS.get(p, "").strip()]
  assert not missing, f"fields without a line in config.DESCRIPTIONS: {missing}"
  stale = sorted(set(config_lib.DESCRIPTIONS) - set(paths))
  assert not stale, f"config.DESCRIPTIONS entries for no field of DEFAULTS: {stale}"
  # One line each, and a markdown table cell.
  assert not [p for p, d in config_lib.DESCRIPTIONS.items() if "\n" in d or "|" in d]


def _doc_tables() -> dict[str, list[str]]:
  """The rows of each field table in docs/configuration.md, by section ("" = top level)."""
  text = (pathlib.Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
  tables, section, lines = {}, None, text.splitlines()
  for i, line in enumerate(lines):
    if line.startswith("### "):
      found = re.search(r"`\[(\w+)\]`", line)
      section = found.group(1) if found else ""
    if line == "| field | default | description |":
      rows = itertools.takewhile(lambda r: r.startswith("|"), lines[i + 2:])
      tables[section] = list(rows)
  return tables


def test_the_configuration_doc_lists_every_field_as_the_table_says():
  tables = _doc_tables()
  sections = [""] + [k for k, v in config_lib.DEFAULTS.items() if isinstance(v, dict)]
  assert sorted(tables) == sorted(sections)
  for section in sections:
    # On a failure, paste `config_lib.reference_rows(section)` into the doc.
    assert tables[section] == config_lib.reference_rows(section), section


def test_config_show_prints_every_field_with_its_description_and_reads_back(capsys, tmp_path):
  argv = ["config", "show", "--config", "ml100k_ncf", "--set", "unlearn.per_attribute.age.l2=3",
          "--set", 'data.users_file="a \\"quoted\\" name"']
  assert cli.main(argv) == 0
  text = capsys.readouterr().out
  assert f"# {config_lib.DESCRIPTIONS['unlearn.steps']}\nsteps = " in text
  assert f"# {config_lib.DESCRIPTIONS['combine']}\n[combine]\n" in text
  saved = tmp_path / "shown.toml"
  saved.write_text(text)
  expected = config_lib.resolve("ml100k_ncf", argv[-3::2])
  assert tomllib.loads(text) == expected
  assert config_lib.resolve(str(saved)) == expected
  assert cli.main(["config", "show", "--json"]) == 0
  assert json.loads(capsys.readouterr().out) == config_lib.DEFAULTS


def test_config_show_refuses_bad_input_in_one_line(capsys):
  assert cli.main(["config", "show", "--set", "unlearn.stepz=3"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("lego-jax: error: unknown config field 'unlearn.stepz'")
  assert len(err.strip().splitlines()) == 1


# ---------------------------------------------------------------- typed views


def test_section_views_are_typed_frozen_and_read_like_the_dicts():
  cfg = config_lib.resolve(None, ["unlearn.steps=7", "unlearn.per_attribute.age.lr=0.5"])
  views = config_lib.sections(cfg)
  assert views.unlearn.steps == 7 == views["unlearn"]["steps"]
  assert views.seed == cfg["seed"]
  assert views.unlearn.per_attribute["age"]["lr"] == 0.5
  assert views.model.mlp_layers == tuple(cfg["model"]["mlp_layers"])
  assert dict(views.train) == cfg["train"] and set(views.unlearn) == set(cfg["unlearn"])
  with pytest.raises(dataclasses.FrozenInstanceError):
    views.unlearn.steps = 3
  with pytest.raises(TypeError):
    views.unlearn.per_attribute["age"] = {}
  fields = {f.name: f for f in dataclasses.fields(config_lib.SECTION_TYPES["unlearn"])}
  assert fields["steps"].type is int and fields["lr"].type is float
  assert fields["probes"].type == tuple[str, ...]
  assert fields["steps"].metadata["description"] == config_lib.DESCRIPTIONS["unlearn.steps"]
  assert "steps: " + config_lib.DESCRIPTIONS["unlearn.steps"] in \
      config_lib.SECTION_TYPES["unlearn"].__doc__


def test_a_view_fills_defaults_and_refuses_unknown_fields_and_types():
  assert config_lib.view("model", {"dim": 8}).n_layers == config_lib.DEFAULTS["model"]["n_layers"]
  assert config_lib.view("train", {"l2": 0}).l2 == 0.0 and \
      isinstance(config_lib.view("train", {"l2": 0}).l2, float)
  assert config_lib.view("attack") == config_lib.SECTION_TYPES["attack"]()
  with pytest.raises(LegoError, match="unknown config field 'model.dims'"):
    config_lib.view("model", {"dims": 8})
  with pytest.raises(LegoError, match="config field model.dim expects int"):
    config_lib.view("model", {"dim": "big"})
  with pytest.raises(LegoError, match="unknown config section 'modle'"):
    config_lib.view("modle", {})


def test_backbones_take_their_defaults_from_the_table():
  model = models.get("mf", {}, {"l2": 0.0})
  params = model.init(jax.random.PRNGKey(0), 3, 4)
  assert model.user_table(params).shape == (3, config_lib.DEFAULTS["model"]["dim"])


def test_name_lists_copied_from_the_data_package_agree():
  # config is imported by lego_jax.data (for its defaults), so it cannot import it back.
  assert config_lib.FORMATS == data.FORMATS
  assert config_lib.SPLIT_METHODS == data.SPLIT_METHODS
