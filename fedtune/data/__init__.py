"""Data: sources of (user, text), tokenization into fixed-length chunks, per-user held-out splits."""

from fedtune.data.partition import (
    PreparedData, build_client_data, load_client_data, prepare_client_data, prepare_run_data, save_client_data,
)
from fedtune.data.sources import available_sources, load_user_texts, register_source
from fedtune.data.tokenize import chunk_tokens

__all__ = [
    "available_sources",
    "build_client_data",
    "chunk_tokens",
    "load_client_data",
    "load_user_texts",
    "PreparedData",
    "prepare_client_data",
    "prepare_run_data",
    "register_source",
    "save_client_data",
]
