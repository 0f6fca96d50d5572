"""FP8 formats and fine-grained scaling: how eight-bit numbers hold a tensor, and how badly.

The two FP8 formats
-------------------
An FP8 number is a sign, a few exponent bits and a few mantissa (fraction) bits. Two layouts exist
(both are torch dtypes, and casts to them work on CPU):

============  ===============  ========  ========  ==============  ===============  ===============
format        torch dtype      exponent  mantissa  largest         smallest normal  smallest subnormal
============  ===============  ========  ========  ==============  ===============  ===============
E4M3          float8_e4m3fn    4 bits    3 bits    448             2^-6             2^-9
E5M2          float8_e5m2      5 bits    2 bits    57344           2^-14            2^-16
============  ===============  ========  ========  ==============  ===============  ===============

E4M3 trades range for precision: its 3 mantissa bits space the numbers 2^-3 apart relative to their
binade, so rounding to nearest costs at most 2^-4 = 6.25% of a value; E5M2 rounds with up to
2^-3 = 12.5% error but spans 2^-16 .. 57344. (The "fn" in E4M3's dtype means "finite": it has no
infinities, only NaN, which buys back the top binade and gives 448 instead of 240.) Earlier FP8 work
used a "hybrid" recipe: E4M3 forward, E5M2 for gradients, whose range is wider. DeepSeek-V3 uses E4M3
everywhere and gets the range back from fine-grained scaling instead.

Scaling, and why fine-grained scaling beats one scale per tensor
----------------------------------------------------------------
FP8's range is narrow, so values are scaled into it first: for a group of values with largest
magnitude ``amax``, ``scale_inv = amax / fp8_max``, ``x_fp8 = cast(x / scale_inv)`` and
``x ~= x_fp8 * scale_inv``. The group's largest value lands on 448 and the others keep 3 bits of
relative precision as long as they stay above 2^-6 * scale_inv; below that they fall into the
subnormals, where only a fixed absolute step of 2^-9 * scale_inv remains, and under half of that they
become zero. E4M3's normal numbers span 2^-6 .. 448, under 15 binades, with three more binades of
subnormals below. With one scale per tensor (``block=None``) a single outlier 10^4 times the typical
value pushes every other value down by 13 binades, so the smaller ones land among the subnormals or on
zero: in the tests (16 such outliers in a 256 x 1024 Gaussian tensor) the mean relative error of the
other values is 5.9% per tensor and 2.3% per 1x128 tile (2.2% without outliers), and per tensor 1.8%
of them become zero. INT8, whose grid is uniform, suffers far more: one scale set by a 1000x outlier
rounds nearly everything else to zero. DeepSeek-V3 scales per **1x128 tile** for activations (one
scale per token per 128 channels) and per **128x128 block** for weights, so an outlier only coarsens
the 127 values that share its tile. The scales are FP32 (later DeepSeek releases round them to powers
of two, ``pow2_scale=True``: multiplying by one is then exact). ``quantize`` / ``dequantize``
implement all of these; tensors whose shape is not a multiple of the block are padded with zeros for
the scale computation, and ``scale_inv`` has one entry per (possibly partial) block, shape
``[ceil(rows / br), ceil(cols / bc)]``. ``fmt="int8"`` is the integer cousin (round to nearest, amax
maps to 127), used here for weight-only inference.

Training with FP8 GEMMs (``FP8Linear``)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


# Formats ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantFormat:
    """An 8-bit storage format: its torch dtype, the largest value it holds and its precision."""

    name: str
    dtype: torch.dtype
    max: float  # the largest finite value: amax of a block is mapped here
    mantissa_bits: int  # explicit fraction bits (0 for int8)
    smallest_subnormal: float  # the absolute step near zero, before scaling
    is_float: bool

    @property
    def max_rel_error(self) -> float:
        """The worst relative rounding error for a value in the normal range: half a unit in the last
        place, 2^-(mantissa_bits + 1)."""
        return 2.0 ** -(self.mantissa_bits + 1)


FORMATS: dict[str, QuantFormat] = {
    "e4m3": QuantFormat("e4m3", torch.float8_e4m3fn, 448.0, 3, 2.0**-9, True),
    "e5m2": QuantFormat("e5m2", torch.float8_e5m2, 57344.0, 2, 2.0**-16, True),
    "int8": QuantFormat("int8", torch.int8, 127.0, 0, 1.0, False),
}
_QUANTIZED_DTYPES = {spec.dtype: spec for spec in FORMATS.values()}

ACTIVATION_BLOCK: tuple[int, int] = (1, 128)  # DeepSeek-V3: per token, per 128 channels
WEIGHT_BLOCK: tuple[int, int] = (128, 128)  # DeepSeek-V3: 128 output x 128 input channels

# Module names (any component of the dotted name) that DeepSeek keeps in high precision. "gate" is the
# MoE router (mlp.gate), not the SwiGLU gate_proj.
DEFAULT_SKIP: tuple[str, ...] = ("embed_tokens", "lm_head", "gate", "router", "norm")

Block = tuple[int, int] | None


# Validation ---------------------------------------------------------------------------------------
def _format(fmt: str, allowed: Iterable[str] = ("e4m3", "e5m2", "int8")) -> QuantFormat:
    allowed = tuple(allowed)
    if fmt not in allowed:
        raise ValueError(f"unknown fmt {fmt!r}; choose one of {', '.join(repr(a) for a in allowed)}")
    return FORMATS[fmt]


def _check_block(block: Block) -> None:
    if block is None:
        return
    ok = (
        isinstance(block, (tuple, list))
        and len(block) == 2
        and all(isinstance(b, int) and not isinstance(b, bool) for b in block)
    )
    if not ok:
        raise ValueError(
            f"block must be None (one scale per tensor) or two ints (rows, cols) such as (1, 128) or "
            f"(128, 128); got {block!r}"
        )
    if block[0] <= 0 or block[1] <= 0:
        raise ValueError(
            f"block sizes must be positive, got {tuple(block)}; use (1, 128) for activation tiles, "
            "(128, 128) for weight blocks, (1, n_cols) for one scale per row or None for one per tensor"
        )


def _as_matrix(x: torch.Tensor, what: str) -> torch.Tensor:
    """View a tensor as (rows, cols): every leading dimension folds into rows."""
    if x.dim() == 0:
        raise ValueError(f"{what} must have at least one dimension, got a scalar; reshape it to (1, 1)")
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # (rows, cols)


def _grid(rows: int, cols: int, block: Block) -> tuple[int, int, int, int]:
    """The effective block (clipped to the tensor, so a block larger than the tensor covers a whole
    dimension) and the number of blocks along each dimension."""
    br, bc = (rows, cols) if block is None else block
    br, bc = max(1, min(br, rows)), max(1, min(bc, cols))
    return br, bc, math.ceil(rows / br), math.ceil(cols / bc)


def scale_shape(shape: torch.Size | tuple[int, ...], block: Block) -> tuple[int, int]:
    """The shape of ``scale_inv`` for a tensor of ``shape``: ``(ceil(rows / br), ceil(cols / bc))``,
    where rows is the product of every dimension but the last."""
    _check_block(block)
    cols = shape[-1]
    rows = math.prod(shape[:-1])
    _, _, n_r, n_c = _grid(rows, cols, block)
    return n_r, n_c


# Quantise / dequantise ----------------------------------------------------------------------------
def _scale_inv_from_amax(amax: torch.Tensor, fmt_max: float, pow2_scale: bool) -> torch.Tensor:
    """Dequantisation scale per block, ``amax / fmt_max``; rounded up to a power of two if asked (so
    ``amax / scale_inv`` still fits); 1 for all-zero blocks. NaN amax stays NaN-producing."""
    scale_inv = amax / fmt_max  # (R, C)
    if pow2_scale:
        mant, exp = torch.frexp(scale_inv)  # scale_inv = mant * 2**exp with mant in [0.5, 1)
        exp = exp - (mant == 0.5).to(exp.dtype)  # an exact power of two stays itself
        scale_inv = torch.ldexp(torch.ones_like(scale_inv), exp)  # 2**ceil(log2(amax / fmt_max))
    scale_inv = scale_inv.clamp_min(torch.finfo(torch.float32).tiny)  # never divide by an underflow
    return torch.where(amax > 0, scale_inv, torch.ones_like(scale_inv))


def _quantize(
    x: torch.Tensor, block: Block, spec: QuantFormat, pow2_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``quantize`` without input checks (used inside training, where NaNs must propagate, not raise)."""
    x2 = _as_matrix(x, "x").float().contiguous()  # (rows, cols)
    rows, cols = x2.shape
    br, bc, n_r, n_c = _grid(rows, cols, block)
    pad_r, pad_c = n_r * br - rows, n_c * bc - cols
    if pad_r or pad_c:
        x2 = F.pad(x2, (0, pad_c, 0, pad_r))  # zeros never change a block's amax
    tiles = x2.view(n_r, br, n_c, bc)  # (R, br, C, bc)
    amax = tiles.abs().amax(dim=(1, 3))  # (R, C)
    scale_inv = _scale_inv_from_amax(amax, spec.max, pow2_scale)  # (R, C)
    y = (tiles / scale_inv[:, None, :, None]).clamp(-spec.max, spec.max)  # (R, br, C, bc)
    if not spec.is_float:
        y = y.round()  # float casts round to nearest even themselves; integer casts truncate
    q = y.to(spec.dtype).view(n_r * br, n_c * bc)[:rows, :cols]  # (rows, cols)
    return q.contiguous().view(x.shape), scale_inv


def quantize(
    x: torch.Tensor, block: Block = ACTIVATION_BLOCK, fmt: str = "e4m3", pow2_scale: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to 8 bits with one scale per block.

    x: a float tensor (..., cols); every leading dimension counts as rows.
    block: ``None`` for one scale per tensor, ``(1, cols)`` (or larger) per row, ``(1, 128)`` for
        DeepSeek's activation tiles, ``(128, 128)`` for its weight blocks; any positive (br, bc) works
        and shapes that are not multiples of it are padded.
    fmt: ``"e4m3"`` (float8_e4m3fn), ``"e5m2"`` (float8_e5m2) or ``"int8"``.
    pow2_scale: round each scale up to a power of two.

    Returns ``(x_q, scale_inv)``: ``x_q`` has ``x``'s shape in the 8-bit dtype and ``scale_inv`` is
    float32 of shape ``[ceil(rows / br), ceil(cols / bc)]`` with ``x ~= x_q.float() * scale_inv`` over
    each block (``dequantize`` does the expansion).
    """
    spec = _format(fmt)
    _check_block(block)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dtype in _QUANTIZED_DTYPES:
        raise ValueError(f"x is already quantised ({x.dtype}); dequantize it first")
    _as_matrix(x, "x")
    bad = (~torch.isfinite(x)).sum().item()
    if bad:
        raise ValueError(
            f"x has {bad} non-finite value(s) (NaN or inf) out of {x.numel()}; an inf would become the "
            "block's amax and wipe out every other value in the block. Find where they come from, or "
            "replace them first (torch.nan_to_num)"
        )
    return _quantize(x, block, spec, pow2_scale)


def _expand_scales(scale_inv: torch.Tensor, rows: int, cols: int, br: int, bc: int) -> torch.Tensor:
    """One scale per block -> one scale per element: (R, C) -> (rows, cols)."""
    return scale_inv.repeat_interleave(br, dim=0)[:rows].repeat_interleave(bc, dim=1)[:, :cols]


def dequantize(
    x_q: torch.Tensor, scale_inv: torch.Tensor, block: Block = ACTIVATION_BLOCK, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Undo ``quantize``: ``x_q.float() * scale_inv`` expanded over each block, in ``dtype``.

    ``block`` must be the one used to quantise; ``scale_inv`` must have shape
    ``[ceil(rows / br), ceil(cols / bc)]``.
    """
    _check_block(block)
    if not isinstance(x_q, torch.Tensor) or x_q.dtype not in _QUANTIZED_DTYPES:
        names = ", ".join(str(d) for d in _QUANTIZED_DTYPES)
        raise ValueError(f"x_q must be a quantised tensor ({names}), got {getattr(x_q, 'dtype', type(x_q))}")
    if not isinstance(scale_inv, torch.Tensor) or not scale_inv.is_floating_point():
        raise ValueError(
            f"scale_inv must be a floating-point tensor, got {getattr(scale_inv, 'dtype', type(scale_inv))}"
        )
    q2 = _as_matrix(x_q, "x_q")  # (rows, cols)
    rows, cols = q2.shape
    br, bc, n_r, n_c = _grid(rows, cols, block)
    if tuple(scale_inv.shape) != (n_r, n_c):
        raise ValueError(
            f"scale_inv has shape {tuple(scale_inv.shape)} but x_q {tuple(x_q.shape)} with block {block} needs "
            f"({n_r}, {n_c}), one scale per block; pass the scale_inv that quantize returned with the same block"
        )
    scales = _expand_scales(scale_inv.float(), rows, cols, br, bc)  # (rows, cols)
    return (q2.float() * scales).to(dtype).view(x_q.shape)
