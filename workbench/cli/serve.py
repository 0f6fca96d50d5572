"""``python -m workbench serve``: a model and its prompt sets over HTTP (``workbench.serve.server``)."""

from __future__ import annotations

import os
from pathlib import Path

API_KEY_ENV = "WORKBENCH_API_KEY"


def add_subcommand(sub) -> None:
    from workbench.util import SHIPPED_DATA

    s = sub.add_parser(
        "serve",
        help="serve a model and its prompt sets over an OpenAI-compatible HTTP API",
        description=(
            "Serve a model folder over HTTP: /v1/models, /v1/completions, /v1/chat/completions (stream: true for "
            "server-sent events), /v1/prompts (the prompt sets given with --prompts), /metrics. Concurrent "
            "requests decode in one batch; the latent KV of shared prompt prefixes is reused. Binds to loopback "
            f"unless --host says otherwise; with --api-key (or ${API_KEY_ENV}) every request must send "
            "'Authorization: Bearer KEY'."
        ),
    )
    s.add_argument(
        "--model", default=str(SHIPPED_DATA / "tiny-model"), help="model folder (default: the shipped tiny model)"
    )
    s.add_argument(
        "--delta", action="append", default=[], metavar="DIR",
        help="a vertical's delta folder (delta.json + delta.safetensors) to apply onto --model at load; repeat it "
        "to serve several verticals behind a per-request domain gate (each request to its vertical or the base)",
    )  # fmt: skip
    s.add_argument("--model-id", help="the name clients pass as 'model' (default: the folder's name, then "
                   "'+' and each delta's)")  # fmt: skip
    s.add_argument(
        "--gate", choices=("mlp", "linear"), default="mlp",
        help="with several --delta: the classifier that routes each request (mlp tells apart verticals whose prompts "
        "share a shape; linear is one logistic probe per vertical)",
    )  # fmt: skip
    s.add_argument("--prompts", nargs="+", default=[], metavar="FILE", help="prompt set files (read at start only)")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, loopback only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0 takes a free one)")
    s.add_argument("--api-key", default=None, help=f"key every request must send (default: ${API_KEY_ENV}, else none)")
    s.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    s.add_argument("--max-batch", type=int, default=16, help="rows that decode together (default: 16)")
    s.add_argument("--max-waiting", type=int, default=64, help="requests that may wait; more get 429 (default: 64)")
    s.add_argument("--cache-mib", type=float, default=64.0,
                   help="MiB of prefix cache per served model, 0 to disable (default: 64)")  # fmt: skip
    s.add_argument("--cache-file", help="keep the prefix cache in this safetensors file between restarts (with "
                   "several deltas: the base's)")  # fmt: skip
    s.add_argument("--max-body-kib", type=int, default=1024, help="largest request body in KiB (default: 1024)")
    s.add_argument("--timeout", type=float, default=120.0, help="seconds a request may take (default: 120)")
    s.set_defaults(func=run_serve)


def build(args):
    """The started engines (the default one first), the app and its settings, from these arguments (everything
    checked, deltas applied and the gate fitted before the port opens)."""
    import math

    from workbench.io.hf import load_hf
    from workbench.io.tokenizer import tokenizer_of
    from workbench.serve.cache import PrefixCache, model_fingerprint
    from workbench.serve.deltas import load_served
    from workbench.serve.engine import Engine, EngineConfig
    from workbench.serve.prompts import load_prompt_set
    from workbench.serve.server import ServeConfig, Server, create_app
    from workbench.util import resolve_device

    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if not math.isfinite(args.cache_mib) or args.cache_mib < 0:
        raise ValueError(f"--cache-mib must be a number >= 0, got {args.cache_mib}")
    if not math.isfinite(args.timeout) or args.timeout <= 0:
        raise ValueError(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    if args.max_body_kib < 1:
        raise ValueError(f"--max-body-kib must be >= 1, got {args.max_body_kib}")
    sets = [load_prompt_set(p) for p in args.prompts]  # a bad file fails now, before the port opens
    folder = Path(args.model)
    if not folder.is_dir():
        raise FileNotFoundError(f"--model: no model folder at {folder}")
    base = load_hf(folder, device=resolve_device(args.device))
    tok = tokenizer_of(base)
    served = load_served(
        base, folder.resolve().name, args.delta, tok, gate=args.gate
    )  # a bad --delta fails here, port closed
    cfg = EngineConfig(max_batch=args.max_batch, max_waiting=args.max_waiting,
                       prefix_cache_bytes=int(args.cache_mib * (1 << 20)))  # fmt: skip
    model = served.default
    prefix = PrefixCache(cfg.prefix_cache_bytes, model_fingerprint(model))
    if args.cache_file and Path(args.cache_file).is_file():
        kept = prefix.load(args.cache_file, device=model.device)
        print(f"prefix cache: {kept} entries from {args.cache_file}")
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    engine = Engine(model, cfg, prefix).start()
    routes = {name: Engine(m, cfg).start() for name, m in served.models.items()} if served.gate is not None else {}
    serve_cfg = ServeConfig(model_id=args.model_id or served.model_id, api_key=key,
                            max_body_bytes=args.max_body_kib * 1024, request_timeout=args.timeout)  # fmt: skip
    server = Server(engine, tok, sets, serve_cfg, routes=routes, gate=served.gate, served=served.describe())
    return [engine, *routes.values()], create_app(server), serve_cfg


def run_serve(args) -> int:
    import uvicorn

    from workbench.serve.server import KEEP_ALIVE_S

    engines, app, cfg = build(args)
    where = f"http://{args.host}:{args.port}"
    print(f"serving {cfg.model_id!r} on {where}/v1 ({'API key required' if cfg.api_key else 'no API key'})")
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", timeout_keep_alive=KEEP_ALIVE_S)
    finally:
        for engine in engines:
            engine.stop()
        if args.cache_file:
            n = engines[0].prefix.save(args.cache_file)
            print(f"prefix cache: {n} entries saved to {args.cache_file}")
    return 0
