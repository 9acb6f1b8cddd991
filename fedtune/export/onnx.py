"""Export the merged model to ONNX (``torch.onnx.export``, dynamo exporter) and check it with ONNX Runtime.

The graph maps ``input_ids [B, T] int64 -> logits [B, T, V] float32`` with dynamic B and T, no KV
cache (the simplest graph every runtime loads; generation re-runs the prefix). Weights above ~1.5 GiB
go to an external ``.data`` file beside the ``.onnx`` (protobuf's 2 GiB limit).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from fedtune.config import ModelConfig
from fedtune.export.merged import merged_model

log = logging.getLogger(__name__)

EXTERNAL_DATA_BYTES = 1536 * 2**20


class LogitsOnly(torch.nn.Module):
    """input_ids [B, T] -> logits [B, T, V]; no cache, no attention mask (unpadded batches)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_onnx_model(model, out: Path, vocab_size: int, opset: int = 18) -> Path:
    """Export a (merged) causal LM. The example batch is 2 x 8: batch 1 would be specialized away."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapped = LogitsOnly(model.eval())
    example = torch.randint(0, vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))  # [B=2, T=8]
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    dims = {"input_ids": {0: torch.export.Dim("batch"), 1: torch.export.Dim("seq")}}
    with torch.no_grad():
        torch.onnx.export(wrapped, (example,), str(out), input_names=["input_ids"], output_names=["logits"],
                          dynamic_shapes=dims, opset_version=opset, dynamo=True,
                          external_data=size > EXTERNAL_DATA_BYTES, verbose=False)
    log.info("wrote ONNX model %s (%.1f MiB of weights)", out, size / 2**20)
    return out


def export_onnx(adapter_dir: Path, out: Path, base_cfg: ModelConfig | None = None, opset: int = 18):
    """Merge the adapter into its base and export; returns (path to .onnx, the merged torch model)."""
    model, _ = merged_model(adapter_dir, base_cfg)
    return export_onnx_model(model, out, model.config.vocab_size, opset), model


def onnx_logits(onnx_path: Path, input_ids: torch.Tensor, threads: int | None = None) -> np.ndarray:
    """ONNX Runtime (CPU) logits [B, T, V] for input_ids [B, T]."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    session = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": input_ids.cpu().numpy().astype(np.int64)})[0]


def onnx_max_abs_diff(onnx_path: Path, torch_model, input_ids: torch.Tensor) -> float:
    """max |logits_onnxruntime - logits_torch| on the same input."""
    with torch.no_grad():
        ref = torch_model(input_ids=input_ids, use_cache=False).logits.float().numpy()  # [B, T, V]
    got = onnx_logits(onnx_path, input_ids)
    if got.shape != ref.shape:
        raise ValueError(f"ONNX logits have shape {got.shape}, PyTorch's {ref.shape}")
    return float(np.abs(got - ref).max())
