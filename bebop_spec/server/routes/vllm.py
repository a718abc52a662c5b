"""vLLM routes that RL frameworks drive (SkyRL's RemoteInferenceClient, TRL): the RL control
API (/pause, /resume, /is_paused, /get_world_size, /reset_prefix_cache) and /tokenize,
/detokenize, /tokenizer_info. Shapes as vLLM 0.33.0; control routes are admin routes."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from bebop_spec.engine.config import WeightSelector
from bebop_spec.server.auth import admin_dependency
from bebop_spec.server.errors import ApiError
from bebop_spec.server.protocol import vllm as v
from bebop_spec.server.state import ServerState


def vllm_router(state: ServerState) -> APIRouter:
    r = APIRouter()
    admin = [Depends(admin_dependency(state.config))]
    c = state.control

    @r.post("/pause", dependencies=admin)
    async def pause(
        mode: Annotated[v.PauseMode, Query()] = v.PauseMode.ABORT,
        wait_for_inflight_requests: Annotated[bool, Query()] = False,
        clear_cache: Annotated[bool, Query()] = True,
    ) -> JSONResponse:
        """abort | wait | keep (see bebop_spec/server/serving/control.py); the deprecated
        wait_for_inflight_requests=true means mode=wait, as in vLLM."""
        await c.pause(v.PauseMode.WAIT if wait_for_inflight_requests else mode, clear_cache)
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
        await state.control.flush()
        return Response(status_code=200)

    # ------------------------------------------- four-phase weight transfer (admin)
    t = state.weight_transfer

    @r.post("/init_weight_transfer_engine", dependencies=admin)
    async def init_weight_transfer_engine(req: v.InitWeightTransferRequest) -> JSONResponse:
        return await _answer(t.init(req.init_info), {"message": "Weight transfer initialized"})

    @r.post("/start_weight_update", dependencies=admin)
    async def start_weight_update() -> JSONResponse:
        t.start(WeightSelector.TARGET)
        return JSONResponse({"message": "Weight update started"})

    @r.post("/start_draft_weight_update", dependencies=admin)
    async def start_draft_weight_update() -> JSONResponse:
        """vLLM's draft-model phase: here the MTP head (selector draft)."""
        t.start(WeightSelector.DRAFT)
        return JSONResponse({"message": "Draft weight update started"})

    @r.post("/update_weights", dependencies=admin)
    async def update_weights(req: v.UpdateWeightsRequest) -> JSONResponse:
        return await _answer(t.update(req.update_info), {"message": "Weights updated"})

    @r.post("/finish_weight_update", dependencies=admin)
    async def finish_weight_update(req: v.FinishWeightUpdateRequest | None = None) -> JSONResponse:
        version = (req or v.FinishWeightUpdateRequest()).weight_version
        return await _answer(t.finish(version), {"message": "Weight update finished"})

    @r.get("/weight_info")
    async def weight_info() -> JSONResponse:
        return JSONResponse({"weight_version": state.info.weight_version()["weight_version"]})

    @r.post("/weight_checker", dependencies=admin)
    async def weight_checker(req: v.WeightCheckerRequest) -> JSONResponse:
        return JSONResponse(await t.checker(req))

    @r.post("/inference/v1/generate")
    async def generate_tokens(req: v.TokensGenerateRequest, raw: Request) -> Response:
        """Tokens in, tokens out (vLLM's disaggregated-serving route; SkyRL's generation)."""
        return await state.tokens.generate(req, raw)

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


async def _answer(work: Awaitable[Any], reply: dict) -> JSONResponse:
    """`reply` once `work` is done; a refused step answers its status with the OpenAI error
    object and vLLM's `detail` (what its HTTPException bodies carry)."""
    try:
        await work
    except ApiError as exc:
        return exc.response({"detail": exc.message})
    return JSONResponse(reply)
