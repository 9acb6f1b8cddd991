"""Base models: resolve a source to local weights, quantize the frozen base, cache per process."""

from fedtune.models.cache import get_base_model
from fedtune.models.loader import load_base_model, resolve_model_dir
from fedtune.models.tokenizer import TextEncoder, load_encoder

__all__ = ["TextEncoder", "get_base_model", "load_base_model", "load_encoder", "resolve_model_dir"]
