"""Continuous batching: requests join and leave one running batch that decodes on the latent KV cache.

Serving one request at a time leaves a CPU or GPU mostly idle: a decoding step of a small batch costs about
what a step of one row costs (the weights are read once either way). The engine therefore keeps a single
*running batch*. A scheduler thread loops:

1. **Admit.** Waiting requests (up to ``max_batch`` rows in all) are prefilled one by one on a fresh cache,
   after a ``PrefixCache`` lookup that skips the tokens an earlier request already computed. The row's
   first token comes out of its prefill, and its cache joins the batch's (``KVCache.concat``, which pads
   the shorter rows on the left; ``KVCache.valid`` and the model's per-row positions keep each row
   computing exactly what it would alone).
2. **Step.** One forward of the model over every row's last token: (B, 1) -> logits (B, V); each row is
   sampled with its own settings and generator (greedy rows take the argmax).
3. **Leave.** Rows that met a stop token, their ``max_tokens``, their deadline, or whose client went away
   (``cancel``) are dropped from the batch (``KVCache.select``, which also trims slots nobody uses).

Greedy outputs are therefore token-identical to ``workbench.model.generate.generate`` whatever else is in
the batch (tested): the prefill is the same computation, and padded decoding equals unpadded decoding up to
float rounding. The queue is bounded: ``submit`` raises ``QueueFull`` (the server's 429) when
``max_waiting`` requests already wait. Events reach the caller through a callback run on the engine's
thread (the server hands them to its event loop).

Simplifications: prefills are not batched with each other or chunked (a long prompt holds the batch for
its prefill), there is no preemption, and memory is bounded by ``max_batch`` rows of the model's context
rather than by a paged allocator.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from workbench.model.generate import check_sampling, inference_attn_mode, sample_next
from workbench.model.mla import KVCache
from workbench.serve.cache import PrefixCache, model_fingerprint


class QueueFull(RuntimeError):
    """The engine's waiting queue is full; try again later (HTTP 429)."""


@dataclass
class EngineConfig:
    max_batch: int = 16  # rows that decode together
    max_waiting: int = 64  # requests allowed to wait for a slot; more are refused (429)
    prefix_cache_bytes: int = 64 << 20  # bytes of latent KV kept for prefix reuse (0: no prefix cache)
    attn_mode: str | None = None  # None: the inference default (absorbed MLA, workbench.model.generate)

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_waiting", "prefix_cache_bytes"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "prefix_cache_bytes" else 1):
                raise ValueError(f"{name} must be an integer >= {0 if name == 'prefix_cache_bytes' else 1}, got {v!r}")
        inference_attn_mode(self.attn_mode)


@dataclass
class Request:
    """One sequence to continue. ``on_event(kind, value)``: ("token", id), then ("done", finish_reason) or
    ("error", message); finish_reason is "stop", "length", "timeout" or "cancelled"."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_ids: tuple[int, ...] = ()
    seed: int | None = None
    deadline: float | None = None  # time.monotonic() past which the request ends with "timeout"
    on_event: Callable[[str, object], None] | None = None
    tokens: list[int] = field(default_factory=list)
    cached_tokens: int = 0
    finish_reason: str | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _generator: torch.Generator | None = None

    def cancel(self) -> None:
        """Leave the batch at the next step (the client went away, or a stop string was met)."""
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def _emit(self, kind: str, value: object) -> None:
        if self.on_event is not None:
            self.on_event(kind, value)


class Engine:
    """The scheduler thread, its waiting queue and running batch. ``start()``, ``submit()``, ``stop()``."""

    def __init__(self, model, config: EngineConfig | None = None, prefix_cache: PrefixCache | None = None) -> None:
        self.model = model.eval()
        self.config = config or EngineConfig()
        self.mode = inference_attn_mode(self.config.attn_mode)
        self.context = model.config.max_position_embeddings
        self.prefix = prefix_cache or PrefixCache(self.config.prefix_cache_bytes, model_fingerprint(model))
        self._waiting: deque[Request] = deque()
        self._running: list[Request] = []
        self._cache = KVCache()
        self._last: list[int] = []  # the last token of every running row
        self._cond = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.counters = {"requests": 0, "finished": 0, "refused": 0, "steps": 0, "step_rows": 0, "tokens": 0}

    # ---- the caller's side ------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="workbench-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def check(self, req: Request) -> None:
        """Refuse a request that cannot run, with the field and the fix (ValueError)."""
        if not req.prompt:
            raise ValueError("prompt: it holds no tokens")
        if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {req.max_tokens!r}")
        if len(req.prompt) >= self.context:
            raise ValueError(f"prompt: {len(req.prompt)} tokens do not fit the context of {self.context}; shorten it")
        if len(req.prompt) + req.max_tokens > self.context:
            raise ValueError(
                f"max_tokens: {len(req.prompt)} prompt tokens + {req.max_tokens} exceed the context of {self.context};"
                f" ask for at most {self.context - len(req.prompt)}"
            )
        check_sampling(req.temperature, req.top_p)

    def submit(self, req: Request) -> Request:
        """Queue a request (checked first); raises ValueError for a bad one, QueueFull when the queue is full."""
        self.check(req)
        if req.temperature > 0:
            g = torch.Generator(device=self.model.device)
            req._generator = g.manual_seed(req.seed) if req.seed is not None else g.manual_seed(int(g.seed()))
        with self._cond:
            if len(self._waiting) >= self.config.max_waiting:
                self.counters["refused"] += 1
                raise QueueFull(f"{len(self._waiting)} requests are waiting already; retry later")
            self.counters["requests"] += 1
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def generate(self, req: Request, timeout: float | None = None) -> Request:
        """Submit and wait (for scripts and tests): the finished request."""
        done = threading.Event()
        inner = req.on_event

        def on_event(kind: str, value: object) -> None:
            if inner is not None:
                inner(kind, value)
            if kind in ("done", "error"):
                done.set()

        req.on_event = on_event
        self.submit(req)
        if not done.wait(timeout):
            req.cancel()
            raise TimeoutError(f"the request did not finish within {timeout} s")
        return req

    def metrics(self) -> dict[str, float | int]:
        c = dict(self.counters)
        c["running"], c["waiting"] = len(self._running), len(self._waiting)
        c["mean_batch"] = c["step_rows"] / c["steps"] if c["steps"] else 0.0
        c["max_batch"] = self.config.max_batch
        return c

    # ---- the scheduler thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stop and not self._waiting and not self._running:
                    self._cond.wait(timeout=0.5)
                if self._stop:
                    break
                admit = []
                while self._waiting and len(self._running) + len(admit) < self.config.max_batch:
                    admit.append(self._waiting.popleft())
            try:
                with torch.no_grad():
                    for req in admit:
                        self._admit(req)
                    if self._running:
                        self._step()
            except Exception as e:  # never let one bad step kill the server: fail the batch, start afresh
                for req in self._running:
                    self._finish(req, None, error=f"the engine failed: {type(e).__name__}: {e}")
                self._running, self._last, self._cache = [], [], KVCache()
        for req in [*self._running, *self._waiting]:
            self._finish(req, None, error="the server is shutting down")

    def _admit(self, req: Request) -> None:
        if self._ended(req, None):
            return
        n, entries = (0, None)
        if self.prefix.max_bytes:
            n, entries = self.prefix.lookup(req.prompt, limit=len(req.prompt) - 1)
        req.cached_tokens = n
        cache = KVCache.from_rows([entries]) if entries else KVCache()
        ids = torch.tensor([req.prompt[n:]], dtype=torch.long, device=self.model.device)  # (1, T - n)
        logits = self.model(ids, cache=cache, attn_mode=self.mode).logits[:, -1]  # (1, V)
        if self.prefix.max_bytes:
            self.prefix.store(req.prompt, cache.row(0))
        token = self._sample(req, logits)[0]
        if self._ended(req, token):
            return
        self._cache = KVCache.concat([self._cache, cache]) if self._running else cache
        self._running.append(req)
        self._last.append(token)

    def _step(self) -> None:
        ids = torch.tensor(self._last, dtype=torch.long, device=self.model.device)[:, None]  # (B, 1)
        logits = self.model(ids, cache=self._cache, attn_mode=self.mode).logits[:, -1]  # (B, V)
        self.counters["steps"] += 1
        self.counters["step_rows"] += len(self._running)
        greedy = logits.argmax(dim=-1).tolist()  # (B,)
        keep = []
        for b, req in enumerate(self._running):
            token = greedy[b] if req.temperature == 0 else self._sample(req, logits[b : b + 1])[0]
            if not self._ended(req, token):
                keep.append(b)
                self._last[b] = token
        if len(keep) < len(self._running):
            self._running = [self._running[b] for b in keep]
            self._last = [self._last[b] for b in keep]
            self._cache = self._cache.select(keep) if keep else KVCache()

    def _sample(self, req: Request, logits: torch.Tensor) -> list[int]:
        return sample_next(logits, req.temperature, req.top_p, req._generator).tolist()

    def _ended(self, req: Request, token: int | None) -> bool:
        """Record ``token`` (None: none yet) and say whether the request leaves the batch now."""
        if req.cancelled:
            return self._finish(req, "cancelled")
        if req.deadline is not None and time.monotonic() > req.deadline:
            return self._finish(req, "timeout")
        if token is None:
            return False
        req.tokens.append(token)
        self.counters["tokens"] += 1
        req._emit("token", token)
        if token in req.stop_ids:
            return self._finish(req, "stop")
        if len(req.tokens) >= req.max_tokens:
            return self._finish(req, "length")
        return False

    def _finish(self, req: Request, reason: str | None, error: str | None = None) -> bool:
        req.finish_reason = reason or "error"
        self.counters["finished"] += 1
        req._emit("error", error) if error else req._emit("done", reason)
        return True


__all__ = ["Engine", "EngineConfig", "QueueFull", "Request"]
