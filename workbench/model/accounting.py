"""The economics of a DeepSeek-V3-style model: parameters (total vs active), bytes, KV cache, FLOPs.

``count_params`` counts every weight tensor the model holds, by role, in closed form from the config:
summing shapes needs no model, so the 671B model (or a config with two million layers) costs nothing
and answers at once. ``count_params_meta`` counts the same by building the real ``Model`` on PyTorch's
``meta`` device (shapes without memory) and summing its tensors; the tests check that the two agree on
many configs, so the formulas below cannot drift from the model. A token activates every parameter
except the routed experts it was not sent to, so

    active = total - n_moe_layers * (n_routed_experts - num_experts_per_tok) * params_per_expert

For the ``deepseek-v3`` preset this gives 671.0e9 total and about 37e9 active (DeepSeek reports
671B and 37B); the MTP module adds about 11.5e9 of its own (14B in DeepSeek's count, which includes
the copies of the embedding and the output head stored with it).

``model_bytes`` turns the count into memory (weights in a dtype, plus the float32 balancing bias and
rotary tables), and ``check_fits`` refuses, before anything is allocated, a model that the device's
free memory cannot hold: ``Model(config)`` and ``load_hf`` call it, so a config that is too big fails
at once with its size, the memory there is and the ways out, instead of swapping the machine to a halt.

KV cache per token: multi-head attention keeps a key and a value per head per layer; grouped-query
attention (GQA) shares them among groups of heads, multi-query (MQA) keeps one; MLA keeps the latent
and one rotary key (``kv_lora_rank + qk_rope_head_dim`` numbers per layer), whatever the head count.

FLOPs per token: a matrix multiply with N weights costs 2N FLOPs per token forward (a multiply and an
add), backward twice that. Attention adds the work of scores and weighted sums, which grows with the
context; we count it separately so its share is visible. Element-wise work (norms, activations,
softmax) is left out, as is usual.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import torch

from workbench.config import ConfigError, ModelConfig

_ROLES = ("embedding", "lm_head", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms")


class ModelTooLarge(ConfigError):
    """A model whose weights do not fit the memory available on the device; the message says what fits."""


def _layer_params(config: ModelConfig, layer_idx: int) -> dict[str, int]:
    """Parameters of one decoder layer (``layers.i`` or an MTP module's block), by role."""
    c = config
    D, H = c.hidden_size, c.num_attention_heads
    out = dict.fromkeys(_ROLES, 0)
    if c.q_lora_rank is None:
        out["attention"] += D * H * c.qk_head_dim  # q_proj
    else:
        out["attention"] += D * c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim  # q_a_proj, q_b_proj
        out["norms"] += c.q_lora_rank  # q_a_layernorm
    out["attention"] += D * (c.kv_lora_rank + c.qk_rope_head_dim)  # kv_a_proj_with_mqa
    out["attention"] += c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b_proj
    out["attention"] += H * c.v_head_dim * D  # o_proj
    out["norms"] += c.kv_lora_rank + 2 * D  # kv_a_layernorm, input_layernorm, post_attention_layernorm
    if c.is_moe_layer(layer_idx):
        E, I = c.n_routed_experts, c.moe_intermediate_size
        out["router"] += E * D
        out["routed_experts"] += 3 * E * D * I  # gate, up (I, D) and down (D, I) per expert
        if c.n_shared_experts > 0:
            out["shared_experts"] += 3 * D * I * c.n_shared_experts
    else:
        out["dense_mlp"] += 3 * D * c.intermediate_size
    return out


def count_params(config: ModelConfig) -> dict[str, Any]:
    """Parameter counts by role, in closed form from the config (no model is built).

    Returns ``total`` (main model, without MTP), ``active`` (per token), ``mtp`` (the MTP modules'
    own parameters; the embedding and head they share are not counted again) and a ``breakdown``.
    """
    c = config
    D, V, L = c.hidden_size, c.vocab_size, c.num_hidden_layers
    breakdown = dict.fromkeys(_ROLES, 0)
    breakdown["embedding"] = V * D
    breakdown["lm_head"] = 0 if c.tie_word_embeddings else V * D  # tied: the same tensor, counted once
    breakdown["norms"] = D  # the final norm
    n_dense = min(c.first_k_dense_replace, L)
    # layers come in two kinds (dense, MoE): count one of each and multiply, so huge configs cost nothing
    for first, n in ((0, n_dense), (n_dense, L - n_dense)):
        if n > 0:
            for role, k in _layer_params(c, first).items():
                breakdown[role] += n * k
    mtp = 0
    for depth in range(c.num_nextn_predict_layers):
        mtp += sum(_layer_params(c, L + depth).values()) + 2 * D * D + 3 * D  # eh_proj; enorm, hnorm, head norm
    total = sum(breakdown.values())
    per_expert = 3 * D * c.moe_intermediate_size
    inactive = c.n_moe_layers * (c.n_routed_experts - c.num_experts_per_tok) * per_expert
    return {
        "total": total,
        "active": total - inactive,
        "mtp": mtp,
        "params_per_expert": per_expert,
        "breakdown": breakdown,
    }


def count_params_meta(config: ModelConfig) -> dict[str, Any]:
    """The same counts as ``count_params``, by building the real ``Model`` on the meta device and summing
    its tensors by name (the check that the closed form matches the model; slow for huge configs)."""
    from workbench.model.model import Model

    with torch.device("meta"):
        model = Model(config)
    seen: set[int] = set()
    breakdown = dict.fromkeys(_ROLES, 0)
    mtp = 0
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:  # tied embedding and head count once
            continue
        seen.add(id(p))
        n = p.numel()
        if name.startswith("mtp."):
            mtp += n
        elif name.startswith("embed_tokens"):
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
    return {"total": total, "active": total - inactive, "mtp": mtp, "params_per_expert": per_expert,
            "breakdown": breakdown}  # fmt: skip


def model_bytes(config: ModelConfig, dtype: torch.dtype = torch.float32, *, include_mtp: bool = True) -> int:
    """Bytes a ``Model(config)`` holds with its parameters in ``dtype``: the weights, the float32 balancing
    bias of every router, the routers' bool masks and the float32 rotary tables."""
    counts = count_params(config)
    params = counts["total"] + (counts["mtp"] if include_mtp else 0)
    size = torch.empty((), dtype=dtype).element_size()
    routers = config.n_moe_layers
    if include_mtp:
        L = config.num_hidden_layers
        routers += sum(config.is_moe_layer(L + d) for d in range(config.num_nextn_predict_layers))
    buffers = routers * config.n_routed_experts * (4 + 1)  # e_score_correction_bias (fp32) + active (bool)
    buffers += 2 * config.max_position_embeddings * (config.qk_rope_head_dim // 2) * 4  # rope cos, sin
    return params * size + buffers


def layered_bytes(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes that layer-by-layer execution keeps (``workbench.io.layered``): the embedding, the head and the
    final norm, the rotary tables, and the largest decoder layer (one at a time)."""
    size = torch.empty((), dtype=dtype).element_size()
    D, V, L = config.hidden_size, config.vocab_size, config.num_hidden_layers
    kept = (V * D * (1 if config.tie_word_embeddings else 2) + D) * size
    kept += 2 * config.max_position_embeddings * (config.qk_rope_head_dim // 2) * 4
    biggest = 0
    for i in {0, min(config.first_k_dense_replace, L - 1)}:
        layer = sum(_layer_params(config, i).values()) * size
        if config.is_moe_layer(i):
            layer += config.n_routed_experts * (4 + 1)  # the router's float32 bias and bool mask
        biggest = max(biggest, layer)
    return kept + biggest


def available_memory(device: torch.device | str) -> int | None:
    """Bytes free for new tensors on ``device``: CUDA's free memory, or the system's available memory (and
    the cgroup's limit, in a container) for the CPU; None where it cannot be known (the check then passes)."""
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return None
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type != "cpu":
        return None
    found: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):  # a container's limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            current = int(Path("/sys/fs/cgroup/memory.current").read_text().strip())
            found.append(max(0, int(limit) - current))
    if not found and hasattr(os, "sysconf"):
        with contextlib.suppress(OSError, ValueError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return min(found) if found else None


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def check_fits(
    config: ModelConfig,
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    need: int | None = None,
    what: str = "this model",
) -> None:
    """Refuse (``ModelTooLarge``), before anything is allocated, a model whose weights exceed the memory
    available on ``device``. need: the bytes to check (default: ``model_bytes(config, dtype)``)."""
    device = torch.device(device)
    if device.type == "meta":
        return
    need = model_bytes(config, dtype) if need is None else need
    free = available_memory(device)
    if free is None or need <= free:
        return
    counts = count_params(config)
    n = counts["total"] + counts["mtp"]
    raise ModelTooLarge(
        f"{what} needs {format_bytes(need)} for its weights ({n / 1e9:.2f}B parameters in "
        f"{str(dtype).removeprefix('torch.')}) but {device} has {format_bytes(free)} available. Count it without "
        "memory on the meta device (count_params, or `with torch.device('meta'): Model(config)`), use a smaller "
        "config or a narrower dtype, or run a checkpoint of it one layer at a time "
        "(workbench.io.layered.LayeredModel, `python -m workbench analyze --layered`)"
    )


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
