"""The serving-backend contract: what the HTTP server needs from an engine.

Implementations: `embedded` (bebop_spec's own AsyncEngine, backends/embedded.py) and the
remote engines `vllm` / `sglang` (backends/remote.py's shared template). Capabilities only
some engines have come with defaults here (`kv_cache_info` None, checksums unsupported, a
memory release that frees nothing), so the server never asks `hasattr`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import torch

from bebop_spec.engine.config import EngineConfig
from bebop_spec.engine.outputs import RequestOutput, SpecStats, StepStats
from bebop_spec.errors import BackendUnsupported
from bebop_spec.sampling_params import SamplingParams


class ServingBackend(abc.ABC):
    """Attributes every backend has (plain attributes or properties)."""

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

    # ------------------------------------------------------------------ lifecycle
    @abc.abstractmethod
    def add_observer(self, fn: Callable[[StepStats], None]) -> None: ...

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def shutdown(self) -> None: ...

    # ------------------------------------------------------------------ generation
    @abc.abstractmethod
    def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                 request_id: str) -> AsyncIterator[RequestOutput]:  # fmt: skip
        """Cumulative outputs of one request; closing the iterator aborts it."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> bool: ...

    @abc.abstractmethod
    async def abort_all(self) -> int: ...

    @abc.abstractmethod
    async def pause(self, mode: str) -> None:
        """Modes abort / retract / in_place (engine/config.PauseMode)."""

    @abc.abstractmethod
    async def resume(self) -> None: ...

    @abc.abstractmethod
    async def flush_cache(self) -> int:
        """Drop every cached K/V; returns how many running sequences must recompute."""

    # ------------------------------------------------------------------ weights
    @abc.abstractmethod
    def weight_spec(self, selector: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]: ...

    @abc.abstractmethod
    async def update_weights(self, tensors: Mapping[str, torch.Tensor], selector: str = "target",
                             weight_version: str | None = None) -> str:  # fmt: skip
        """Swap in checked tensors between two steps; returns the new label."""

    @abc.abstractmethod
    async def relabel_weight_version(self, label: str) -> str: ...

    # ------------------------------------------------------------------ optional
    @property
    def kv_cache_info(self) -> dict | None:
        """The KV pool now (blocks, use, preemptions, prefix hit rate), where known."""
        return None

    @property
    def gamma_chosen(self) -> list[int] | None:
        """Decode steps per draft length under the auto policy, where known."""
        return None

    async def weight_checksums(self, selector: str = "target") -> dict[str, str]:
        raise BackendUnsupported(f"{type(self).__name__} cannot report weight checksums")

    async def release_kv(self) -> int:
        """Pause (re-queuing running requests) and free the KV pool; returns bytes freed.
        Default: the pause only (an engine whose pool it cannot free)."""
        await self.pause("retract")
        return 0
