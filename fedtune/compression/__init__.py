"""Upload compression of adapter updates: pure tensors in, pure tensors out (no Flower here).

``fp32`` sends the adapter as is, ``fp16`` halves it, ``int8`` sends the blockwise-quantized delta
from the adapter the server sent, with error feedback (the quantization error is kept on the device
in a ``ResidualStore`` and added to the next round's delta). ``fedtune.flower.records`` puts the
payload into a Flower message; the server decodes it before validation and aggregation.
"""

from fedtune.compression.codec import SCHEMES, decode_update, encode_update, payload_scheme
from fedtune.compression.int8 import BLOCK, dequantize_blockwise, quantize_blockwise
from fedtune.compression.residual import ResidualStore

__all__ = ["BLOCK", "SCHEMES", "ResidualStore", "decode_update", "dequantize_blockwise", "encode_update",
           "payload_scheme", "quantize_blockwise"]
