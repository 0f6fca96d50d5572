"""One decoder layer: pre-norm MLA attention, then a pre-norm dense MLP or DeepSeekMoE.

``x = x + attn(norm(x)); x = x + ffn(norm(x))``. The first ``first_k_dense_replace`` layers use a
dense MLP (DeepSeek-V3 keeps three: routing is least useful on the shallowest representations);
every later layer is a MoE layer. Module names follow the Hugging Face checkpoint layout.
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.model.layers import MLP, RMSNorm
from workbench.model.mla import MLA, KVCache
from workbench.model.moe import MoE, RoutingStats


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp: nn.Module = (
            MoE(config, layer_idx) if self.is_moe else MLP(config.hidden_size, config.intermediate_size)
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mode: str = "naive",
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingStats | None]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mode=mode, cache=cache, mask=mask)  # (B, T, D)
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, stats = self.mlp(h)
        else:
            y, stats = self.mlp(h), None
        return x + y, stats
