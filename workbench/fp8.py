"""FP8: eight-bit numbers with fine-grained scales, as DeepSeek-V3 trains and serves with them.

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
---------------------------------------
A linear layer does three GEMMs per step, and DeepSeek-V3 runs all three in FP8:

* Fprop  ``Y = X W^T``: X (M, K) in 1x128 tiles along K, W (N, K) in 128x128 blocks;
* Dgrad ``dX = dY W``: dY (M, N) in 1x128 tiles along N (the reduction dimension), W reused with
  the same 128x128 blocks (a square block of W is a square block of W^T);
* Wgrad ``dW = dY^T X``: the reduction now runs over tokens, so both dY and X are quantised in tiles of
  128 *tokens*. DeepSeek caches X in FP8 (1x128) after the forward pass; for Wgrad it dequantises,
  transposes and re-quantises it (the paper asks for hardware that does this transpose directly).
  We do the same, so the saved activation costs one byte per value.

The FP32 master weight is quantised afresh every forward pass; gradients flow to it in FP32 and the
optimiser never sees FP8. ``convert_to_fp8`` swaps a model's ``nn.Linear`` layers for ``FP8Linear``
and, like DeepSeek, leaves the embedding, the output head, the norms and the MoE router in high
precision.

The accumulation problem, and promotion every N_C = 128 elements
-----------------------------------------------------------------
A dot product of length K adds K products into one accumulator. DeepSeek found that on H800 tensor
cores the FP8 GEMM accumulator keeps only about 14 mantissa bits, so once the running sum is large,
each new product loses its low bits; over K = 4096 terms the error reached nearly 2%. Their fix:
let the tensor cores sum only N_C = 128 products (four WGMMA instructions), then copy the partial sum
into FP32 registers on the CUDA cores and add it there. That is also where the per-tile scales are
multiplied in, so fine-grained scaling costs almost nothing. ``simulate_accumulation`` reproduces
the effect: the accumulator is rounded to ``mantissa_bits`` after every product, and optionally
flushed into an FP32 sum every ``promote_every`` products. A truncating accumulator always loses in
the same direction, so its error grows with the length of the sum; restarting every 128 products
caps it. Measured with 14 bits on K = 4096 same-sign FP8 products (256 outputs): 3.6% maximum
relative error without promotion, 0.035% with promotion every 128. Rounding to nearest instead is
unbiased and its errors partly cancel: 0.26% and 0.003%. DeepSeek's "nearly 2%" on real hardware
lies between the two models.

Weight-only 8-bit inference
---------------------------
For serving, only memory matters: ``quantize_weights_`` replaces each ``nn.Linear`` by a
``QuantizedLinear`` holding FP8 weights with 128x128-block scales (DeepSeek's checkpoint layout:
``weight`` in float8_e4m3fn and ``weight_scale_inv``) or INT8 weights with one scale per output row,
and dequantises them in ``forward``. ``weight_bytes`` measures what a model's state dict holds.
``top1_agreement`` measures what the 8 bits cost: how often two models pick the same next token, and
both models' loss on the same batches.

FP8 checkpoints
---------------
DeepSeek publishes V3 and R1 in FP8, and transformers reads the same layout: every weight
matrix of a linear layer (attention projections, dense and shared MLPs, each routed expert, the MTP
``eh_proj``) is stored as ``float8_e4m3fn`` with a float32 sibling ``<name>_scale_inv`` holding one
scale per 128x128 block, shape ``[ceil(out / 128), ceil(in / 128)]``, and ``W = W_fp8 * scale_inv``
over each block (partial blocks at the edges included). The embedding, ``lm_head``, the norms, the
router ``mlp.gate.weight`` and its ``e_score_correction_bias`` stay in high precision.
``config.json`` declares it with ``quantization_config`` (``FP8_QUANTIZATION_CONFIG``).
``quantize_state_dict_fp8`` and ``dequantize_state_dict_fp8`` convert a Hugging Face state dict to
and from that layout (``workbench.hf`` uses them to save and load); they also accept stacked 3-D
expert tensors, one scale grid per expert (``gate_up_proj`` -> ``gate_up_proj_scale_inv``).

Where this module simplifies
----------------------------
* On CPU (and wherever the fast path does not apply) every FP8 GEMM is an exact *simulation*: the
  operands are quantised with torch's real float8 casts (round to nearest even, so the quantisation
  error is exactly the hardware's), dequantised, and multiplied in FP32. The simulation therefore
  accumulates in full FP32; the tensor-core accumulation error is studied separately with
  ``simulate_accumulation``, not folded into ``FP8Linear``.
* The fast path calls ``torch.nn.functional.scaled_mm`` (cuBLAS's DeepSeek-style block scaling), which
  needs a Hopper GPU (compute capability 9.x), E4M3 operands and M, N, K that are multiples of 128; it
  writes BF16 outputs. E5M2 gradients and other shapes use the simulation on any device.
* Quantisation is plain torch code, not a fused kernel: on a GPU it makes extra passes over memory that
  DeepSeek's kernels avoid, so our end-to-end FP8 layer speed understates what the GEMM alone gains.
* ``simulate_accumulation`` models the accumulator as a float with ``mantissa_bits`` bits rounded after
  each addition (toward zero by default, like an adder that drops the bits shifted out when aligning
  exponents; or to nearest). NVIDIA does not document the real rule, so read the numbers as the size
  and trend of the effect, not as a bit-exact replay of an H800.
* ``ModelConfig.fp8`` puts a whole model on this path: its ``nn.Linear`` layers become ``FP8Linear``
  and the routed experts (batched 3-D parameters, not ``nn.Linear``) call ``fp8_linear`` on each
  expert's slice in a loop; DeepSeek runs them as one grouped FP8 GEMM. Like DeepSeek we keep
  attention's softmax core, the norms and the router in high precision and cache each linear layer's
  input in FP8; unlike DeepSeek we keep the other activations and the optimiser state in FP32 rather
  than storing some of them in BF16.
* Weight-only inference (``quantize_weights_``) replaces ``nn.Linear`` layers only, so the routed
  experts keep FP32 weights there; the FP8 *checkpoint* functions quantise them too.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "ACTIVATION_BLOCK",
    "CHECKPOINT_SKIP",
    "DEFAULT_SKIP",
    "FORMATS",
    "FP8_QUANTIZATION_CONFIG",
    "WEIGHT_BLOCK",
    "FP8Linear",
    "QuantFormat",
    "QuantizedLinear",
    "SCALE_SUFFIX",
    "check_quantization_config",
    "convert_to_fp8",
    "dequantize",
    "dequantize_state_dict_fp8",
    "fp8_dequantized_note",
    "is_fp8_checkpoint",
    "fp8_linear",
    "quantize",
    "quantize_state_dict_fp8",
    "quantize_weights_",
    "scale_shape",
    "scaled_mm_support",
    "simulate_accumulation",
    "top1_agreement",
    "weight_bytes",
]


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


# The FP8 GEMM: simulated everywhere, torch.nn.functional.scaled_mm on Hopper -------------------
def scaled_mm_support(device: torch.device | str | None = None) -> tuple[bool, str]:
    """Whether DeepSeek-style block-scaled FP8 GEMMs can run on ``device`` (default: the current CUDA
    device, else CPU), and a sentence saying why or why not."""
    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    if not hasattr(F, "scaled_mm") or not hasattr(F, "ScalingType"):
        return False, f"torch {torch.__version__} has no torch.nn.functional.scaled_mm; FP8 GEMMs are simulated"
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, (
            f"tensors are on {device.type}; the FP8 speed path needs a CUDA GPU of compute capability 9.0 "
            "(sm90, Hopper: H100/H800/H200), so FP8 GEMMs are simulated in FP32"
        )
    major, minor = torch.cuda.get_device_capability(device)
    if major != 9:
        return False, (
            f"the GPU has compute capability {major}.{minor}; cuBLAS's 1x128/128x128 block-scaled FP8 GEMM "
            "needs 9.x (sm90, Hopper), so FP8 GEMMs are simulated"
        )
    return True, f"compute capability {major}.{minor}: block-scaled FP8 GEMMs run on tensor cores"


def _fast_path_reason(a_q: torch.Tensor, b_q: torch.Tensor) -> str | None:
    """None if ``a @ b.T`` can use scaled_mm, else why not."""
    ok, why = scaled_mm_support(a_q.device)
    if not ok:
        return why
    if a_q.dtype != torch.float8_e4m3fn or b_q.dtype != torch.float8_e4m3fn:
        return "the block-scaled cuBLAS GEMM takes E4M3 operands only (E5M2 gradients are simulated)"
    (m, k), n = a_q.shape, b_q.shape[0]
    if m % 128 or n % 128 or k % 128:
        return f"GEMM shape M={m}, N={n}, K={k} is not a multiple of 128 in every dimension"
    return None


def _scaled_mm_nt(
    a_q: torch.Tensor, a_s: torch.Tensor, b_q: torch.Tensor, b_s: torch.Tensor, b_block: tuple[int, int]
) -> torch.Tensor:
    """``a @ b.T`` with cuBLAS's DeepSeek recipes: (M, K) x (N, K) -> (M, N) in BF16.

    ``a`` is in 1x128 tiles along K; ``b`` is in 128x128 blocks (``WEIGHT_BLOCK``) or 1x128 tiles
    along K. Both are K-major (row-major (rows, K)), which is what scaled_mm wants: ``a`` row-major
    and ``b.T`` column-major. The scale layouts follow torch's checks for ``_scaled_mm_v2``.
    """
    k_blocks = a_s.shape[1]
    scale_a = a_s.t().contiguous().t()  # (M, K/128), stride (1, M): "outer-dim-major"
    if tuple(b_block) == WEIGHT_BLOCK:
        l4 = -(-k_blocks // 4) * 4  # K/128 rounded up to a multiple of 4
        scale_b = F.pad(b_s, (0, l4 - k_blocks)).contiguous().t()  # (L4, N/128), stride (1, L4)
        recipe_b = F.ScalingType.BlockWise128x128
    else:
        scale_b = b_s.t().contiguous().t()  # (N, K/128), stride (1, N)
        recipe_b = F.ScalingType.BlockWise1x128
    return F.scaled_mm(
        a_q,  # (M, K) row-major
        b_q.t(),  # (K, N) column-major
        scale_a,
        F.ScalingType.BlockWise1x128,
        scale_b,
        recipe_b,
        swizzle_a=F.SwizzleType.NO_SWIZZLE,
        swizzle_b=F.SwizzleType.NO_SWIZZLE,
        output_dtype=torch.bfloat16,
    )  # (M, N)


def _fp8_mm_nt(
    a_q: torch.Tensor,
    a_s: torch.Tensor,
    b_q: torch.Tensor,
    b_s: torch.Tensor,
    b_block: tuple[int, int],
    backend: str,
) -> torch.Tensor:
    """``a @ b.T`` from quantised operands ((M, K) in 1x128 tiles, (N, K) in ``b_block``), in FP32."""
    if backend != "simulate":
        reason = _fast_path_reason(a_q, b_q)
        if reason is None:
            try:
                return _scaled_mm_nt(a_q, a_s, b_q, b_s, b_block).float()
            except RuntimeError as err:  # e.g. a cuBLAS older than 12.9
                if backend == "scaled_mm":
                    raise
                warnings.warn(f"FP8 scaled_mm failed, using the simulated FP8 GEMM instead: {err}", stacklevel=3)
        elif backend == "scaled_mm":
            raise ValueError(f"backend='scaled_mm' cannot run here: {reason}; use backend='auto' to fall back")
    a = dequantize(a_q, a_s, ACTIVATION_BLOCK)  # (M, K) exactly the values the GPU would multiply
    b = dequantize(b_q, b_s, b_block)  # (N, K)
    return a @ b.t()  # (M, N), FP32 accumulation


# FP8 training: the linear layer ------------------------------------------------------------------
_BACKENDS = ("auto", "simulate", "scaled_mm")


def _check_linear_options(grad_fmt: str, backend: str) -> None:
    _format(grad_fmt, allowed=("e4m3", "e5m2"))
    if backend not in _BACKENDS:
        raise ValueError(
            f"unknown backend {backend!r}; choose 'auto' (scaled_mm on Hopper, else simulated), "
            "'simulate' (quantise, dequantise, FP32 matmul) or 'scaled_mm' (Hopper only, raise otherwise)"
        )


class _FP8LinearFunction(torch.autograd.Function):
    """Y = X W^T + b with all three GEMMs (Fprop, Dgrad, Wgrad) on FP8 operands."""

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        grad_fmt: str,
        backend: str,
    ) -> torch.Tensor:
        e4m3 = FORMATS["e4m3"]
        x2 = x.reshape(-1, x.shape[-1])  # (M, K)
        x_q, x_s = _quantize(x2, ACTIVATION_BLOCK, e4m3)  # (M, K) fp8, (M, K/128)
        w_q, w_s = _quantize(weight, WEIGHT_BLOCK, e4m3)  # (N, K) fp8, (N/128, K/128)
        y = _fp8_mm_nt(x_q, x_s, w_q, w_s, WEIGHT_BLOCK, backend)  # (M, N) fp32
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x_q, x_s, w_q, w_s)  # the activation is kept in FP8, as DeepSeek caches it
        ctx.grad_fmt, ctx.backend, ctx.has_bias = grad_fmt, backend, bias is not None
        ctx.x_shape, ctx.x_dtype, ctx.w_dtype = x.shape, x.dtype, weight.dtype
        ctx.b_dtype = bias.dtype if bias is not None else None
        return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])  # (..., N)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        g_spec, e4m3 = FORMATS[ctx.grad_fmt], FORMATS["e4m3"]
        dy = grad_out.reshape(-1, grad_out.shape[-1])  # (M, N)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # Dgrad dX = dY W: reduce over N, so dY in 1x128 tiles along N; W^T keeps W's 128x128 blocks.
            dy_q, dy_s = _quantize(dy, ACTIVATION_BLOCK, g_spec)  # (M, N), (M, N/128)
            w_t_q, w_t_s = w_q.t().contiguous(), w_s.t().contiguous()  # (K, N), (K/128, N/128)
            dx = _fp8_mm_nt(dy_q, dy_s, w_t_q, w_t_s, WEIGHT_BLOCK, ctx.backend)  # (M, K)
            dx = dx.to(ctx.x_dtype).view(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # Wgrad dW = dY^T X: reduce over the M tokens, so both operands in tiles of 128 tokens.
            dy_t_q, dy_t_s = _quantize(dy.t(), ACTIVATION_BLOCK, g_spec)  # (N, M), (N, M/128)
            x = dequantize(x_q, x_s, ACTIVATION_BLOCK)  # (M, K): the FP8 activation cached in forward
            x_t_q, x_t_s = _quantize(x.t(), ACTIVATION_BLOCK, e4m3)  # (K, M), (K, M/128): re-quantised
            dw = _fp8_mm_nt(dy_t_q, dy_t_s, x_t_q, x_t_s, ACTIVATION_BLOCK, ctx.backend)  # (N, K)
            dw = dw.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.float().sum(0).to(ctx.b_dtype)  # (N,)
        return dx, dw, db, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    grad_fmt: str = "e4m3",
    backend: str = "auto",
) -> torch.Tensor:
    """``F.linear`` with FP8 GEMMs in forward and backward: x (..., K), weight (N, K) -> (..., N).

    grad_fmt: ``"e4m3"`` (DeepSeek-V3) or ``"e5m2"`` (the hybrid recipe) for dY in both backward GEMMs.
    backend: ``"auto"`` (scaled_mm where it applies, else simulated), ``"simulate"`` or ``"scaled_mm"``.
    """
    _check_linear_options(grad_fmt, backend)
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight {tuple(weight.shape)} expects {weight.shape[-1]}")
    return _FP8LinearFunction.apply(x, weight, bias, grad_fmt, backend)


class FP8Linear(nn.Linear):
    """An ``nn.Linear`` whose three GEMMs run in FP8 (E4M3, 1x128 activation tiles, 128x128 weight
    blocks) while its parameters stay in their own (FP32 master) dtype."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        grad_fmt: str = "e4m3",
        backend: str = "auto",
    ) -> None:
        _check_linear_options(grad_fmt, backend)
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.grad_fmt = grad_fmt
        self.backend = backend

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, grad_fmt: str = "e4m3", backend: str = "auto") -> FP8Linear:
        """An FP8Linear sharing ``linear``'s parameters (optimiser state and tied weights carry over)."""
        new = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device="meta",
            grad_fmt=grad_fmt,
            backend=backend,
        )
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.bias, grad_fmt=self.grad_fmt, backend=self.backend)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, grad_fmt={self.grad_fmt}, backend={self.backend}"


def _is_skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(s == name or s in parts for s in skip)


def _replace_linears(
    module: nn.Module, skip: tuple[str, ...], make: Callable[[nn.Linear], nn.Module], what: str
) -> list[str]:
    if type(module) is nn.Linear:
        raise ValueError(
            f"{what} replaces the nn.Linear layers *inside* a module; for a bare nn.Linear use "
            "FP8Linear.from_linear(layer) or QuantizedLinear.from_linear(layer, fmt)"
        )
    targets = [
        (name, child)
        for name, child in module.named_modules()
        if type(child) is nn.Linear and name and not _is_skipped(name, skip)
    ]
    for name, child in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, make(child))
    return [name for name, _ in targets]


def convert_to_fp8(
    module: nn.Module,
    skip: Iterable[str] = DEFAULT_SKIP,
    *,
    grad_fmt: str = "e4m3",
    backend: str = "auto",
) -> nn.Module:
    """Swap every ``nn.Linear`` inside ``module`` for an ``FP8Linear`` sharing its parameters, in place.

    skip: a layer stays in high precision if its qualified name, or any dot-separated part of it, is in
        ``skip``. The default keeps ``embed_tokens``, ``lm_head``, the router (``gate``; the SwiGLU
        ``gate_proj`` is converted) and norms, as DeepSeek-V3 does.
    Only exact ``nn.Linear`` instances are converted (subclasses, and layers already converted, are left
    alone). Returns ``module``.
    """
    _check_linear_options(grad_fmt, backend)
    skip = tuple(skip)
    _replace_linears(
        module, skip, lambda lin: FP8Linear.from_linear(lin, grad_fmt=grad_fmt, backend=backend), "convert_to_fp8"
    )
    return module


# The accumulation problem -------------------------------------------------------------------------
def _round_mantissa(v: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    """Round float64 values to ``bits`` explicit mantissa bits (plus the implicit leading one)."""
    drop = 52 - bits  # float64 keeps 52 explicit bits
    if rounding == "truncate":  # toward zero: clear the low mantissa bits of the IEEE encoding
        return (v.view(torch.int64) & ~((1 << drop) - 1)).view(torch.float64)
    c = v * float(2**drop + 1)  # nearest even (Veltkamp's splitting): the high part of v
    return c - (c - v)


def simulate_accumulation(
    a: torch.Tensor,
    b: torch.Tensor,
    mantissa_bits: int = 14,
    promote_every: int | None = 128,
    rounding: str = "truncate",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``a @ b`` with a limited-precision accumulator, as in an FP8 tensor-core GEMM.

    a: (M, K), b: (K, N). Each product is exact (as FP8 x FP8 products are), and is added into an
    accumulator that keeps ``mantissa_bits`` mantissa bits, rounded after every addition
    (``rounding="truncate"`` drops the low bits, ``"nearest"`` rounds to nearest even). With
    ``promote_every=N_C`` the accumulator is added into an FP32 sum every N_C products and restarted
    (DeepSeek's promotion, N_C = 128); ``None`` accumulates all K products in the narrow accumulator.

    Returns ``(result, reference)``: the (M, N) float32 result and the float64 exact product.
    The loop runs over the N_C steps of a chunk, all chunks and outputs at once (K steps without
    promotion): K = 4096 with a few hundred outputs takes a fraction of a second on one CPU core.
    """
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor) or a.dim() != 2 or b.dim() != 2:
        raise ValueError("a and b must be 2-D tensors (M, K) and (K, N)")
    if a.shape[1] != b.shape[0]:
        raise ValueError(f"inner dimensions differ: a is {tuple(a.shape)}, b is {tuple(b.shape)}; b must be (K, N)")
    if not isinstance(mantissa_bits, int) or not 1 <= mantissa_bits <= 40:
        raise ValueError(f"mantissa_bits must be an int in 1..40 (H800 keeps about 14), got {mantissa_bits!r}")
    if promote_every is not None and (not isinstance(promote_every, int) or promote_every <= 0):
        raise ValueError(f"promote_every must be a positive int (DeepSeek: 128) or None, got {promote_every!r}")
    if rounding not in ("truncate", "nearest"):
        raise ValueError(f"rounding must be 'truncate' or 'nearest', got {rounding!r}")
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise ValueError("a and b must be finite (no NaN or inf)")
    a64, b64 = a.detach().cpu().double(), b.detach().cpu().double()
    (m, k), n = a64.shape, b64.shape[1]
    chunk = min(promote_every or k, k) or 1  # N_C products per narrow accumulation
    n_chunks = math.ceil(k / chunk)
    pad = n_chunks * chunk - k  # zero products change nothing
    a_cols = F.pad(a64, (0, pad)).t().reshape(n_chunks, chunk, m)  # (C, N_C, M): product j of chunk c
    b_rows = F.pad(b64, (0, 0, 0, pad)).reshape(n_chunks, chunk, n)  # (C, N_C, N)
    acc = torch.zeros(n_chunks, m, n, dtype=torch.float64)  # (C, M, N) one narrow accumulator per chunk
    for j in range(chunk):
        product = a_cols[:, j, :, None] * b_rows[:, j, None, :]  # (C, M, N), exact in float64
        acc = _round_mantissa(acc + product, mantissa_bits, rounding)
    total = torch.zeros(m, n, dtype=torch.float32)  # (M, N) FP32 registers on the CUDA cores
    for c in range(n_chunks):
        total = total + acc[c].float()  # promotion: one FP32 addition per chunk, in order
    return total, a64 @ b64


# Weight-only 8-bit inference ----------------------------------------------------------------------
class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored in 8 bits and dequantised on the fly in ``forward``.

    fmt ``"e4m3"``/``"e5m2"``: FP8 with one scale per 128x128 block (DeepSeek's checkpoint layout,
    ``weight`` + ``weight_scale_inv``); ``"int8"``: INT8 with one scale per output row.
    """

    def __init__(self, weight_q: torch.Tensor, weight_scale_inv: torch.Tensor, bias: torch.Tensor | None, fmt: str):
        super().__init__()
        self.fmt = fmt
        self.block = self.block_for(fmt, weight_q.shape[1])
        self.out_features, self.in_features = weight_q.shape
        self.register_buffer("weight", weight_q)  # (N, K) 8-bit
        self.register_buffer("weight_scale_inv", weight_scale_inv)  # (N/128, K/128) or (N, 1) float32
        self.register_buffer("bias", bias)

    @staticmethod
    def block_for(fmt: str, in_features: int) -> tuple[int, int]:
        return (1, in_features) if fmt == "int8" else WEIGHT_BLOCK

    @classmethod
    def from_linear(cls, linear: nn.Linear, fmt: str = "e4m3") -> QuantizedLinear:
        _format(fmt)
        with torch.no_grad():
            w = linear.weight.detach()  # (N, K)
            if not torch.isfinite(w).all():
                raise ValueError("the layer's weight has NaN or inf values; it cannot be quantised")
            q, s = _quantize(w, cls.block_for(fmt, w.shape[1]), FORMATS[fmt])
            bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(q, s, bias, fmt)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale_inv, self.block, dtype)  # (N, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias.to(x.dtype) if self.bias is not None else None
        return F.linear(x, self.dequantized_weight(x.dtype), bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def quantize_weights_(model: nn.Module, fmt: str = "e4m3", skip: Iterable[str] = DEFAULT_SKIP) -> nn.Module:
    """Replace every ``nn.Linear`` inside ``model`` (except the ``skip``ped ones, see ``convert_to_fp8``)
    by a ``QuantizedLinear`` in ``fmt`` (``"e4m3"``, ``"e5m2"`` or ``"int8"``), in place, for inference.

    Returns ``model``. Compare ``weight_bytes`` before and after to see the memory saved.
    """
    _format(fmt)
    _replace_linears(model, tuple(skip), lambda lin: QuantizedLinear.from_linear(lin, fmt), "quantize_weights_")
    return model


def weight_bytes(module: nn.Module) -> int:
    """Bytes of every tensor in ``module.state_dict()`` (what a checkpoint holds), shared storage
    (tied weights) counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for tensor in module.state_dict(keep_vars=True).values():
        if not isinstance(tensor, torch.Tensor):
            continue
        key = (tensor.untyped_storage().data_ptr(), tensor.nbytes)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.nbytes
    return total


@torch.no_grad()
def top1_agreement(model_a: nn.Module, model_b: nn.Module, batches: Iterable[torch.Tensor]) -> dict[str, float]:
    """How often ``model_b`` predicts the same next token as ``model_a``, and both models' loss.

    batches: token ids (B, T) (or tuples whose first item is them, as ``TokenDataset.eval_batches``
        yields), moved to each model's device. A model returns logits (B, T, V) or an object with
        ``.logits`` (``workbench.Model``).
    Returns ``agreement`` (fraction of positions whose argmax agrees), ``loss_a`` and ``loss_b`` (mean
    next-token cross-entropy), ``loss_change`` (``loss_b - loss_a``), ``rel_loss_change``
    (``loss_change / loss_a``) and ``tokens`` (positions compared). Put the models in eval mode first.
    """
    agree = positions = 0
    loss_sums, loss_tokens = [0.0, 0.0], 0
    for batch in batches:
        ids = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[1] < 2:
            raise ValueError(
                f"each batch must hold token ids of shape (batch, seq_len >= 2), got {getattr(ids, 'shape', ids)!r}"
            )
        preds = []
        for i, model in enumerate((model_a, model_b)):
            x = ids.to(_device_of(model))
            out = model(x)
            logits = (out.logits if hasattr(out, "logits") else out).float()  # (B, T, V)
            preds.append(logits.argmax(-1).cpu())  # (B, T)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
            loss_sums[i] += float(loss)
        agree += int((preds[0] == preds[1]).sum())
        positions += ids.numel()
        loss_tokens += ids.shape[0] * (ids.shape[1] - 1)
    if positions == 0:
        raise ValueError("batches is empty: pass at least one (batch, seq_len) tensor of token ids")
    loss_a, loss_b = loss_sums[0] / loss_tokens, loss_sums[1] / loss_tokens
    return {
        "agreement": agree / positions,
        "loss_a": loss_a,
        "loss_b": loss_b,
        "loss_change": loss_b - loss_a,
        "rel_loss_change": (loss_b - loss_a) / loss_a,
        "tokens": positions,
    }


def _device_of(model: nn.Module) -> torch.device:
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


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
