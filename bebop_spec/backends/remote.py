"""What the vLLM and SGLang serving backends share: bookkeeping around a remote engine.

A remote engine (vLLM's AsyncLLM, SGLang's Engine) owns scheduling and weights in its
own processes; the server still needs the `ServingBackend` surface of the embedded
engine (bebop_spec/backends/base.py): version counter and labels, running / waiting counts,
spec totals, per-step observers, and the names / shapes / dtypes a trainer must send
(`weight_spec`), which are read from the checkpoint's safetensors headers.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bebop_spec.backends.base import ServingBackend
from bebop_spec.engine.config import WEIGHT_SELECTORS, EngineConfig, WeightSelector
from bebop_spec.engine.outputs import RequestOutput, SpecStats, StepStats
from bebop_spec.models.checkpoint import Checkpoint, is_mtp_name
from bebop_spec.sampling_params import SamplingParams

# copies of the target's embedding / LM head that exported head directories carry
SHARED_NAMES = ("model.embed_tokens.weight", "lm_head.weight")


def checkpoint_spec(directory: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    return Checkpoint(directory).spec()


def weight_spec_of(
    model_dir: str | Path, mtp_dir: str | Path | None, num_hidden_layers: int, selector: str
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Tensors a trainer sends for `selector`, in checkpoint (Hugging Face) names."""
    if selector not in WEIGHT_SELECTORS:
        raise ValueError(f"selector={selector!r}: expected one of {WEIGHT_SELECTORS}")
    target = checkpoint_spec(model_dir)
    draft = {k: v for k, v in target.items() if is_mtp_name(k, num_hidden_layers)}
    target = {k: v for k, v in target.items() if k not in draft}
    if mtp_dir is not None:
        draft = {k: v for k, v in checkpoint_spec(mtp_dir).items() if k not in SHARED_NAMES}
    parts = {WeightSelector.TARGET: target, WeightSelector.DRAFT: draft}
    return {**parts, WeightSelector.ALL: {**target, **draft}}[selector]


def read_model_config(model_dir: str | Path) -> Any:
    """bebop's ModelConfig of the target, or the raw config.json as attributes."""
    hf = json.loads((Path(model_dir) / "config.json").read_text())
    try:
        from bebop_spec.models.config import ModelConfig

        return ModelConfig.from_hf(hf)
    except (ValueError, KeyError, TypeError):  # a family the embedded engine does not run
        from types import SimpleNamespace

        eos = hf.get("eos_token_id")
        fields = {
            **hf,
            "eos_token_ids": [] if eos is None else (eos if isinstance(eos, list) else [eos]),
            "max_position_embeddings": hf.get("max_position_embeddings", 32768),
        }
        return SimpleNamespace(**fields)


class RemoteBackend(ServingBackend):
    """Shared state of a backend whose engine runs elsewhere (see module docstring)."""

    backend_name = "remote"

    def __init__(self, config: EngineConfig, tokenizer: Any = None) -> None:
        self.config = config
        self.model_config = read_model_config(config.model)
        self._tokenizer = tokenizer
        self.max_model_len = config.max_model_len or self.model_config.max_position_embeddings
        self.version = 0
        self.version_labels: dict[int, str] = {0: "0"}
        self.spec_totals = SpecStats()
        self.paused = False
        self._observers: list[Callable[[StepStats], None]] = []
        self._waiting: set[str] = set()
        self._running: set[str] = set()

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
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add_observer(self, fn: Callable[[StepStats], None]) -> None:
        self._observers.append(fn)

    def weight_spec(self, selector: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return weight_spec_of(
            self.config.model, self.config.mtp, self.model_config.num_hidden_layers, selector
        )

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

    def _track(self, request_id: str, started: bool, finished: bool) -> None:
        if finished:
            self._waiting.discard(request_id)
            self._running.discard(request_id)
        elif started:
            self._waiting.discard(request_id)
            self._running.add(request_id)
        else:
            self._waiting.add(request_id)

    def _observe(self, new_tokens: int, spec: SpecStats | None) -> None:
        """One StepStats per output increment (remote engines do not expose their steps)."""
        if spec is not None:
            self._add_spec(spec)
        if not self._observers:
            return
        stats = StepStats(
            draft_mode=self.config.draft_mode_name,
            num_generated_tokens=new_tokens,
            num_drafts=spec.num_drafts if spec else 0,
            num_draft_tokens=spec.num_draft_tokens if spec else 0,
            num_accepted_tokens=spec.num_accepted_tokens if spec else 0,
            accepted_per_pos=list(spec.accepted_per_pos) if spec else [],
            num_running=self.num_running,
            num_waiting=self.num_waiting,
        )
        for fn in self._observers:
            fn(stats)

    def _add_spec(self, spec: SpecStats) -> None:
        t = self.spec_totals
        t.num_drafts += spec.num_drafts
        t.num_draft_tokens += spec.num_draft_tokens
        t.num_accepted_tokens += spec.num_accepted_tokens
        if len(t.accepted_per_pos) < len(spec.accepted_per_pos):
            t.accepted_per_pos += [0] * (len(spec.accepted_per_pos) - len(t.accepted_per_pos))
        for i, n in enumerate(spec.accepted_per_pos):
            t.accepted_per_pos[i] += n


def new_tokens(prev: RequestOutput | None, cur: RequestOutput) -> int:
    before = sum(len(o.token_ids) for o in prev.outputs) if prev else 0
    return sum(len(o.token_ids) for o in cur.outputs) - before
