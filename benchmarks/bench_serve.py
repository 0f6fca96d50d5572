"""Serving benchmark: throughput against concurrency, and time to first token with and without a prefix hit.

    OMP_NUM_THREADS=1 python benchmarks/bench_serve.py [--model data/tiny-model] [--requests 32] [--max-tokens 32]

Everything runs in one process, side by side, so the ratios hold on a shared machine even when the absolute
times do not: the server (``workbench.serve``) on a free loopback port, driven by the real ``openai`` client.

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
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai

from workbench.io.hf import load_hf
from workbench.io.tokenizer import tokenizer_of
from workbench.serve.engine import Engine, EngineConfig
from workbench.serve.server import Background, ServeConfig, Server, create_app

ROOT = Path(__file__).resolve().parent.parent
QUESTIONS = ["What is 4 5 + 1 2?", "What is 7 - 3?", "Sort these numbers: 5, 2, 9.", "What is 1 2 + 3 0 + 4?"]


def throughput(client, n_requests: int, clients: int, max_tokens: int) -> tuple[float, float]:
    """requests/s and completion tokens/s for n_requests spread over `clients` concurrent callers."""

    def one(i: int) -> int:
        r = client.completions.create(model="bench", prompt=QUESTIONS[i % len(QUESTIONS)], max_tokens=max_tokens,
                                      temperature=0)  # fmt: skip
        return r.usage.completion_tokens

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(n_requests)))
    dt = time.perf_counter() - t
    return n_requests / dt, tokens / dt


def ttft(client, prompt: str) -> tuple[float, int]:
    """Seconds to the first streamed chunk, and the cached prompt tokens the final usage reports."""
    t = time.perf_counter()
    first = None
    cached = 0
    stream = client.completions.create(model="bench", prompt=prompt, max_tokens=4, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - t
        if chunk.usage is not None:
            details = getattr(chunk.usage, "prompt_tokens_details", None)
            cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
    return (first if first is not None else time.perf_counter() - t), cached


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
    engine = Engine(model, EngineConfig(max_batch=16)).start()
    bg = Background(create_app(Server(engine, tok, [], ServeConfig(model_id="bench"))))
    client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0, timeout=600)
    try:
        throughput(client, 4, 4, args.max_tokens)  # warm-up
        base_rps, base_tps = throughput(client, args.requests, 1, args.max_tokens)
        print(f"{'clients':>8} {'req/s':>8} {'tok/s':>8} {'x req/s':>8} {'x tok/s':>8}")
        print(f"{1:>8} {base_rps:8.2f} {base_tps:8.1f} {1.0:8.2f} {1.0:8.2f}")
        ratio16 = None
        for c in (4, 16):
            rps, tps = throughput(client, args.requests, c, args.max_tokens)
            print(f"{c:>8} {rps:8.2f} {tps:8.1f} {rps / base_rps:8.2f} {tps / base_tps:8.2f}")
            ratio16 = tps / base_tps
        print(f"aim >= 3x tokens/s at 16 clients: {'met' if ratio16 >= 3 else 'not met'} ({ratio16:.2f}x)")

        # a shared prefix filling most of the context, then a short question
        context = model.config.max_position_embeddings
        filler = " ".join(f"{d}" for d in range(10)) + " "
        n_fill = max(1, (context - 40) // max(1, len(tok.encode(filler))))
        misses, hits, cached = [], [], []
        for trial in range(args.ttft_trials):
            prefix = f"Note {trial} {trial}: " + filler * n_fill  # new each trial: nothing cached yet
            prefix_len = len(tok.encode(prefix))
            m, _ = ttft(client, prefix + QUESTIONS[0])
            h, c = ttft(client, prefix + QUESTIONS[1])  # same prefix: a hit
            misses.append(m)
            hits.append(h)
            cached.append(c)
        miss, hit = statistics.median(misses), statistics.median(hits)
        print(f"time to first token, prefix of {prefix_len} tokens (context {context}), median of {args.ttft_trials}:")
        print(f"  miss {miss * 1e3:.1f} ms, hit {hit * 1e3:.1f} ms, ratio {miss / hit:.2f}x; cached tokens "
              f"reported on hits: {statistics.median(cached):.0f}")  # fmt: skip
        print(f"aim >= 3x faster to first token with a hit: {'met' if miss / hit >= 3 else 'not met'}")
        print("engine metrics:", engine.metrics())
    finally:
        bg.stop()
        engine.stop()


if __name__ == "__main__":
    main()
