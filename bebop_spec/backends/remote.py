"""What the vLLM and SGLang serving backends share: the template around a remote engine.

A remote engine (vLLM's AsyncLLM, SGLang's Engine) owns scheduling and weights in its
own processes; the server still needs the `ServingBackend` surface of the embedded
engine (bebop_spec/backends/base.py): version counter and labels, running / waiting counts,
spec totals, per-step observers (derived from each request's outputs: remote_requests.py),
and the names / shapes / dtypes a trainer must send (`weight_spec`, read from the
checkpoint's safetensors headers: remote_model.py).

`RemoteBackend` runs the parts both engines share (engine arguments with overrides, the
generate loop with its tracking, observing and abort-on-close, pause / resume / flush,
versioned weight updates) and calls the hooks below for what each engine spells its own way:

    _open_stream(ids, params, rid)   start one request; an async iterator of engine outputs
    _converter(ids, params, rid)     engine output -> our cumulative RequestOutput
    _abort_engine(rid) / _abort_all_engine(rids)
    _pause_engine(mode) / _resume_engine() / _flush_engine()
    _send_weights(tensors, selector, label)
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import torch

from bebop_spec.backends.base import ServingBackend
from bebop_spec.backends.remote_model import read_model_config, weight_spec_of
from bebop_spec.backends.remote_requests import RequestLedger, new_tokens
from bebop_spec.engine.config import PAUSE_MODES, WEIGHT_SELECTORS, EngineConfig, WeightSelector
from bebop_spec.engine.outputs import RequestOutput, SpecStats, StepStats
from bebop_spec.sampling_params import SamplingParams


def with_overrides(args: dict[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
    """Engine keywords: `args`, then $BEBOP_ENGINE_ARGS (JSON), then `extra` on top."""
    env = os.environ.get("BEBOP_ENGINE_ARGS")
    return {**args, **(json.loads(env) if env else {}), **dict(extra or {})}


class RemoteBackend(ServingBackend):
    """Shared state of a backend whose engine runs elsewhere (see module docstring)."""

    backend_name = "remote"
    # EngineConfig (+ overrides) -> the engine's constructor keywords (the module's engine_args)
    make_engine_args: Callable[[EngineConfig, Mapping[str, Any] | None], dict[str, Any]]

    def __init__(self, config: EngineConfig, engine_args_override: Mapping[str, Any] | None = None,
                 engine: Any = None, tokenizer: Any = None) -> None:  # fmt: skip
        self.config = config
        self.engine_args = self.make_engine_args(config, engine_args_override)
        self._engine = engine  # injectable (tests); otherwise built in start()
        self.model_config = read_model_config(config.model)
        self._tokenizer = tokenizer
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.version = 0
        self.version_labels: dict[int, str] = {0: "0"}
        self.paused = False
        self.requests = RequestLedger(config.draft_mode_name)

    @staticmethod
    def check_params(params: SamplingParams) -> None:
        """What only the embedded engine computes: prompt scoring and chosen-id logprobs."""
        if params.scores_prompt or params.logprob_token_ids:
            from bebop_spec.errors import InvalidRequest

            raise InvalidRequest("prompt logprobs and logprob_token_ids are served by the "
                                 "embedded engine only")  # fmt: skip

    # ------------------------------------------------------------------ ServingBackend surface
    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            try:
                from transformers import AutoTokenizer

                self._tokenizer = AutoTokenizer.from_pretrained(self.config.model)
            except (OSError, ValueError):
                return None
        return self._tokenizer

    @property
    def weight_version(self) -> str:
        return self.version_labels[self.version]

    @property
    def num_running(self) -> int:
        return len(self.requests.running)

    @property
    def num_waiting(self) -> int:
        return len(self.requests.waiting)

    @property
    def spec_totals(self) -> SpecStats:
        return self.requests.spec_totals

    def add_observer(self, fn: Callable[[StepStats], None]) -> None:
        self.requests.observers.append(fn)

    def weight_spec(self, selector: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return weight_spec_of(
            self.config.model, self.config.mtp, self.model_config.num_hidden_layers, selector
        )

    async def shutdown(self) -> None:
        if self._engine is not None:
            self._engine.shutdown()

    async def generate(
        self, prompt_token_ids: list[int], params: SamplingParams, request_id: str
    ) -> AsyncIterator[RequestOutput]:
        """Cumulative outputs; closing the iterator early aborts the request in the engine."""
        self.check_params(params)
        await self.start()
        ids = list(prompt_token_ids)
        convert = self._converter(ids, params, request_id)
        self.requests.track(request_id, started=False, finished=False)
        stream = await self._open_stream(ids, params, request_id)
        prev: RequestOutput | None = None
        try:
            async for raw in stream:
                cur = convert(raw)
                self.requests.track(request_id, started=True, finished=cur.finished)
                spec = cur.spec if cur.finished else None
                self.requests.observe(
                    new_tokens(prev, cur), spec if spec and spec.num_drafts else None
                )
                prev = cur
                yield cur
        finally:
            self.requests.track(request_id, started=True, finished=True)
            if prev is None or not prev.finished:
                await self._abort_engine(request_id)

    async def abort(self, request_id: str) -> bool:
        known = request_id in self.requests
        await self._abort_engine(request_id)
        return known

    async def abort_all(self) -> int:
        ids = self.requests.ids()
        await self._abort_all_engine(ids)
        return len(ids)

    async def pause(self, mode: str) -> None:
        if mode not in PAUSE_MODES:
            raise ValueError(f"pause mode {mode!r} must be one of {', '.join(PAUSE_MODES)}")
        await self._pause_engine(mode)
        self.paused = True

    async def resume(self) -> None:
        await self._resume_engine()
        self.paused = False

    async def flush_cache(self) -> int:
        await self._flush_engine()
        return 0  # remote engines do not say how many sequences recompute

    async def update_weights(
        self,
        tensors: Mapping[str, torch.Tensor],
        selector: str = WeightSelector.TARGET,
        weight_version: str | None = None,
    ) -> str:
        """Send checked tensors to the engine; the version moves only on success."""
        self._check_selector(selector)
        label = weight_version or str(self.version + 1)
        await self._send_weights(tensors, selector, label)
        return self._bump_version(label)

    # ------------------------------------------------------------------ engine hooks
    async def _open_stream(self, ids: list[int], params: SamplingParams,
                           request_id: str) -> AsyncIterator[Any]:  # fmt: skip
        raise NotImplementedError

    def _converter(self, ids: list[int], params: SamplingParams,
                   request_id: str) -> Callable[[Any], RequestOutput]:  # fmt: skip
        """A converter for one request's outputs (it may keep that request's state)."""
        raise NotImplementedError

    async def _abort_engine(self, request_id: str) -> None:
        raise NotImplementedError

    async def _abort_all_engine(self, request_ids: list[str]) -> None:
        raise NotImplementedError

    async def _pause_engine(self, mode: str) -> None:
        raise NotImplementedError

    async def _resume_engine(self) -> None:
        raise NotImplementedError

    async def _flush_engine(self) -> None:
        raise NotImplementedError

    async def _send_weights(self, tensors: Mapping[str, torch.Tensor], selector: str,
                            label: str) -> None:  # fmt: skip
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers for subclasses
    async def relabel_weight_version(self, label: str) -> str:
        """Rename the serving weights' version here, where every reply reads it (the remote
        engine keeps its own counter)."""
        if not label:
            from bebop_spec.errors import InvalidRequest

            raise InvalidRequest("weight_version label must be non-empty")
        self.version_labels[self.version] = label
        return label

    def _check_selector(self, selector: str) -> None:
        if selector not in WEIGHT_SELECTORS:
            raise ValueError(f"selector={selector!r}: expected one of {WEIGHT_SELECTORS}")
        if selector != WeightSelector.TARGET and not self.config.speculative:
            raise ValueError(f"selector={selector!r} needs speculative decoding (an MTP head)")

    def _bump_version(self, label: str | None) -> str:
        self.version += 1
        self.version_labels[self.version] = label or str(self.version)
        return self.weight_version

    def _version_of(self, label: str | None) -> int:
        """Our counter for an engine-reported label (the current one when unknown)."""
        for v, lab in self.version_labels.items():
            if lab == label:
                return v
        return self.version
