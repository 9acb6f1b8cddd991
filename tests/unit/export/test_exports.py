"""Each export reproduces PyTorch's base + adapter on the same input."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import make_config


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


def test_peft_directory_reloads_identically(tmp_path, lora_dir, reference):
    from peft import PeftModel

    from fedtune.export import export_peft
    from fedtune.models import load_base_model

    model, x = reference
    out = export_peft(lora_dir, tmp_path / "peft")
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors", "fedtune.json"}
    base, _ = load_base_model(make_config().model)
    assert torch.equal(logits(PeftModel.from_pretrained(base, str(out)), x), logits(model, x))


def test_merged_safetensors_reproduce_base_plus_adapter(tmp_path, lora_dir, reference):
    from transformers import AutoModelForCausalLM

    from fedtune.export.merged import export_merged
    from fedtune.models import load_base_model

    model, x = reference
    out = export_merged(lora_dir, tmp_path / "merged")
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    got, want = logits(merged, x), logits(model, x)
    assert (got - want).abs().max() < 1e-5
    base, _ = load_base_model(make_config().model)
    assert (logits(base, x) - want).abs().max() > 0.05  # the adapter matters: this is not a vacuous check


def test_onnx_runtime_matches_pytorch_within_1e_3(tmp_path, lora_dir, reference):
    import onnx

    from fedtune.export.onnx import export_onnx, onnx_max_abs_diff

    model, x = reference
    path, merged = export_onnx(lora_dir, tmp_path / "model.onnx")
    onnx.checker.check_model(str(path))
    assert onnx_max_abs_diff(path, model, x) < 1e-3  # peft model vs ONNX Runtime
    assert onnx_max_abs_diff(path, merged, x[:1, :5]) < 1e-3  # batch 1, shorter: axes are dynamic


def test_gguf_lora_file_structure_and_llama_cpp_math(tmp_path, lora_dir, lora_cfg):
    """Read the file back and apply it the way llama.cpp does: W_gguf + (alpha / r) * lora_b @ lora_a."""
    from gguf import GGUFReader, GGMLQuantizationType
    from safetensors.torch import load_file

    from fedtune.export.gguf_lora import export_gguf_lora, permute_for_rope
    from fedtune.models.loader import resolve_model_dir

    path = export_gguf_lora(lora_dir, tmp_path / "adapter.gguf")
    reader = GGUFReader(path)
    field = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert field["general.architecture"] == "llama" and field["general.type"] == "adapter"
    assert field["adapter.type"] == "lora" and field["adapter.lora.alpha"] == pytest.approx(8.0)

    hf = json.loads((resolve_model_dir(lora_cfg.model) / "config.json").read_text())
    n_layer, d, kv = hf["num_hidden_layers"], hf["hidden_size"], hf["num_key_value_heads"]
    ffn, head_dim = hf["intermediate_size"], hf["hidden_size"] // hf["num_attention_heads"]
    tensors = {t.name: t for t in reader.tensors}
    n_out = {"attn_q": d, "attn_k": kv * head_dim, "attn_v": kv * head_dim, "attn_output": d,
             "ffn_gate": ffn, "ffn_up": ffn, "ffn_down": d}
    n_in = dict.fromkeys(n_out, d) | {"ffn_down": ffn}
    expected = {f"blk.{i}.{m}.weight.lora_{ab}" for i in range(n_layer) for m in n_out for ab in "ab"}
    assert set(tensors) == expected
    r = lora_cfg.adapter.rank
    for i in range(n_layer):
        for m in n_out:
            a, b = tensors[f"blk.{i}.{m}.weight.lora_a"], tensors[f"blk.{i}.{m}.weight.lora_b"]
            assert a.tensor_type == b.tensor_type == GGMLQuantizationType.F32
            assert list(a.shape) == [n_in[m], r] and list(b.shape) == [r, n_out[m]]  # ne order

    base = load_file(str(resolve_model_dir(lora_cfg.model) / "model.safetensors"))
    peft = load_file(str(lora_dir / "adapter_model.safetensors"))
    scale = field["adapter.lora.alpha"] / r
    for hf_name, gname, permute in [("self_attn.q_proj", "attn_q", (4, 4)), ("self_attn.k_proj", "attn_k", (4, 2)),
                                    ("mlp.down_proj", "ffn_down", None)]:
        key = f"model.layers.1.{hf_name}"
        w = base[f"{key}.weight"]
        delta = peft[f"base_model.model.{key}.lora_B.weight"] @ peft[f"base_model.model.{key}.lora_A.weight"]
        want = w + 2.0 * delta  # peft: alpha / r = 8 / 4
        gguf_base = permute_for_rope(w, *permute) if permute else w  # what the base GGUF holds
        want = permute_for_rope(want, *permute) if permute else want
        a = torch.from_numpy(np.array(tensors[f"blk.1.{gname}.weight.lora_a"].data))  # [r, n_in]
        b = torch.from_numpy(np.array(tensors[f"blk.1.{gname}.weight.lora_b"].data))  # [n_out, r]
        assert torch.allclose(gguf_base + scale * (b @ a), want, atol=1e-5), gname


def test_prompt_tuning_exports_only_as_peft(tmp_path):
    from fedtune.export import export_peft
    from fedtune.export.gguf_lora import export_gguf_lora
    from fedtune.export.merged import export_merged
    from tests.unit.export.conftest import save_lora

    cfg = make_config(adapter={"method": "prompt_tuning", "num_virtual_tokens": 4})
    d = save_lora(tmp_path / "pt", cfg)
    assert (export_peft(d, tmp_path / "out") / "adapter_config.json").is_file()
    for fn in (export_merged, export_gguf_lora):
        with pytest.raises(ValueError, match="needs a LoRA adapter, got peft_type='PROMPT_TUNING'"):
            fn(d, tmp_path / "x")


def test_rope_permutation_is_a_permutation():
    from fedtune.export.gguf_lora import permute_for_rope

    w = torch.arange(64 * 3, dtype=torch.float32).reshape(64, 3)  # 4 heads x head_dim 16
    p = permute_for_rope(w, 4)
    assert sorted(p[:, 0].tolist()) == sorted(w[:, 0].tolist()) and not torch.equal(p, w)
    # HF keeps each head's rotary pairs in halves (j, j + 8); llama.cpp wants them adjacent (2j, 2j + 1)
    assert torch.equal(p[0], w[0]) and torch.equal(p[1], w[8]) and torch.equal(p[2], w[1])
