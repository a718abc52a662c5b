"""vLLM routes that RL frameworks drive (SkyRL's RemoteInferenceClient, TRL): the RL control
API (/pause, /resume, /is_paused, /get_world_size, /reset_prefix_cache) and /tokenize,
/detokenize, /tokenizer_info. Shapes as vLLM 0.33.0; control routes are admin routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response

from server.auth import admin_dependency
from server.protocol import vllm as v
from server.state import ServerState


def vllm_router(state: ServerState) -> APIRouter:
    r = APIRouter()
    admin = [Depends(admin_dependency(state.config))]
    c = state.control

    @r.post("/pause", dependencies=admin)
    async def pause(
        mode: Annotated[v.PauseMode, Query()] = "abort",
        wait_for_inflight_requests: Annotated[bool, Query()] = False,
        clear_cache: Annotated[bool, Query()] = True,
    ) -> JSONResponse:
        """abort | wait | keep (see server/serving/control.py); the deprecated
        wait_for_inflight_requests=true means mode=wait, as in vLLM."""
        await c.pause("wait" if wait_for_inflight_requests else mode, clear_cache)
        return JSONResponse({"status": "paused"})

    @r.post("/resume", dependencies=admin)
    async def resume() -> JSONResponse:
        await c.resume()
        return JSONResponse({"status": "resumed"})

    @r.get("/is_paused")
    async def is_paused() -> JSONResponse:
        return JSONResponse({"is_paused": c.paused})

    @r.get("/get_world_size")
    async def get_world_size(include_dp: Annotated[bool, Query()] = True) -> JSONResponse:
        return JSONResponse({"world_size": 1})  # one process, no TP / PP / DP

    @r.post("/reset_prefix_cache", dependencies=admin)
    async def reset_prefix_cache() -> Response:
        """= /flush_cache: every sequence's K/V is dropped and recomputed."""
        await state.engine.flush_cache()
        return Response(status_code=200)

    @r.post("/tokenize")
    async def tokenize(
        req: v.TokenizeChatRequest | v.TokenizeCompletionRequest,
    ) -> v.TokenizeResponse:
        return c.tokenize(req)

    @r.post("/detokenize")
    async def detokenize(req: v.DetokenizeRequest) -> v.DetokenizeResponse:
        return c.detokenize(req)

    @r.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        return JSONResponse(c.tokenizer_info())

    return r
