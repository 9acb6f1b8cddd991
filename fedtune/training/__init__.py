"""One device's local training and held-out evaluation; knows nothing of Flower."""

from fedtune.training.evaluate import EvalResult, evaluate_chunks
from fedtune.training.local import train_local

__all__ = ["EvalResult", "evaluate_chunks", "train_local"]
