"""Operations routes: /health, /health_generate and the Prometheus /metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response

from bebop_spec.server.metrics import CONTENT_TYPE
from bebop_spec.server.state import ServerState


def ops_router(state: ServerState) -> APIRouter:
    r = APIRouter()

    @r.get("/health")
    async def health() -> Response:
        return Response(status_code=state.info.health())

    @r.get("/health_generate")
    async def health_generate() -> Response:
        return Response(status_code=await state.info.health_generate())

    @r.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return r
