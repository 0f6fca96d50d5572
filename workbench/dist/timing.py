"""Chunk times of our own decoder blocks: forward (F), full backward (B), and its weight part (W).

The pipeline schedules of ``workbench.dist.pipeline`` are judged on three times per chunk (a stage's
consecutive layers on one micro-batch): F, the forward; B, the whole backward; and W, the part of B that
computes the weights' gradients (zero-bubble schedules postpone it, since no other stage waits for it).
Autograd computes only the gradients asked for, so the backward for the inputs alone (``torch.autograd.grad``
with respect to the chunk's input) skips every weight-gradient matmul: W = B - B_input. Each time is the
median of ``repeats`` runs after a warm-up, on a fresh forward each time.

Where it simplifies: the chunk is ``layers`` MoE decoder blocks with the model's own routing (no
embedding, head or loss); W measured as a difference carries the noise of two timings; on a CPU the
split differs from a GPU's (where attention and expert GEMMs overlap differently), so lesson 11 shows
the measured times and keeps the schedules' conclusions to what the times support.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn

from workbench.config import ModelConfig
from workbench.model.block import Block
from workbench.model.rope import rope_tables


def _chunk(config: ModelConfig, layers: int, device: torch.device) -> nn.Module:
    first = config.first_k_dense_replace if config.n_moe_layers else 0  # a MoE layer when there is one
    torch.manual_seed(0)
    blocks = nn.ModuleList([Block(config, first) for _ in range(layers)]).to(device)
    with torch.no_grad():  # the model's initialisation (stacked experts and routers start empty)
        for p in blocks.parameters():
            if p.dim() > 1:
                nn.init.normal_(p, 0.0, config.initializer_range)
    return blocks


def measure_chunk_times(
    config: ModelConfig,
    batch: int = 4,
    seq_len: int = 64,
    layers: int = 1,
    repeats: int = 7,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Median seconds of F, B, B_input and W = B - B_input for ``layers`` decoder blocks on (batch, seq_len),
    and under ``"repeats"`` the seconds of every timed repeat of F, B and B_input (for their noise)."""
    for name, value in (("batch", batch), ("seq_len", seq_len), ("layers", layers), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if seq_len > config.max_position_embeddings:
        raise ValueError(f"seq_len={seq_len} exceeds max_position_embeddings={config.max_position_embeddings}")
    device = torch.device(device)
    blocks = _chunk(config, layers, device)
    cos, sin = rope_tables(config.qk_rope_head_dim, seq_len, config.rope_theta, config.rope_scaling, device=device)
    params = [p for p in blocks.parameters() if p.requires_grad]
    gen = torch.Generator(device="cpu").manual_seed(1)
    x0 = torch.randn(batch, seq_len, config.hidden_size, generator=gen).to(device)  # (B, T, D)
    grad_out = torch.randn(batch, seq_len, config.hidden_size, generator=gen).to(device)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        x = x0.clone().requires_grad_(True)
        h = x
        for block in blocks:
            h, _ = block(h, cos, sin)
        return x, h

    def timed(fn, *args) -> tuple[float, object]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        result = fn(*args)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0, result

    runs: dict[str, list[float]] = {"F": [], "B": [], "B_input": []}
    for i in range(repeats + 1):  # the first round warms up
        f, (x, h) = timed(forward)
        b, _ = timed(torch.autograd.backward, h, grad_out)  # inputs' and weights' gradients
        for p in params:
            p.grad = None
        x, h = forward()
        bi, _ = timed(torch.autograd.grad, h, [x], grad_out)  # the inputs' only: no weight GEMMs
        if i:
            runs["F"].append(f)
            runs["B"].append(b)
            runs["B_input"].append(bi)
    F, B, Bi = (statistics.median(runs[k]) for k in ("F", "B", "B_input"))
    W = min(max(B - Bi, 0.0), B)
    return {"F": F, "B": B, "B_input": min(Bi, B), "W": W, "tokens": batch * seq_len, "layers": layers,
            "repeats": runs}  # fmt: skip


__all__ = ["measure_chunk_times"]
