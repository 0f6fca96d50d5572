"""The HTTP server: a model and its prompt sets behind an OpenAI-compatible API (FastAPI + uvicorn).

Endpoints (every one behind the API key when one is set, sent as ``Authorization: Bearer KEY``):

* ``GET /v1/models``: the one served model, with its context length, its base and the deltas applied onto it
  (``workbench.serve.deltas``: with several, a domain gate sends each request to its vertical or the base).
* ``POST /v1/completions`` and ``POST /v1/chat/completions`` (``stream: true`` for server-sent events):
  temperature, top_p, max_tokens, stop, seed, n; ``usage`` with cached prompt tokens.
* ``GET /v1/prompts``: every prompt set read at start, its prompts and their inputs;
  ``POST /v1/prompts/{set}/{prompt}``: run one with the given inputs; returns the thinking, the answer and
  whether the task's verifier accepts it. Nothing in a request names a file.
* ``GET /metrics``: the engine's and the prefix cache's counters (hit rate, bytes held, bytes per token).

All generation goes through one ``Engine`` (``workbench.serve.engine``): concurrent requests decode in one
batch. Generation stops at ``</answer>`` (the end of an R1-format reply) or ``<|eos|>``, at a stop string,
or at max_tokens. Every error is JSON, ``{"error": {"message", "type", "param", "code"}}``, naming the field
at fault and the fix: unknown model or prompt (404), bad fields or malformed JSON (400), a missing or
wrong key (401), a body over ``max_body_bytes`` (413), a full queue (429), a request past its time limit
(504). A client that disconnects frees its batch slot at the next step.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from workbench.serve.chat import ChatError, render_chat
from workbench.serve.engine import Engine, QueueFull
from workbench.serve.engine import Request as GenRequest
from workbench.serve.prompts import PromptInputError, PromptSet
from workbench.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatRequest,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ModelCard,
    ModelList,
    PromptInfo,
    PromptRun,
    PromptRunRequest,
    PromptSetInfo,
    PromptSetList,
    Usage,
)

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
_UNION_TAG = re.compile(r"(str|int|float|bool|none|list\[.*\]|dict\[.*\])")  # pydantic names union members in loc


# Seconds an idle keep-alive connection stays open. uvicorn's default (5 s) races pooled clients: a client
# that reuses a connection just as the server closes it gets "connection reset by peer" on a healthy server.
KEEP_ALIVE_S = 75


@dataclass
class ServeConfig:
    model_id: str = "workbench"  # the name clients pass as "model"
    api_key: str | None = None  # None: no key asked
    max_body_bytes: int = 1 << 20  # larger request bodies are refused (413)
    request_timeout: float = 120.0  # seconds a request may take, queueing included (504 past it)


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
}


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class BodyLimit:
    """ASGI middleware: read the body up to ``limit`` bytes, answer 413 past it (before any parsing)."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        too_big = f"the request body is larger than {self.limit} bytes; send a shorter prompt"
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await error_response(413, too_big, code="body_too_large")(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await error_response(413, too_big, code="body_too_large")(scope, receive, send)
            if not message.get("more_body"):
                break
        body, sent = b"".join(chunks), False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


@dataclass
class _Choice:
    req: GenRequest
    stops: list[str]
    tok: Any
    text: str = ""  # the text so far, cut at a stop string
    sent: int = 0  # characters already streamed
    finish: str | None = None

    def feed(self) -> None:
        """Decode the tokens so far; a stop string ends the choice (the engine drops the row)."""
        if self.finish is not None:
            return
        text = self.tok.decode(self.req.tokens, skip_special=True)
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                text, self.finish = text[:at], "stop"
                self.req.cancel()
        self.text = text

    def delta(self, final: bool) -> str:
        """New text that can be sent: held back by the longest stop string unless the choice is over."""
        hold = 0 if final or self.finish else max((len(s) - 1 for s in self.stops), default=0)
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : end], end
        return out


class Server:
    """The state behind the app: model, tokenizer, engine, prompt sets, settings."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        prompt_sets: list[PromptSet],
        config: ServeConfig,
        *,
        routes: dict[str, Engine] | None = None,
        gate=None,
        served: dict[str, Any] | None = None,
    ) -> None:
        """engine: answers every request the gate does not route; routes: a vertical's name -> its engine,
        chosen per request by ``gate`` (a ``vertical.gate.DomainGate``); served: what /v1/models says is
        served (``deltas.Served.describe()``)."""
        from workbench.rl.rollout import stop_ids

        self.engine, self.tok, self.config = engine, tokenizer, config
        self.routes, self.gate, self.served = dict(routes or {}), gate, served or {}
        if self.gate is not None and set(self.gate.probes) - set(self.routes):
            raise ValueError(
                f"the gate routes to {sorted(set(self.gate.probes) - set(self.routes))}, which have no engine"
            )
        self._gate_lock = threading.Lock()
        self.sets = {s.name: s for s in prompt_sets}
        if len(self.sets) != len(prompt_sets):
            raise ValueError("two prompt sets share a name; give each set a distinct 'name'")
        self.stop_ids = stop_ids(tokenizer)
        self.created = int(time.time())

    def check_model(self, name: str) -> None:
        if name != self.config.model_id:
            raise APIError(404, f"model {name!r} is not served here; use {self.config.model_id!r}", "model",
                           "model_not_found")  # fmt: skip

    def encode(self, prompt: str | list[int]) -> list[int]:
        from workbench.rl.rollout import encode_prompt

        if isinstance(prompt, str):
            return encode_prompt(self.tok, prompt)
        vocab = self.engine.model.config.vocab_size
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            raise APIError(400, f"prompt: token ids must be a non-empty list of integers in [0, {vocab})", "prompt")
        return list(prompt)

    def route(self, ids: list[int]) -> str | None:
        """The vertical that answers a prompt (None: ``engine``, the base or the one delta)."""
        if self.gate is None:
            return None
        with self._gate_lock:  # one base forward per prompt; the engines' threads keep decoding meanwhile
            return self.gate.route_ids([ids])[0]

    async def run(self, http: Request, ids: list[int], body, n: int, max_tokens: int | None) -> AsyncIterator:
        """Submit ``n`` choices and yield (index, choice, kind) as tokens arrive; cancels them on exit."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        route = await asyncio.to_thread(self.route, ids) if self.gate is not None else None
        engine = self.engine if route is None else self.routes[route]
        context = engine.context
        if max_tokens is None:
            max_tokens = min(DEFAULT_MAX_TOKENS, max(1, context - len(ids)))
        deadline = time.monotonic() + self.config.request_timeout
        choices = []
        try:
            for i in range(n):
                req = GenRequest(ids, max_tokens, body.temperature, body.top_p, self.stop_ids,
                                 None if body.seed is None else body.seed + i, deadline)  # fmt: skip
                req.on_event = lambda kind, value, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, kind, value))
                choices.append(_Choice(req, list(body.stop or []), self.tok))
                engine.submit(req)
            live = n
            while live:
                try:
                    i, kind, value = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await http.is_disconnected():
                        return
                    if time.monotonic() > deadline + 1.0:  # still queued (or the engine stalled): give up
                        raise APIError(504, f"the request waited past its time limit of "
                                       f"{self.config.request_timeout} s; retry when the server is less busy",
                                       None, "timeout") from None  # fmt: skip
                    continue
                c = choices[i]
                if kind == "error":
                    raise APIError(500, str(value), code="engine_error")
                if kind == "done":
                    live -= 1
                    if value == "timeout":
                        raise APIError(504, f"the request ran past its time limit of {self.config.request_timeout} s;"
                                       " ask for fewer max_tokens or retry when the server is less busy",
                                       "max_tokens", "timeout")  # fmt: skip
                    if c.finish is None:
                        c.feed()
                        c.finish = c.finish or ("length" if value == "length" else "stop")
                elif c.finish is None:
                    c.feed()
                yield i, c, kind
        except QueueFull as e:
            raise APIError(429, f"the server is busy: {e}", code="queue_full") from None
        except ValueError as e:
            msg = str(e)
            raise APIError(400, msg, msg.split(":")[0].split(" ")[0] or None) from None
        finally:
            for c in choices:
                c.req.cancel()

    def usage(self, ids: list[int], choices: list[_Choice]) -> Usage:
        cached = choices[0].req.cached_tokens if choices else 0
        return Usage.of(len(ids), sum(len(c.req.tokens) for c in choices), cached)


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def create_app(server: Server) -> FastAPI:
    """The FastAPI app of a ``Server`` (the engine must be started; ``serve`` does it)."""
    app = FastAPI(title="DeepSeek Workbench", version="0.1", docs_url="/docs", redoc_url=None)
    app.state.server = server
    cfg = server.config

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(x) for x in first.get("loc", ()) if x != "body" and not _UNION_TAG.fullmatch(str(x))]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            return error_response(400, f"the body is not valid JSON ({first.get('msg')}); send a JSON object",
                                  None, "invalid_json")  # fmt: skip
        if not loc and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
            return error_response(400, "the body must be a JSON object (send Content-Type: application/json)",
                                  None, "invalid_json")  # fmt: skip
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"{param}: unknown field; remove it (see /docs for the fields)", param,
                                  "unknown_field")  # fmt: skip
        return error_response(400, f"{param or 'body'}: {first.get('msg')}", param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _crash(_: Request, e: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(e).__name__}: {e}", code="internal_error")

    @app.middleware("http")
    async def _key(request: Request, call_next):
        if cfg.api_key is not None:
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else request.headers.get("api-key", "")
            if not hmac.compare_digest(token.encode(), cfg.api_key.encode()):
                return error_response(401, "missing or wrong API key; send 'Authorization: Bearer KEY'", None,
                                      "invalid_api_key")  # fmt: skip
        return await call_next(request)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        card = ModelCard(id=cfg.model_id, created=server.created, context_length=server.engine.context,
                         **server.served)  # fmt: skip
        return ModelList(data=[card])

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        out = {"engine": server.engine.metrics(), "prefix_cache": server.engine.prefix.metrics()}
        if server.routes:
            out["verticals"] = {name: {"engine": e.metrics(), "prefix_cache": e.prefix.metrics()}
                                for name, e in server.routes.items()}  # fmt: skip
        return out

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, http: Request):
        server.check_model(body.model)
        ids = server.encode(body.prompt)
        return await _respond(http, ids, body, body.max_tokens, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatRequest, http: Request):
        server.check_model(body.model)
        try:
            text = render_chat([m.model_dump() for m in body.messages])
        except ChatError as e:
            raise APIError(400, str(e), e.field) from None
        ids = server.encode(text)
        return await _respond(http, ids, body, body.max_completion_tokens or body.max_tokens, chat=True)

    async def _respond(http: Request, ids: list[int], body, max_tokens: int | None, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        gen = server.run(http, ids, body, body.n, max_tokens)
        if not body.stream:
            choices: dict[int, _Choice] = {}
            async for i, c, _ in gen:
                choices[i] = c
            got = [choices[i] for i in sorted(choices)]
            if len(got) < body.n:  # the client went away
                raise APIError(499, "the client disconnected")
            usage = server.usage(ids, got)
            if chat:
                return ChatCompletion(id=rid, created=created, model=cfg.model_id, usage=usage, choices=[
                    ChatChoice(index=i, message=AssistantMessage(content=c.text), finish_reason=c.finish)
                    for i, c in enumerate(got)])  # fmt: skip
            return Completion(id=rid, created=created, model=cfg.model_id, usage=usage, choices=[
                CompletionChoice(index=i, text=c.text, finish_reason=c.finish) for i, c in enumerate(got)])  # fmt: skip
        # streaming: check for an early refusal (429, 400) before the 200 goes out
        first = await anext(gen, None)
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, text: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if chat:
                delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
                choice = {"index": i, "delta": delta, "finish_reason": finish}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": None}
            return {"id": rid, "object": kind, "created": created, "model": cfg.model_id, "choices": [choice]}

        async def events() -> AsyncIterator[str]:
            seen: dict[int, _Choice] = {}
            try:
                if chat:
                    for i in range(body.n):
                        yield _sse(chunk(i, None, None, role=True))
                item = first
                while item is not None:
                    i, c, ev = item
                    seen[i] = c
                    text = c.delta(final=ev == "done")
                    if text or ev == "done":
                        yield _sse(chunk(i, text, c.finish if ev == "done" else None))
                    item = await anext(gen, None)
                if body.stream_options is not None and body.stream_options.include_usage:
                    usage = server.usage(ids, [seen[i] for i in sorted(seen)])
                    yield _sse({"id": rid, "object": kind, "created": created, "model": cfg.model_id, "choices": [],
                                "usage": usage.model_dump()})  # fmt: skip
            except APIError as e:
                yield _sse({"error": {"message": e.message, "type": _TYPES.get(e.status, "server_error"),
                                      "param": e.param, "code": e.code}})  # fmt: skip
            finally:
                await gen.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/prompts", response_model=PromptSetList)
    async def prompts() -> PromptSetList:
        return PromptSetList(data=[
            PromptSetInfo(set=s.name, description=s.description, task=s.task, prompts=[
                PromptInfo(name=p.name, description=p.description, template=p.template, fields=p.fields(),
                           inputs=p.inputs) for p in s.prompts])
            for s in server.sets.values()])  # fmt: skip

    @app.post("/v1/prompts/{set_name}/{prompt_name}", response_model=PromptRun)
    async def run_prompt(set_name: str, prompt_name: str, body: PromptRunRequest, http: Request) -> PromptRun:
        from workbench.tasks.rewards import extract_answer, extract_think

        s = server.sets.get(set_name)
        if s is None:
            raise APIError(404, f"no prompt set {set_name!r}; GET /v1/prompts lists {sorted(server.sets)}", "set",
                           "prompt_set_not_found")  # fmt: skip
        p = {q.name: q for q in s.prompts}.get(prompt_name)
        if p is None:
            raise APIError(404, f"set {set_name!r} has no prompt {prompt_name!r}; it has {[q.name for q in s.prompts]}",
                           "prompt", "prompt_not_found")  # fmt: skip
        try:
            question = p.render(body.inputs, strict=True)
        except PromptInputError as e:
            raise APIError(400, str(e), f"inputs.{e.field}" if e.field else "inputs", "bad_inputs") from None
        d = s.defaults
        settings = _PromptSampling(
            temperature=body.temperature if body.temperature is not None else d.get("temperature", 0.0),
            top_p=body.top_p if body.top_p is not None else d.get("top_p", 1.0),
            seed=body.seed if body.seed is not None else d.get("seed"),
        )
        ids = server.encode(s.prompt_text(question))
        max_tokens = body.max_tokens or d.get("max_new_tokens") or min(64, server.engine.context - len(ids))
        got = None
        async for _, c, _ in server.run(http, ids, settings, 1, max_tokens):
            got = c
        if got is None or got.finish is None:
            raise APIError(499, "the client disconnected")
        expect = body.expect if body.expect is not None else p.expected(body.inputs)
        answer = extract_answer(got.text)
        return PromptRun(set=s.name, prompt=p.name, inputs=body.inputs, question=question, completion=got.text,
                         thinking=extract_think(got.text), answer=answer, expect=expect,
                         correct=s.check(answer, expect), finish_reason=got.finish,
                         usage=server.usage(ids, [got]))  # fmt: skip

    return BodyLimit(app, cfg.max_body_bytes)


@dataclass
class _PromptSampling:
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str] = field(default_factory=list)


class Background:
    """uvicorn serving an app on a thread (tests, benchmarks, lessons): ``url``, then ``stop()``.

    ``port=0`` takes a free port of the loopback interface."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0) -> None:
        import socket
        import threading

        import uvicorn

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        self.port = sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", lifespan="off", timeout_keep_alive=KEEP_ALIVE_S)
        )
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)


__all__ = ["KEEP_ALIVE_S", "APIError", "Background", "BodyLimit", "ServeConfig", "Server", "create_app"]
