"""SGLang-native routes: /generate, abort, generation control, memory occupation, info.
Each parses, makes one serving call and replies."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from bebop_spec.server.auth import admin_dependency, check_admin
from bebop_spec.server.protocol import sglang as sgl
from bebop_spec.server.protocol.vllm import MemoryOccupationRequest
from bebop_spec.server.state import ServerState


def sglang_router(state: ServerState) -> APIRouter:
    r = APIRouter()
    admin = [Depends(admin_dependency(state.config))]

    @r.api_route("/generate", methods=["POST", "PUT"])
    async def generate(req: sgl.GenerateRequest, raw: Request) -> Response:
        return await state.generate.generate(req, raw)

    @r.post("/abort_request")
    async def abort_request(req: sgl.AbortRequest, raw: Request) -> JSONResponse:
        if req.abort_all:
            check_admin(state.config, raw)
        n = await state.generate.abort(req.rid, req.abort_all)
        return JSONResponse({"success": True, "num_aborted": n})

    @r.post("/pause_generation", dependencies=admin)
    async def pause(req: sgl.PauseGenerationRequest | None = None) -> JSONResponse:
        await state.control.pause_engine((req or sgl.PauseGenerationRequest()).mode)
        return JSONResponse({"message": "Generation paused successfully.", "status": "ok"})

    @r.post("/continue_generation", dependencies=admin)
    async def resume(req: sgl.ContinueGenerationRequest | None = None) -> JSONResponse:
        await state.control.resume()  # also ends a vLLM-style pause(wait)
        return JSONResponse({"message": "Generation continued successfully.", "status": "ok"})

    @r.api_route("/release_memory_occupation", methods=["GET", "POST"], dependencies=admin)
    async def release_memory(req: MemoryOccupationRequest | None = None) -> JSONResponse:
        """Pause, re-queue running requests, free the KV pool (ControlServing.release_memory);
        /resume_memory_occupation continues."""
        freed = await state.control.release_memory((req or MemoryOccupationRequest()).tags)
        return JSONResponse({"success": True, "message": f"Generation paused; KV cache "
                             f"released ({freed / 2**20:.1f} MiB freed); weights kept."})  # fmt: skip

    @r.api_route("/resume_memory_occupation", methods=["GET", "POST"], dependencies=admin)
    async def resume_memory(req: MemoryOccupationRequest | None = None) -> JSONResponse:
        await state.control.resume_memory((req or MemoryOccupationRequest()).tags)
        return JSONResponse({"success": True, "message": "Generation resumed."})

    @r.get("/v1/loads")
    async def loads() -> dict:
        return state.control.loads()

    @r.api_route("/flush_cache", methods=["GET", "POST"], dependencies=admin)
    async def flush_cache() -> PlainTextResponse:
        await state.control.flush()
        return PlainTextResponse("Cache flushed.\n")

    @r.get("/get_weight_version")
    @r.get("/weight_version")
    async def weight_version() -> dict:
        return state.info.weight_version()

    @r.get("/get_model_info")
    @r.get("/model_info")
    async def model_info() -> dict:
        return state.info.model_info(state.config.served_model_name)

    @r.get("/get_server_info")
    @r.get("/server_info")
    async def server_info() -> dict:
        return state.info.server_info()

    return r
