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
  cache holds (only the question is prefilled). Medians over ``--ttft-trials``.

Aims (issue 12): >= 3x one-at-a-time throughput at 16 clients on the CPU; a prefix hit >= 3x faster to the
first token on a long shared prefix. Printed as measured, met or not.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

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
    args = p.parse_args()
    if args.requests < 1 or args.max_tokens < 1 or args.ttft_trials < 1:
        p.error("--requests, --max-tokens and --ttft-trials must be >= 1")

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

        # a shared prefix filling most of the context, then a short question
        context = model.config.max_position_embeddings
        trials = [prefix_trial(client, "bench", tok, context, t) for t in range(args.ttft_trials)]
        miss = statistics.median(t["miss_s"] for t in trials)
        hit = statistics.median(t["hit_s"] for t in trials)
        cached = statistics.median(t["hit_cached"] for t in trials)
        prefix_len = trials[-1]["prefix_tokens"]
        print(f"time to first token, prefix of {prefix_len} tokens (context {context}), median of {args.ttft_trials}:")
        print(f"  miss {miss * 1e3:.1f} ms, hit {hit * 1e3:.1f} ms, ratio {miss / hit:.2f}x; cached tokens "
              f"reported on hits: {cached:.0f}")  # fmt: skip
        print(f"aim >= 3x faster to first token with a hit: {'met' if miss / hit >= 3 else 'not met'}")
        print("engine metrics:", live.engine.metrics())


if __name__ == "__main__":
    main()
