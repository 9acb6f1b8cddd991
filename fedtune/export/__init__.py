"""Formats on-device runtimes load: PEFT directory, merged safetensors, GGUF LoRA (llama.cpp), ONNX.

Every export starts from an adapter directory (PEFT files + fedtune.json naming the base model).
Heavy dependencies (onnx, onnxruntime, gguf) are imported by the module that needs them.
"""

from fedtune.export.peft_dir import export_peft

FORMATS = ("peft", "merged", "gguf-lora", "onnx")

__all__ = ["FORMATS", "export_peft"]
