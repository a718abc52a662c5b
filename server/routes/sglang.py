"""SGLang-native routes: /generate, info, health, generation control, /metrics."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import server
from bebop_spec.sampling_params import SamplingParams
from server.auth import admin_dependency, check_admin
from server.metrics import CONTENT_TYPE
from server.protocol import sglang as sgl
from server.protocol.vllm import MemoryOccupationRequest
from server.state import ServerState

HEALTH_TIMEOUT_S = 20.0
SECRETS = ("admin_token", "api_key")  # never in /get_server_info


def sglang_router(state: ServerState) -> APIRouter:
    r = APIRouter()
    admin = [Depends(admin_dependency(state.config))]
    engine = state.engine

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
        await engine.pause((req or sgl.PauseGenerationRequest()).mode)
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
        await engine.flush_cache()
        return PlainTextResponse("Cache flushed.\n")

    @r.get("/get_weight_version")
    @r.get("/weight_version")
    async def weight_version() -> dict:
        return {"weight_version": engine.weight_version, "version": engine.version}

    @r.get("/get_model_info")
    @r.get("/model_info")
    async def model_info() -> dict:
        return _model_info(state)

    @r.get("/get_server_info")
    @r.get("/server_info")
    async def server_info() -> dict:
        return _server_info(state)

    @r.get("/health")
    async def health() -> Response:
        return Response(status_code=503 if state.shutting_down else 200)

    @r.get("/health_generate")
    async def health_generate() -> Response:
        if state.shutting_down:
            return Response(status_code=503)
        if engine.paused or engine.num_running > 0:
            return Response(status_code=200)  # busy or paused on purpose: alive
        ok = await _one_token(state)
        return Response(status_code=200 if ok else 503)

    @r.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    return r


async def _one_token(state: ServerState) -> bool:
    params = SamplingParams(temperature=0.0, max_tokens=1)
    stream = state.engine.generate([0], params, f"health-{uuid.uuid4().hex}")

    async def run() -> None:
        async for _ in stream:
            pass

    try:
        await asyncio.wait_for(run(), HEALTH_TIMEOUT_S)
        return True
    except Exception:
        return False


def _model_info(state: ServerState) -> dict:
    e, mc = state.engine, state.engine.model_config
    return {
        "model_path": e.config.model,
        "tokenizer_path": e.config.model if e.tokenizer is not None else None,
        "served_model_name": state.config.served_model_name,
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": e.weight_version,
        "model_type": getattr(mc, "family", None),
        "architectures": _architectures(mc),
        # ext
        "mtp_path": e.config.mtp,
        "draft_mode": e.config.draft_mode or "none",
        "num_speculative_tokens": _gamma(e),
        "max_model_len": e.max_model_len,
        "vocab_size": getattr(mc, "vocab_size", None),
        "eos_token_ids": list(getattr(mc, "eos_token_ids", []) or []),
    }


def _server_info(state: ServerState) -> dict:
    e = state.engine
    spec = e.spec_totals
    engine_args = dataclasses.asdict(e.config) if dataclasses.is_dataclass(e.config) else {}
    server_args = {k: v for k, v in dataclasses.asdict(state.config).items() if k not in SECRETS}
    return {
        **engine_args,
        **server_args,
        "num_speculative_tokens": _gamma(e),  # None without speculation, not the unused γ
        "draft_mode": e.config.draft_mode or "none",
        "admin_protected": state.config.admin_protected,
        "internal_states": [
            {
                "avg_spec_accept_length": spec.mean_accepted_length,
                # decode steps per draft length 0, 1, … (auto policy; null when fixed or none)
                "spec_draft_length_steps": getattr(e, "gamma_chosen", None),
                "spec_accept_rate": spec.acceptance_rate,
                "kv_cache": getattr(e, "kv_cache_info", None),  # embedded engine only
                "num_running": e.num_running,
                "num_waiting": e.num_waiting,
                "paused": state.control.paused,
                "weight_version": e.weight_version,
            }
        ],
        "startup_time": state.started_at,
        "version": server.__version__,
        "frontend": "bebop",
    }


def _gamma(e) -> int | None:
    """Drafts per step (γ, the most under the auto policy); None when not speculating."""
    return e.config.num_speculative_tokens if e.config.draft_mode else None


def _architectures(mc) -> list[str] | None:
    """From the model's config.json, as SGLang reports them (the family's class if absent)."""
    if hasattr(mc, "to_hf"):
        return list(mc.to_hf().get("architectures") or []) or None
    return list(getattr(mc, "hf", {}).get("architectures") or []) or None
