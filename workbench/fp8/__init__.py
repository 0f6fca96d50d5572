"""FP8: eight-bit numbers with fine-grained scales, as DeepSeek-V3 trains and serves with them.

One module per idea, read in this order:

* ``formats``: E4M3 / E5M2 / INT8, per-tensor, per-row, 1x128 and 128x128 scales (``quantize``, ``dequantize``);
* ``linear``: ``FP8Linear`` and ``fp8_linear``, training GEMMs on FP8 operands (``scaled_mm`` on Hopper);
* ``accumulation``: the tensor-core accumulator and promotion every 128 products;
* ``weights``: weight-only 8-bit inference and what it costs.

The checkpoint layout (FP8 weights with ``_scale_inv`` siblings) is checkpoint I/O: ``workbench.io.fp8_layout``.
"""

from __future__ import annotations

from workbench.fp8.accumulation import simulate_accumulation
from workbench.fp8.formats import (
    ACTIVATION_BLOCK,
    DEFAULT_SKIP,
    FORMATS,
    WEIGHT_BLOCK,
    QuantFormat,
    dequantize,
    quantize,
    scale_shape,
)
from workbench.fp8.linear import FP8Linear, convert_to_fp8, fp8_linear, scaled_mm_support
from workbench.fp8.weights import QuantizedLinear, quantize_weights_, top1_agreement, weight_bytes

__all__ = [
    "ACTIVATION_BLOCK",
    "DEFAULT_SKIP",
    "FORMATS",
    "WEIGHT_BLOCK",
    "FP8Linear",
    "QuantFormat",
    "QuantizedLinear",
    "convert_to_fp8",
    "dequantize",
    "fp8_linear",
    "quantize",
    "quantize_weights_",
    "scale_shape",
    "scaled_mm_support",
    "simulate_accumulation",
    "top1_agreement",
    "weight_bytes",
]
