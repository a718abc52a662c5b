"""Draft vocabulary: the head drafts over the K most frequent tokens only.

The head's LM head is most of its cost on a real model (SmolLM2: a 49 k × 576 matmul against
one decoder layer of ~4 M MACs), so drafting over K ≪ V tokens cuts the draft cost c. It
stays exact: q is 0 outside the K tokens, so a draft is always one of them, min(1, p/q)
accepts as before, and the residual max(p − q, 0) ∝ p there gives every other token its
full probability.
"""

from __future__ import annotations

import torch


def expand_draft_logits(sub: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """sub[B, K] logits of the draft tokens ids[K] -> logits[B, V], −∞ elsewhere (q = 0)."""
    full = sub.new_full((sub.shape[0], vocab), float("-inf"))
    return full.scatter_(1, ids.expand(sub.shape[0], -1), sub)


def expand_draft_probs(sub: torch.Tensor, ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """sub[B, K] probabilities of the draft tokens ids[K] -> q[B, V], 0 elsewhere."""
    full = sub.new_zeros((sub.shape[0], vocab))
    return full.scatter_(1, ids.expand(sub.shape[0], -1), sub)


def rank_tokens(counts: torch.Tensor) -> list[int]:
    """Token ids, most frequent first; ties (and unseen tokens) in id order — BPE ids are
    themselves roughly in merge order, i.e. by frequency in the tokenizer's corpus."""
    order = torch.argsort(-counts.double() + torch.arange(counts.numel()) / (2 * counts.numel()))
    return order.tolist()
