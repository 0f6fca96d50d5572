"""Generating from a model whose weights were quantised to 8 bits (``quantize_weights_``).

Absorbed MLA (the inference default) multiplies the query and the attention output by ``kv_b_proj``'s
weight directly instead of calling the layer; a ``QuantizedLinear`` stores that weight in 8 bits, so the
absorbed path must use its dequantised weight. Naive and absorbed attention compute the same function, so a
quantised model must produce the same greedy tokens (and nearly the same logits) in both modes.
"""

from __future__ import annotations

import copy

import pytest
import torch

from workbench import Model, ModelConfig, fp8
from workbench.fp8 import QuantizedLinear, quantize_weights_
from workbench.model.generate import generate


def quantised_tiny(fmt: str) -> Model:
    torch.manual_seed(0)
    model = Model(ModelConfig.from_preset("tiny"))
    quantize_weights_(model, fmt)
    return model.eval()


@pytest.mark.parametrize("fmt", ["e4m3", "int8"])
def test_quantised_model_generates_the_same_tokens_absorbed_and_naive(fmt):
    model = quantised_tiny(fmt)
    kv_b = model.layers[0].self_attn.kv_b_proj
    assert isinstance(kv_b, QuantizedLinear) and kv_b.weight.element_size() == 1  # the absorbed path's weight is 8-bit
    prompt = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    absorbed = generate(model, prompt, 12, attn_mode="absorb")
    naive = generate(model, prompt, 12, attn_mode="naive")
    assert absorbed.shape == (2, 20)
    assert torch.equal(absorbed, naive)


def test_quantised_model_logits_agree_across_attention_modes():
    model = quantised_tiny("e4m3")
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        absorbed = model(ids, attn_mode="absorb").logits
        naive = model(ids, attn_mode="naive").logits
    assert absorbed.dtype == naive.dtype == torch.float32
    assert torch.allclose(absorbed, naive, rtol=1e-4, atol=1e-4)


def test_weight_bytes_in_a_bf16_deployment():
    torch.manual_seed(0)
    model = Model(ModelConfig.from_preset("tiny"))
    full = fp8.weight_bytes(model)
    bf16 = fp8.weight_bytes(model, torch.bfloat16)
    assert bf16 == fp8.weight_bytes(copy.deepcopy(model).to(torch.bfloat16)) and 2 * bf16 == full
    quantised = quantize_weights_(copy.deepcopy(model), "e4m3")
    scales = sum(b.nbytes for n, b in quantised.named_buffers() if n.endswith("scale_inv"))
    eight_bit = sum(b.nbytes for n, b in quantised.named_buffers() if n.endswith(".weight") and b.element_size() == 1)
    rest = sum(
        t.numel() * 2 for n, t in quantised.state_dict().items() if t.element_size() > 1 and "scale_inv" not in n
    )
    assert fp8.weight_bytes(quantised, torch.bfloat16) == eight_bit + scales + rest < bf16
    state = quantised.state_dict()
    assert fp8.weight_bytes(state, torch.bfloat16) == fp8.weight_bytes(quantised, torch.bfloat16)
    with pytest.raises(ValueError, match="other_dtype"):
        fp8.weight_bytes(model, torch.int8)
