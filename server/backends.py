"""Serving backends: what the HTTP layer needs from an engine, and a registry of engines.

`embedded` is bebop_spec's own `AsyncEngine`; `vllm` / `sglang` plug in here later. Each
entry is imported lazily so optional heavy packages stay optional.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from bebop_spec.engine.config import EngineConfig
from bebop_spec.engine.outputs import RequestOutput, SpecStats, StepStats
from bebop_spec.sampling_params import SamplingParams


@runtime_checkable
class ServingBackend(Protocol):
    """The engine surface the server uses (matches `bebop_spec.engine.AsyncEngine`)."""

    config: EngineConfig
    model_config: Any  # vocab_size, eos_token_ids, max_position_embeddings, ...
    tokenizer: Any  # transformers tokenizer, or None (token-id-only mode)
    max_model_len: int
    version: int  # counter, +1 per successful update; per-token versions use it
    weight_version: str  # label of the serving weights
    version_labels: dict[int, str]
    num_running: int
    num_waiting: int
    paused: bool
    spec_totals: SpecStats

    def add_observer(self, fn: Callable[[StepStats], None]) -> None: ...
    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
    def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]: ...
    async def abort(self, request_id: str) -> bool: ...
    async def abort_all(self) -> int: ...
    async def pause(self, mode: str) -> None: ...
    async def resume(self) -> None: ...
    def weight_spec(self, selector: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...
    async def update_weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        selector: str = "target",
        weight_version: str | None = None,
    ) -> str: ...
    async def flush_cache(self) -> None: ...


BACKENDS: dict[str, str] = {
    "embedded": "bebop_spec.engine.async_engine:AsyncEngine",
    "vllm": "bebop_spec.integrations.vllm_backend:VLLMBackend",  # needs vllm (+ a GPU)
    "sglang": "bebop_spec.integrations.sglang_backend:SGLangBackend",  # needs sglang (+ a GPU)
}


def create_backend(name: str, config: EngineConfig) -> ServingBackend:
    """Build (and load) the engine registered as `name`."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; available: {', '.join(sorted(BACKENDS))}")
    module, _, attr = BACKENDS[name].partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls(config)
