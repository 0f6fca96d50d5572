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

**Multi-Token Prediction.** MTP module ``k`` (1-based) is stored as one more decoder layer,
``model.layers.{L + k - 1}``, with the extra tensors ``enorm``, ``hnorm``, ``eh_proj`` and
``shared_head.norm``, plus ``embed_tokens.weight`` and ``shared_head.head.weight``: *copies* of the
shared embedding and output head, written so that the module can be served on its own. We keep the
modules in ``Model.mtp`` (``mtp.{k-1}.X`` <-> ``model.layers.{L+k-1}.X``) and the embedding and head
only once; loading checks that the copies equal the originals and warns if they don't.
transformers' ``DeepseekV3ForCausalLM`` has no MTP modules: it skips those tensors on load and does
not write them, although its ``config.json`` still says ``num_nextn_predict_layers: 1``.

**Precision.** ``e_score_correction_bias`` stays float32 whatever dtype the other weights are saved
in: the bias moves by tiny steps (gamma = 0.001) that bfloat16 could not represent.

API::

    save_hf(model, "ckpt", dtype=torch.bfloat16)   # config.json + model.safetensors (or shards)
    model = load_hf("ckpt")                       # checks every name and shape before copying
    hf_sd = to_hf_state_dict(model)               # our names -> Hugging Face names
    our_sd = from_hf_state_dict(config, hf_sd)    # and back
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from workbench.config import ConfigError, ModelConfig
from workbench.io.files import (
    MODEL_FOLDER_FILES,
    CheckpointError,
    atomic_write_json,
    check_output_folder,
    load_tensors,
    read_json,
    save_tensors,
    write_folder_atomically,
)
from workbench.io.fp8_layout import (
    FP8_QUANTIZATION_CONFIG,
    SCALE_SUFFIX,
    WEIGHT_BLOCK,
    check_quantization_config,
    dequantize_state_dict_fp8,
    fp8_dequantized_note,
    quantize_state_dict_fp8,
)
from workbench.io.tokenizer import Tokenizer, load_tokenizer_files, save_tokenizer_files
from workbench.model import Model

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

_PROJS = ("gate_proj", "up_proj", "down_proj")
_OUR_STACKED = re.compile(r"^((?:layers|mtp)\.\d+\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_MTP_COPIES = ("embed_tokens.weight", "shared_head.head.weight")
_BIAS = "e_score_correction_bias"


# ------------------------------------------------------------------------------------------------
# Names
# ------------------------------------------------------------------------------------------------
def hf_name(config: ModelConfig, name: str) -> str:
    """The Hugging Face name of one of our (non-expert) tensor names."""
    if name == "lm_head.weight":
        return name
    if name.startswith("mtp."):
        k, rest = name[len("mtp.") :].split(".", 1)
        return f"model.layers.{config.num_hidden_layers + int(k)}.{rest}"
    return f"model.{name}"


def our_name(config: ModelConfig, name: str) -> str:
    """Our name of a Hugging Face (non-expert) tensor name; decoder layers >= L are MTP modules."""
    if name == "lm_head.weight":
        return name
    m = _HF_LAYER.match(name)
    if m is not None:
        i, rest = int(m.group(1)), m.group(2)
        L = config.num_hidden_layers
        return f"layers.{i}.{rest}" if i < L else f"mtp.{i - L}.{rest}"
    if name.startswith("model."):
        return name[len("model.") :]
    raise CheckpointError(f"{name!r} is not a DeepSeek-V3 tensor name (expected 'model.*' or 'lm_head.weight')")


def _mtp_copy_names(config: ModelConfig, n_modules: int | None = None) -> list[str]:
    """The names of the embedding/head copies stored with each MTP layer."""
    n = config.num_nextn_predict_layers if n_modules is None else n_modules
    L = config.num_hidden_layers
    return [f"model.layers.{L + k}.{c}" for k in range(n) for c in _MTP_COPIES]


# ------------------------------------------------------------------------------------------------
# State dicts
# ------------------------------------------------------------------------------------------------
def to_hf_state_dict(model: Model) -> dict[str, torch.Tensor]:
    """Our model's weights under Hugging Face names (per-expert tensors are views of our stacks).

    The MTP layers get ``embed_tokens.weight`` and ``shared_head.head.weight`` copies of the shared
    embedding and head; ``lm_head.weight`` is omitted when the embeddings are tied.
    """
    config = model.config
    sd = model.state_dict()
    for name, module in model.named_modules():  # an inactive expert's bias is -inf in the file, so that
        active = getattr(module, "active", None)  # transformers and DeepSeek's code never route to it either
        if isinstance(active, torch.Tensor) and not bool(active.all()):
            key = f"{name}.{_BIAS}"
            sd[key] = sd[key].masked_fill(~active.to(sd[key].device), float("-inf"))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        m = _OUR_STACKED.match(name)
        if m is None:
            out[hf_name(config, name)] = tensor
            continue
        prefix, proj = hf_name(config, m.group(1)), m.group(2)
        for j, expert in enumerate(tensor.unbind(0)):  # (E, out, in) -> E x (out, in)
            out[f"{prefix}.{j}.{proj}.weight"] = expert
    head = sd["embed_tokens.weight"] if config.tie_word_embeddings else sd["lm_head.weight"]
    for k in range(len(model.mtp)):
        base = f"model.layers.{config.num_hidden_layers + k}"
        out[f"{base}.embed_tokens.weight"] = sd["embed_tokens.weight"]
        out[f"{base}.shared_head.head.weight"] = head
    return out


def from_hf_state_dict(config: ModelConfig, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face tensors -> our state dict: per-expert (or fused) experts stacked, MTP layers mapped.

    The MTP layers' copies of the embedding and head are checked against the originals (a warning
    if they differ) and dropped. With tied embeddings a stored ``lm_head.weight`` is likewise checked
    and dropped. Names that are not part of the layout raise ``CheckpointError``.
    """
    L = config.num_hidden_layers
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[str, dict[int, torch.Tensor]]] = {}  # our prefix -> proj -> j -> (out, in)
    copies: list[tuple[str, torch.Tensor, str]] = []  # (hf name, tensor, the original's hf name)
    for name, tensor in sd.items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            copies.append((name, tensor, "model.embed_tokens.weight"))
            continue
        m = _HF_LAYER.match(name)
        if m is None:
            out[our_name(config, name)] = tensor
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i >= L and rest in _MTP_COPIES:
            head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
            copies.append((name, tensor, "model.embed_tokens.weight" if rest == _MTP_COPIES[0] else head))
            continue
        layer = our_name(config, f"model.layers.{i}.mlp.experts")  # e.g. layers.3.mlp.experts
        e = _HF_EXPERT.match(rest)
        if e is not None:
            experts.setdefault(layer, {}).setdefault(e.group(2), {})[int(e.group(1))] = tensor
        elif rest == "mlp.experts.gate_up_proj":  # transformers' fused (E, 2I, D): gate rows, then up
            if tensor.dim() != 3 or tensor.shape[1] % 2:
                raise CheckpointError(f"{name} must be (experts, 2 * intermediate, hidden), got {tuple(tensor.shape)}")
            gate, up = tensor.chunk(2, dim=1)
            out[f"{layer}.gate_proj"], out[f"{layer}.up_proj"] = gate, up
        elif rest == "mlp.experts.down_proj":  # fused (E, D, I)
            out[f"{layer}.down_proj"] = tensor
        else:
            out[our_name(config, name)] = tensor

    for layer, projs in experts.items():
        for proj, by_index in projs.items():
            E = config.n_routed_experts
            absent = [j for j in range(E) if j not in by_index]
            extra = sorted(j for j in by_index if not 0 <= j < E)
            if absent or extra:
                raise CheckpointError(
                    f"{hf_name(config, layer)}: {proj} of experts {absent} missing"
                    + (f", experts {extra} beyond n_routed_experts={E}" if extra else "")
                )
            shapes = {tuple(by_index[j].shape) for j in range(E)}
            if len(shapes) != 1:
                raise CheckpointError(f"{hf_name(config, layer)}: {proj} shapes differ between experts: {shapes}")
            out[f"{layer}.{proj}"] = torch.stack([by_index[j] for j in range(E)])  # (E, out, in)

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
    if fp8:
        hf_sd = quantize_state_dict_fp8(hf_sd)  # from the full-precision weights, before any cast
    tensors: dict[str, torch.Tensor] = {}
    for name, t in hf_sd.items():
        if name.endswith((_BIAS, SCALE_SUFFIX)):
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
    **overrides: Any,
) -> Model:
    """Build a ``Model`` from a Hugging Face checkpoint folder (ours, DeepSeek's or transformers').

    Every tensor name and shape is checked against the model before anything is copied; all the
    problems (missing, unexpected and wrongly shaped tensors, by name) are reported together in one
    ``CheckpointError``. The model is returned in eval mode, like transformers' ``from_pretrained``.

    dtype: the weights' dtype (default: the checkpoint's); the router bias stays float32.
    strict: with ``False``, missing tensors keep their fresh initialisation and unexpected ones are
        ignored, each with a warning that names them (wrong shapes are always an error). This is how
        to load a transformers checkpoint, which has no MTP tensors, into a model with MTP modules.
    overrides: config fields to change, e.g. ``num_nextn_predict_layers=0`` to drop the MTP modules
        (their tensors in the file are then skipped).
    """
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"no checkpoint folder at {folder}")
    hf_config = read_hf_config(folder)
    block = WEIGHT_BLOCK
    if hf_config.get("quantization_config"):
        try:
            block = check_quantization_config(hf_config["quantization_config"])
        except ValueError as e:
            raise CheckpointError(f"{folder / CONFIG_NAME}: {e}") from e
    try:
        config = ModelConfig.from_hf(hf_config, **overrides)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{folder / CONFIG_NAME} does not describe a valid model: {e}") from e

    files = _tensor_files(folder)
    found = _read_shapes(files)  # name -> (shape, dtype, file)
    scales = {n: found.pop(n) for n in [n for n in found if n.endswith(SCALE_SUFFIX)]}  # FP8 block scales

    with torch.device(device):
        model = Model(config)
    expected = {name: tuple(t.shape) for name, t in to_hf_state_dict(model).items()}
    optional = set(_mtp_copy_names(config))
    if config.tie_word_embeddings:
        optional.add("lm_head.weight")
    _use_fused_experts(expected, found)

    # MTP layers the file declares but the (overridden) config drops
    declared = hf_config.get("num_nextn_predict_layers", hf_config.get("num_mtp_layers", 0)) or 0
    L, kept = config.num_hidden_layers, config.num_nextn_predict_layers
    dropped = [n for n in found if _layer_index(n) is not None and L + kept <= _layer_index(n) < L + declared]

    missing = [n for n in expected if n not in found and n not in optional]
    unexpected = [n for n in found if n not in expected and n not in optional and n not in dropped]
    wrong = [
        f"{n}: expected {_fmt(expected[n])}, found {_fmt(found[n][0])}"
        for n in found
        if n in expected and tuple(found[n][0]) != expected[n]
    ]
    copies_wrong = [
        f"{n}: expected {_fmt(expected[_original_of(config, n)])}, found {_fmt(found[n][0])}"
        for n in optional
        if n in found and tuple(found[n][0]) != expected[_original_of(config, n)]
    ]
    wrong += copies_wrong

    mtp_names = [n for n in expected if (i := _layer_index(n)) is not None and i >= L]
    mtp_absent = bool(mtp_names) and all(n not in found for n in mtp_names)
    problems = []
    if wrong:
        problems.append(_listing("tensors with the wrong shape", wrong))
    if strict and mtp_absent:
        problems.append(
            f"config.json declares num_nextn_predict_layers={kept} but the checkpoint holds no tensor of "
            f"the MTP layers {_layer_list(L, kept)} (transformers' save_pretrained does not write them); "
            "pass strict=False to keep freshly initialised MTP modules, or num_nextn_predict_layers=0 "
            "to build the model without them"
        )
        missing = [n for n in missing if n not in mtp_names]
    if strict and missing:
        problems.append(_listing("missing tensors", missing))
    if strict and unexpected:
        problems.append(_listing("unexpected tensors", unexpected))
    if problems:
        raise CheckpointError(f"checkpoint {folder} does not fit the model:\n" + "\n".join(problems))

    if mtp_absent:
        modules = ", ".join(f"mtp.{k} (model.layers.{L + k})" for k in range(kept))
        warnings.warn(
            f"{folder} has no MTP tensors; the MTP modules {modules} keep their fresh initialisation",
            stacklevel=2,
        )
        missing = [n for n in missing if n not in mtp_names]
    if missing:
        warnings.warn(f"{folder}: missing tensors keep their fresh initialisation: {missing}", stacklevel=2)
    if unexpected:
        warnings.warn(f"{folder}: ignoring unexpected tensors {unexpected}", stacklevel=2)
    if dropped:
        warnings.warn(
            f"{folder}: skipping the tensors of MTP layers {_layer_list(L + kept, declared - kept)} "
            f"(num_nextn_predict_layers={kept})",
            stacklevel=2,
        )

    # Everything fits: read the tensors and copy them in
    if dtype is None:
        stored = found.get("model.embed_tokens.weight")
        dtype = _DTYPES.get(stored[1], torch.float32) if stored else torch.float32
    for p in model.parameters():  # buffers (router bias, rope tables) stay float32
        p.data = p.data.to(dtype)
    wanted = set(expected) | optional
    hf_sd: dict[str, torch.Tensor] = {}
    for file in files:
        for name, t in load_tensors(file).items():
            if name in wanted or name.removesuffix(SCALE_SUFFIX) in wanted:
                hf_sd[name] = t
    if scales or any(stored_dtype.startswith("F8") for _, stored_dtype, _ in found.values()):
        try:
            hf_sd = dequantize_state_dict_fp8(hf_sd, dtype=dtype, block=block)
        except ValueError as e:
            raise CheckpointError(f"checkpoint {folder}: {e}") from e
        warnings.warn(fp8_dequantized_note(str(folder), len(scales), dtype, device), stacklevel=2)
    ours = from_hf_state_dict(config, hf_sd)
    result = model.load_state_dict(ours, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; guard against future drift
        raise CheckpointError(f"internal error: tensors {result.unexpected_keys} have no place in the model")
    try:
        model.tokenizer = load_tokenizer_files(folder)
    except ValueError as e:
        raise CheckpointError(f"checkpoint {folder}: {e}") from e
    return model.eval()


def _tensor_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint: the single file, or the shards its index lists."""
    single, index = folder / WEIGHTS_NAME, folder / INDEX_NAME
    if single.exists():
        return [single]
    if not index.exists():
        raise CheckpointError(f"{folder} holds neither {WEIGHTS_NAME} nor {INDEX_NAME}")
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no 'weight_map' (tensor name -> file)")
    files = []
    for filename in dict.fromkeys(weight_map.values()):
        file = folder / str(filename)
        if not file.exists():
            raise CheckpointError(f"{index} lists {filename}, which is missing from {folder}")
        files.append(file)
    return files


def _read_shapes(files: Iterable[Path]) -> dict[str, tuple[tuple[int, ...], str, Path]]:
    """Every tensor's shape and dtype from the safetensors headers (no data is read)."""
    found: dict[str, tuple[tuple[int, ...], str, Path]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    s = f.get_slice(name)
                    if name in found:
                        raise CheckpointError(f"tensor {name} is stored twice: in {found[name][2]} and {file}")
                    found[name] = (tuple(s.get_shape()), s.get_dtype(), file)
        except CheckpointError:
            raise
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(
                f"{file} is not a readable safetensors file ({e}); it may be truncated or corrupt"
            ) from e
    return found


_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def _use_fused_experts(expected: dict[str, tuple[int, ...]], found: dict[str, Any]) -> None:
    """Where the file holds transformers' fused experts, expect those instead of per-expert tensors."""
    layers = {n[: -len(".gate_up_proj")] for n in found if n.endswith(".mlp.experts.gate_up_proj")}
    for layer in layers:  # e.g. model.layers.3.mlp.experts
        per_expert = [n for n in expected if n.startswith(layer + ".")]
        if not per_expert:
            continue  # not a MoE layer of this model: reported as unexpected
        shape = {p: expected[f"{layer}.0.{p}.weight"] for p in _PROJS}
        E = len(per_expert) // len(_PROJS)
        for n in per_expert:
            del expected[n]
        expected[f"{layer}.gate_up_proj"] = (E, 2 * shape["gate_proj"][0], shape["gate_proj"][1])
        expected[f"{layer}.down_proj"] = (E, *shape["down_proj"])


def _layer_index(name: str) -> int | None:
    m = _HF_LAYER.match(name)
    return int(m.group(1)) if m else None


def _original_of(config: ModelConfig, copy_name: str) -> str:
    """The tensor an optional copy duplicates (embedding or head)."""
    if copy_name.endswith("embed_tokens.weight") or config.tie_word_embeddings:
        return "model.embed_tokens.weight"
    return "lm_head.weight"


def _layer_list(start: int, n: int) -> str:
    return ", ".join(f"model.layers.{i}" for i in range(start, start + n))


def _fmt(shape: Iterable[int]) -> str:
    return str(tuple(int(d) for d in shape))


def _listing(title: str, items: list[str], limit: int = 50) -> str:
    lines = [f"  {item}" for item in items[:limit]]
    if len(items) > limit:
        lines.append(f"  ... and {len(items) - limit} more")
    return f"{title} ({len(items)}):\n" + "\n".join(lines)


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a checkpoint folder."""
    data = read_json(Path(path) / CONFIG_NAME)
    if not isinstance(data, dict):
        raise CheckpointError(f"{Path(path) / CONFIG_NAME} must hold a JSON object")
    return data


__all__ = [
    "from_hf_state_dict",
    "hf_name",
    "load_hf",
    "our_name",
    "save_hf",
    "to_hf_state_dict",
]
