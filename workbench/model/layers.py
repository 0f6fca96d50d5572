"""Small building blocks shared by every part of the model: RMSNorm and the SwiGLU MLP.

RMSNorm normalises each vector by its root mean square (no mean subtraction, no bias) and scales it
by a learned weight; the statistics are taken in float32 whatever the activation dtype, as DeepSeek
and Hugging Face do. The MLP is the SwiGLU feed-forward used by the dense layers, by every routed
expert and by the shared experts: ``down(silu(gate(x)) * up(x))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # statistics in fp32
        return self.weight * y.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: (..., hidden) -> (..., hidden)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
