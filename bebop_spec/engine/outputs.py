"""What the engine hands back: per-request outputs and per-step statistics."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from bebop_spec.spec.stats import SpecStats


@dataclass
class CompletionOutput:
    """One sample of a request. Lists are cumulative (the whole completion so far)."""

    index: int
    token_ids: list[int]
    text: str = ""
    logprobs: list[float] | None = None  # log p(token) under the processed p
    raw_logprobs: list[float] | None = None  # log softmax of unprocessed (T=1) logits
    top_logprobs: list[dict[int, float]] | None = None  # when SamplingParams.logprobs > 0
    token_ids_logprobs: list[dict[int, float]] | None = None  # SamplingParams.logprob_token_ids
    entropies: list[float] = field(default_factory=list)  # H(processed p) at each token
    weight_versions: list[int] = field(default_factory=list)  # version that produced each token
    finish_reason: str | None = None  # None (running) | "stop" | "length" | "abort"
    stop_reason: str | int | None = None  # matched stop string or stop token id
    spec: SpecStats = field(default_factory=SpecStats)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class PromptLogprobs:
    """Scores of prompt tokens start..P-1 under the raw (T=1, unprocessed) model: entry t is
    token `start + t`, predicted by the hidden at position start + t - 1 (token 0 has none)."""

    start: int  # first scored position (>= 1)
    logprobs: list[float]  # log p(x_i | x_<i)
    ranks: list[int]  # 1 + how many tokens are likelier than x_i
    top: list[dict[int, float]] | None = None  # the k likeliest (SamplingParams.prompt_logprobs)
    chosen: list[dict[int, float]] | None = None  # SamplingParams.logprob_token_ids


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    prompt: str | None = None
    prompt_logprobs: PromptLogprobs | None = None

    @property
    def finished(self) -> bool:
        return all(o.finished for o in self.outputs)

    @property
    def spec(self) -> SpecStats:
        """Counters summed over the request's samples."""
        return functools.reduce(SpecStats.merge, (o.spec for o in self.outputs), SpecStats())


@dataclass
class StepStats:
    """What one engine step did; observers (metrics) receive one per step."""

    draft_mode: str  # "rs" | "to" | "none"
    gamma: int | None = None  # drafts per row of a decode step (0: plain); None: prefill
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)
    # One entry per verified draft position: target entropy H(p_i) and whether x_i was accepted.
    verified_entropies: list[float] = field(default_factory=list)
    verified_accepted: list[bool] = field(default_factory=list)
    num_running: int = 0
    num_waiting: int = 0
    step_seconds: float = 0.0
    # KV pool after the step, and what scheduling it did (engine/block_manager.py)
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    num_preemptions: int = 0
    prefix_queried_tokens: int = 0  # prefill tokens needed by the step's admissions
    prefix_hit_tokens: int = 0  # of those, covered by cached prefix blocks
