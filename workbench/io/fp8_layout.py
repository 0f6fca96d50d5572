"""FP8 checkpoints in DeepSeek's (and transformers') layout: E4M3 weights with a float32 scale per block.

DeepSeek publishes V3 and R1 in FP8, and transformers reads the same layout: every weight
matrix of a linear layer (attention projections, dense and shared MLPs, each routed expert, the MTP
``eh_proj``) is stored as ``float8_e4m3fn`` with a float32 sibling ``<name>_scale_inv`` holding one
scale per 128x128 block, shape ``[ceil(out / 128), ceil(in / 128)]``, and ``W = W_fp8 * scale_inv``
over each block (partial blocks at the edges included). The embedding, ``lm_head``, the norms, the
router ``mlp.gate.weight`` and its ``e_score_correction_bias`` stay in high precision.
``config.json`` declares it with ``quantization_config`` (``FP8_QUANTIZATION_CONFIG``).
``quantize_state_dict_fp8`` and ``dequantize_state_dict_fp8`` convert a Hugging Face state dict to
and from that layout (``workbench.io.hf`` uses them to save and load); they also accept stacked 3-D
expert tensors, one scale grid per expert (``gate_up_proj`` -> ``gate_up_proj_scale_inv``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from workbench.fp8.formats import (
    _QUANTIZED_DTYPES,
    DEFAULT_SKIP,
    FORMATS,
    WEIGHT_BLOCK,
    _check_block,
    _quantize,
    dequantize,
    scale_shape,
)
from workbench.fp8.linear import _is_skipped, scaled_mm_support

# FP8 checkpoints: DeepSeek's and transformers' layout ---------------------------------------------
# transformers 5 reads this layout with FineGrainedFP8Config (utils/quantization_config.py: quant_method
# "fp8", weight_block_size, activation_scheme "dynamic"; DeepSeek's extra "fmt" is accepted and ignored).
# Its FP8Linear (integrations/finegrained_fp8.py) holds `weight` in float8_e4m3fn and
# `weight_scale_inv` of shape (ceil(out / bs0), ceil(in / bs1)), and its Fp8Quantize names the scale of
# `x.weight` `x.weight_scale_inv` and of any other tensor `x` (fused experts: `gate_up_proj`)
# `x_scale_inv`: always `<name>_scale_inv`. It converts every nn.Linear but `lm_head`; the embedding, the
# norms and the router (DeepseekV3TopkRouter, not a Linear; `e_score_correction_bias` is kept in fp32 by
# `_keep_in_fp32_modules_strict`) stay in high precision.
FP8_QUANTIZATION_CONFIG: dict[str, Any] = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "weight_block_size": [128, 128],
    "activation_scheme": "dynamic",
}
SCALE_SUFFIX = "_scale_inv"
# What stays in high precision, by dotted name part: DEFAULT_SKIP (embed_tokens, lm_head, the router
# "gate", norms) plus "head", the MTP layers' shared_head.head copy of lm_head. 1-D tensors (norm weights,
# e_score_correction_bias) are never quantised.
CHECKPOINT_SKIP: tuple[str, ...] = (*DEFAULT_SKIP, "head")
_FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def _is_fp8_weight_name(name: str, tensor: torch.Tensor, skip: tuple[str, ...]) -> bool:
    """Whether a checkpoint tensor is stored in FP8: a floating matrix (or stack of matrices) of a
    linear layer that ``skip`` does not keep in high precision."""
    return (
        tensor.is_floating_point()
        and tensor.dim() >= 2
        and tensor.dtype not in _QUANTIZED_DTYPES
        and not name.endswith(SCALE_SUFFIX)
        and not _is_skipped(name, skip)
    )


def _quantize_matrices(x: torch.Tensor, block: tuple[int, int], pow2_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """E4M3 with one scale grid per (rows, cols) matrix of x (..., rows, cols): stacked experts get
    one grid each, (..., ceil(rows / br), ceil(cols / bc))."""
    e4m3 = FORMATS["e4m3"]
    if x.dim() == 2:
        return _quantize(x, block, e4m3, pow2_scale)
    parts = [_quantize(m, block, e4m3, pow2_scale) for m in x.reshape(-1, *x.shape[-2:])]
    q, s = (torch.stack(p) for p in zip(*parts))
    return q.view(x.shape), s.view(*x.shape[:-2], *s.shape[-2:])


def _dequantize_matrices(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """``dequantize`` per (rows, cols) matrix, the inverse of ``_quantize_matrices``."""
    if q.dim() == 2:
        return dequantize(q, s, block, dtype)
    mats = zip(q.reshape(-1, *q.shape[-2:]), s.reshape(-1, *s.shape[-2:]))
    return torch.stack([dequantize(qm, sm, block, dtype) for qm, sm in mats]).view(q.shape)


def quantize_state_dict_fp8(
    state_dict: dict[str, torch.Tensor],
    skip: Iterable[str] = CHECKPOINT_SKIP,
    block: tuple[int, int] = WEIGHT_BLOCK,
    pow2_scale: bool = False,
) -> dict[str, torch.Tensor]:
    """A state dict in the FP8 checkpoint layout: each linear weight ``W`` (out, in) becomes
    ``name`` in float8_e4m3fn plus ``name + "_scale_inv"`` (float32, ``[ceil(out / 128), ceil(in / 128)]``).

    Tensors whose name has a dotted part in ``skip`` (default: embedding, lm_head and the MTP head copy,
    router, norms) and 1-D tensors are returned unchanged. A stacked (E, out, in) expert tensor gets
    one scale grid per expert, (E, ceil(out / 128), ceil(in / 128)). The scales are computed from the
    tensors as given, so pass the FP32 master weights rather than a BF16 copy. Non-finite weights raise
    ``ValueError`` naming them (one inf would wipe out its whole block).
    """
    skip = tuple(skip)
    _check_block(block)
    if block is None:
        raise ValueError("FP8 checkpoints use block-wise scales; pass block=(128, 128) (DeepSeek's)")
    targets = [n for n, t in state_dict.items() if _is_fp8_weight_name(n, t, skip)]
    problems = []
    for n in targets:
        if n + SCALE_SUFFIX in state_dict:
            problems.append(f"{n}: already has a {n}{SCALE_SUFFIX} (quantised twice?)")
        bad = int((~torch.isfinite(state_dict[n])).sum())
        if bad:
            problems.append(f"{n}: {bad} NaN/inf value(s) out of {state_dict[n].numel()}")
    if problems:
        raise ValueError("cannot write these tensors in FP8:\n" + "\n".join(f"  {p}" for p in problems))
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state_dict.items():
        if name not in targets:
            out[name] = tensor
            continue
        out[name], out[name + SCALE_SUFFIX] = _quantize_matrices(tensor.detach(), block, pow2_scale)
    return out


def dequantize_state_dict_fp8(
    state_dict: dict[str, torch.Tensor],
    dtype: torch.dtype = torch.float32,
    block: tuple[int, int] = WEIGHT_BLOCK,
) -> dict[str, torch.Tensor]:
    """Undo ``quantize_state_dict_fp8`` (or read DeepSeek's / transformers' FP8 files): every FP8
    tensor ``name`` becomes ``name_fp8 * name_scale_inv`` expanded over ``block``, in ``dtype``, and the
    ``*_scale_inv`` tensors are dropped. Other tensors are returned unchanged.

    Every problem is reported at once in a ``ValueError`` that names the tensors: an FP8 tensor
    without its scale, a scale without its FP8 tensor, a scale of the wrong shape (it must be
    ``[ceil(out / 128), ceil(in / 128)]``, per expert for stacked experts), non-finite scales or NaN
    weights, and static activation scales, which this reader does not support.
    """
    _check_block(block)
    if block is None:
        raise ValueError("FP8 checkpoints use block-wise scales; pass block=(128, 128) (DeepSeek's)")
    problems: list[str] = []
    for name, t in state_dict.items():
        if name.endswith(SCALE_SUFFIX):
            base = name[: -len(SCALE_SUFFIX)]
            if base not in state_dict:
                problems.append(f"{name}: a scale without its weight {base}")
            elif state_dict[base].dtype not in _FP8_DTYPES:
                problems.append(f"{name}: its weight {base} is {state_dict[base].dtype}, not FP8")
            elif not t.is_floating_point():
                problems.append(f"{name}: scales must be floating point (float32), got {t.dtype}")
            elif not torch.isfinite(t.float()).all():
                problems.append(f"{name}: {int((~torch.isfinite(t.float())).sum())} NaN/inf scale(s)")
        elif name.endswith(("activation_scale", "input_scale")):
            problems.append(f"{name}: static activation scales are not supported (only activation_scheme 'dynamic')")
        elif t.dtype in _FP8_DTYPES:
            scale = state_dict.get(name + SCALE_SUFFIX)
            expected = (*t.shape[:-2], *scale_shape(t.shape[-2:], block)) if t.dim() >= 2 else None
            if expected is None:
                problems.append(
                    f"{name}: FP8 tensors must be matrices (out, in) or stacks of them, got {tuple(t.shape)}"
                )
            elif scale is None:
                problems.append(f"{name}: stored in {t.dtype} but {name}{SCALE_SUFFIX} is missing")
            elif tuple(scale.shape) != expected:
                problems.append(
                    f"{name}{SCALE_SUFFIX}: shape {tuple(scale.shape)}, but {name} {tuple(t.shape)} in blocks of "
                    f"{block[0]}x{block[1]} needs {expected}"
                )
            if t.numel() and torch.isnan(t.float()).any():
                problems.append(f"{name}: {int(torch.isnan(t.float()).sum())} NaN value(s)")
    if problems:
        raise ValueError(
            f"not a valid FP8 checkpoint ({len(problems)} problem(s)):\n" + "\n".join(f"  {p}" for p in problems)
        )
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype in _FP8_DTYPES:
            t = _dequantize_matrices(t, state_dict[name + SCALE_SUFFIX], block, dtype)
        out[name] = t
    return out


def check_quantization_config(quantization_config: dict[str, Any]) -> tuple[int, int]:
    """Check a ``config.json`` ``quantization_config`` that ``dequantize_state_dict_fp8`` can read, and
    return its weight block size. Raises ``ValueError`` for other methods or options."""
    qc = quantization_config
    if not isinstance(qc, dict):
        raise ValueError(f"quantization_config must be a JSON object, got {qc!r}")
    if qc.get("quant_method") != "fp8":
        raise ValueError(
            f"quantization_config has quant_method {qc.get('quant_method')!r}; only DeepSeek's fine-grained "
            "'fp8' is supported (dequantise other formats with their own tools first)"
        )
    if qc.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"quantization_config fmt {qc['fmt']!r} is not supported; FP8 checkpoints use 'e4m3'")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise ValueError(
            f"quantization_config activation_scheme {qc['activation_scheme']!r} is not supported; "
            "only 'dynamic' (activations quantised online per 1x128 tile, DeepSeek-V3's scheme)"
        )
    bs = qc.get("weight_block_size")
    if not (
        isinstance(bs, (list, tuple))
        and len(bs) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in bs)
    ):
        raise ValueError(
            f"quantization_config weight_block_size must be two positive ints such as [128, 128], got {bs!r} "
            "(per-tensor FP8 scales are not supported)"
        )
    return int(bs[0]), int(bs[1])


def is_fp8_checkpoint(hf_config: dict[str, Any], tensor_names: Iterable[str]) -> bool:
    """Whether a checkpoint is in the FP8 layout: its config declares ``quant_method: fp8`` or its
    tensors include ``*_scale_inv`` siblings."""
    qc = hf_config.get("quantization_config")
    if isinstance(qc, dict) and qc.get("quant_method") == "fp8":
        return True
    return any(n.endswith(SCALE_SUFFIX) for n in tensor_names)


def fp8_dequantized_note(
    source: str, n_tensors: int, dtype: torch.dtype, device: torch.device | str | None = None
) -> str:
    """The note shown when an FP8 checkpoint's weights are dequantised on load."""
    ok, why = scaled_mm_support(device)
    reason = (
        "the model computes with high-precision weights (ModelConfig.fp8 re-quantises them on the fly for "
        "training); there is no inference path here that multiplies stored FP8 weights"
        if ok
        else f"this hardware/path has no FP8 matmul ({why})"
    )
    return (
        f"{source} holds FP8 weights ({n_tensors} tensors in float8_e4m3fn with one float32 weight_scale_inv "
        f"per 128x128 block); they were dequantised to {str(dtype).removeprefix('torch.')} on load because "
        f"{reason}. The values are exactly W_fp8 * scale_inv, but the memory is that of "
        f"{str(dtype).removeprefix('torch.')}, not of FP8."
    )
