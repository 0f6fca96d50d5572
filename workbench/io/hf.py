"""Hugging Face checkpoints: read and write the folder layout DeepSeek publishes and transformers loads.

A Hugging Face checkpoint is a folder with ``config.json`` (the architecture, see
``ModelConfig.to_hf``) and the weights in ``model.safetensors``, or, when large, in shards
``model-00001-of-0000N.safetensors`` listed by ``model.safetensors.index.json`` (``weight_map``:
tensor name -> file).

Tensor names (``L = num_hidden_layers``; ``i`` a layer, ``j`` a routed expert)::

    model.embed_tokens.weight                      (V, D)   ours: embed_tokens.weight
    model.layers.i.input_layernorm.weight          (D,)     ours: layers.i.input_layernorm.weight
    model.layers.i.self_attn.q_a_proj.weight ...            ours: layers.i.self_attn.q_a_proj.weight ...
    model.layers.i.mlp.gate_proj.weight            dense layers (i < first_k_dense_replace)
    model.layers.i.mlp.gate.weight                 (E, D)   the router
    model.layers.i.mlp.gate.e_score_correction_bias (E,)    balancing bias, always float32
    model.layers.i.mlp.experts.j.gate_proj.weight  (I, D)   one tensor per expert ...
    model.layers.i.mlp.experts.j.up_proj.weight    (I, D)
    model.layers.i.mlp.experts.j.down_proj.weight  (D, I)
    model.layers.i.mlp.shared_experts.{gate,up,down}_proj.weight
    model.norm.weight                              (D,)     ours: norm.weight
    lm_head.weight                                 (V, D)   absent when tie_word_embeddings

**Experts.** Files keep one small tensor per expert. We store a layer's experts *stacked*:
``layers.i.mlp.experts.gate_proj`` is (E, I, D), row ``j`` being expert ``j``'s weight, so that the
forward can run all experts as one grouped matrix multiplication. Saving unbinds the stack, loading
stacks the per-expert tensors again. transformers 5 also stacks them in memory, fusing gate and up
into ``experts.gate_up_proj`` (E, 2I, D: gate rows first, then up) and ``experts.down_proj``
(E, D, I); its ``save_pretrained`` converts back to per-expert names, but a file written with
``save_original_format=False`` keeps the fused ones. ``load_hf`` reads both.

**Names.** Every naming rule (``model.`` prefixes, per-expert tensors, MTP layers) lives in
``workbench.io.names.HFNames``; loading is planned by ``workbench.io.plan`` and applied by
``workbench.io.stream`` (a streaming fill of a meta-device model).

**Multi-Token Prediction.** MTP module ``k`` (1-based) is stored as one more decoder layer,
``model.layers.{L + k - 1}``, with the extra tensors ``enorm``, ``hnorm``, ``eh_proj`` and
``shared_head.norm``, plus ``embed_tokens.weight`` and ``shared_head.head.weight``: *copies* of the
shared embedding and output head, written so that the module can be served on its own. We keep the
modules in ``Model.mtp`` (``mtp.{k-1}.X`` <-> ``model.layers.{L+k-1}.X``) and the embedding and head
only once; loading checks that the copies equal the originals and warns if they don't.
transformers' ``DeepseekV3ForCausalLM`` has no MTP modules: it skips those tensors on load and does
not write them, although its ``config.json`` still says ``num_nextn_predict_layers: 1``. Such a folder
loads by default, without the MTP modules and with one warning (``missing_mtp="init"`` keeps fresh ones).

**DeepSeek-V2.** V2 and V2-Lite use the same names, with no balancing bias (their routing,
``topk_method`` greedy or group_limited_greedy, has none). A V2-routed model is saved without it while
the bias is zero, as DeepSeek publishes V2, and with it otherwise (transformers' DeepseekV2 ignores it).

**Precision.** ``e_score_correction_bias`` stays float32 whatever dtype the other weights are saved
in: the bias moves by tiny steps (gamma = 0.001) that bfloat16 could not represent.

API::

    save_hf(model, "ckpt", dtype=torch.bfloat16)   # config.json + model.safetensors (or shards)
    model = load_hf("ckpt")                       # plans (every name, shape, dtype, size), then streams
    plan = plan_load("ckpt")                      # the plan alone (workbench.io.plan): nothing allocated
    hf_sd = to_hf_state_dict(model)               # our names -> Hugging Face names
    our_sd = from_hf_state_dict(config, hf_sd)    # and back
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from workbench.config import ModelConfig
from workbench.io.files import (
    MODEL_FOLDER_FILES,
    CheckpointError,
    atomic_write_json,
    check_output_folder,
    save_tensors,
    write_folder_atomically,
)
from workbench.io.fp8_layout import (
    FP8_QUANTIZATION_CONFIG,
    SCALE_SUFFIX,
    quantize_state_dict_fp8,
)
from workbench.io.names import BIAS, MTP_COPIES, HFNames
from workbench.io.plan import CONFIG_NAME, INDEX_NAME, WEIGHTS_NAME, plan_load, read_hf_config
from workbench.io.stream import emit_notes, materialise
from workbench.io.tokenizer import Tokenizer, save_tokenizer_files
from workbench.model import Model

DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------
def hf_name(config: ModelConfig, name: str) -> str:
    """The Hugging Face name of one of our (non-expert) tensor names."""
    return HFNames.of(config).hf_name(name)


def our_name(config: ModelConfig, name: str) -> str:
    """Our name of a Hugging Face (non-expert) tensor name; decoder layers >= L are MTP modules."""
    return HFNames.of(config).our_name(name)


# ------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------
def to_hf_state_dict(model: Model) -> dict[str, torch.Tensor]:
    """Our model's weights under Hugging Face names (per-expert tensors are views of our stacks).

    The MTP layers get ``embed_tokens.weight`` and ``shared_head.head.weight`` copies of the shared
    embedding and head; ``lm_head.weight`` is omitted when the embeddings are tied. A V2-routed model's
    balancing bias is omitted while it is zero (V2 checkpoints have none).
    """
    config = model.config
    names = HFNames.of(config)
    sd = model.state_dict()
    for name, module in model.named_modules():  # an inactive expert's bias is -inf in the file, so that
        active = getattr(module, "active", None)  # transformers and DeepSeek's code never route to it either
        if isinstance(active, torch.Tensor) and not active.is_meta and not bool(active.all()):
            key = f"{name}.{BIAS}"
            sd[key] = sd[key].masked_fill(~active.to(sd[key].device), float("-inf"))
    if config.topk_method != "noaux_tc":
        for key in [k for k in sd if k.endswith(BIAS)]:
            if not sd[key].is_meta and not bool(sd[key].any()):
                del sd[key]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stack = names.stacked(name)
        if stack is None:
            out[names.hf_name(name)] = tensor
            continue
        for hf, expert in zip(names.expert_names(name, tensor.shape[0]), tensor.unbind(0)):  # (E, out, in)
            out[hf] = expert
    head = sd["embed_tokens.weight"] if config.tie_word_embeddings else sd["lm_head.weight"]
    for i in names.mtp_layers(0, len(model.mtp)):
        out[f"model.layers.{i}.{MTP_COPIES[0]}"] = sd["embed_tokens.weight"]
        out[f"model.layers.{i}.{MTP_COPIES[1]}"] = head
    return out


def from_hf_state_dict(config: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our state dict: per-expert (or fused) experts stacked, MTP layers mapped.

    An in-memory counterpart of the streaming loader (``load_hf`` does not use it). The MTP layers' copies
    of the embedding and head are checked against the originals (a warning if they differ) and dropped.
    With tied embeddings a stored ``lm_head.weight`` is likewise checked and dropped. Names that are not
    part of the layout raise ``CheckpointError``.
    """
    names = HFNames.of(config)
    copies_of = names.copies()
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = {}  # our stack -> j -> (out, in)
    copies: list[tuple[str, torch.Tensor, str]] = []  # (hf name, tensor, the original's hf name)
    for name, tensor in sd.items():
        if name in copies_of:
            copies.append((name, tensor, copies_of[name]))
            continue
        expert = names.expert(name)
        fused = names.fused(name) if expert is None else None
        if expert is not None:
            experts.setdefault(expert.stack, {})[expert.index] = tensor
        elif fused is not None and fused.kind == "gate_up_proj":  # transformers' fused (E, 2I, D): gate, then up
            if tensor.dim() != 3 or tensor.shape[1] % 2:
                raise CheckpointError(f"{name} must be (experts, 2 * intermediate, hidden), got {tuple(tensor.shape)}")
            gate, up = tensor.chunk(2, dim=1)
            out[f"{fused.experts}.gate_proj"], out[f"{fused.experts}.up_proj"] = gate, up
        elif fused is not None:  # fused down_proj (E, D, I)
            out[f"{fused.experts}.down_proj"] = tensor
        else:
            out[names.our_name(name)] = tensor

    E = config.n_routed_experts
    for stack, by_index in experts.items():
        absent = [j for j in range(E) if j not in by_index]
        extra = sorted(j for j in by_index if not 0 <= j < E)
        if absent or extra:
            raise CheckpointError(
                f"{names.hf_name(stack.rsplit('.', 1)[0])}: {stack.rsplit('.', 1)[1]} of experts {absent} missing"
                + (f", experts {extra} beyond n_routed_experts={E}" if extra else "")
            )
        shapes = {tuple(by_index[j].shape) for j in range(E)}
        if len(shapes) != 1:
            raise CheckpointError(f"{names.hf_name(stack)}: shapes differ between experts: {shapes}")
        out[stack] = torch.stack([by_index[j] for j in range(E)])  # (E, out, in)

    for name, copy, original_name in copies:
        original = sd.get(original_name)
        if original is not None and not _same(copy, original):
            warnings.warn(
                f"{name} is meant to be a copy of {original_name} but differs from it; {original_name} is used",
                stacklevel=2,
            )
    return out


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.to(b.dtype), b)


# ------------------------------------------------------------------------------------------------
# Saving
# ------------------------------------------------------------------------------------------------
def save_hf(
    model: Model,
    path: str | Path,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    fp8: bool = False,
    tokenizer: Tokenizer | None = None,
    protect: tuple[str | Path, ...] = (),
) -> Path:
    """Write ``model`` as a Hugging Face checkpoint folder that transformers and ``load_hf`` read.

    dtype: cast floating weights to it (default: keep the model's); the router bias stays float32.
    max_shard_bytes: above this total size the weights are split into shards plus an index file.
    The folder is written atomically: on any failure nothing at ``path`` changes.
    overwrite: replace an existing model folder (one that holds only model files: config, weights,
        tokenizer). A non-empty folder with anything else in it is never replaced, and neither is a folder
        that holds one of ``protect`` (e.g. the training run being exported).
    fp8: write DeepSeek's FP8 layout: linear weights in float8_e4m3fn with a float32 ``<name>_scale_inv``
        per 128x128 block, quantised from the model's own weights (the embedding, head, norms and router
        stay in ``dtype``), and ``quantization_config`` in config.json (see ``workbench.io.fp8_layout``).
    tokenizer: written next to the weights (``tokenizer.json``, ``tokenizer_config.json``); default: the
        one the model carries (``model.tokenizer``), if any.
    """
    check_output_folder(path, overwrite=overwrite, protect=protect, allowed=MODEL_FOLDER_FILES)  # before any work
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    hf_sd = {name: t.detach() for name, t in to_hf_state_dict(model).items()}
    if model.config.topk_method != "noaux_tc" and any(n.endswith(BIAS) for n in hf_sd):
        warnings.warn(
            f"{path}: this V2-routed model ({model.config.topk_method}) has a non-zero balancing bias, which is "
            "written so that load_hf reads it back exactly; transformers' DeepseekV2ForCausalLM has no such bias "
            "and will ignore it (its routing then differs from this model's)",
            stacklevel=2,
        )
    if fp8:
        hf_sd = quantize_state_dict_fp8(hf_sd)  # from the full-precision weights, before any cast
    tensors: dict[str, torch.Tensor] = {}
    for name, t in hf_sd.items():
        if name.endswith((BIAS, SCALE_SUFFIX)):
            t = t.float()
        elif dtype is not None and t.is_floating_point() and t.dtype != torch.float8_e4m3fn:
            t = t.to(dtype)
        tensors[name] = t.cpu()
    weights_dtype = tensors["model.embed_tokens.weight"].dtype
    config = model.config.to_hf()
    config["dtype"] = str(weights_dtype).removeprefix("torch.")
    if fp8:
        config["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)

    shards = _plan_shards(tensors, max_shard_bytes)

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is not None and tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is {model.config.vocab_size}"
        )

    def fill(folder: Path) -> None:
        atomic_write_json(folder / CONFIG_NAME, config)
        if tokenizer is not None:
            save_tokenizer_files(tokenizer, folder, model.config.max_position_embeddings)
        metadata = {"format": "pt"}
        if len(shards) == 1:
            save_tensors(folder / WEIGHTS_NAME, shards[0], metadata=metadata)
            return
        weight_map: dict[str, str] = {}
        for n, shard in enumerate(shards, start=1):
            filename = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
            save_tensors(folder / filename, shard, metadata=metadata)
            weight_map.update(dict.fromkeys(shard, filename))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        atomic_write_json(folder / INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})

    return write_folder_atomically(path, fill, overwrite=overwrite, protect=protect, allowed=MODEL_FOLDER_FILES)


def _plan_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Greedy split in name order; a tensor larger than max_bytes gets a shard of its own."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------
def load_hf(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    strict: bool = True,
    *,
    missing_mtp: str = "drop",
    allow_bad_weights: bool = False,
    progress: bool = False,
    **overrides: Any,
) -> Model:
    """Build a ``Model`` from a Hugging Face checkpoint folder (ours, DeepSeek's or transformers').

    First the whole load is planned from ``config.json`` and the safetensors headers
    (``workbench.io.plan.plan_load``): every tensor name, shape and dtype is checked, the size is checked
    against the memory free on ``device``, and all the problems (missing, unexpected and wrongly shaped
    tensors by name, a missing or truncated shard, an index pointing outside the folder, integer weights,
    an unimplemented config field) are reported together in one ``CheckpointError``. Then the model is
    built on the meta device and filled shard by shard (``workbench.io.stream``), FP8 weights dequantised
    block by block on the way, so the peak memory stays close to the model's own size. The model is
    returned in eval mode, like transformers' ``from_pretrained``, with the folder's tokenizer.

    dtype: the weights' dtype (default: the checkpoint's); the router bias stays float32.
    strict: with ``False``, missing tensors keep a fresh initialisation and unexpected ones are ignored,
        each with a warning that names them (wrong shapes are always an error).
    missing_mtp: a folder written by transformers' ``save_pretrained`` has no MTP tensors although its
        config.json declares ``num_nextn_predict_layers: 1``: ``"drop"`` (default) builds the model without
        them (one warning), ``"init"`` keeps freshly initialised MTP modules, ``"error"`` refuses.
    allow_bad_weights: load NaN/inf, integer or boolean weights with a warning instead of refusing them.
    progress: a progress bar over the bytes read.
    overrides: config fields to change, e.g. ``num_nextn_predict_layers=0`` to drop the MTP modules
        (their tensors in the file are then skipped).
    """
    plan = plan_load(
        path,
        device=device,
        dtype=dtype,
        strict=strict,
        missing_mtp=missing_mtp,
        allow_bad_weights=allow_bad_weights,
        **overrides,
    )
    model = materialise(plan, device, allow_bad_weights=allow_bad_weights, progress=progress)
    emit_notes(plan, device)
    return model


__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "from_hf_state_dict",
    "hf_name",
    "load_hf",
    "our_name",
    "read_hf_config",
    "save_hf",
    "to_hf_state_dict",
]
