import json

import torch

from fedtune.adapters import create_adapter, get_adapter_state, set_adapter_state
from fedtune.models import load_base_model
from fedtune.recording import save_adapter
from fedtune.types import RoundResult
from tests.conftest import make_config


def test_saved_adapter_reloads_with_peft_and_gives_same_logits(tmp_path):
    from peft import PeftModel

    cfg = make_config(privacy={"enabled": True, "noise_multiplier": 1.0})
    base, _ = load_base_model(cfg.model)
    model = create_adapter(base, cfg.adapter, seed=0)
    trained = {k: torch.randn_like(v) * 0.05 for k, v in get_adapter_state(model).items()}
    set_adapter_state(model, trained)
    result = RoundResult(round=3, clients_sampled=4, clients_succeeded=4, train_loss=1.0, eval_loss=2.0,
                         eval_perplexity=7.39, upload_bytes=10, wall_seconds=1.0, epsilon=2.5, delta=1e-5)
    out = save_adapter(model, tmp_path / "round-3", result, cfg, {"level": "sample", "epsilon": 2.5, "delta": 1e-5})
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        expected = model(input_ids=x).logits
    fresh, _ = load_base_model(cfg.model)
    reloaded = PeftModel.from_pretrained(fresh, str(out))
    with torch.no_grad():
        got = reloaded(input_ids=x).logits
    assert torch.allclose(expected, got, atol=1e-6)
    meta = json.loads((out / "fedtune.json").read_text())
    assert meta["round"] == 3 and meta["privacy"]["epsilon"] == 2.5 and meta["privacy"]["level"] == "sample"
