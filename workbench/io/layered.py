"""Layer-by-layer execution: run a checkpoint bigger than memory, one decoder layer at a time from disk.

DeepSeek-V3 in bf16 is 1.3 TB; in its published FP8 about 690 GB; one H200 holds 141 GB. To *look inside*
such a model (routing per layer, expert load, the latent cache, hidden states) there is no need to hold
it whole: a forward pass only ever needs one decoder layer at a time. ``LayeredModel`` keeps the
embedding, the final norm and the output head in memory, and for each decoder layer in turn

1. materialises it from the checkpoint (``workbench.io.stream.materialise`` on the layer's tensors only;
   FP8 weights dequantised block by block),
2. runs the whole batch through it, exactly as ``Model.forward`` does (same modules, same order, same
   dtype, so the logits and the routing are bit-identical to the full model's),
3. lets its weights go (back to the meta device) before the next layer is read.

The peak is the embedding + head + one layer + the activations, whatever the depth; the price is
reading the whole checkpoint from disk once per forward pass, so batch the inputs: one pass over many
sequences costs the same reading as one sequence. The memory check at construction uses that need, not
the whole model's.

Where it simplifies: the MTP modules are not run (they matter for training and speculative decoding, not
for looking at the main model), there is no overlap of reading layer i+1 with computing layer i, and
generation (one token at a time) would reread every layer per token, so it is not offered here.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workbench.io.files import CheckpointError
from workbench.io.plan import LoadPlan, plan_load
from workbench.io.stream import emit_notes, materialise, skeleton
from workbench.model.accounting import check_fits, format_bytes
from workbench.model.block import Block
from workbench.model.mla import KVCache
from workbench.model.moe import RoutingStats

KEPT = ("embed_tokens", "norm", "lm_head", "rope_cos", "rope_sin")


@dataclass
class LayeredOutput:
    logits: torch.Tensor  # (B, T, vocab)
    hidden: torch.Tensor  # (B, T, D) the last layer's output, before the final norm
    routing: list[RoutingStats] = field(default_factory=list)  # one per MoE layer, in order
    hidden_states: list[torch.Tensor] = field(default_factory=list)  # (B, T, D) after each layer, if kept
    seconds_loading: float = 0.0  # time spent bringing layers in from disk
    seconds_computing: float = 0.0


class LayeredModel:
    """A checkpoint folder run one decoder layer at a time (see the module docstring).

    ``LayeredModel("ckpt", device="cuda")``; then ``forward(ids)`` as a model would, with ``hidden_states``
    and a ``KVCache`` on request. ``plan_options`` go to ``plan_load`` (dtype, strict, missing_mtp, ...).
    """

    def __init__(self, path: str | Path | LoadPlan, device: str | torch.device = "cpu", **plan_options: Any) -> None:
        self.device = torch.device(device)
        if isinstance(path, LoadPlan):
            plan = path
        else:
            plan = plan_load(path, device=self.device, check_memory=False, **plan_options)
        fresh = [t.name for t in plan.targets.values() if t.fresh and t.name.startswith("layers.")]
        if fresh:  # each pass reads every layer again: a tensor drawn afresh would differ from pass to pass
            raise CheckpointError(
                f"{plan.folder} lacks tensors of its decoder layers ({', '.join(fresh[:5])}"
                f"{' ...' if len(fresh) > 5 else ''}); layer-by-layer execution reads each layer again on every "
                "pass and cannot make up the missing ones consistently. Load it whole with strict=False instead"
            )
        self.plan = plan
        self.config = plan.config
        kept = sum(plan.layer_bytes(name) for name in KEPT)
        biggest = max((plan.layer_bytes(f"layers.{i}") for i in range(self.config.num_hidden_layers)), default=0)
        self.resident_bytes = kept + biggest
        what = f"layer-by-layer execution of {plan.folder} (embedding, head and its largest layer)"
        check_fits(self.config, self.device, plan.dtype, need=self.resident_bytes, what=what)
        self.model = skeleton(plan)
        materialise(plan, self.device, model=self.model, modules=KEPT)
        emit_notes(plan, self.device)
        self.tokenizer = plan.tokenizer
        self.layers_loaded = 0  # how many times a layer was brought in (reading cost)

    def __repr__(self) -> str:
        return (
            f"LayeredModel({self.plan.folder}, {self.config.num_hidden_layers} layers, resident "
            f"{format_bytes(self.resident_bytes)} of {format_bytes(self.plan.nbytes)})"
        )

    def load_layer(self, i: int) -> Block:
        """Decoder layer ``i`` with its weights in memory (``release_layer`` lets them go again)."""
        if not 0 <= i < self.config.num_hidden_layers:
            raise IndexError(f"layer {i} does not exist; the model has {self.config.num_hidden_layers}")
        materialise(self.plan, self.device, model=self.model, modules=[f"layers.{i}"])
        self.layers_loaded += 1
        return self.model.layers[i]

    def release_layer(self, i: int) -> None:
        """Put layer ``i`` back on the meta device: its memory is freed."""
        self.model.layers[i] = self.model.layers[i].to("meta")

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attn_mode: str | None = None,
        cache: KVCache | None = None,
        keep_hidden: bool = False,
        on_layer: Callable[[int, nn.Module], Callable[[], None] | None] | None = None,
    ) -> LayeredOutput:
        """input_ids (B, T) -> ``LayeredOutput``: the main model's logits and routing, as ``Model.forward``.

        attn_mode: "naive" or "absorb" (default: the config's). cache: a ``KVCache`` to fill (in absorb mode it
        holds each layer's latent ``c_kv`` and rotary key ``k_pe``: what MLA remembers about each token).
        keep_hidden: also return every layer's output (B, T, D). on_layer: called with (index, block) once a
        layer is in memory and before it runs (attach forward hooks there); it may return a function that
        is called after the layer ran (to remove them).
        """
        model = self.model
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len), got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        mode = attn_mode or self.config.attn_mode
        past = cache.length if cache is not None else 0
        cos, sin = model.rope(past, T)
        input_ids = input_ids.to(self.device)
        x = model.embed_tokens(input_ids)  # (B, T, D)
        out = LayeredOutput(logits=x, hidden=x)
        for i in range(self.config.num_hidden_layers):
            start = time.perf_counter()
            try:
                block = self.load_layer(i)
            except BaseException:
                self.release_layer(i)  # a failed read keeps nothing of the layer
                raise
            loaded = time.perf_counter()
            done = on_layer(i, block) if on_layer is not None else None
            try:
                x, stats = block(x, cos, sin, mode=mode, cache=cache)
            finally:
                if done is not None:
                    done()
                self.release_layer(i)
            out.seconds_loading += loaded - start
            out.seconds_computing += time.perf_counter() - loaded
            if stats is not None:
                out.routing.append(stats)
            if keep_hidden:
                out.hidden_states.append(x)
        if cache is not None:
            cache.advance(T)
        out.hidden = x  # (B, T, D)
        out.logits = model.lm_head(model.norm(x))  # (B, T, V)
        return out

    __call__ = forward


def layered_or_whole(path: str | Path, device: str | torch.device = "cpu", *, layered: bool | None = None, **options):
    """The model of a checkpoint folder, whole (``load_hf``) when it fits the device's memory, otherwise one
    layer at a time (``LayeredModel``); ``layered`` forces either. Returns (model, is_layered)."""
    from workbench.io.hf import load_hf
    from workbench.model.accounting import ModelTooLarge

    progress = options.pop("progress", False)  # a bar for the whole load; a layered pass reads layer by layer
    if layered:
        return LayeredModel(path, device, **options), True
    try:
        return load_hf(path, device, progress=progress, **options), False
    except ModelTooLarge:
        if layered is False:
            raise
    return LayeredModel(path, device, **options), True


__all__ = ["LayeredModel", "LayeredOutput", "layered_or_whole"]
