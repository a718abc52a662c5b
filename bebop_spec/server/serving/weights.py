"""Hot weight sync and generation control (SGLang endpoint names) -> engine calls.

Every update, whatever its path, goes: receive into fresh tensors -> `check_update` (all
names, shapes, dtypes, finiteness) -> `engine.update_weights` (swaps between two steps).
Until the swap the old weights keep serving; on any failure nothing changes and the
version does not move. Updates are serialised by one lock; decoding continues meanwhile.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Mapping

import torch
from bebop_client.bucket import nbytes

from bebop_spec.backends import ServingBackend
from bebop_spec.engine.weights import check_update, tied_aliases
from bebop_spec.errors import WeightUpdateError
from bebop_spec.server.config import ServerConfig
from bebop_spec.server.errors import ApiError
from bebop_spec.server.metrics import ServerMetrics
from bebop_spec.server.protocol import sglang as sgl
from bebop_spec.server.weight_sync.group import WeightUpdateGroup
from bebop_spec.server.weight_sync.tensors import (
    load_safetensors_bytes,
    load_safetensors_dir,
    parse_dtype,
    select_known,
)

logger = logging.getLogger("bebop.server")


def _ok(message: str, version: str, **extra) -> sgl.UpdateResult:
    return sgl.UpdateResult(success=True, message=message, weight_version=version, **extra)


def _failure(message: str, status: int = 400) -> ApiError:
    return ApiError(status, message, code="weight_update_failed")


class WeightServing:
    def __init__(self, engine: ServingBackend, config: ServerConfig, metrics: ServerMetrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.groups: dict[str, WeightUpdateGroup] = {}
        self.lock = asyncio.Lock()
        self.session: str | None = None  # selector of an open begin/end_weight_update bracket

    # ---------------------------------------------------------------- updates
    async def _apply(self, source: str, tensors: Mapping[str, torch.Tensor], selector: str,
                     version: str | None, *, flush: bool, t0: float, message: str,
                     from_disk: bool = False) -> sgl.UpdateResult:  # fmt: skip
        """Check, then swap. Runs under `self.lock`; `t0` is when receiving started."""
        t1 = time.perf_counter()
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        try:
            spec = self._spec(selector)
            aliases = tied_aliases(spec, selector)
            if from_disk:
                tensors, _ = select_known(tensors, spec, aliases)
            ready = await asyncio.to_thread(check_update, tensors, spec, aliases)
            t2 = time.perf_counter()
            label = await self.engine.update_weights(  # no label given: keep it (SGLang)
                ready, selector=selector, weight_version=version or self.engine.weight_version
            )
        except WeightUpdateError as exc:
            self.metrics.observe_weight_sync(source, time.perf_counter() - t0, size, ok=False)
            raise _failure(f"weights not updated ({source}): {exc}") from exc
        t3 = time.perf_counter()
        if flush:
            await self.engine.flush_cache()
        total = time.perf_counter() - t0
        self.metrics.observe_weight_sync(source, total, size, ok=True)
        logger.info("weights updated from %s: %d tensors, %.1f MB in %.3f s -> %s",
                    source, len(ready), size / 1e6, total, label)  # fmt: skip
        timings = {"receive_s": t1 - t0, "check_s": t2 - t1, "swap_s": t3 - t2, "total_s": total}
        return _ok(message, label, timings={k: round(v, 4) for k, v in timings.items()})

    async def relabel(self, label: str, *, abort_all: bool = True) -> str:
        """Rename the serving weights' version (tensors and the per-token version counter
        stay), aborting in-flight requests first unless told not to; the
        bebop:weight_version_info gauge follows the new label."""
        async with self.lock:
            if abort_all:
                await self.engine.abort_all()
            label = await self.engine.relabel_weight_version(label)
        self.metrics.refresh_version()
        return label

    def _spec(self, selector: str) -> dict:
        """The engine's parameters for `selector` (name -> (shape, dtype))."""
        try:
            return dict(self.engine.weight_spec(selector))
        except ValueError as exc:  # e.g. selector "draft" without an MTP head
            raise WeightUpdateError(str(exc)) from exc

    async def from_disk(self, req: sgl.UpdateWeightsFromDiskRequest) -> sgl.UpdateResult:
        t0 = time.perf_counter()
        async with self.lock:
            if req.abort_all_requests:
                await self.engine.abort_all()
            try:
                tensors = await asyncio.to_thread(
                    load_safetensors_dir, req.model_path, self.config.weights_root
                )
            except WeightUpdateError as exc:
                self.metrics.observe_weight_sync("disk", 0.0, 0, ok=False)
                raise _failure(f"weights not updated (disk): {exc}") from exc
            return await self._apply("disk", tensors, req.selector, req.weight_version,
                                     flush=req.flush_cache, t0=t0, from_disk=True,
                                     message=f"Succeeded to update model weights from {req.model_path}.")  # fmt: skip

    async def from_tensor_bytes(self, data: bytes | bytearray, selector: str, version: str | None, *,
                                flush: bool = True, abort_all: bool = False,
                                t0: float | None = None) -> sgl.UpdateResult:  # fmt: skip
        """Body = one safetensors file (the streamed /update_weights_from_tensor form);
        `t0`: when reading the body started."""
        t0 = time.perf_counter() if t0 is None else t0
        tensors = await self._decode(data)
        async with self.lock:
            if abort_all:
                await self.engine.abort_all()
            return await self._apply("tensor", tensors, selector, version, flush=flush, t0=t0,
                                     message="Succeeded to update model weights.")  # fmt: skip

    async def from_tensor_json(self, req: sgl.UpdateWeightsFromTensorRequest) -> sgl.UpdateResult:
        """SGLang's JSON form, but every entry must be base64 safetensors (no pickle)."""
        t0 = time.perf_counter()
        tensors: dict[str, torch.Tensor] = {}
        for i, blob in enumerate(req.serialized_named_tensors):
            try:
                raw = base64.b64decode(blob, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ApiError(
                    400,
                    f"serialized_named_tensors[{i}] is not base64",
                    param="serialized_named_tensors",
                ) from exc
            tensors.update(await self._decode(raw, f"serialized_named_tensors[{i}]: "))
        async with self.lock:
            if req.abort_all_requests:
                await self.engine.abort_all()
            return await self._apply("tensor", tensors, req.selector, req.weight_version,
                                     flush=req.flush_cache, t0=t0,
                                     message="Succeeded to update model weights.")  # fmt: skip

    async def _decode(self, data: bytes | bytearray, where: str = "") -> dict[str, torch.Tensor]:
        try:
            return await asyncio.to_thread(load_safetensors_bytes, data)
        except WeightUpdateError as exc:
            self.metrics.observe_weight_sync("tensor", 0.0, 0, ok=False)
            hint = "" if "pickle" in str(exc) else " (only safetensors is accepted)"
            raise _failure(f"weights not updated (tensor): {where}{exc}{hint}") from exc

    async def from_distributed(
        self, req: sgl.UpdateWeightsFromDistributedRequest
    ) -> sgl.UpdateResult:
        t0 = time.perf_counter()
        group = self.groups[self._group_name(req.group_name)]
        dtypes = self._announce(req)
        async with self.lock:
            if req.abort_all_requests:
                await self.engine.abort_all()
            try:  # receive even if names are wrong, so the trainer's broadcasts complete
                tensors = await group.receive(
                    req.names, dtypes, req.shapes, req.load_format == "flattened_bucket"
                )
            except Exception as exc:
                self.metrics.observe_weight_sync("distributed", 0.0, 0, ok=False)
                raise _failure(f"weights not updated (distributed): receive failed: {exc}") from exc
            return await self._apply("distributed", tensors, req.selector, req.weight_version,
                                     flush=req.flush_cache, t0=t0,
                                     message="Succeeded to update parameter online.")  # fmt: skip

    def _announce(self, req: sgl.UpdateWeightsFromDistributedRequest) -> list[torch.dtype]:
        """Check what the trainer announced is receivable at all (before any broadcast)."""
        if not (len(req.names) == len(req.dtypes) == len(req.shapes)) or not req.names:
            raise _failure("names, dtypes and shapes must be non-empty lists of equal length")
        if len(set(req.names)) != len(req.names):
            raise _failure("names must be distinct")
        if req.load_format not in (None, "flattened_bucket"):
            raise _failure(
                f"load_format {req.load_format!r} is not supported (None or flattened_bucket)"
            )
        try:
            dtypes = [parse_dtype(d) for d in req.dtypes]
        except WeightUpdateError as exc:
            raise _failure(str(exc)) from exc
        if any(d < 0 for s in req.shapes for d in s):
            raise _failure("shapes must be non-negative")
        total = sum(nbytes(s, d) for s, d in zip(req.shapes, dtypes, strict=True))
        if total > self.config.max_distributed_bytes:
            raise _failure(
                f"update of {total} bytes exceeds the limit {self.config.max_distributed_bytes}",
                413,
            )
        return dtypes

    # ----------------------------------------------------------------- groups
    async def init_group(self, req: sgl.InitWeightsUpdateGroupRequest) -> sgl.UpdateResult:
        backend = req.backend.lower()
        device = self.engine.config.device
        if backend not in ("gloo", "nccl"):
            raise _failure(f"backend {req.backend!r} is not supported (gloo, nccl)")
        if backend == "nccl" and not device.startswith("cuda"):
            raise _failure("the engine runs on CPU: use backend 'gloo' (nccl needs a GPU)")
        if req.rank_offset >= req.world_size:
            raise _failure("rank_offset must be < world_size")
        stale = self.groups.pop(req.group_name, None)
        if stale is not None:  # SGLang: a re-init replaces the group of that name
            await stale.destroy()
        group = WeightUpdateGroup(req.group_name, backend, device, self.config.group_timeout_s)
        try:
            await group.join(req.master_address, req.master_port, req.rank_offset, req.world_size)
        except Exception as exc:
            await group.destroy()
            raise _failure(f"Failed to initialize custom process group: {exc}.") from exc
        self.groups[req.group_name] = group
        return _ok("Succeeded to initialize custom process group.", self.engine.weight_version)

    def _group_name(self, name: str | None) -> str:
        """The group a call means. SGLang keeps one weight-update group and uses it whatever
        name a later call gives (SkyRL creates "skyrl", then updates and destroys without a
        name): an exact name wins; otherwise the only group there is; otherwise a 400."""
        if name in self.groups:
            return name
        if len(self.groups) == 1:
            return next(iter(self.groups))
        known = ", ".join(map(repr, self.groups)) or "none"
        raise _failure(
            f"group {name!r} does not exist (groups: {known}): call /init_weights_update_group"
            + (" first" if not self.groups else " or name one of them")
        )

    async def destroy_group(self, name: str | None) -> sgl.UpdateResult:
        if not self.groups:
            raise _failure("The group to be destroyed does not exist.")
        group = self.groups.pop(self._group_name(name))
        await group.destroy()
        return _ok("Succeeded to destroy custom process group.", self.engine.weight_version)

    async def close(self) -> None:
        for name in list(self.groups):
            await self.groups.pop(name).destroy()

    # ---------------------------------------------------------------- control
    def begin(self, selector: str) -> sgl.UpdateResult:
        self.session = selector
        return _ok("Weight update session opened.", self.engine.weight_version)

    def end(self) -> sgl.UpdateResult:
        if self.session is None:
            raise _failure("no weight update session is open (call /begin_weight_update)")
        self.session = None
        return _ok("Weight update session closed.", self.engine.weight_version)
