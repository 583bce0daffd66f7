"""Configs: merging, type checks, per-attribute tables and older saved configs."""

import pytest

from lego_jax import config as config_lib
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
