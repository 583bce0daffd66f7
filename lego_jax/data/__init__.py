"""Datasets: readers, the synthetic default, splits, and a summary for the CLI."""

from lego_jax.data.dataset import MISSING, Attribute, Dataset, Split, fingerprint
from lego_jax.data.load import DATASETS, describe, from_config, load_dataset
from lego_jax.data.readers import FORMATS
from lego_jax.data.split import METHODS as SPLIT_METHODS
from lego_jax.data.split import split_dataset

__all__ = [
    "MISSING", "Attribute", "Dataset", "Split", "fingerprint", "DATASETS", "FORMATS",
    "SPLIT_METHODS", "describe", "from_config", "load_dataset", "split_dataset",
]
