"""Multi-Token Prediction (MTP): extra modules that predict tokens further ahead, sharing embedding and head.

DeepSeek-V3 trains with ``D`` (``num_nextn_predict_layers``) sequential MTP modules. Module k
predicts the token k+1 positions ahead. At position i it combines

* ``h^{k-1}_i``: the representation from the previous depth (the main model's final hidden state
  for k = 1, before the final norm), and
* ``Emb(t_{i+k})``: the embedding of the token k positions ahead (known in training),

as ``h' = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h^{k-1}_i)])``, runs one transformer block
(causal, so position i still sees only the past), and predicts ``t_{i+k+1}`` through the shared
output head after ``shared_head.norm``. The embedding and the output head are *shared* with the main
model; each module owns only its norms, its projection and its block.

The MTP loss is the mean of the modules' cross-entropies, added with weight lambda
(``mtp_loss_weight``). It densifies the training signal and makes the model plan ahead. At inference
the modules can be dropped, or reused to *draft* tokens for speculative decoding (``workbench.model.generate``):
DeepSeek reports 85-90% acceptance of the second token. Training and drafting run the same code,
``Model.predict_ahead`` (embedding, positions, this module's forward, the shared head).

Storage follows DeepSeek's checkpoints: module k is saved as decoder layer
``num_hidden_layers + k - 1`` with extra ``enorm``, ``hnorm``, ``eh_proj`` and ``shared_head``
tensors (the shared embedding and head are written there too, as copies).
"""

from __future__ import annotations

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.model.block import Block
from workbench.model.layers import RMSNorm
from workbench.model.mla import KVCache
from workbench.model.moe import RoutingStats


class SharedHead(nn.Module):
    """The norm in front of the (shared) output head. The head itself is the main model's lm_head."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(Block):
    """One MTP depth: a decoder block fed with [enorm(embedding of a future token) ; hnorm(hidden)]."""

    def __init__(self, config: ModelConfig, depth: int) -> None:
        super().__init__(config, layer_idx=config.num_hidden_layers + depth - 1)
        self.depth = depth  # 1-based: module `depth` predicts the token depth + 1 ahead
        D = config.hidden_size
        self.enorm = RMSNorm(D, config.rms_norm_eps)
        self.hnorm = RMSNorm(D, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.shared_head = SharedHead(config)

    def forward(
        self,
        h_prev: torch.Tensor,
        emb_ahead: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mode: str = "naive",
        cache: KVCache | None = None,
        mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RoutingStats | None]:
        """h_prev (B, T, D) and emb_ahead (B, T, D) -> this depth's hidden state (B, T, D)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_ahead), self.hnorm(h_prev)], dim=-1))  # (B, T, D)
        return super().forward(x, cos, sin, mode=mode, cache=cache, mask=mask)

    def logits(self, h: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """This depth's predictions (B, T, vocab) through the shared output head."""
        return lm_head(self.shared_head.norm(h))
