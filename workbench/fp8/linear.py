"""FP8 training GEMMs: ``FP8Linear`` runs Fprop, Dgrad and Wgrad on FP8 operands, as DeepSeek-V3 trains.

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

Where it simplifies
-------------------
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
* ``ModelConfig.fp8`` puts a whole model on this path: its ``nn.Linear`` layers become ``FP8Linear``
  and the routed experts (batched 3-D parameters, not ``nn.Linear``) call ``fp8_linear`` on each
  expert's slice in a loop; DeepSeek runs them as one grouped FP8 GEMM. Like DeepSeek we keep
  attention's softmax core, the norms and the router in high precision and cache each linear layer's
  input in FP8; unlike DeepSeek we keep the other activations and the optimiser state in FP32 rather
  than storing some of them in BF16.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from workbench.fp8.formats import (
    ACTIVATION_BLOCK,
    DEFAULT_SKIP,
    FORMATS,
    WEIGHT_BLOCK,
    _format,
    _quantize,
    dequantize,
)


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
