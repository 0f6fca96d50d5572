"""Serving benchmark: throughput against concurrency, and time to first token with and without a prefix hit.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py [--model data/tiny-model] [--requests 32] [--max-tokens 32]

Everything runs in one process, side by side, so the ratios hold on a shared machine even when the absolute
times do not: the server (``workbench.serve``) on a free loopback port, driven by the real ``openai`` client
(the measurements are ``workbench.serve.measure``'s, which lesson 10 uses too).

* Throughput: ``--requests`` completions sent one at a time, then by 4 and by 16 concurrent clients;
  requests/s and completion tokens/s, and each as a ratio to one-at-a-time. Concurrent requests decode in one
  running batch, so a decoding step serves many rows for about the price of one.
* Time to first token (streamed): a long shared prefix (most of the context) followed by a short question.
  A *miss* gets a prefix no earlier request had (the prefix cache must prefill it); a *hit* repeats one the
  cache holds (only the question is prefilled). Medians over ``--ttft-trials``. Measured on ``--model`` (its
  own context), then on a long context: a ``--long-preset`` model with ``--long-context`` positions, freshly
  initialised (its weights do not matter to a time; the shipped tokenizer), since the shipped model's context
  is too short for a prefill to cost much next to the fixed cost of a request.

Aims (issue 12): >= 3x one-at-a-time throughput at 16 clients on the CPU; a prefix hit >= 3x faster to the
first token on a long shared prefix. Printed as measured, met or not.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from workbench import Model, ModelConfig
from workbench.io.hf import load_hf
from workbench.io.tokenizer import tokenizer_of
from workbench.serve.measure import in_process, prefix_trial, throughput

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(ROOT / "data" / "tiny-model"))
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--ttft-trials", type=int, default=5)
    p.add_argument("--long-preset", default="small", help="preset of the long-context TTFT model ('none' skips it)")
    p.add_argument("--long-context", type=int, default=2048, help="positions of the long-context TTFT model")
    args = p.parse_args()
    if args.requests < 1 or args.max_tokens < 1 or args.ttft_trials < 1:
        p.error("--requests, --max-tokens and --ttft-trials must be >= 1")
    if args.long_preset != "none" and args.long_preset not in ModelConfig.preset_names():
        p.error(f"--long-preset must be 'none' or one of {ModelConfig.preset_names()}, got {args.long_preset!r}")
    if not 64 <= args.long_context <= 32768:
        p.error(f"--long-context must be between 64 and 32768 positions, got {args.long_context}")

    model = load_hf(args.model)
    tok = tokenizer_of(model)
    with in_process(model, model_id="bench", max_batch=16) as live:
        client = live.client
        throughput(client, "bench", 4, 4, args.max_tokens)  # warm-up
        one = throughput(client, "bench", args.requests, 1, args.max_tokens)
        base_rps, base_tps = one["requests_per_s"], one["tokens_per_s"]
        print(f"{'clients':>8} {'req/s':>8} {'tok/s':>8} {'x req/s':>8} {'x tok/s':>8}")
        print(f"{1:>8} {base_rps:8.2f} {base_tps:8.1f} {1.0:8.2f} {1.0:8.2f}")
        ratio16 = None
        for c in (4, 16):
            r = throughput(client, "bench", args.requests, c, args.max_tokens)
            rps, tps = r["requests_per_s"], r["tokens_per_s"]
            print(f"{c:>8} {rps:8.2f} {tps:8.1f} {rps / base_rps:8.2f} {tps / base_tps:8.2f}")
            ratio16 = tps / base_tps
        print(f"aim >= 3x tokens/s at 16 clients: {'met' if ratio16 >= 3 else 'not met'} ({ratio16:.2f}x)")

        ttft_ratio(client, tok, model.config.max_position_embeddings, args.ttft_trials, "the served model")
        print("engine metrics:", live.engine.metrics())
    if args.long_preset != "none":
        torch.manual_seed(0)
        config = ModelConfig.from_preset(args.long_preset, max_position_embeddings=args.long_context)
        long_model = Model(config).eval()
        with in_process(long_model, model_id="bench", max_batch=4) as live:
            ttft_ratio(live.client, tokenizer_of(long_model), args.long_context, args.ttft_trials,
                       f"a fresh {args.long_preset!r} model")  # fmt: skip


def ttft_ratio(client, tok, context: int, trials_n: int, what: str) -> float:
    """A shared prefix filling most of the context, then a short question: miss against hit, medians."""
    prefix_trial(client, "bench", tok, context, -1)  # warm-up at this length
    trials = [prefix_trial(client, "bench", tok, context, t) for t in range(trials_n)]
    miss = statistics.median(t["miss_s"] for t in trials)
    hit = statistics.median(t["hit_s"] for t in trials)
    cached = statistics.median(t["hit_cached"] for t in trials)
    prefix_len = trials[-1]["prefix_tokens"]
    print(f"time to first token on {what}, prefix of {prefix_len} tokens (context {context}), median of {trials_n}:")
    print(f"  miss {miss * 1e3:.1f} ms, hit {hit * 1e3:.1f} ms, ratio {miss / hit:.2f}x; cached tokens "
          f"reported on hits: {cached:.0f}")  # fmt: skip
    print(f"  aim >= 3x faster to first token with a hit: {'met' if miss / hit >= 3 else 'not met'}")
    return miss / hit


if __name__ == "__main__":
    main()
