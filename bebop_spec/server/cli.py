"""`bebop serve`: load a model into a serving backend and run the HTTP server.

    bebop serve                                   # the built-in demo model on 127.0.0.1:30000
    bebop serve --model DIR --mtp HEAD_DIR --draft-mode rs --num-speculative-tokens 3
    BEBOP_ADMIN_TOKEN=secret bebop serve --host 0.0.0.0 --port 30000

SIGTERM / Ctrl-C stop gracefully: no new connections, in-flight requests get up to
--graceful-shutdown-s to finish, then the engine aborts what is left and stops.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from bebop_spec.backends import BACKENDS

ENGINE_OPTIONS = ["mtp", "num_speculative_tokens", "draft_mode", "spec_policy", "max_num_seqs",
                  "max_model_len", "max_waiting", "dtype", "kv_cache_memory_gb", "block_size",
                  "num_kv_blocks", "enable_prefix_caching", "draft_vocab_size", "device", "threads",
                  "seed"]  # fmt: skip
SERVER_OPTIONS = ["host", "port", "admin_token", "api_key", "allow_unauthenticated_admin",
                  "max_n", "weights_root"]  # fmt: skip


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """Engine and server options from EngineConfig / ServerConfig (bebop_spec.config_args),
    plus the few that are the command line's own (model resolution, sizes in MB, logging)."""
    from bebop_spec.config_args import add_config_args
    from bebop_spec.engine.config import (
        DRAFT_MODE_OFF,
        DRAFT_MODES,
        SPEC_POLICIES,
        EngineConfig,
    )
    from bebop_spec.hardware import DTYPES
    from bebop_spec.server.config import ServerConfig

    a = parser.add_argument
    a(
        "--model",
        default=None,
        help="HF model directory, or 'demo' for the built-in demo model "
        "(default: SmolLM2-135M-Instruct with its Bebop head, converted once into the cache)",
    )
    add_config_args(parser, EngineConfig, ENGINE_OPTIONS, choices={
        "draft_mode": [*DRAFT_MODES, DRAFT_MODE_OFF], "spec_policy": list(SPEC_POLICIES),
        "dtype": list(DTYPES)}, help={
        "spec_policy": "auto: choose 0..--num-speculative-tokens drafts per step for the best "
        "measured tokens/s (never slower than plain decoding by design); fixed: always draft "
        "that many",
        "kv_cache_memory_gb": "KV cache budget in GiB for the paged pool, target and head "
        "together (default: min(4, a quarter of RAM or free GPU memory)); when it runs out "
        "sequences are preempted and recomputed, and --max-model-len is lowered if one "
        "sequence would not fit alone",
        "draft_vocab_size": "draft over the head's K most frequent tokens (exact; cuts the "
        "draft's LM-head cost); default: the head's own (its draft_vocab.json), 0: the full "
        "vocabulary"})  # fmt: skip
    a("--backend", default="embedded", choices=sorted(BACKENDS))
    add_config_args(parser, ServerConfig, SERVER_OPTIONS, help={
        "admin_token": "bearer token for admin routes (default: $BEBOP_ADMIN_TOKEN)",
        "api_key": "bearer key every route but /health* and /metrics needs, as SGLang's and "
        "vLLM's --api-key (default: $BEBOP_API_KEY); the admin token still guards admin routes",
        "allow_unauthenticated_admin": "allow binding a non-loopback host without an admin "
        "token"})  # fmt: skip
    parser.set_defaults(admin_token=os.environ.get("BEBOP_ADMIN_TOKEN"),
                        api_key=os.environ.get("BEBOP_API_KEY"))  # fmt: skip
    a("--served-model-name", default=None, help="model name in the API (default: directory name)")
    a("--max-body-mb", type=float, default=16, help="largest JSON request body")
    a("--max-tensor-body-mb", type=float, default=8192,
      help="largest /update_weights_from_tensor body")  # fmt: skip
    a("--graceful-shutdown-s", type=float, default=10.0)
    a("--timeout-keep-alive", type=int, default=75,
      help="idle keep-alive seconds; longer than clients' own (aiohttp 15 s, httpx 5 s) so the "
      "server never closes a connection a client is about to reuse")  # fmt: skip
    a("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def build_configs(args: argparse.Namespace):
    """(EngineConfig, ServerConfig) from parsed arguments; ValueError on bad combinations."""
    from bebop_spec.config_args import config_kwargs
    from bebop_spec.engine.config import DRAFT_MODE_OFF, EngineConfig
    from bebop_spec.models.defaults import DEMO, resolve_model
    from bebop_spec.server.config import ServerConfig

    # None: SmolLM2-135M-Instruct (converted once) + its shipped head; "demo": the demo model
    model, mtp = resolve_model(args.model, args.mtp)
    draft_mode = args.draft_mode
    if mtp is None and args.model is None:  # an install without the shipped head
        draft_mode = DRAFT_MODE_OFF
    engine = EngineConfig(
        model=str(model),
        **(config_kwargs(args, ENGINE_OPTIONS) | {"mtp": mtp, "draft_mode": draft_mode}),
    )
    default_name = "bebop-demo" if args.model == DEMO else Path(model).resolve().name
    server = ServerConfig(
        served_model_name=args.served_model_name or default_name,
        max_body_bytes=int(args.max_body_mb * 2**20),
        max_tensor_body_bytes=int(args.max_tensor_body_mb * 2**20),
        **config_kwargs(args, SERVER_OPTIONS),
    )
    return engine, server


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from bebop_spec.backends import create_backend
    from bebop_spec.server.app import build_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    log = logging.getLogger("bebop.server")
    try:
        engine_config, server_config = build_configs(args)
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    log.info("loading %s (backend %s, draft mode %s)", engine_config.model, args.backend,
             engine_config.draft_mode_name)  # fmt: skip
    try:
        engine = create_backend(args.backend, engine_config)
    except ImportError as exc:
        log.error("backend %r is not available here: %s", args.backend, exc)
        return 2
    app = build_app(engine, server_config)
    config = uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_level=args.log_level,
        timeout_graceful_shutdown=args.graceful_shutdown_s, access_log=args.log_level == "debug",
        timeout_keep_alive=args.timeout_keep_alive,
    )  # fmt: skip
    uvicorn.Server(config).run()  # handles SIGTERM / SIGINT: drain, lifespan shutdown, exit
    return 0
