"""Entropy of processed distributions and speculative-decoding counters (vLLM's definitions)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def entropy(probs: torch.Tensor) -> torch.Tensor:
    """probs[...,V] -> H[...] = -Σ p log p in nats, with 0·log 0 = 0."""
    return torch.special.entr(probs).sum(dim=-1)


@dataclass
class SpecCounters:
    """Running totals over verification steps; ``accepted_per_pos[j]`` counts chains whose
    draft j (0-based) was accepted, i.e. num_accepted > j."""

    num_drafts: int = 0  # verification steps (chains) that carried drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = field(default_factory=list)  # [γ]

    def add(self, num_accepted: torch.Tensor | list[int], gamma: int) -> None:
        """Count one step of B chains of γ drafts each; num_accepted[B] in [0, γ]."""
        n = torch.as_tensor(num_accepted, dtype=torch.long).reshape(-1).cpu()
        if n.numel() and (n.min() < 0 or n.max() > gamma):
            raise ValueError(f"num_accepted must lie in [0, {gamma}], got {n.tolist()}")
        self._grow(gamma)
        self.num_drafts += n.numel()
        self.num_draft_tokens += n.numel() * gamma
        self.num_accepted_tokens += int(n.sum())
        reached = (n.unsqueeze(-1) > torch.arange(gamma)).sum(dim=0).tolist()
        for j, count in enumerate(reached):
            self.accepted_per_pos[j] += count

    def merge(self, other: SpecCounters) -> SpecCounters:
        """A new counter holding the sum of both (neither input changes)."""
        size = max(len(self.accepted_per_pos), len(other.accepted_per_pos))

        def pad(xs: list[int]) -> list[int]:
            return xs + [0] * (size - len(xs))

        return SpecCounters(
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
