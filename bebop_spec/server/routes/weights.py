"""Weight-sync routes (admin). Replies follow SGLang: `{success, message}` with 200 or 400;
failures also carry the OpenAI-style `error` object."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from bebop_spec.engine.config import WeightSelector
from bebop_spec.server.auth import admin_dependency
from bebop_spec.server.errors import ApiError
from bebop_spec.server.protocol import sglang as sgl
from bebop_spec.server.state import ServerState

OCTET = "application/octet-stream"


async def _reply(work: Awaitable[sgl.UpdateResult]) -> JSONResponse:
    try:
        result = await work
    except ApiError as exc:
        return exc.response({"success": False, "message": exc.message})
    return JSONResponse(result.model_dump(exclude_none=True))


def weights_router(state: ServerState) -> APIRouter:
    r = APIRouter(dependencies=[Depends(admin_dependency(state.config))])
    w = state.weights

    @r.post("/update_weights_from_disk")
    async def from_disk(req: sgl.UpdateWeightsFromDiskRequest) -> JSONResponse:
        return await _reply(w.from_disk(req))

    @r.post("/update_weight_version")
    async def update_weight_version(req: sgl.UpdateWeightVersionRequest) -> JSONResponse:
        """Relabel the serving weights (SGLang's route; WeightServing.relabel)."""
        label = await w.relabel(req.new_version, abort_all=req.abort_all_requests)
        return JSONResponse({"success": True, "new_version": label,
                             "message": f"Weight version updated to {label}"})  # fmt: skip

    @r.post("/init_weights_update_group")
    async def init_group(req: sgl.InitWeightsUpdateGroupRequest) -> JSONResponse:
        return await _reply(w.init_group(req))

    @r.post("/destroy_weights_update_group")
    async def destroy_group(
        req: sgl.DestroyWeightsUpdateGroupRequest | None = None,
    ) -> JSONResponse:
        """SkyRL posts this with no body: the one group there is."""
        return await _reply(
            w.destroy_group((req or sgl.DestroyWeightsUpdateGroupRequest()).group_name)
        )

    @r.post("/update_weights_from_distributed")
    async def from_distributed(req: sgl.UpdateWeightsFromDistributedRequest) -> JSONResponse:
        return await _reply(w.from_distributed(req))

    @r.post("/update_weights_from_tensor")
    async def from_tensor(
        raw: Request,
        selector: WeightSelector = WeightSelector.ALL,
        weight_version: str | None = None,
        flush_cache: bool = True,
        abort_all_requests: bool = False,
    ) -> JSONResponse:
        """Either a raw safetensors body (Content-Type: application/octet-stream, options
        in the query string, streamed and size-capped) or SGLang's JSON with base64
        safetensors entries."""
        if raw.headers.get("content-type", "").split(";")[0].strip() == OCTET:
            t0 = time.perf_counter()
            data = await _read_capped(raw, state.config.max_tensor_body_bytes)
            work = w.from_tensor_bytes(
                data,
                selector,
                weight_version,
                flush=flush_cache,
                abort_all=abort_all_requests,
                t0=t0,
            )
            return await _reply(work)
        try:
            req = sgl.UpdateWeightsFromTensorRequest.model_validate_json(await raw.body())
        except ValidationError as exc:
            first = exc.errors()[0]
            msg = f"{'.'.join(map(str, first['loc'])) or 'body'}: {first['msg']}"
            raise ApiError(
                400, f"expected a safetensors body ({OCTET}) or SGLang JSON; {msg}"
            ) from exc
        return await _reply(w.from_tensor_json(req))

    @r.post("/begin_weight_update")
    async def begin(req: sgl.BeginWeightUpdateRequest | None = None) -> JSONResponse:
        selector = (req or sgl.BeginWeightUpdateRequest()).selector
        return await _reply(_call(lambda: w.begin(selector)))

    @r.post("/end_weight_update")
    async def end(req: sgl.EndWeightUpdateRequest | None = None) -> JSONResponse:
        return await _reply(_call(w.end))

    return r


async def _call(fn: Callable[[], sgl.UpdateResult]) -> sgl.UpdateResult:
    return fn()  # run inside _reply, so its ApiError becomes a reply


async def _read_capped(raw: Request, limit: int) -> bytearray:
    """The body into one buffer (preallocated when Content-Length is given), at most `limit`."""
    declared = raw.headers.get("content-length", "")
    size = int(declared) if declared.isdigit() else None
    if size is not None and size > limit:
        raise ApiError(413, f"tensor body of {size} bytes exceeds the limit of {limit}")
    buf, n = bytearray(size or 0), 0
    async for chunk in raw.stream():
        if n + len(chunk) > (size if size is not None else limit):
            raise ApiError(
                413 if size is None else 400, "tensor body is longer than declared or allowed"
            )
        if size is None:
            buf += chunk
        else:
            buf[n : n + len(chunk)] = chunk
        n += len(chunk)
    if size is not None and n != size:
        raise ApiError(400, f"tensor body ended after {n} of {size} declared bytes")
    return buf
