"""MLA's absorb mode (what generation runs) must apply a peft LoRA adapter on kv_b_proj, as naive mode does."""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model

from workbench.config import ModelConfig
from workbench.model import Model


def _lora_model() -> Model:
    torch.manual_seed(0)
    m = Model(ModelConfig.from_preset("tiny", num_nextn_predict_layers=0)).eval()
    m = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=8, target_modules=["kv_b_proj", "o_proj"]), m)
    g = torch.Generator().manual_seed(1)
    for name, p in m.named_parameters():
        if "lora_B" in name:  # peft starts B at zero (the identity); make the adapter do something
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m


def test_absorb_mode_applies_the_lora_delta_on_kv_b_proj():
    m = _lora_model()
    ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        naive = m(ids, attn_mode="naive").logits
        absorb = m(ids, attn_mode="absorb").logits
        for mod in m.modules():
            if hasattr(mod, "enable_adapters") and hasattr(mod, "lora_A"):
                mod.enable_adapters(False)
        base = m(ids, attn_mode="absorb").logits
    assert (naive - base).abs().max() > 1e-3  # the adapter really changes the output
    torch.testing.assert_close(absorb, naive, atol=1e-4, rtol=1e-4)
