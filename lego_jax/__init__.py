"""lego-jax: multi-attribute unlearning for recommender systems (LEGO) in JAX.

The pipeline flows one way: data -> backbone -> calibration -> combination ->
evaluation -> report. Typical use:

  import lego_jax as lj
  config = lj.load_config("synthetic_mf", ["train.epochs=20"])
  wd = lj.Workdir.create("runs/demo", config)        # trains the backbone on first use
  u = lj.Unlearner(wd)
  u.unlearn(["gender", "age"])                       # vmapped calibration, then combination
  u.add("occupation"); u.withdraw("age")             # dynamic requests reuse stored bricks
  print(lj.attack(u.table("combined"), *wd.labels(["gender", "occupation"])))
"""

from lego_jax.config import resolve as load_config
from lego_jax.data import Dataset, Split, describe, load_dataset, split_dataset
from lego_jax.errors import LegoError
from lego_jax.evaluation import attack, evaluate
from lego_jax.experiment import train_and_evaluate
from lego_jax.requests import Unlearner
from lego_jax.workdir import Backbone, Workdir

__version__ = "0.1.0"

__all__ = ["Backbone", "Dataset", "LegoError", "Split", "Unlearner", "Workdir", "attack",
           "describe", "evaluate", "load_config", "load_dataset", "split_dataset",
           "train_and_evaluate"]
