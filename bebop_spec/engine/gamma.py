"""Per-step choice of the draft length γ_t ∈ {0, …, γ_max} (the `auto` speculation policy).

Each decode step picks the γ that maximises expected tokens per second for the batch:

    tokens(γ) = 1 + Σ_{k=1..γ} Π_{j≤k} α_j          (per row; α_j = P(accept draft j | j-1 accepted))
    rate(γ)   = tokens(γ) / cost(B, γ)               (cost: measured seconds of a step, B rows)

γ = 0 is a plain decode step. Costs are measured online per (batch-size bucket, γ); α comes
from decayed per-position counts of what verification accepted. The decision reads only
what happened in earlier steps, never the current step's random draws, so speculative
sampling stays exactly distributed (tests/test_engine_exactness.py covers `auto`).

Exploration is bounded: each γ ≤ 1 is timed twice per bucket (the first timing of a shape
is discarded as warm-up); a larger γ is tried only if it could win even if its extra drafts
were free; every `reprobe_every` steps a bucket re-times its least recently measured γ, so
estimates follow the context length and the policy's entropy as they drift.
"""

from __future__ import annotations

from dataclasses import dataclass, field


def bucket(rows: int) -> int:
    """Batch-size bucket: the next power of two ≥ rows (1, 2, 4, …)."""
    return 1 << max(0, rows - 1).bit_length()


def expected_tokens(alpha: list[float], gamma: int) -> float:
    """1 + Σ_{k=1..γ} Π_{j≤k} α_j: tokens a step emits per row (accepted drafts + one more)."""
    total, run = 1.0, 1.0
    for a in alpha[:gamma]:
        run *= a
        total += run
    return total


@dataclass
class _Cost:
    seconds: float = 0.0
    samples: int = 0  # timings seen (the first, warm-up, is discarded)
    last_step: int = 0  # bucket step at which it was last measured


@dataclass
class GammaController:
    """Chooses γ_t from measured step costs and running acceptance (see module docstring)."""

    gamma_max: int
    decay: float = 0.99  # per spec step: acceptance counts forget with a ~100-step horizon
    ema: float = 0.25  # weight of a new timing in a cost estimate
    reprobe_every: int = 50
    prior: float = 0.5  # α_1 before any evidence (pseudo-count `prior_weight`)
    prior_weight: float = 2.0
    accepted: list[float] = field(default_factory=list)  # decayed counts per position
    reached: list[float] = field(default_factory=list)
    costs: dict[tuple[int, int], _Cost] = field(default_factory=dict)
    steps: dict[int, int] = field(default_factory=dict)  # decisions per bucket
    chosen: list[int] = field(default_factory=list)  # histogram of γ_t, index γ

    def __post_init__(self) -> None:
        if self.gamma_max < 1:
            raise ValueError(f"gamma_max={self.gamma_max} must be >= 1")
        self.accepted = [0.0] * self.gamma_max
        self.reached = [0.0] * self.gamma_max
        self.chosen = [0] * (self.gamma_max + 1)

    # ------------------------------------------------------------------ estimates
    def alpha(self) -> list[float]:
        """Conditional acceptance per position; an unseen position shrinks to the one before."""
        out, prev = [], self.prior
        for acc, reach in zip(self.accepted, self.reached, strict=True):
            prev = (acc + self.prior_weight * prev) / (reach + self.prior_weight)
            out.append(prev)
        return out

    def cost(self, rows: int, gamma: int) -> float | None:
        c = self.costs.get((bucket(rows), gamma))
        return c.seconds if c is not None and c.samples >= 2 else None

    def rates(self, rows: int) -> dict[int, float]:
        """Expected tokens per second per row for every γ whose cost is known."""
        alpha = self.alpha()
        known = {g: self.cost(rows, g) for g in range(self.gamma_max + 1)}
        return {g: expected_tokens(alpha, g) / c for g, c in known.items() if c}

    # ------------------------------------------------------------------ decide / observe
    def choose(self, rows: int) -> int:
        """γ for the next decode step of a batch of `rows` sequences."""
        b = bucket(rows)
        self.steps[b] = step = self.steps.get(b, 0) + 1
        gamma = self._explore(rows)
        if gamma is None:
            gamma = self._reprobe(b, step)
        if gamma is None:
            rates = self.rates(rows)
            gamma = max(rates, key=lambda g: (rates[g], -g))
        self.chosen[gamma] += 1
        return gamma

    def _explore(self, rows: int) -> int | None:
        """An unmeasured γ worth measuring: 0 and 1 always; larger γ only if it could win."""
        for g in (0, 1):
            if self.cost(rows, g) is None:
                return g
        rates = self.rates(rows)
        best, alpha, c1 = max(rates.values()), self.alpha(), self.cost(rows, 1)
        for g in range(2, self.gamma_max + 1):
            if g not in rates and expected_tokens(alpha, g) / c1 > best:
                return g  # c1 is a lower bound on cost(γ ≥ 1): only then can γ win
        return None

    def _reprobe(self, b: int, step: int) -> int | None:
        """Every `reprobe_every` steps, the γ whose timing is oldest (ties: the smallest)."""
        if step % self.reprobe_every:
            return None
        measured = [(c.last_step, g) for (bb, g), c in self.costs.items() if bb == b]
        return min(measured)[1] if measured else None

    def observe_cost(self, rows: int, gamma: int, seconds: float) -> None:
        """A decode step of `rows` rows and draft length γ took `seconds`."""
        b = bucket(rows)
        c = self.costs.setdefault((b, gamma), _Cost())
        c.samples += 1
        c.last_step = self.steps.get(b, 0)
        if c.samples == 2:  # the first timing of a shape pays warm-up: drop it
            c.seconds = seconds
        elif c.samples > 2:
            c.seconds += self.ema * (seconds - c.seconds)

    def observe_acceptance(self, num_accepted: list[int], gamma: int) -> None:
        """Per-row accepted-draft counts of one spec step with draft length γ ≥ 1."""
        self.accepted = [a * self.decay for a in self.accepted]
        self.reached = [r * self.decay for r in self.reached]
        for a in num_accepted:
            for j in range(min(a + 1, gamma)):  # drafts 1..a accepted; a+1 reached, rejected
                self.reached[j] += 1
                self.accepted[j] += j < a
