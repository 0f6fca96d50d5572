"""FP8 against BF16 (or FP32): one linear layer's forward + backward at several GEMM shapes, and a full
training step of the model with ``fp8=False`` against ``fp8=True``.

For each shape M x K x N (M tokens, K input features, N output features) the script times one
forward and backward pass of ``nn.Linear`` and of ``workbench.fp8.FP8Linear`` with the same weights
and inputs, in the same run, and prints both times, their ratio (FP8 / baseline: below 1 means FP8
is faster), the throughput (6*M*K*N FLOPs per pass) and the FP8 output's relative error.

FP8 is fast only on Hopper (CUDA compute capability 9.0, sm90), where FP8Linear calls
``torch.nn.functional.scaled_mm`` with DeepSeek-V3's 1x128 / 128x128 block scales. There the script
also times the forward GEMM alone (BF16 ``torch.mm`` against ``scaled_mm`` on operands quantised
beforehand), because FP8Linear's quantisation is plain torch code, not the fused kernels DeepSeek
uses, and the layer time includes it. On a CPU (or any other GPU) it says so and runs the simulated
path (quantise, dequantise, FP32 matmul) at small shapes, which shows what the simulation costs.

The training step builds the same model twice (``ModelConfig.fp8`` off and on, same weights), and
times forward, backward, gradient clipping and an AdamW step on the same batch, as ``workbench.train``
runs them (BF16 autocast on CUDA). With ``fp8=True`` every linear layer and each routed expert runs
its GEMMs through ``FP8Linear`` / ``fp8_linear``; GEMMs whose sizes are not multiples of 128 (small
experts' token counts, most widths of the small presets) take the simulated path even on Hopper.

    python benchmarks/bench_fp8.py                                  # CPU: small shapes, simulated
    python benchmarks/bench_fp8.py --device cuda                    # H100: 4096^3, 8192^3, ... and the gpu preset
    python benchmarks/bench_fp8.py --shapes 2048x7168x2048 --iters 50 --skip-model
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import Model, ModelConfig, fp8  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
CUDA_SHAPES = "4096x4096x4096,8192x8192x8192,16384x7168x2048"
CPU_SHAPES = "256x512x512,512x1024x1024"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Times are medians over --iters passes after --warmup untimed ones.",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument(
        "--shapes",
        default=None,
        help=f"comma-separated MxKxN (default: {CUDA_SHAPES} on CUDA, {CPU_SHAPES} on CPU)",
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="baseline dtype of weights and activations (default: bfloat16 on CUDA, float32 on CPU)",
    )
    parser.add_argument("--iters", type=int, default=None, help="timed passes per layer (default 20 CUDA, 3 CPU)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed passes first (default 2)")
    parser.add_argument(
        "--backend", default="auto", choices=["auto", "simulate"], help="FP8Linear backend (default auto)"
    )
    parser.add_argument("--grad-fmt", default="e4m3", choices=["e4m3", "e5m2"], help="FP8 format of dY")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--preset", default=None, help="model of the training-step comparison (default: gpu on CUDA, tiny on CPU)"
    )
    parser.add_argument(
        "--batch-size", type=int, default=None, help="sequences per training step (default 8 CUDA, 4 CPU)"
    )
    parser.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default 1024 CUDA, 128 CPU)")
    parser.add_argument("--skip-model", action="store_true", help="only the linear-layer shapes, no training step")
    args = parser.parse_args(argv)
    on_cuda = args.device.startswith("cuda")
    if on_cuda and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA GPU; use --device cpu")
    args.shapes = args.shapes or (CUDA_SHAPES if on_cuda else CPU_SHAPES)
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    args.iters = args.iters or (20 if on_cuda else 3)
    args.preset = args.preset or ("gpu" if on_cuda else "tiny")
    args.batch_size = args.batch_size or (8 if on_cuda else 4)
    args.seq_len = args.seq_len or (1024 if on_cuda else 128)
    if args.preset not in ModelConfig.preset_names() or args.preset == "deepseek-v3":
        parser.error(f"--preset must be one of tiny, small, gpu; got {args.preset!r}")
    try:
        args.shape_list = [tuple(int(v) for v in s.lower().split("x")) for s in args.shapes.split(",")]
    except ValueError:
        parser.error(f"--shapes must look like 4096x4096x4096,8192x8192x8192; got {args.shapes!r}")
    if any(len(s) != 3 or min(s) <= 0 for s in args.shape_list):
        parser.error(f"every shape needs three positive sizes MxKxN; got {args.shapes!r}")
    return args


def timed(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fwd_bwd(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        x.grad = None
        layer.zero_grad(set_to_none=True)
        layer(x).backward(grad)

    return step


def gemm_only(m: int, k: int, n: int, device: torch.device, dtype: torch.dtype, args: argparse.Namespace) -> str:
    """Forward GEMM alone: dtype torch.mm against scaled_mm on pre-quantised operands (Hopper only)."""
    x = torch.randn(m, k, device=device, dtype=dtype)  # (M, K)
    w = torch.randn(n, k, device=device, dtype=dtype)  # (N, K)
    x_q, x_s = fp8.quantize(x, fp8.ACTIVATION_BLOCK)  # (M, K), (M, K/128)
    w_q, w_s = fp8.quantize(w, fp8.WEIGHT_BLOCK)  # (N, K), (N/128, K/128)
    t_base = timed(lambda: x @ w.t(), device, args.iters, args.warmup)
    t_fp8 = timed(lambda: fp8._scaled_mm_nt(x_q, x_s, w_q, w_s, fp8.WEIGHT_BLOCK), device, args.iters, args.warmup)
    flops = 2 * m * k * n
    return (
        f"   forward GEMM only: {args.dtype} {t_base * 1e3:8.3f} ms ({flops / t_base / 1e12:6.1f} TFLOP/s)   "
        f"fp8 {t_fp8 * 1e3:8.3f} ms ({flops / t_fp8 / 1e12:6.1f} TFLOP/s)   ratio {t_fp8 / t_base:.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    fast, why = fp8.scaled_mm_support(device)
    print(f"torch {torch.__version__}, device {device}, baseline dtype {args.dtype}, FP8 backend {args.backend}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    if fast and args.backend == "auto":
        print(f"FP8 speed path: {why}")
    else:
        print(f"FP8 speed path NOT used: {why if not fast else 'backend=simulate'}.")
        print("Timing the simulated FP8 path (quantise, dequantise, FP32 matmul): it shows the cost of the")
        print("simulation, not FP8 speed. The speed path needs sm90 (CUDA capability 9.0) and torch's scaled_mm.")
    print()
    unit, per = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    header = (
        f"{'M x K x N':>20}  {args.dtype + ' ms':>13}  {'fp8 ms':>10}  {'fp8/base':>8}  "
        f"{'base ' + unit:>12}  {'fp8 ' + unit:>11}  {'rel err y':>9}  fp8 GEMMs"
    )
    print("forward + backward of one linear layer")
    print(header)
    print("-" * len(header))
    for m, k, n in args.shape_list:
        base = torch.nn.Linear(k, n, bias=False, device=device, dtype=dtype)
        layer = fp8.FP8Linear.from_linear(base, grad_fmt=args.grad_fmt, backend=args.backend)
        x = torch.randn(m, k, device=device, dtype=dtype, requires_grad=True)  # (M, K)
        grad = torch.randn(m, n, device=device, dtype=dtype)  # (M, N)
        with torch.no_grad():
            y_ref, y_fp8 = base(x).float(), layer(x).float()
            rel_err = ((y_fp8 - y_ref).norm() / y_ref.norm()).item()
        t_base = timed(fwd_bwd(base, x, grad), device, args.iters, args.warmup)
        t_fp8 = timed(fwd_bwd(layer, x, grad), device, args.iters, args.warmup)
        flops = 6 * m * k * n  # three GEMMs of 2*M*K*N
        shape_ok = m % 128 == 0 and k % 128 == 0 and n % 128 == 0
        path = "simulated"
        if fast and args.backend == "auto" and shape_ok:
            path = "scaled_mm" if args.grad_fmt == "e4m3" else "scaled_mm fwd, simulated bwd (E5M2)"
        print(
            f"{f'{m}x{k}x{n}':>20}  {t_base * 1e3:13.3f}  {t_fp8 * 1e3:10.3f}  {t_fp8 / t_base:8.2f}  "
            f"{flops / t_base / per:12.2f}  {flops / t_fp8 / per:11.2f}  {rel_err:9.4f}  {path}"
        )
        if path.startswith("scaled_mm"):
            print(gemm_only(m, k, n, device, dtype, args))
        del base, layer, x, grad
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not args.skip_model:
        print()
        train_step(args, device, fast)


def train_step(args: argparse.Namespace, device: torch.device, fast: bool) -> None:
    """A full training step (forward, backward, clipping, AdamW) with fp8=False and fp8=True."""
    config = ModelConfig.from_preset(args.preset)
    ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), device=device)
    torch.manual_seed(args.seed)
    reference = Model(config).to(device)
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    times, losses = {}, {}
    for name, use_fp8 in (("baseline", False), ("fp8", True)):
        model = Model(config.replace(fp8=use_fp8)).to(device).train()
        model.load_state_dict(reference.state_dict())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model: Model = model, opt: torch.optim.Optimizer = opt, name: str = name) -> None:
            with autocast:
                out = model(ids, labels=ids)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses[name] = float(out.loss.detach())

        times[name] = timed(step, device, max(1, args.iters // 2), args.warmup)
        del model, opt
        if device.type == "cuda":
            torch.cuda.empty_cache()
    tokens = args.batch_size * args.seq_len
    base = "bf16 autocast" if device.type == "cuda" else "fp32"
    print(f"full training step: preset {args.preset}, {args.batch_size} x {args.seq_len} tokens, baseline {base}")
    for name, t in times.items():
        print(f"  {name:>8}: {t * 1e3:10.1f} ms/step  {tokens / t:12,.0f} tokens/s  loss {losses[name]:.4f}")
    print(f"  ratio fp8 / baseline: {times['fp8'] / times['baseline']:.2f} (below 1 means FP8 is faster)")
    if not fast:
        print(
            "  FP8 GEMMs were simulated (quantise, dequantise, FP32 matmul): this measures the cost of the\n"
            "  simulation, not FP8 speed. The speed path needs sm90 (CUDA compute capability 9.0, Hopper)."
        )


if __name__ == "__main__":
    main()
