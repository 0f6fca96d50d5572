"""Distributed training on this machine: tokens/s for 1, 2 and 4 processes at a fixed global batch (DDP and
FSDP2 on gloo), the all-to-all bytes per token of expert parallelism with and without the node limit, and,
on a GPU, single-GPU bf16 training against transformers with MFU and the NCCL path.

Data parallel keeps the *global* batch fixed (``--batch-size`` sequences of ``--seq-len`` tokens per step,
split over the processes), so the runs do the same work per step and the ratio of tokens/s says what the
extra processes buy. On a machine with fewer cores than processes they compete for the cores and the
collectives run over the loopback, so more processes can be slower: the script prints the core count.
Each configuration runs in the same invocation, one after the other; the first ``--warmup`` steps of
each run are not timed (tokens/s from the median step time).

Expert parallelism: the MoE layers' experts are split over 4 ranks in 2 "nodes" of 2, tokens routed by
the untrained router (near-uniform) with and without node-limited routing (M = 1 node), and the copies
and bytes per token per MoE layer counted from the real exchanges are printed beside the closed form.

On CUDA (``--gpu``): the ``gpu`` preset trained with bf16 autocast (fp32 master weights, ``grouped_mm``
experts) by workbench and by transformers' DeepseekV3ForCausalLM from the same weights, steps interleaved
(``bench_train_vs_hf.build``), tokens/s and MFU (training FLOPs per token from ``model.accounting`` times
tokens/s over ``--peak-tflops``); then the data-parallel loop on an NCCL group of one GPU.

    python benchmarks/bench_dist.py                     # CPU: 1, 2, 4 processes, DDP and FSDP2; traffic
    python benchmarks/bench_dist.py --quick             # fewer steps, 1 and 2 processes
    python benchmarks/bench_dist.py --gpu --steps 20    # one GPU: MFU against transformers, NCCL
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from workbench import Model, ModelConfig  # noqa: E402
from workbench.dist.comm import expected_traffic  # noqa: E402
from workbench.dist.process import launch  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=ModelConfig.preset_names())
    p.add_argument("--steps", type=int, default=12, help="steps per run, warmup included (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed first steps (default 2)")
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences (default 16)")
    p.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default 64)")
    p.add_argument("--processes", default="1,2,4", help="process counts (default 1,2,4)")
    p.add_argument("--quick", action="store_true", help="6 steps, 1 and 2 processes")
    p.add_argument("--gpu", action="store_true", help="the single-GPU MFU comparison and the NCCL path")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100/H200: 989)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.processes = 6, "1,2"
    if args.steps <= args.warmup:
        raise SystemExit(f"--steps {args.steps} must exceed --warmup {args.warmup}")
    return args


def _dataset():
    from workbench.data import TokenDataset, generate_corpus
    from workbench.io.tokenizer import load_tokenizer

    return TokenDataset.from_documents(generate_corpus(400, seed=0), load_tokenizer(), seed=0)


def _train(dataset, preset: str, parallel: str, steps: int, batch: int, seq_len: int, device: str = "cpu"):
    """One run in this process (of a group or alone): the wall time of each step and the losses."""
    from workbench.train import TrainConfig, train

    tc = TrainConfig(steps=steps, batch_size=batch, seq_len=seq_len, warmup_steps=1, eval_every=0, eval_batches=1,
                     device=device, parallel=parallel)  # fmt: skip
    torch.manual_seed(0)
    res = train(ModelConfig.from_preset(preset), tc, dataset=dataset, progress=False)
    elapsed = [r["elapsed_s"] for r in res.metrics]
    return {"steps": [b - a for a, b in zip([0.0, *elapsed[:-1]], elapsed)], "loss": res.metrics[-1]["loss"]}


def data_parallel(args: argparse.Namespace) -> None:
    dataset = _dataset()
    counts = [int(n) for n in args.processes.split(",")]
    print(f"data parallel: preset={args.preset}, global batch {args.batch_size}x{args.seq_len} tokens per step, "
          f"{args.steps} steps ({args.warmup} untimed), {os.cpu_count()} CPU cores, gloo, 1 thread each")  # fmt: skip
    base = None
    print(f"{'processes':>9} {'mode':>5} {'tokens/s':>10} {'vs 1 process':>13} {'final loss':>11}")
    for n in counts:
        if args.batch_size % n:
            print(f"{n:>9} skipped: batch {args.batch_size} does not split over {n}")
            continue
        for mode in ("none",) if n == 1 else ("ddp", "fsdp"):
            out = launch(_train, n, dataset, args.preset, mode, args.steps, args.batch_size, args.seq_len)[0]
            step = statistics.median(out["steps"][args.warmup :])
            tps = args.batch_size * args.seq_len / step
            base = base or tps
            print(f"{n:>9} {mode:>5} {tps:10.0f} {tps / base:12.2f}x {out['loss']:11.4f}")


def _traffic(max_nodes: int | None, tokens: int, config: ModelConfig):
    import torch.distributed as dist

    from workbench.dist.expert_parallel import global_traffic, shard_experts

    torch.manual_seed(0)
    model = Model(config)
    shard_experts(model, ranks_per_node=2, max_nodes=max_nodes)
    gen = torch.Generator().manual_seed(10 + dist.get_rank())
    ids = torch.randint(0, config.vocab_size, (8, tokens // 8), generator=gen)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(ids)
    return global_traffic(model).per_token() | {"forward_s": time.perf_counter() - t0}


def expert_traffic() -> None:
    config = ModelConfig.from_preset("tiny", n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=4)
    print(f"\nexpert parallel: {config.n_routed_experts} experts, top-{config.num_experts_per_tok}, 4 ranks in 2 nodes "
          f"of 2, hidden {config.hidden_size} float32 ({config.hidden_size * 4} bytes per copy); per token per MoE "
          "layer, dispatch (the combine sends as much back)")  # fmt: skip
    print(f"{'node limit':>10} {'copies self':>12} {'same node':>10} {'other node':>11} {'B other node':>13} "
          f"{'B two-hop':>10} {'B no dedup':>11} {'max nodes':>10} {'closed form other node':>23}")  # fmt: skip
    for max_nodes in (None, 1):
        got = launch(_traffic, 4, max_nodes, 2048, config)[0]
        want = expected_traffic(16, 4, 4, 2, n_group=4, topk_group=4, max_nodes=max_nodes)
        print(f"{str(max_nodes or 'none'):>10} {got['copies_to_self']:12.3f} {got['copies_intra_node']:10.3f} "
              f"{got['copies_inter_node']:11.3f} {got['bytes_inter_node']:13.1f} "
              f"{got['bytes_inter_node_two_hop']:10.1f} "
              f"{got['bytes_without_dedup']:11.1f} {got['max_nodes_per_token']:10.0f} "
              f"{want['copies_inter_node']:14.3f} copies")  # fmt: skip


def gpu(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("\n--gpu: no CUDA device here; the single-GPU MFU comparison and the NCCL path need one")
        return
    import bench_train_vs_hf as hf_bench

    from workbench.model.accounting import flops_per_token

    hf_args = hf_bench.parse_args(["--preset", "gpu", "--device", "cuda", "--dtype", "float32",
                                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len)])  # fmt: skip
    ours, theirs = hf_bench.build(hf_args)
    config = ours.model.config
    gen = torch.Generator().manual_seed(1)
    for step in range(args.steps):
        ids = torch.randint(0, config.vocab_size, (args.batch_size, args.seq_len), generator=gen).cuda()
        for runner in (ours, theirs) if step % 2 == 0 else (theirs, ours):
            with torch.autocast("cuda", dtype=torch.bfloat16):  # fp32 master weights, bf16 matmuls: as the loop
                runner.step(ids, timed=step >= args.warmup)
    flops = flops_per_token(config, context=args.seq_len // 2, training=True)["total"]
    print(f"\nsingle GPU ({torch.cuda.get_device_name()}): preset gpu, bf16 autocast, batch {args.batch_size}x"
          f"{args.seq_len}, {flops / 1e9:.2f} GFLOP per token (training), peak {args.peak_tflops} TFLOP/s")  # fmt: skip
    for runner in (ours, theirs):
        tps = runner.median_tokens_per_second
        print(f"{runner.name:>12}: {tps:10.0f} tokens/s  MFU {tps * flops / (args.peak_tflops * 1e12):6.1%}")
    print(f"ratio workbench/transformers: {ours.median_tokens_per_second / theirs.median_tokens_per_second:.2f}x")
    del ours, theirs
    torch.cuda.empty_cache()
    dataset = _dataset()
    out = _train(dataset, "gpu", "ddp", args.steps, args.batch_size, args.seq_len, device="cuda")
    step = statistics.median(out["steps"][args.warmup :])
    print(
        f"NCCL group of one, DDP through the training loop: {args.batch_size * args.seq_len / step:.0f} tokens/s, "
        f"final loss {out['loss']:.4f}"
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.gpu:
        gpu(args)
        return
    data_parallel(args)
    expert_traffic()


if __name__ == "__main__":
    main()
