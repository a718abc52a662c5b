"""Pure tensor functions of speculative decoding: sampling transforms, chain verification
(rs / to / greedy), acceptance formulas and statistics. See docs/architecture.md "spec/"."""

from bebop_spec.spec.draft_vocab import expand_draft_logits, expand_draft_probs, rank_tokens
from bebop_spec.spec.penalties import PenaltyTensors, TokenHistory, apply_penalties, token_counts
from bebop_spec.spec.sampling import (
    SamplingTensors,
    draw_uniforms,
    logprobs_of,
    make_generators,
    process_logits,
    sample_from_probs,
    top_logprobs,
)
from bebop_spec.spec.stats import SpecStats, entropy
from bebop_spec.spec.verify import (
    DRAFT_MODES,
    DraftMode,
    acceptance_rs,
    acceptance_to,
    draft_tokens,
    expected_accepted,
    speedup_bound,
    verify_chain,
)

__all__ = [
    "DRAFT_MODES",
    "DraftMode",
    "PenaltyTensors",
    "SamplingTensors",
    "SpecStats",
    "TokenHistory",
    "expand_draft_logits",
    "expand_draft_probs",
    "rank_tokens",
    "acceptance_rs",
    "acceptance_to",
    "apply_penalties",
    "draft_tokens",
    "draw_uniforms",
    "entropy",
    "expected_accepted",
    "logprobs_of",
    "make_generators",
    "process_logits",
    "sample_from_probs",
    "speedup_bound",
    "token_counts",
    "top_logprobs",
    "verify_chain",
]
