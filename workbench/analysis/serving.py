"""Serving economics: how many contexts a GPU or a disk holds, and what a prefix-cache hit is worth.

A served model's weights are read once per decoding step whoever asks; each running request also needs
its own KV cache, ``kv_bytes_per_token x context`` bytes, for as long as it runs. So the memory left after
the weights, divided by one context's cache, is how many requests one machine can serve at once: the
batch that amortises the weights (lesson 10 measures the throughput that buys). MLA's cache is the latent
plus the rotary key per layer (``model.accounting.kv_cache_bytes_per_token``); multi-head attention's is
every head's key and value, many times more, and the number of concurrent contexts divides by the same
factor.

The same arithmetic on a disk explains DeepSeek's *context caching on disk*: with a cache this small per
token, the KV of a long shared prefix is cheap to keep for hours and to load again instead of recomputing
it, which is why a cache hit is billed at a fraction of a miss. ``request_cost`` prices one request at
published per-million-token prices, so a lesson can show what a shared prefix saves.

Where it simplifies: memory for activations, the framework and fragmentation is left out (real servers
keep some for them), every context is counted at its full length (a paged allocator holds only what is
used), and weights are sharded evenly over the GPUs of one replica.
"""

from __future__ import annotations

import math

import torch

from workbench.config import ModelConfig
from workbench.model.accounting import count_params, kv_cache_bytes_per_token


def kv_per_token(config: ModelConfig, dtype: torch.dtype = torch.bfloat16) -> dict[str, int]:
    """Bytes of KV cache per token over all layers: ``mla`` (latent + rotary key) and ``mha`` (all heads)."""
    kv = kv_cache_bytes_per_token(config, dtype)
    return {"mla": kv["mla"], "mha": kv["mha"]}


def weight_bytes(config: ModelConfig, bytes_per_param: float, include_mtp: bool = False) -> float:
    """Bytes of the weights at ``bytes_per_param`` (1 for FP8, 2 for BF16, 4 for float32)."""
    if not bytes_per_param > 0:
        raise ValueError(f"bytes_per_param must be > 0, got {bytes_per_param}")
    c = count_params(config)
    return (c["total"] + (c["mtp"] if include_mtp else 0)) * bytes_per_param


def contexts_that_fit(memory_bytes: float, weights: float, kv_bytes_per_token: float, context: int) -> int:
    """Whole contexts of ``context`` tokens whose KV cache fits in the memory left after the weights (0 when
    the weights alone do not fit)."""
    for name, v in (("memory_bytes", memory_bytes), ("kv_bytes_per_token", kv_bytes_per_token)):
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{name} must be a positive number, got {v}")
    if not (math.isfinite(weights) and weights >= 0):
        raise ValueError(f"weights must be a number of bytes >= 0, got {weights}")
    if isinstance(context, bool) or not isinstance(context, int) or context < 1:
        raise ValueError(f"context must be a positive number of tokens, got {context!r}")
    left = memory_bytes - weights
    return max(0, math.floor(left / (kv_bytes_per_token * context)))


def request_cost(prompt_tokens: float, cached_tokens: float, output_tokens: float, hit_price: float,
                 miss_price: float, output_price: float) -> float:  # fmt: skip
    """Dollars for one request at per-million-token prices: cached prompt tokens at the hit price, the rest of
    the prompt at the miss price, the output at the output price."""
    if not 0 <= cached_tokens <= prompt_tokens or output_tokens < 0:
        raise ValueError(f"need 0 <= cached_tokens <= prompt_tokens and output_tokens >= 0, got "
                         f"{cached_tokens}, {prompt_tokens}, {output_tokens}")  # fmt: skip
    miss = prompt_tokens - cached_tokens
    return (cached_tokens * hit_price + miss * miss_price + output_tokens * output_price) / 1e6


__all__ = ["contexts_that_fit", "kv_per_token", "request_cost", "weight_bytes"]
