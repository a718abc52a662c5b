"""Repetition / frequency / presence penalties, logit bias and min_tokens (vLLM semantics).

They are functions of the tokens a row has seen, applied to raw logits before temperature /
top-k / top-p (``sampling.process_logits``), to the target's p and the draft's q alike. At
chain position k of a speculative step the row's generated tokens are its output plus the
drafts d_1..d_{k-1} (``TokenHistory.advance`` / ``along``), exactly what plain decoding
would have seen there, so p and q stay the distributions of plain sampling and the rejection
test stays exact. Tests: ``python -m pytest -q tests/spec/test_spec_penalties.py``.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from bebop_spec.sampling_params import SamplingParams


@dataclass(eq=False)
class PenaltyTensors:
    """Per-row penalty parameters of a batch: [B] columns and [B, K] id lists padded with -1."""

    repetition: torch.Tensor  # float32 [B], 1 = off
    frequency: torch.Tensor  # float32 [B], 0 = off
    presence: torch.Tensor  # float32 [B], 0 = off
    min_tokens: torch.Tensor  # long [B], 0 = off
    stop_ids: torch.Tensor  # long [B, S]: EOS and stop_token_ids, blocked below min_tokens
    bias_ids: torch.Tensor  # long [B, K]
    bias_values: torch.Tensor  # float32 [B, K], 0 at padding
    # Whole-batch switches, read once here so apply_penalties skips unused stages without a sync.
    any_repetition: bool = field(init=False)
    any_additive: bool = field(init=False)
    any_min_tokens: bool = field(init=False)
    any_bias: bool = field(init=False)

    def __post_init__(self) -> None:
        self.any_repetition = bool((self.repetition != 1).any())
        self.any_additive = bool(((self.frequency != 0) | (self.presence != 0)).any())
        self.any_min_tokens = bool((self.min_tokens > 0).any())
        self.any_bias = bool((self.bias_values != 0).any())

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], eos_ids: Sequence[int] = (),
        device: torch.device | str = "cpu",
    ) -> PenaltyTensors | None:  # fmt: skip
        """The batch's penalties, or None when no row uses any (the fast path)."""
        if not any(sp.uses_penalties for sp in params):
            return None

        def col(values: list, dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype, device=device)

        stops = [sorted(set(eos_ids) | set(sp.stop_token_ids)) for sp in params]
        biases = [sorted((sp.logit_bias or {}).items()) for sp in params]
        return cls(
            repetition=col([sp.repetition_penalty for sp in params], torch.float32),
            frequency=col([sp.frequency_penalty for sp in params], torch.float32),
            presence=col([sp.presence_penalty for sp in params], torch.float32),
            min_tokens=col([sp.min_tokens for sp in params], torch.long),
            stop_ids=_padded(stops, -1, torch.long, device),
            bias_ids=_padded([[t for t, _ in b] for b in biases], -1, torch.long, device),
            bias_values=_padded([[x for _, x in b] for b in biases], 0.0, torch.float32, device),
        )

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> PenaltyTensors:
        """The same rows transformed by fn on dim 0 (select, repeat_interleave, to)."""
        return PenaltyTensors(fn(self.repetition), fn(self.frequency), fn(self.presence),
                              fn(self.min_tokens), fn(self.stop_ids), fn(self.bias_ids),
                              fn(self.bias_values))  # fmt: skip


def _padded(rows: list[list], pad: float, dtype: torch.dtype, device) -> torch.Tensor:
    """[B, max(1, longest row)] with `pad` after each row's entries."""
    width = max([1] + [len(r) for r in rows])
    return torch.tensor([r + [pad] * (width - len(r)) for r in rows], dtype=dtype, device=device)


@dataclass(eq=False)
class TokenHistory:
    """What the penalties read for each row at each position; leading dims [B, ...] match the
    logits' (``[B]`` for one position, ``[B, γ+1]`` along a chain)."""

    counts: torch.Tensor  # float32 [B, ..., V]: times each token was generated so far
    num_generated: torch.Tensor  # long [B, ...]
    prompt_mask: torch.Tensor | None = None  # bool [B, V]: token occurs in the prompt

    @classmethod
    def from_ids(
        cls, prompts: Sequence[Sequence[int]] | None, outputs: Sequence[Sequence[int]],
        vocab: int, device: torch.device | str = "cpu",
    ) -> TokenHistory:  # fmt: skip
        """History at the next position of rows with these outputs (and prompts: None skips
        the prompt mask, which only the repetition penalty reads)."""
        counts = token_counts(outputs, vocab, device)
        num = torch.tensor([len(o) for o in outputs], dtype=torch.long, device=device)
        mask = None if prompts is None else token_counts(prompts, vocab, device) > 0
        return cls(counts, num, mask)

    def advance(self, tokens: torch.Tensor) -> TokenHistory:
        """History one position later, after each row generated tokens[B] (a [B] history)."""
        counts = self.counts.scatter_add(-1, tokens[:, None], torch.ones_like(self.counts[:, :1]))
        return TokenHistory(counts, self.num_generated + 1, self.prompt_mask)

    def along(self, drafts: torch.Tensor) -> TokenHistory:
        """[B] history -> [B, γ+1] history of a chain: position k has also generated drafts[:, :k].

        drafts[B, γ]; counts_k = counts + Σ_{j<k} one_hot(d_j), num_k = num + k.
        """
        vocab = self.counts.shape[-1]
        seen = torch.nn.functional.one_hot(drafts, vocab).to(self.counts.dtype).cumsum(1)
        before = torch.cat([torch.zeros_like(seen[:, :1]), seen], 1)  # [B, γ+1, V]
        steps = torch.arange(drafts.shape[1] + 1, device=drafts.device)
        return TokenHistory(self.counts[:, None] + before,
                            self.num_generated[:, None] + steps, self.prompt_mask)  # fmt: skip


def token_counts(rows: Sequence[Sequence[int]], vocab: int, device) -> torch.Tensor:
    """rows (B lists of ids < vocab) -> counts[B, V] float32, built on `device` in one copy."""
    lens = torch.tensor([len(r) for r in rows], dtype=torch.long)
    flat = torch.tensor(list(itertools.chain.from_iterable(rows)), dtype=torch.long)
    row = torch.repeat_interleave(torch.arange(len(rows)), lens)
    counts = torch.zeros(len(rows), vocab, dtype=torch.float32, device=device)
    ones = torch.ones(flat.shape[0], dtype=torch.float32, device=device)
    return counts.index_put_((row.to(device), flat.to(device)), ones, accumulate=True)


def apply_penalties(logits: torch.Tensor, pt: PenaltyTensors, hist: TokenHistory) -> torch.Tensor:
    """logits[B,...,V] float32, history with leading dims [B,...] -> penalised logits[B,...,V].

    In vLLM's order: min_tokens, logit bias, then the repetition, frequency and presence
    penalties (the penalties act on the biased logits).
    """
    batch, vocab = logits.shape[0], logits.shape[-1]
    shape = (batch,) + (1,) * (logits.dim() - 1)  # per-row value, broadcast over ...,V
    rows_v = (batch,) + (1,) * (logits.dim() - 2) + (vocab,)  # per-row [V] vector
    counts = hist.counts
    if pt.any_min_tokens:
        # EOS and stop ids are impossible while fewer than min_tokens tokens were generated.
        young = hist.num_generated < pt.min_tokens.view(shape[:-1])  # [B, ...]
        blocked = _id_sum(pt.stop_ids, torch.ones_like(pt.stop_ids, dtype=torch.float32), vocab)
        logits = logits.masked_fill((blocked > 0).view(rows_v) & young[..., None], float("-inf"))
    if pt.any_bias:
        logits = logits + _id_sum(pt.bias_ids, pt.bias_values, vocab).view(rows_v)
    if pt.any_repetition:
        # CTRL rule on tokens of the prompt or the output: x > 0 -> x / r, else x * r.
        seen = counts > 0
        if hist.prompt_mask is not None:
            seen = seen | hist.prompt_mask.view(rows_v)
        r = pt.repetition.view(shape)
        logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    if pt.any_additive:
        # x - frequency * count(v) - presence * [count(v) > 0], output tokens only.
        present = (counts > 0).to(logits.dtype)
        logits = logits - pt.frequency.view(shape) * counts - pt.presence.view(shape) * present
    return logits


def _id_sum(ids: torch.Tensor, values: torch.Tensor, vocab: int) -> torch.Tensor:
    """ids[B, K] (-1 or >= vocab: ignored), values[B, K] -> dense[B, V]: Σ values at each id."""
    valid = (ids >= 0) & (ids < vocab)
    dense = torch.zeros(ids.shape[0], vocab, dtype=values.dtype, device=values.device)
    return dense.scatter_add_(-1, ids.clamp(0, vocab - 1), values * valid)
