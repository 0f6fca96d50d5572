"""Peak memory of loading a sharded checkpoint: the streaming loader against the whole-file one, and of a
layer-by-layer forward against the whole model's.

The script writes a synthetic sharded checkpoint under a temporary folder (random weights of a
DeepSeek-V3-shaped config, about ``--gb`` GB in bf16, in shards of ``--shard-mb``), and the same model in
DeepSeek's FP8 layout (E4M3 weights with 128x128 block scales). Each measurement then runs in a fresh
Python process, so that its peak resident set (``ru_maxrss``) is its own; the resident set of the
process after its imports is subtracted, so the figures are what the load itself added:

* ``stream``: ``load_hf`` (the plan, a meta-device skeleton, a fill shard by shard);
* ``whole_files``: what loading did before the plan (kept here to compare against): build the model,
  cast it to the checkpoint's dtype, read every file whole, stack the experts, ``load_state_dict``;
* ``layered`` / ``whole_forward``: one forward pass of ``--batch`` x ``--seq`` tokens through
  ``LayeredModel`` (one decoder layer in memory at a time) and through the streamed whole model.

Every figure is printed side by side with the model's own bytes and the ratio to them. The checkpoints
are deleted at the end (``--keep`` keeps them). This is a benchmark, not a test: it is never part of the
test suite.

    python benchmarks/bench_stream_load.py                 # ~1.1 GB bf16 and its FP8 twin, a few minutes
    python benchmarks/bench_stream_load.py --gb 4 --shard-mb 1024 --skip-fp8
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def synthetic_config(gb: float):
    """A DeepSeek-V3-shaped config whose weights take about ``gb`` GB in bf16 (layers added to reach it)."""
    from workbench.config import ModelConfig
    from workbench.model.accounting import model_bytes

    base = dict(
        vocab_size=32000,
        hidden_size=1024,
        first_k_dense_replace=1,
        intermediate_size=2816,
        moe_intermediate_size=352,
        n_routed_experts=64,
        n_shared_experts=1,
        num_experts_per_tok=6,
        n_group=8,
        topk_group=4,
        num_attention_heads=16,
        q_lora_rank=384,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        max_position_embeddings=512,
        num_nextn_predict_layers=0,
    )
    layers = 2
    while model_bytes(ModelConfig(num_hidden_layers=layers, **base), torch.bfloat16) < gb * 1e9:
        layers += 1
    return ModelConfig(num_hidden_layers=layers, **base)


def write_checkpoint(config, folder: Path, shard_bytes: int, fp8: bool, seed: int = 0) -> int:
    """Random weights tensor by tensor, written shard by shard (the writer never holds the model)."""
    from safetensors.torch import save_file

    from workbench.io.fp8_layout import CHECKPOINT_SKIP, FP8_QUANTIZATION_CONFIG, SCALE_SUFFIX, _quantize_matrices
    from workbench.io.hf import to_hf_state_dict
    from workbench.model import Model

    with torch.device("meta"):
        skeleton = Model(config)
    shapes = {name: tuple(t.shape) for name, t in to_hf_state_dict(skeleton).items()}
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size, total = 0, 0
    weight_map: dict[str, str] = {}

    def flush(last: bool = False) -> None:
        nonlocal size
        if not shards[-1]:
            return
        name = f"model-{len(shards):05d}.safetensors"
        save_file(shards[-1], str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shards[-1], name))
        shards[-1] = {}
        if not last:
            shards.append({})
        size = 0

    for name, shape in shapes.items():
        if name.endswith("e_score_correction_bias"):
            tensors = {name: (0.01 * torch.randn(shape, generator=g)).float()}
        elif name.endswith("norm.weight"):
            tensors = {name: torch.ones(shape, dtype=torch.bfloat16)}
        else:
            w = 0.02 * torch.randn(shape, generator=g)
            skip = any(part in CHECKPOINT_SKIP for part in name.split("."))
            if fp8 and len(shape) == 2 and not skip:
                q, s = _quantize_matrices(w, (128, 128), pow2_scale=False)
                tensors = {name: q, name + SCALE_SUFFIX: s}
            else:
                tensors = {name: w.to(torch.bfloat16)}
        for n, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > shard_bytes:
                flush()
            shards[-1][n] = t
            size += nbytes
            total += nbytes
    flush(last=True)
    n = len(set(weight_map.values()))
    renamed = {}
    for i in range(1, n + 1):
        old, new = f"model-{i:05d}.safetensors", f"model-{i:05d}-of-{n:05d}.safetensors"
        (folder / old).rename(folder / new)
        renamed[old] = new
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in weight_map.items()}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    hf = config.to_hf()
    hf["dtype"] = "bfloat16"
    if fp8:
        hf["quantization_config"] = dict(FP8_QUANTIZATION_CONFIG)
    (folder / "config.json").write_text(json.dumps(hf, indent=2))
    return total


# ---- one measurement, in its own process ------------------------------------------------------------
def _rss_now() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux)


def measure(kind: str, path: Path, batch: int, seq: int) -> dict:
    import warnings

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    from workbench.io.hf import from_hf_state_dict, load_hf
    from workbench.io.layered import LayeredModel
    from workbench.model import Model

    ids = torch.randint(0, 32000, (batch, seq), generator=torch.Generator().manual_seed(0))
    # warm up what any first use loads (torch's meta-device registrations, kernels): imports, not the load
    from workbench.config import ModelConfig

    tiny = ModelConfig.from_preset("tiny")
    with torch.device("meta"):
        Model(tiny)
    with torch.no_grad():
        Model(tiny).eval().to(torch.bfloat16)(ids[:1, :8] % tiny.vocab_size, compute_mtp=False)
    _reset_peak()
    base = _rss_now()
    start = time.perf_counter()
    if kind == "stream":
        model = load_hf(path)
    elif kind == "whole_files":
        from safetensors.torch import load_file

        from workbench.config import ModelConfig
        from workbench.io.fp8_layout import dequantize_state_dict_fp8

        config = ModelConfig.from_hf(path)
        model = Model(config)  # the model, randomly initialised, in float32
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
        tensors = {}
        for f in sorted(path.glob("model-*.safetensors")):
            tensors.update(load_file(str(f)))
        if any(n.endswith("_scale_inv") for n in tensors):
            tensors = dequantize_state_dict_fp8(tensors, dtype=torch.bfloat16)
        model.load_state_dict(from_hf_state_dict(config, tensors), strict=False)
        del tensors
    elif kind == "whole_forward":
        model = load_hf(path)
        with torch.no_grad():
            model(ids, compute_mtp=False)
    elif kind == "layered":
        model = LayeredModel(path)
        model(ids)
    else:
        raise ValueError(kind)
    seconds = time.perf_counter() - start
    return {"kind": kind, "peak_added": _peak() - base, "seconds": seconds}


def run_measurement(kind: str, path: Path, batch: int, seq: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--path", str(path), "--batch", str(batch), "--seq", str(seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=1.05, help="bf16 size of the synthetic model in GB (default: 1.05)")
    p.add_argument("--shard-mb", type=int, default=256, help="shard size in MB (default: 256)")
    p.add_argument("--batch", type=int, default=4, help="sequences per forward pass (default: 4)")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence (default: 128)")
    p.add_argument("--skip-fp8", action="store_true", help="only the bf16 checkpoint")
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: a new folder in /tmp)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, Path(args.path), args.batch, args.seq)))
        return 0
    if args.gb <= 0 or args.shard_mb <= 0 or args.batch < 1 or args.seq < 2:
        p.error("--gb, --shard-mb, --batch must be positive and --seq at least 2")

    from workbench.model.accounting import format_bytes, model_bytes

    config = synthetic_config(args.gb)
    model_size = model_bytes(config, torch.bfloat16)
    root = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-stream-", dir="/tmp"))
    print(
        f"synthetic model: {config.num_hidden_layers} layers, {config.n_routed_experts} experts, "
        f"{format_bytes(model_size)} in bf16; checkpoints under {root}"
    )
    rows = []
    try:
        layouts = [("bf16", False)] + ([] if args.skip_fp8 else [("fp8", True)])
        for label, fp8 in layouts:
            folder = root / label
            t0 = time.perf_counter()
            stored = write_checkpoint(config, folder, args.shard_mb * 1024**2, fp8)
            shards = len(list(folder.glob("model-*.safetensors")))
            print(f"{label}: wrote {format_bytes(stored)} in {shards} shards ({time.perf_counter() - t0:.0f} s)")
            for kind in ("stream", "whole_files", "whole_forward", "layered"):
                r = run_measurement(kind, folder, args.batch, args.seq)
                r["layout"] = label
                rows.append(r)
                print(
                    f"  {kind:14s} peak +{format_bytes(r['peak_added']):>10s}  = {r['peak_added'] / model_size:5.2f}x "
                    f"the model  ({r['seconds']:.1f} s)"
                )
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print("\nlayout  loader         peak added   x model   seconds")
    for r in rows:
        print(
            f"{r['layout']:6s}  {r['kind']:13s}  {format_bytes(r['peak_added']):>10s}  "
            f"{r['peak_added'] / model_size:7.2f}  {r['seconds']:8.1f}"
        )
    by = {(r["layout"], r["kind"]): r["peak_added"] for r in rows}
    for label in {r["layout"] for r in rows}:
        s, w = by[(label, "stream")], by[(label, "whole_files")]
        lay, fwd = by[(label, "layered")], by[(label, "whole_forward")]
        print(
            f"{label}: streaming peak {s / model_size:.2f}x the model ({w / s:.2f}x less than reading whole files); "
            f"layer-by-layer forward {lay / model_size:.2f}x ({fwd / lay:.1f}x less than the whole model's)"
        )
    if not math.isfinite(model_size):
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
