"""The economics of a DeepSeek-V3-style model: parameters (total vs active), KV cache bytes, FLOPs.

Everything here is *counted*, not estimated from formulas typed by hand: ``count_params`` builds the
real ``Model`` on PyTorch's ``meta`` device (shapes without memory, so the 671B model costs nothing)
and sums the tensors, split by role. A token activates every parameter except the routed experts
it was not sent to, so

    active = total - n_moe_layers * (n_routed_experts - num_experts_per_tok) * params_per_expert

For the ``deepseek-v3`` preset this gives 671.0e9 total and about 37e9 active (DeepSeek reports
671B and 37B); the MTP module adds about 11.5e9 of its own (14B in DeepSeek's count, which includes
the copies of the embedding and the output head stored with it).

KV cache per token: multi-head attention keeps a key and a value per head per layer; grouped-query
attention (GQA) shares them among groups of heads, multi-query (MQA) keeps one; MLA keeps the latent
and one rotary key (``kv_lora_rank + qk_rope_head_dim`` numbers per layer), whatever the head count.

FLOPs per token: a matrix multiply with N weights costs 2N FLOPs per token forward (a multiply and an
add), backward twice that. Attention adds the work of scores and weighted sums, which grows with the
context; we count it separately so its share is visible. Element-wise work (norms, activations,
softmax) is left out, as is usual.
"""

from __future__ import annotations

from typing import Any

import torch

from workbench.config import ModelConfig
from workbench.model.model import Model


def _build_meta(config: ModelConfig) -> Model:
    with torch.device("meta"):
        return Model(config)


def count_params(config: ModelConfig) -> dict[str, Any]:
    """Parameter counts by role, computed on the meta device.

    Returns ``total`` (main model, without MTP), ``active`` (per token), ``mtp`` (the MTP modules'
    own parameters; the embedding and head they share are not counted again) and a ``breakdown``.
    """
    model = _build_meta(config)
    seen: set[int] = set()
    breakdown: dict[str, int] = {
        "embedding": 0,
        "lm_head": 0,
        "attention": 0,
        "dense_mlp": 0,
        "shared_experts": 0,
        "routed_experts": 0,
        "router": 0,
        "norms": 0,
    }
    mtp = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied embedding and head count once
            continue
        seen.add(id(p))
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
            continue
        if name.startswith("embed_tokens"):
            breakdown["embedding"] += n
        elif name.startswith("lm_head"):
            breakdown["lm_head"] += n
        elif ".self_attn." in name and "layernorm" not in name:
            breakdown["attention"] += n
        elif ".mlp.experts." in name:
            breakdown["routed_experts"] += n
        elif ".mlp.shared_experts." in name:
            breakdown["shared_experts"] += n
        elif ".mlp.gate." in name:
            breakdown["router"] += n
        elif ".mlp." in name:
            breakdown["dense_mlp"] += n
        else:
            breakdown["norms"] += n
    total = sum(breakdown.values())
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    inactive = config.n_moe_layers * (config.n_routed_experts - config.num_experts_per_tok) * per_expert
    return {
        "total": total,
        "active": total - inactive,
        "mtp": mtp,
        "params_per_expert": per_expert,
        "breakdown": breakdown,
    }


def kv_cache_bytes_per_token(
    config: ModelConfig, dtype: torch.dtype = torch.bfloat16, gqa_groups: int = 8
) -> dict[str, int]:
    """Bytes of KV cache one token costs (all layers) under MLA and the MHA/GQA/MQA equivalents.

    The equivalents keep the same heads and head widths: keys of ``qk_nope_head_dim +
    qk_rope_head_dim`` and values of ``v_head_dim`` per head; GQA keeps ``gqa_groups`` key/value heads.
    ``mla_naive`` is what MLA's naive mode caches (expanded keys and values, i.e. the MHA size).
    """
    nbytes = torch.empty((), dtype=dtype).element_size()
    L, H = config.num_hidden_layers, config.num_attention_heads
    kv_per_head = config.qk_head_dim + config.v_head_dim
    groups = min(gqa_groups, H)
    return {
        "mha": L * H * kv_per_head * nbytes,
        "gqa": L * groups * kv_per_head * nbytes,
        "mqa": L * kv_per_head * nbytes,
        "mla": L * (config.kv_lora_rank + config.qk_rope_head_dim) * nbytes,
        "mla_naive": L * H * kv_per_head * nbytes,
    }


def kv_cache_values_per_token_per_layer(config: ModelConfig) -> dict[str, int]:
    """Numbers cached per token and layer: MLA's latent + rotary key against MHA's keys + values."""
    return {
        "mla": config.kv_lora_rank + config.qk_rope_head_dim,
        "mha": config.num_attention_heads * (config.qk_head_dim + config.v_head_dim),
    }


def flops_per_token(
    config: ModelConfig, context: int | None = None, training: bool = False, include_mtp: bool = False
) -> dict[str, float]:
    """FLOPs to process one token: ``matmul`` (2 x active weights used in matmuls) + ``attention``.

    context: how many earlier tokens the token attends to (default: half the maximum context, the
    average over a causal sequence of that length). training: forward + backward (x3).
    """
    counts = count_params(config)
    b = counts["breakdown"]
    # the embedding is a lookup, not a matmul; everything else active is a weight of some matmul
    matmul_weights = counts["active"] - b["embedding"] - b["norms"]
    if config.tie_word_embeddings:
        matmul_weights += config.vocab_size * config.hidden_size
    ctx = config.max_position_embeddings // 2 if context is None else context
    H = config.num_attention_heads
    attn_per_layer = 2 * H * (config.qk_head_dim + config.v_head_dim) * ctx  # scores + weighted sum
    layers = config.num_hidden_layers
    mtp_weights = 0
    if include_mtp and config.num_nextn_predict_layers:
        per_expert = counts["params_per_expert"]
        inactive = (config.n_routed_experts - config.num_experts_per_tok) * per_expert
        mtp_weights = counts["mtp"] - config.num_nextn_predict_layers * inactive
        mtp_weights += config.num_nextn_predict_layers * config.vocab_size * config.hidden_size  # shared head
        layers += config.num_nextn_predict_layers
    forward = {"matmul": 2.0 * (matmul_weights + mtp_weights), "attention": float(layers * attn_per_layer)}
    factor = 3.0 if training else 1.0
    out = {k: v * factor for k, v in forward.items()}
    out["total"] = out["matmul"] + out["attention"]
    return out
