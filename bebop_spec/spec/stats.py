"""Entropy of processed distributions and speculative-decoding counters (vLLM's definitions)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs[...,V] -> H[...] = -Σ p log p in nats, with 0·log 0 = 0."""
    return torch.special.entr(probs).sum(dim=-1)


@dataclass
class SpecStats:
    """Speculative-decoding counters of one completion, a request or a whole engine (vLLM's
    definitions); ``accepted_per_pos[j]`` counts chains whose draft j (0-based) was accepted,
    i.e. num_accepted > j. γ may differ between steps (the auto policy)."""

    num_drafts: int = 0  # verification steps (chains) that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [max γ seen]

    def add(self, num_accepted: int | list[int] | torch.Tensor, gamma: int) -> None:
        """Count chains of γ drafts each; num_accepted (one int, or [B]) in [0, γ]. Plain
        Python: the engine calls it per sequence per step."""
        if isinstance(num_accepted, torch.Tensor):
            ns = num_accepted.reshape(-1).tolist()
        else:
            ns = [num_accepted] if isinstance(num_accepted, int) else list(num_accepted)
        if any(not 0 <= n <= gamma for n in ns):
            raise ValueError(f"num_accepted must lie in [0, {gamma}], got {ns}")
        self._grow(gamma)
        self.num_drafts += len(ns)
        self.num_draft_tokens += len(ns) * gamma
        self.num_accepted_tokens += sum(ns)
        for n in ns:
            for j in range(n):
                self.accepted_per_pos[j] += 1

    def merge(self, other: SpecStats) -> SpecStats:
        """A new counter holding the sum of both (neither input changes)."""
        size = max(len(self.accepted_per_pos), len(other.accepted_per_pos))

        def pad(xs: list[int]) -> list[int]:
            return xs + [0] * (size - len(xs))

        return SpecStats(
            self.num_drafts + other.num_drafts,
            self.num_draft_tokens + other.num_draft_tokens,
            self.num_accepted_tokens + other.num_accepted_tokens,
            [
                a + b
                for a, b in zip(
                    pad(self.accepted_per_pos), pad(other.accepted_per_pos), strict=True
                )
            ],
        )

    def _grow(self, gamma: int) -> None:
        if len(self.accepted_per_pos) < gamma:
            self.accepted_per_pos += [0] * (gamma - len(self.accepted_per_pos))

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafts / drafted tokens (0 before any draft)."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verification step, 1 + accepted / drafts (vLLM's definition; 0 if none)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_rate_per_pos(self) -> list[float]:
        """P(draft j accepted) = accepted_per_pos[j] / num_drafts, one entry per position."""
        d = self.num_drafts
        return [a / d if d else 0.0 for a in self.accepted_per_pos]
