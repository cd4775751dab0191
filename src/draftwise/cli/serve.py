"""``draftwise serve``: the OpenAI-compatible server (:mod:`draftwise.serve`), its scheduler on
the main thread."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from draftwise.cli.flags import (
    HIDDEN_STATE_BACKENDS,
    add_budget_flag,
    add_model_flags,
    positive_int,
)

__all__ = ["API_KEY_ENV", "add_parser"]

API_KEY_ENV = "DRAFTWISE_API_KEY"


def add_parser(commands: Any) -> None:
    serve = commands.add_parser(
        "serve",
        help="an OpenAI-compatible HTTP server that verifies many requests in one pass",
        description="Serve POST /v1/chat/completions, /v1/completions, GET /v1/models, "
        "/health and /metrics. Every step verifies all active requests' draft trees in one "
        "forward pass (continuous batching; the quant backend shares the weight reads).",
    )
    add_model_flags(serve)
    serve.add_argument("--method", default="pld",
                       help="default method when a request names none (default: pld)")
    add_budget_flag(serve)
    serve.add_argument("--backend", choices=HIDDEN_STATE_BACKENDS, default="auto",
                       help="quant (GGUF blocks) or fast; auto picks quant for a GGUF "
                       "(default: auto)")
    serve.add_argument("--host", default="127.0.0.1", help="default: 127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="default: 8000")
    serve.add_argument("--max-batch", type=positive_int, default=8,
                       help="requests decoded together (KV cache regions; default: 8)")
    serve.add_argument("--suffix-cache", type=int, default=None, metavar="TOKENS",
                       help="tokens of earlier answers the suffix drafter keeps, over all "
                            "tenants, each API key and cache salt drafting only from its "
                            "own; the oldest answer is evicted first; 0: none (default: "
                            "262144: a few MB of text, at most ~40 MB)")
    serve.add_argument("--max-queue", type=int, default=64,
                       help="requests waiting for a slot before 429 (default: 64)")
    guard = serve.add_argument_group("what clients may send")
    guard.add_argument("--api-key", action="append", default=[], metavar="KEY",
                       help="every /v1 route (and /metrics) needs 'Authorization: Bearer KEY' "
                       f"(repeatable; also ${API_KEY_ENV}, comma-separated); /health stays open")
    guard.add_argument("--metrics-public", action="store_true",
                       help="serve /metrics without an API key")
    guard.add_argument("--max-body", type=positive_int, default=4 << 20, metavar="BYTES",
                       help="the largest request body; larger ones get 413 (default: 4 MiB)")
    guard.add_argument("--allow-methods", default="", metavar="NAMES",
                       help="comma-separated methods clients may pick (default: every method "
                       "the server can run)")
    guard.add_argument("--max-method-option", type=positive_int, default=64, metavar="N",
                       help="the largest integer method option or budget a client may set "
                       "(default: 64)")
    serve.set_defaults(handler=_serve)


def _serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    import uvicorn

    from draftwise.backends.registry import make_backend
    from draftwise.method import SUFFIX_TOKENS, MethodBuilder, MethodSpec, parse_budget
    from draftwise.models import default_cache_dir, load_model
    from draftwise.serve.app import create_app
    from draftwise.serve.policy import ClientPolicy

    MethodSpec.parse(args.method)
    budget = parse_budget(args.budget)
    if args.suffix_cache is not None and args.suffix_cache < 0:
        raise ValueError(f"--suffix-cache must be >= 0 tokens, got {args.suffix_cache}")
    loaded = load_model(args.model, cache_dir=args.cache_dir)
    cache = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    backend = make_backend(loaded, args.backend, cache)
    methods = MethodBuilder(loaded, backend, budget=budget, cache_dir=cache,
                            suffix_tokens=SUFFIX_TOKENS if args.suffix_cache is None
                            else args.suffix_cache)
    keys = [*args.api_key, *os.environ.get(API_KEY_ENV, "").split(",")]
    policy = ClientPolicy.of(args.allow_methods.split(","), args.max_method_option)
    app = create_app(methods, args.method, max_batch=args.max_batch,
                     max_queue=args.max_queue, scheduler_thread=False, policy=policy,
                     api_keys=frozenset(k.strip() for k in keys if k.strip()),
                     metrics_public=args.metrics_public, max_body=args.max_body)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port,
                                           log_level="warning"))
    http = threading.Thread(target=server.run, name="draftwise-http", daemon=True)
    http.start()
    print(f"draftwise: serving {loaded.name} ({type(backend).__name__}, method {args.method}, "
          f"{args.max_batch} slots) on http://{args.host}:{args.port}/v1", file=sys.stderr,
          flush=True)
    scheduler = app.state.server.scheduler

    def watch() -> None:  # the HTTP side ended (port taken, say): end the loop too
        http.join()
        scheduler.close()

    threading.Thread(target=watch, daemon=True).start()
    signal.signal(signal.SIGTERM, lambda *_: scheduler.close())
    try:
        scheduler.run_forever()  # on the main thread (see Scheduler.run_forever)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        http.join(timeout=10)
    return 0
