"""Compressing a trained model's KV cache after the fact: the "JPEG" reading of MLA, made measurable.

MLA is sometimes explained as compression of the cache, like JPEG for an image or minutes for a
meeting: take what attention would keep, and store a smaller summary. That describes *post-hoc*
compression. MLA is something else: the model is *trained* with the bottleneck, so everything it learns
is shaped to pass through ``kv_lora_rank`` numbers. The difference can be measured:

1. train a model whose latent is as wide as the keys and values it expands to (``full_kv_rank``:
   ``num_attention_heads x (qk_nope_head_dim + v_head_dim)``), i.e. no bottleneck: an MHA cache;
2. compress that model's cache to ``rank`` numbers per token and layer the best linear way after
   training: ``fit_kv_compression`` collects the expanded keys and values ``KV = c W_b^T`` of each layer
   on calibration windows and keeps their top-``rank`` principal directions ``U`` (the projection that
   loses the least squared error, as JPEG keeps the largest transform coefficients), which as a map on
   the latent is ``M = pinv(W_b) U U^T W_b``;
3. compare its loss with a model *trained* at that rank, same data and budget.

``compressed_kv(model, maps)`` applies the maps inside a ``with`` block (forward hooks on each layer's
``kv_a_layernorm``, removed afterwards); both attention modes see the compressed latent. The cache then
holds ``rank`` numbers per token and layer (the coefficients ``c W_b^T U``) plus the rotary key, as many
as a trained rank-``rank`` model's.

Where it simplifies: the rotary key ``k_pe`` is left uncompressed in both cases (it is the same size in
both); the projection is uncentred (a cache stores coefficients, not a mean); the MTP module's
attention is not compressed (it does not run when the main model is scored).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch

from workbench.config import ModelConfig
from workbench.model import Model
from workbench.util import eval_mode


def full_kv_rank(config: ModelConfig) -> int:
    """The latent width at which MLA has no bottleneck: the width of all heads' keys (nope) and values."""
    return config.num_attention_heads * (config.qk_nope_head_dim + config.v_head_dim)


@torch.no_grad()
def fit_kv_compression(model: Model, batches: Iterable, rank: int) -> list[torch.Tensor]:
    """Per layer, the (r, r) map on the latent that keeps the top-``rank`` directions of the expanded KV."""
    r = model.config.kv_lora_rank
    if not isinstance(rank, int) or not 1 <= rank <= r:
        raise ValueError(f"rank must be an int in [1, kv_lora_rank={r}], got {rank!r}")
    latents: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.layers))}
    hooks = []
    for i, block in enumerate(model.layers):
        hooks.append(
            block.self_attn.kv_a_layernorm.register_forward_hook(
                lambda _m, _i, out, i=i: latents[i].append(out.detach().reshape(-1, out.shape[-1]).double().cpu())
            )
        )
    try:
        with eval_mode(model):
            seen = 0
            for batch in batches:
                ids = batch[0] if isinstance(batch, (tuple, list)) else batch
                model(ids.to(model.device), compute_mtp=False)
                seen += 1
    finally:
        for h in hooks:
            h.remove()
    if seen == 0:
        raise ValueError("batches is empty: pass calibration windows (token ids (B, T))")
    maps = []
    for i, block in enumerate(model.layers):
        c = torch.cat(latents[i])  # (N, r)
        w_b = block.self_attn.kv_b_proj.weight.detach().double().cpu()  # (H * (d_nope + d_v), r)
        kv = c @ w_b.T  # (N, H * (d_nope + d_v)): the expanded keys and values an MHA cache would hold
        _, _, vh = torch.linalg.svd(kv, full_matrices=False)  # rows of vh: principal directions of KV
        u = vh[:rank].T  # (H * (d_nope + d_v), rank)
        m = torch.linalg.pinv(w_b) @ u @ u.T @ w_b  # (r, r): c -> c' with W_b c' = U U^T W_b c
        maps.append(m.to(block.self_attn.kv_b_proj.weight.dtype))
    return maps


@contextmanager
def compressed_kv(model: Model, maps: list[torch.Tensor]) -> Iterator[Model]:
    """Inside the block, every layer's latent ``c`` is replaced by ``c M^T`` (its compressed cache)."""
    if len(maps) != len(model.layers):
        raise ValueError(f"need one map per layer ({len(model.layers)}), got {len(maps)}")
    hooks = []
    for block, m in zip(model.layers, maps):
        m = m.to(block.self_attn.kv_b_proj.weight.device)
        hooks.append(block.self_attn.kv_a_layernorm.register_forward_hook(lambda _mod, _i, out, m=m: out @ m.T))
    try:
        yield model
    finally:
        for h in hooks:
            h.remove()


__all__ = ["compressed_kv", "fit_kv_compression", "full_kv_rank"]
