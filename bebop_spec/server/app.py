"""The FastAPI app: state, routes, error handlers, body limits, engine lifecycle.

app = build_app(engine, ServerConfig(...))   # engine: a ServingBackend (not started)
uvicorn.run(app, host=..., port=...)         # or server.cli.run_serve(args)
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from bebop_spec.backends import ServingBackend
from bebop_spec.server.auth import AdminGateMiddleware, admin_paths
from bebop_spec.server.config import ServerConfig
from bebop_spec.server.errors import install_error_handlers
from bebop_spec.server.middleware import BodyLimitMiddleware, FaultMiddleware
from bebop_spec.server.routes.openai import openai_router
from bebop_spec.server.routes.ops import ops_router
from bebop_spec.server.routes.sglang import sglang_router
from bebop_spec.server.routes.vllm import vllm_router
from bebop_spec.server.routes.weights import weights_router
from bebop_spec.server.state import ServerState

logger = logging.getLogger("bebop.server")
TENSOR_ROUTE = "/update_weights_from_tensor"
GENERATION_ROUTES = {"/generate", "/v1/completions", "/v1/chat/completions",
                     "/inference/v1/generate"}  # fmt: skip


def build_app(engine: ServingBackend, config: ServerConfig) -> FastAPI:
    state = ServerState.build(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        logger.info("serving %s (weights %s)", config.served_model_name, engine.weight_version)
        try:
            yield
        finally:
            state.info.shutting_down = True
            await state.weights.close()
            await engine.shutdown()
            logger.info("engine stopped")

    app = FastAPI(title="Bebop rollout server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.bebop = state
    install_error_handlers(app, on_invalid=lambda path: _count_invalid(state, path))
    routers = [openai_router(state.openai), sglang_router(state), vllm_router(state),
               weights_router(state), ops_router(state)]  # fmt: skip
    for router in routers:
        app.include_router(router)

    def limit_for(path: str) -> int:
        return config.max_tensor_body_bytes if path == TENSOR_ROUTE else config.max_body_bytes

    app.add_middleware(BodyLimitMiddleware, limit_for=limit_for)
    app.add_middleware(AdminGateMiddleware, config=config, paths=admin_paths(routers))
    app.add_middleware(FaultMiddleware)  # outermost of ours: catches what the others raise
    return app


def _count_invalid(state: ServerState, path: str) -> None:
    """A generation request refused by body validation is a failure too (as vLLM counts)."""
    if path in GENERATION_ROUTES:
        state.metrics.failed("input_processing", 400)
