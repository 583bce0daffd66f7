"""Backbones: each module's `make(model_cfg, train_cfg)` returns a `Model`."""

from lego_jax.errors import unknown
from lego_jax.models.base import Model

NAMES = ("mf", "ncf", "lightgcn")


def get(name: str, model_cfg, train_cfg) -> Model:
  """The backbone `name` built from the config's model and train tables (dicts or
  `config.view`s; fields they lack take the defaults)."""
  if name == "mf":
    from lego_jax.models import mf as mod
  elif name == "ncf":
    from lego_jax.models import ncf as mod
  elif name == "lightgcn":
    from lego_jax.models import lightgcn as mod
  else:
    raise unknown("backbone", name, NAMES)
  return mod.make(model_cfg, train_cfg)


__all__ = ["Model", "NAMES", "get"]
