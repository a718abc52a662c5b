"""Per-request sampling parameters, validated at construction (vLLM-shaped)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    """How one prompt is sampled. ``temperature == 0`` means greedy.

    Transforms are applied to logits in this order: min_tokens, logit_bias, the repetition /
    frequency / presence penalties (vLLM's semantics, spec/penalties.py), temperature, top-k,
    top-p, min-p. The same transforms are applied to the draft distribution q (DESIGN §2).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0) disables
    min_p: float = 0.0
    max_tokens: int = 16
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: no logprobs; k >= 0: sampled token + top-k alternatives
    raw_logprobs: bool = False  # also report log softmax of the unprocessed (T=1) logits
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # leave special tokens (EOS, ...) out of the text
    presence_penalty: float = 0.0  # minus penalty for each token already in the output
    frequency_penalty: float = 0.0  # minus penalty x its count in the output
    repetition_penalty: float = 1.0  # tokens of prompt + output: x>0 -> x/r, x<=0 -> x*r
    min_tokens: int = 0  # EOS and stop_token_ids impossible before this many tokens
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit
    # Prompt scoring (engine/prompt_logprobs.py): log p(x_i | x_<i) of prompt tokens under
    # the raw (T=1, unprocessed) model, for i > prompt_logprob_start (the first causal row).
    prompt_logprobs: int | None = None  # None: off; k >= 0: also the top-k at each position
    prompt_logprob_start: int = 0
    logprob_token_ids: list[int] | None = None  # ids whose logprobs every position reports

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in (self.stop_token_ids or [])]
        if self.logprob_token_ids is not None:
            self.logprob_token_ids = [int(t) for t in self.logprob_token_ids] or None
        if self.logit_bias is not None:
            self.logit_bias = {int(t): float(b) for t, b in self.logit_bias.items()} or None
        checks = [
            ("temperature", self.temperature >= 0, "must be >= 0"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("top_k", self.top_k >= -1, "must be -1 (disabled), 0 (disabled) or >= 1"),
            ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
            # 0 only to score a prompt (vLLM's echo with max_tokens=0, SGLang's max_new_tokens=0)
            (
                "max_tokens",
                self.max_tokens >= (0 if self.scores_prompt else 1),
                "must be >= 1 (0 only with prompt_logprobs)",
            ),
            ("n", self.n >= 1, "must be >= 1"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "must be >= 0"),
            (
                "prompt_logprobs",
                self.prompt_logprobs is None or self.prompt_logprobs >= 0,
                "must be >= 0",
            ),
            ("prompt_logprob_start", self.prompt_logprob_start >= 0, "must be >= 0"),
            (
                "logprob_token_ids",
                all(t >= 0 for t in self.logprob_token_ids or []),
                "must be >= 0",
            ),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(t >= 0 for t in self.stop_token_ids), "must be >= 0"),
            ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
            ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
            ("repetition_penalty", 0.0 < self.repetition_penalty < math.inf, "must be > 0"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, "must be in [0, max_tokens]"),
            (
                "logit_bias",
                all(t >= 0 and math.isfinite(b) for t, b in (self.logit_bias or {}).items()),
                "needs token ids >= 0 and finite biases",
            ),
        ]
        for name, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{name}={getattr(self, name)!r} {why}")
        if self.seed is not None:
            self.seed = int(self.seed)

    @property
    def scores_prompt(self) -> bool:
        return self.prompt_logprobs is not None

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def uses_penalties(self) -> bool:
        """Whether any transform reads the tokens seen so far (spec/penalties.py)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0
                or self.repetition_penalty != 1 or self.min_tokens > 0
                or bool(self.logit_bias))  # fmt: skip

    @property
    def effective_top_k(self) -> int:
        """0 means disabled."""
        return 0 if self.top_k in (-1, 0) else self.top_k

    def for_sample(self, index: int) -> SamplingParams:
        """Params of the index-th of n samples: n=1 and a derived seed so samples differ."""
        seed = None if self.seed is None else (self.seed * 1_000_003 + index) % (2**63)
        return replace(self, n=1, seed=seed)
