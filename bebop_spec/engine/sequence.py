"""Per-sample state: one `Sequence` per sample of a request, everything derived from it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from bebop_spec.engine.outputs import CompletionOutput, PromptLogprobs, SpecStats
from bebop_spec.sampling_params import SamplingParams


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity semantics: queues test membership by object
class Sequence:
    """One sample being generated.

    KV bookkeeping (see docs/architecture.md): target K/V are valid for positions
    ``0..num_cached-1``; the last token is fed at the next step. The MTP cache holds the pair
    ``(h_j, x_{j+1})`` at position ``j`` for ``j < mtp_cached``; ``pending_hidden`` holds the
    target hiddens ``h_j`` for ``mtp_cached <= j < num_cached`` that the head has not seen yet.
    """

    seq_id: int
    request_id: str
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    generator: torch.Generator
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    raw_logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] = field(default_factory=list)
    token_ids_logprobs: list[dict[int, float]] = field(default_factory=list)
    prompt_logprobs: PromptLogprobs | None = None  # scored at the first prefill (sample 0 only)
    entropies: list[float] = field(default_factory=list)
    weight_versions: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    text_tokens: int = 0  # how many of token_ids `text` reflects (postprocess.refresh_text)
    block_table: list[int] = field(default_factory=list)  # KV blocks (engine/block_manager.py)
    prefill_level: int = 0  # prefill order within a batch: after the rows filling its prefix
    num_cached: int = 0
    mtp_cached: int = 0
    pending_hidden: torch.Tensor | None = None  # [num_cached - mtp_cached, H]
    spec: SpecStats = field(default_factory=SpecStats)

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def last_token(self) -> int:
        return self.token_ids[-1] if self.token_ids else self.prompt_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SeqStatus.FINISHED

    @property
    def needs_sample_at_prefill(self) -> bool:
        """A fresh sequence samples its first token at prefill; a retracted one does not."""
        return not self.token_ids

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Sample 0 of a request that scores its prompt, until its prefill has done so."""
        return self.params.scores_prompt and self.index == 0 and self.prompt_logprobs is None

    @property
    def max_prefix_hit(self) -> int:
        """Positions a cached prefix may cover: a prompt being scored needs the hiddens from
        its first causal row on, so those positions must be computed, not reused."""
        if self.wants_prompt_logprobs:
            return min(self.params.prompt_logprob_start, self.num_prompt_tokens - 1)
        return self.num_tokens

    @property
    def num_prefill_tokens(self) -> int:
        """Tokens a prefill feeds: the prompt, or everything but the last token after a
        retract (the last is fed by the next decode step)."""
        return self.num_tokens if self.needs_sample_at_prefill else self.num_tokens - 1

    def finish(self, reason: str, stop_reason: str | int | None = None) -> None:
        self.status = SeqStatus.FINISHED
        self.finish_reason = reason
        self.stop_reason = stop_reason
        self.pending_hidden = None

    def reset_cache_state(self) -> None:
        """Forget all cached K/V (retract, preempt, flush): the next prefill recomputes them.
        The block manager must have released `block_table` first."""
        self.block_table = []
        self.num_cached = 0
        self.mtp_cached = 0
        self.pending_hidden = None

    def to_output(self) -> CompletionOutput:
        want = self.params.logprobs is not None
        return CompletionOutput(
            index=self.index,
            token_ids=list(self.token_ids),
            text=self.text,
            logprobs=list(self.logprobs) if want or self.params.raw_logprobs else None,
            raw_logprobs=list(self.raw_logprobs) if self.params.raw_logprobs else None,
            top_logprobs=list(self.top_logprobs) if want and self.params.logprobs else None,
            token_ids_logprobs=list(self.token_ids_logprobs)
            if self.params.logprob_token_ids
            else None,  # fmt: skip
            entropies=list(self.entropies),
            weight_versions=list(self.weight_versions),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            spec=SpecStats(
                self.spec.num_drafts,
                self.spec.num_draft_tokens,
                self.spec.num_accepted_tokens,
                list(self.spec.accepted_per_pos),
            ),
        )
