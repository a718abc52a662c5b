"""Per-step choice of the draft length γ_t ∈ {0, …, γ_max} (the `auto` speculation policy).

Each decode step picks the γ that maximises expected tokens per second for the batch:

    tokens(γ) = 1 + Σ_{k=1..γ} Π_{j≤k} α_j          (per row; α_j = P(accept draft j | j-1 accepted))
    rate(γ)   = tokens(γ) / cost(B, γ)               (cost: measured seconds of a step, B rows)

γ = 0 is a plain decode step. Costs are measured online: a plain step's seconds per exact
row count B, and for γ ≥ 1 the ratio of a drafting step's seconds to the plain cost at the
same B, per (batch-size bucket, γ). So cost(B, γ) = plain(B) · ratio(bucket(B), γ): a batch
that shrinks inside a bucket (requests finishing) cannot make drafting look cheap, and the
ratio survives the slow growth of every step's cost with context length. α comes from decayed
per-position counts of what verification accepted. The decision reads only what happened in
earlier steps, never the current step's random draws, so speculative sampling stays exactly
distributed (tests/engine/test_engine_exactness.py covers `auto`).

Exploration is bounded, so that a policy whose drafts cannot pay costs almost nothing: a new
row count is timed with plain steps (the baseline: free); γ = 1 is timed twice in a bucket
(the first timing of a shape is discarded as warm-up) only if it could win at the cheapest
ratio a smaller bucket measured (a drafting step's cost relative to a plain one grows with
the batch); a larger γ only if it could win even if its extra drafts were free. A bucket
re-times its least recently measured γ every `reprobe_every` steps, so estimates follow the
policy's entropy as it drifts; each re-probe that leaves γ = 0 the best doubles that interval
(up to `max_backoff`×), and one after which drafting wins resets it.
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
    max_backoff: int = 16  # a losing bucket re-probes at most every reprobe_every · max_backoff
    prior: float = 0.5  # α_1 before any evidence (pseudo-count `prior_weight`)
    prior_weight: float = 2.0
    accepted: list[float] = field(default_factory=list)  # decayed counts per position
    reached: list[float] = field(default_factory=list)
    plain: dict[int, _Cost] = field(default_factory=dict)  # seconds of a plain step, by rows
    ratios: dict[tuple[int, int], _Cost] = field(default_factory=dict)  # (bucket, γ≥1) -> ÷ plain
    steps: dict[int, int] = field(default_factory=dict)  # decisions per bucket
    next_probe: dict[int, int] = field(default_factory=dict)  # bucket -> step of its re-probe
    backoff: dict[int, int] = field(default_factory=dict)  # bucket -> current interval factor
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

    def plain_cost(self, rows: int, exact: bool = False) -> float | None:
        """Seconds of a plain step of `rows` rows; else (not `exact`) that of the nearest row
        count measured."""
        known = {r: c.seconds for r, c in self.plain.items() if c.samples >= 2}
        if rows in known or exact:
            return known.get(rows)
        return known[min(known, key=lambda r: (abs(r - rows), r))] if known else None

    def cost(self, rows: int, gamma: int) -> float | None:
        base = self.plain_cost(rows, exact=True)
        if gamma == 0 or base is None:
            return base
        c = self.ratios.get((bucket(rows), gamma))
        return base * c.seconds if c is not None and c.samples >= 2 else None

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
            gamma = self._reprobe(rows, step)
        if gamma is None:
            rates = self.rates(rows)
            gamma = max(rates, key=lambda g: (rates[g], -g))
        self.chosen[gamma] += 1
        return gamma

    def _explore(self, rows: int) -> int | None:
        """An unmeasured γ worth measuring: 0 always; 1 if it could win at the cheapest ratio
        measured at a smaller batch; larger γ only if it could win with free extra drafts."""
        if self.cost(rows, 0) is None:
            return 0
        if self.cost(rows, 1) is None:
            return 1 if expected_tokens(self.alpha(), 1) > self._ratio_floor(rows) else None
        rates = self.rates(rows)
        best, alpha, c1 = max(rates.values()), self.alpha(), self.cost(rows, 1)
        for g in range(2, self.gamma_max + 1):
            if g not in rates and expected_tokens(alpha, g) / c1 > best:
                return g  # c1 is a lower bound on cost(γ ≥ 1): only then can γ win
        return None

    def _ratio_floor(self, rows: int) -> float:
        """A lower bound on cost(γ ≥ 1) / cost(0) at `rows`: the least ratio measured in a
        bucket no larger (1 if none is)."""
        b = bucket(rows)
        known = [c.seconds for (bb, _), c in self.ratios.items() if bb <= b and c.samples >= 2]
        return min(known, default=1.0)

    def _reprobe(self, rows: int, step: int) -> int | None:
        """At the bucket's next probe step, the drafting γ whose ratio is oldest (ties:
        smallest); the interval doubles while plain steps stay the best, else resets."""
        b = bucket(rows)
        due = self.next_probe.setdefault(b, self.reprobe_every)
        if step < due:
            return None
        measured = [(c.last_step, g) for (bb, g), c in self.ratios.items() if bb == b]
        rates = self.rates(rows)
        losing = bool(rates) and max(rates, key=lambda g: (rates[g], -g)) == 0
        factor = min(2 * self.backoff.get(b, 1), self.max_backoff) if losing else 1
        self.backoff[b] = factor
        self.next_probe[b] = step + self.reprobe_every * factor
        return min(measured)[1] if measured else None

    def observe_cost(self, rows: int, gamma: int, seconds: float) -> None:
        """A decode step of `rows` rows and draft length γ took `seconds`."""
        b = bucket(rows)
        if gamma == 0:
            self._update(self.plain.setdefault(rows, _Cost()), seconds, b)
            return
        base = self.plain_cost(rows)
        if base:
            self._update(self.ratios.setdefault((b, gamma), _Cost()), seconds / base, b)

    def _update(self, c: _Cost, value: float, b: int) -> None:
        c.samples += 1
        c.last_step = self.steps.get(b, 0)
        if c.samples == 2:  # the first timing of a shape pays warm-up: drop it
            c.seconds = value
        elif c.samples > 2:
            c.seconds += self.ema * (value - c.seconds)

    def observe_acceptance(self, num_accepted: list[int], gamma: int) -> None:
        """Per-row accepted-draft counts of one spec step with draft length γ ≥ 1."""
        self.accepted = [a * self.decay for a in self.accepted]
        self.reached = [r * self.decay for r in self.reached]
        for a in num_accepted:
            for j in range(min(a + 1, gamma)):  # drafts 1..a accepted; a+1 reached, rejected
                self.reached[j] += 1
                self.accepted[j] += j < a
