"""Training throughput of workbench.Model against transformers' DeepseekV3ForCausalLM.

Both models get the same config and the same weights (ours are written with ``workbench.io.hf.save_hf``
and read by transformers' ``from_pretrained``), then train for the same number of AdamW steps on the
same random token batches. Steps alternate between the two models (which one goes first alternates
too), the first ``--warmup`` steps are not timed, and the script prints tokens per second for both
and the ratio workbench / transformers (above 1: workbench is faster).

To do the same work, workbench runs without Multi-Token Prediction (``num_nextn_predict_layers=0``);
its loss still adds the tiny sequence-wise balance loss, which transformers does not compute, and
neither model updates the routing bias. transformers uses its defaults: SDPA attention and its
``grouped_mm`` experts kernel where torch has one.

    python benchmarks/bench_train_vs_hf.py                       # tiny preset on CPU
    python benchmarks/bench_train_vs_hf.py --preset small --steps 20
    python benchmarks/bench_train_vs_hf.py --preset gpu --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workbench import Model, ModelConfig  # noqa: E402
from workbench.io.hf import save_hf  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Timings exclude the warmup steps. MTP is disabled in workbench so both models do the same work.",
    )
    parser.add_argument("--preset", default="tiny", choices=ModelConfig.preset_names(), help="model preset")
    parser.add_argument("--steps", type=int, default=20, help="timed optimizer steps per model (default 20)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per batch (default 8)")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES), help="weights and activations")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument(
        "--hf-experts",
        default=None,
        choices=["eager", "grouped_mm", "batched_mm"],
        help="transformers' experts implementation (default: its own choice)",
    )
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


@dataclass
class Runner:
    """One model, its optimizer and how to get a loss out of it."""

    name: str
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step_seconds: list[float] = field(default_factory=list)  # timed steps only
    tokens_per_step: int = 0
    last_loss: float = float("nan")

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        if isinstance(self.model, Model):
            return self.model(ids, labels=ids, compute_mtp=False).loss
        return self.model(input_ids=ids, labels=ids, use_cache=False).loss

    def step(self, ids: torch.Tensor, timed: bool) -> None:
        _sync(ids.device)
        start = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss(ids)
        loss.backward()
        self.optimizer.step()
        _sync(ids.device)
        if timed:
            self.step_seconds.append(time.perf_counter() - start)
            self.tokens_per_step = ids.numel()
        self.last_loss = float(loss.detach())

    @property
    def tokens_per_second(self) -> float:
        """Over all timed steps."""
        total = sum(self.step_seconds)
        return self.tokens_per_step * len(self.step_seconds) / total if total else float("nan")

    @property
    def median_tokens_per_second(self) -> float:
        """From the median step time: robust to a few steps slowed down by other processes."""
        return self.tokens_per_step / statistics.median(self.step_seconds) if self.step_seconds else float("nan")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(args: argparse.Namespace) -> tuple[Runner, Runner]:
    """workbench and transformers models with identical weights, each with its own AdamW."""
    from transformers import DeepseekV3ForCausalLM

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    config = ModelConfig.from_preset(args.preset, num_nextn_predict_layers=0)
    if args.seq_len > config.max_position_embeddings:
        raise SystemExit(f"--seq-len {args.seq_len} exceeds max_position_embeddings={config.max_position_embeddings}")
    torch.manual_seed(args.seed)
    ours = Model(config)
    with tempfile.TemporaryDirectory() as folder:
        save_hf(ours, Path(folder) / "ckpt")
        kwargs = {"attn_implementation": "sdpa", "dtype": dtype}
        if args.hf_experts:
            kwargs["experts_implementation"] = args.hf_experts
        theirs = DeepseekV3ForCausalLM.from_pretrained(Path(folder) / "ckpt", **kwargs)
    ours.to(device)
    for p in ours.parameters():
        p.data = p.data.to(dtype)  # the router bias (a buffer) stays float32, as in transformers
    theirs.to(device)
    ours.train()
    theirs.train()
    runners = []
    for name, model in (("workbench", ours), ("transformers", theirs)):
        optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
        runners.append(Runner(name, model, optimizer))
    return runners[0], runners[1]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ours, theirs = build(args)
    device = torch.device(args.device)
    config = ours.model.config
    gen = torch.Generator().manual_seed(args.seed + 1)
    total = args.warmup + args.steps
    shape = (args.batch_size, args.seq_len)
    batches = [torch.randint(0, config.vocab_size, shape, generator=gen) for _ in range(total)]

    with torch.no_grad():  # same weights -> same starting loss (up to the balance-loss term)
        first = batches[0].to(device)
        start_losses = (float(ours.loss(first)), float(theirs.loss(first)))

    for step, batch in enumerate(batches):
        ids = batch.to(device)
        order = (ours, theirs) if step % 2 == 0 else (theirs, ours)
        for runner in order:
            runner.step(ids, timed=step >= args.warmup)

    n_params = sum(p.numel() for p in ours.model.parameters())
    print(
        f"preset={args.preset} ({n_params / 1e6:.2f}M parameters)  device={args.device}  dtype={args.dtype}  "
        f"threads={torch.get_num_threads()}  batch={args.batch_size}x{args.seq_len}  "
        f"steps={args.steps} timed (+{args.warmup} warmup)  torch {torch.__version__}"
    )
    print("workbench runs with MTP disabled (num_nextn_predict_layers=0) so both models do the same work;")
    print("transformers: attn_implementation=sdpa, experts_implementation=" + str(_experts_impl(theirs.model)))
    print(f"loss at step 0: workbench {start_losses[0]:.4f}  transformers {start_losses[1]:.4f}")
    for runner in (ours, theirs):
        print(
            f"{runner.name:>12}: {runner.tokens_per_second:10.0f} tokens/s mean  "
            f"{runner.median_tokens_per_second:10.0f} tokens/s median-step  "
            f"({statistics.median(runner.step_seconds) * 1e3:8.1f} ms/step median)  final loss {runner.last_loss:.4f}"
        )
    print(
        f"ratio workbench/transformers: {ours.tokens_per_second / theirs.tokens_per_second:.2f}x (mean), "
        f"{ours.median_tokens_per_second / theirs.median_tokens_per_second:.2f}x (median step)"
    )


def _experts_impl(model: torch.nn.Module) -> str:
    return str(getattr(model.config, "_experts_implementation", "unknown"))


if __name__ == "__main__":
    main()
