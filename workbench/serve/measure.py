"""Measuring a server from the outside: throughput against concurrency, and time to first token on a prefix hit.

What a user of an API feels is measured over HTTP with the real ``openai`` client, the way any client would
call it, against a server started in this process (``in_process``: an ``Engine`` and the app on a free
loopback port, ``server.Background``). Two measurements, each repeated so a lesson can put noise on it:

* ``throughput(client, model, n_requests, clients, max_tokens)``: ``n_requests`` greedy completions spread
  over ``clients`` concurrent callers; requests/s and completion tokens/s. Concurrent requests decode in one
  running batch (``engine``), so a decoding step serves many rows for about the price of one: throughput
  grows with concurrency until the batch's compute, not the weights' reading, is the cost.
* ``prefix_trial(client, model, tokenizer, context, trial)``: time to the first streamed token of a prompt
  whose long prefix (most of the context) no earlier request had (a *miss*: the whole prompt is
  prefilled), then of a second prompt with the same prefix (a *hit*: the prefix cache hands back its
  latent KV and only the short question is prefilled), with the cached tokens each response reports.

Where it simplifies: client and server share this machine's cores, so absolute times include the client's
own work and the HTTP stack; the ratios are what carry over. A hit's time still includes the network
round trip and the first decoding step, which no cache removes.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

QUESTIONS = ("What is 4 5 + 1 2?", "What is 7 - 3?", "Sort these numbers: 5, 2, 9.", "What is 1 2 + 3 0 + 4?")


@dataclass
class Live:
    """A server running in this process: its URL, its engine, and an ``openai`` client for it."""

    url: str
    engine: object
    client: object
    model_id: str


@contextmanager
def in_process(model, *, model_id: str = "workbench", max_batch: int = 16, prefix_cache_bytes: int = 64 << 20,
               timeout: float = 600.0) -> Iterator[Live]:  # fmt: skip
    """Serve ``model`` on a free loopback port for the block (engine and server stopped at its end)."""
    import openai

    from workbench.io.tokenizer import tokenizer_of
    from workbench.serve.engine import Engine, EngineConfig
    from workbench.serve.server import Background, ServeConfig, Server, create_app

    engine = Engine(model, EngineConfig(max_batch=max_batch, prefix_cache_bytes=prefix_cache_bytes)).start()
    bg = None
    try:
        server = Server(engine, tokenizer_of(model), [], ServeConfig(model_id=model_id, request_timeout=timeout))
        bg = Background(create_app(server))
        client = openai.OpenAI(base_url=bg.url + "/v1", api_key="unused", max_retries=0, timeout=timeout)
        yield Live(bg.url, engine, client, model_id)
    finally:
        if bg is not None:
            bg.stop()
        engine.stop()


def throughput(client, model: str, n_requests: int, clients: int, max_tokens: int,
               questions: Sequence[str] = QUESTIONS) -> dict[str, float]:  # fmt: skip
    """``n_requests`` greedy completions over ``clients`` concurrent callers: requests/s, tokens/s, seconds."""
    if n_requests < 1 or clients < 1 or max_tokens < 1:
        raise ValueError(f"n_requests, clients and max_tokens must be >= 1, got {n_requests}, {clients}, {max_tokens}")

    def one(i: int) -> int:
        r = client.completions.create(model=model, prompt=questions[i % len(questions)], max_tokens=max_tokens,
                                      temperature=0)  # fmt: skip
        return r.usage.completion_tokens

    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(n_requests)))
    dt = time.perf_counter() - t
    return {"clients": clients, "requests_per_s": n_requests / dt, "tokens_per_s": tokens / dt, "seconds": dt,
            "tokens": tokens}  # fmt: skip


def ttft(client, model: str, prompt: str, max_tokens: int = 4) -> tuple[float, int]:
    """Seconds to the first streamed chunk of text, and the cached prompt tokens the final usage reports."""
    t = time.perf_counter()
    first, cached = None, 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    for chunk in stream:
        if first is None and chunk.choices:
            first = time.perf_counter() - t
        if chunk.usage is not None:
            details = getattr(chunk.usage, "prompt_tokens_details", None)
            cached = (getattr(details, "cached_tokens", 0) or 0) if details else 0
    return (first if first is not None else time.perf_counter() - t), cached


def long_prefix(tokenizer, context: int, trial: int, room: int = 40) -> str:
    """A prefix of about ``context - room`` tokens, different for every ``trial`` (so it starts as a miss)."""
    filler = " ".join(str(d) for d in range(10)) + " "
    n = max(1, (context - room) // max(1, len(tokenizer.encode(filler))))
    return f"Note {trial} {trial}: " + filler * n


def prefix_trial(client, model: str, tokenizer, context: int, trial: int,
                 questions: Sequence[str] = QUESTIONS) -> dict[str, float]:  # fmt: skip
    """One paired trial: a new long prefix + a question (miss), then the same prefix + another (hit)."""
    prefix = long_prefix(tokenizer, context, trial)
    miss, miss_cached = ttft(client, model, prefix + questions[0])
    hit, hit_cached = ttft(client, model, prefix + questions[1])
    return {"miss_s": miss, "hit_s": hit, "miss_cached": miss_cached, "hit_cached": hit_cached,
            "prefix_tokens": len(tokenizer.encode(prefix))}  # fmt: skip


__all__ = ["QUESTIONS", "Live", "in_process", "long_prefix", "prefix_trial", "throughput", "ttft"]
