"""Per-step choice of the draft length γ_t ∈ {0, …, γ_max} (the `auto` speculation policy).

Each decode step picks the γ that maximises expected tokens per second for the batch:

    tokens(γ) = 1 + Σ_{k=1..γ} Π_{j≤k} α_j          (per row; α_j = P(accept draft j | j-1 accepted))
    rate(γ)   = tokens(γ) / cost(B, γ)               (cost: measured seconds of a step, B rows)

γ = 0 is a plain decode step. Costs are measured online: a plain step's seconds per exact
row count B, and a drafting step's seconds per (batch-size bucket, γ), each divided by the
*current* plain estimate at the rows it ran with. So cost(B, γ) = plain(B) · ratio(bucket(B),
γ): a batch that shrinks inside a bucket (requests finishing) cannot make drafting look cheap,
and a baseline that was slow when a drafting step was timed does not linger in its ratio.

Noise on a shared CPU only ever slows a step (a neighbour, a page fault, the head's
occasional catch-up), so each estimate is the lower quartile (the fastest, below 5 timings) of
its last `window` timings of the last 200 bucket steps (at least the newest), used once it has
kept `MIN_TIMINGS`. Timings that run on caches another shape left are not kept: the first of a
shape (warm-up), the first after a change of γ, and the `after_prefill` steps after a prefill
(up to 2x a settled step on the demo model). A bucket's ratios are made non-decreasing in γ
(pool-adjacent-violators, weighted by timings) and at least 1 (a drafting step does a plain
step's forward and more), so noise cannot make a longer draft look cheaper than a shorter one.

α comes from decayed per-position counts of what verification accepted, positions ≥ 2 taken
one standard error high (`optimism`): a deep position that is rarely drafted is otherwise
stuck at the shrunk estimate of the one before it (measured on SmolLM2: α_3 = 0.71 read as
0.46, so γ = 2 ran at 0.9x the speed of γ = 3). The decision reads only what happened in
earlier steps, never the current step's random draws, so speculative sampling stays exactly
distributed (tests/engine/test_engine_exactness.py covers `auto`).

Exploration is bounded, so that a policy whose drafts cannot pay costs almost nothing: a new
row count is timed with plain steps (the baseline: free); γ = 1 is timed in a bucket only if
it could win at the ratio the largest smaller bucket measured (a drafting step's cost relative
to a plain one grows with the batch); a larger γ only if it could win even if its extra
drafts were free. A bucket re-times its least recently measured drafting γ every
`reprobe_every` steps, in bursts of `burst` steps (the first untimed), so estimates follow the
policy's entropy as it drifts; each re-probe that leaves γ = 0 the best doubles that interval
(up to `max_backoff`×), and one after which drafting wins resets it. While drafting wins,
plain steps are timed on a schedule of their own: bursts every `refill_every` steps while the
lead is narrower than `narrow` (a shared machine's speed drifts 2-3x over seconds here, so a
narrow lead must rest on timings close in time), else every 2 · `reprobe_every`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

# Kept timings before a shape's cost is used.
MIN_TIMINGS = 3
# Noise (a neighbour, the head's catch-up) only slows a step: estimates take a low quantile.
QUANTILE = 0.25


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
    """Recent timings of one shape; the estimate is their lower quartile, trusted once
    `MIN_TIMINGS` were kept."""

    window: int = 9
    horizon: int = 200  # bucket steps: older timings leave the window (the newest stays)
    samples: int = 0  # timings seen (the first, warm-up, is dropped)
    last_step: int = 0  # bucket step at which it was last measured
    recent: deque = field(default_factory=deque)  # (bucket step, value, rows)
    _sorted: list[float] | None = None  # the recent values, sorted (None: stale)

    @property
    def trusted(self) -> bool:
        return self.samples > MIN_TIMINGS  # the first timing was dropped

    def estimate(self, quantile: float) -> float | None:
        """The `quantile` of the recent timings (0: the fastest)."""
        if not self.recent:
            return None
        if self._sorted is None:
            self._sorted = sorted(v for _, v, _ in self.recent)
        return self._sorted[int(quantile * (len(self._sorted) - 1))]

    def relative(self, quantile: float, base) -> float | None:
        """The `quantile` of the recent timings, each divided by base(its rows)."""
        values = sorted(v / b for _, v, r in self.recent if (b := base(r)))
        return values[int(quantile * (len(values) - 1))] if values else None

    def add(self, value: float, step: int, rows: int = 0) -> None:
        self.samples += 1
        self.last_step = step
        if self.samples == 1:
            return
        self.recent.append((step, value, rows))
        self._sorted = None
        while len(self.recent) > self.window or (
            len(self.recent) > 1 and self.recent[0][0] < step - self.horizon
        ):
            self.recent.popleft()


def _best(rates: dict[int, float]) -> int:
    """The γ of highest rate (ties: the smallest γ)."""
    return max(rates, key=lambda g: (rates[g], -g))


def monotone(values: list[float], weights: list[float]) -> list[float]:
    """The weighted least-squares non-decreasing fit of `values` (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [mean, weight, count]
    for v, w in zip(values, weights, strict=True):
        blocks.append([v, w, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (m2, w2, n2), (m1, w1, n1) = blocks.pop(), blocks.pop()
            blocks.append([(m1 * w1 + m2 * w2) / (w1 + w2), w1 + w2, n1 + n2])
    return [m for m, _, n in blocks for _ in range(n)]


@dataclass
class GammaController:
    """Chooses γ_t from measured step costs and running acceptance (see module docstring)."""

    gamma_max: int
    decay: float = 0.99  # per spec step: acceptance counts forget with a ~100-step horizon
    window: int = 9  # timings per cost estimate (their lower quartile)
    reprobe_every: int = 50
    max_backoff: int = 16  # a losing bucket re-probes at most every reprobe_every · max_backoff
    prior: float = 0.5  # α_1 before any evidence (pseudo-count `prior_weight`)
    prior_weight: float = 2.0
    optimism: float = 1.0  # standard errors added to α: deep, rarely drafted positions get tried
    refill_every: int = 10  # a narrow drafting lead re-times the baseline every this many steps
    narrow: float = 1.25  # a drafting lead below this is narrow
    accepted: list[float] = field(default_factory=list)  # decayed counts per position
    reached: list[float] = field(default_factory=list)
    plain: dict[int, _Cost] = field(default_factory=dict)  # seconds of a plain step, by rows
    ratios: dict[tuple[int, int], _Cost] = field(default_factory=dict)  # (bucket, γ≥1) -> s
    steps: dict[int, int] = field(default_factory=dict)  # decisions per bucket
    next_probe: dict[int, int] = field(default_factory=dict)  # bucket -> step of its re-probe
    backoff: dict[int, int] = field(default_factory=dict)  # bucket -> current interval factor
    chosen: list[int] = field(default_factory=list)  # histogram of γ_t, index γ
    burst: int = 2  # steps a probe runs (the first, after a switch of γ, is not timed)
    after_prefill: int = 4  # decode steps after a prefill that are not timed
    _previous: int | None = None  # γ of the last decode step
    _settle: int = 0  # decode steps still to pass untimed
    _queued: dict[int, tuple[int, int]] = field(default_factory=dict)  # bucket -> (γ, steps)
    _version: int = 0  # timings observed: keys the ratio cache
    _ratio_cache: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.gamma_max < 1:
            raise ValueError(f"gamma_max={self.gamma_max} must be >= 1")
        self.accepted = [0.0] * self.gamma_max
        self.reached = [0.0] * self.gamma_max
        self.chosen = [0] * (self.gamma_max + 1)

    # ------------------------------------------------------------------ estimates
    def alpha(self, optimism: float = 0.0) -> list[float]:
        """Conditional acceptance per position; an unseen position shrinks to the one before.
        `optimism` adds that many standard errors to positions ≥ 2 (an upper confidence
        bound where data is scarce: position 1 is verified on every drafting step, deeper
        ones only when γ reaches them)."""
        out, prev = [], self.prior
        for j, (acc, reach) in enumerate(zip(self.accepted, self.reached, strict=True)):
            n = reach + self.prior_weight
            prev = (acc + self.prior_weight * prev) / n
            bonus = optimism * math.sqrt(prev * (1 - prev) / n) if j else 0.0
            out.append(min(1.0, prev + bonus))
        return out

    def plain_cost(self, rows: int, exact: bool = False, quantile: float = QUANTILE,
                   same_bucket: bool = False) -> float | None:  # fmt: skip
        """Seconds of a plain step of `rows` rows; else (not `exact`) that of the nearest row
        count measured (with `same_bucket`, the nearest in bucket(rows))."""
        c = self.plain.get(rows)
        if c is not None and c.trusted:
            return c.estimate(quantile)
        known = [r for r, c in self.plain.items()
                 if c.trusted and (not same_bucket or bucket(r) == bucket(rows))]  # fmt: skip
        if exact or not known:
            return None
        return self.plain[min(known, key=lambda r: (abs(r - rows), r))].estimate(quantile)

    def bucket_ratios(self, b: int, quantile: float = QUANTILE) -> dict[int, float]:
        """cost(γ) / cost(0) of bucket `b` for every measured γ ≥ 1: ≥ 1, non-decreasing in γ.
        Each drafting timing is divided by the *current* plain estimate at its rows, so a
        baseline that was slow when the timing was taken (warm-up) does not linger in it."""
        key = (b, quantile, self._version)
        if key not in self._ratio_cache:
            known = [(g, r, len(c.recent)) for g in range(1, self.gamma_max + 1)
                     if (c := self.ratios.get((b, g))) is not None and c.trusted
                     and (r := c.relative(quantile, self.plain_cost)) is not None]  # fmt: skip
            fit = monotone([max(1.0, r) for _, r, _ in known], [n for _, _, n in known])
            if len(self._ratio_cache) > 64:
                self._ratio_cache.clear()
            self._ratio_cache[key] = {g: v for (g, _, _), v in zip(known, fit, strict=True)}
        return self._ratio_cache[key]

    def rates(self, rows: int, quantile: float = QUANTILE) -> dict[int, float]:
        """Expected tokens per second per row for every γ whose cost is known. The base is
        the nearest row count of the bucket when `rows` has none yet: it cancels between γ's,
        and in an RL long tail the rows change every few steps, too fast to time each."""
        base = self.plain_cost(rows, quantile=quantile, same_bucket=True)
        if not base:
            return {}
        alpha = self.alpha(self.optimism)
        known = {0: 1.0, **self.bucket_ratios(bucket(rows), quantile)}
        return {g: expected_tokens(alpha, g) / (base * r) for g, r in known.items()}

    # ------------------------------------------------------------------ decide / observe
    def choose(self, rows: int) -> int:
        """γ for the next decode step of a batch of `rows` sequences."""
        b = bucket(rows)
        self.steps[b] = step = self.steps.get(b, 0) + 1
        if b in self._queued:  # the rest of a probe's burst
            gamma, left = self._queued.pop(b)
            if left > 1:
                self._queued[b] = (gamma, left - 1)
        elif self.backoff.get(b, 1) > 1 and step < self.next_probe[b] and rows in self.plain:
            gamma = 0  # a losing bucket between probes: nothing it could learn changes this
        else:
            gamma = self._decide(rows, step)
        self.chosen[gamma] += 1
        return gamma

    def _decide(self, rows: int, step: int) -> int:
        rates = self.rates(rows)
        gamma = self._explore(rows, step, rates)
        if gamma is None:
            gamma = self._reprobe(rows, step, rates)
            if gamma is not None:
                self._queue_burst(rows, gamma)
        return _best(rates) if gamma is None else gamma

    def _queue_burst(self, rows: int, gamma: int) -> None:
        """Run a probe for `burst` steps: its first step follows a switch of γ and is not
        timed (the step after a switch runs on caches the other γ left, ~10 % slower)."""
        if self.burst > 1:
            self._queued[bucket(rows)] = (gamma, self.burst - 1)

    def _explore(self, rows: int, step: int, rates: dict[int, float]) -> int | None:
        """A γ worth timing: an unmeasured one (0 always; 1 if it could win at the floor of
        `_ratio_floor`; larger γ only if it could win with free extra drafts); a plain step
        while drafting leads, every `refill_every` steps while the lead is below `narrow`
        (the machine's speed drifts: a narrow lead must rest on timings close in time), else
        every 2 · `reprobe_every` (it follows the context's growth); or a γ that beats the
        leader when both are judged by their fastest recent timings (a burst of slow steps
        must not bury a γ until its timings age out)."""
        if not rates:
            return 0
        alpha = self.alpha(self.optimism)
        if 1 not in rates:
            return 1 if expected_tokens(alpha, 1) > self._ratio_floor(rows) else None
        best, c1 = max(rates.values()), expected_tokens(alpha, 1) / rates[1]  # c1: cost(rows, 1)
        for g in range(2, self.gamma_max + 1):
            if g not in rates and expected_tokens(alpha, g) / c1 > best:
                return g  # c1 is a lower bound on cost(γ ≥ 1): only then can γ win
        leader = _best(rates)
        plain = self.plain.get(rows)
        if rates[leader] < self.narrow * rates[0]:
            every = self.refill_every  # a narrow lead: compare timings close in time
        else:
            every = 2 * self.reprobe_every
        if leader and (plain is None or step - plain.last_step >= every):
            self._queue_burst(rows, 0)
            return 0  # drafting leads: plain steps are timed only here
        fast = self.rates(rows, quantile=0.0)
        challenger = _best(fast)
        return challenger if fast[challenger] > fast[leader] else None

    def _ratio_floor(self, rows: int) -> float:
        """A lower bound on cost(γ ≥ 1) / cost(0) at `rows`: a drafting step's cost relative
        to a plain one grows with the batch, so the least ratio of the largest smaller bucket
        that has one (1 if none has)."""
        b = bucket(rows)
        for bb in sorted({bb for bb, _ in self.ratios if bb < b}, reverse=True):
            if known := self.bucket_ratios(bb):
                return min(known.values())
        return 1.0

    def _reprobe(self, rows: int, step: int, rates: dict[int, float]) -> int | None:
        """At the bucket's next probe step, the drafting γ whose estimate is oldest (ties:
        smallest); the interval doubles while plain steps stay the best, else resets."""
        b = bucket(rows)
        due = self.next_probe.setdefault(b, self.reprobe_every)
        if step < due:
            return None
        measured = [(c.last_step, g) for (bb, g), c in self.ratios.items() if bb == b]
        losing = len(rates) > 1 and _best(rates) == 0  # γ = 0 beat a measured drafting γ
        factor = min(2 * self.backoff.get(b, 1), self.max_backoff) if losing else 1
        self.backoff[b] = factor
        self.next_probe[b] = step + self.reprobe_every * factor
        return min(measured)[1] if measured else None

    def observe_cost(self, rows: int, gamma: int, seconds: float) -> None:
        """A decode step of `rows` rows and draft length γ took `seconds`."""
        b = bucket(rows)
        step = self.steps.get(b, 0)
        if gamma != self._previous:
            self._previous, self._settle = gamma, max(self._settle, 1)
        if self._settle:
            self._settle -= 1
            return  # not representative: after a switch of γ or a prefill
        self._version += 1
        if gamma == 0:
            self.plain.setdefault(rows, _Cost(self.window)).add(seconds, step)
        else:
            self.ratios.setdefault((b, gamma), _Cost(self.window)).add(seconds, step, rows)

    def observe_prefill(self) -> None:
        """A prefill step ran: the next `after_prefill` decode steps run on the caches it
        left (measured on the demo model: 2x a settled step) and are not timed."""
        self._settle = self.after_prefill

    def observe_acceptance(self, num_accepted: list[int], gamma: int) -> None:
        """Per-row accepted-draft counts of one spec step with draft length γ ≥ 1."""
        self.accepted = [a * self.decay for a in self.accepted]
        self.reached = [r * self.decay for r in self.reached]
        for a in num_accepted:
            for j in range(min(a + 1, gamma)):  # drafts 1..a accepted; a+1 reached, rejected
                self.reached[j] += 1
                self.accepted[j] += j < a
