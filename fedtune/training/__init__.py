"""One device's local training and held-out evaluation; knows nothing of Flower."""

from fedtune.training.evaluate import EvalResult, evaluate_chunks, token_losses
from fedtune.training.local import train_local

__all__ = ["EvalResult", "evaluate_chunks", "token_losses", "train_local"]
