"""Drafting and verification of speculative chains (DESIGN §2), as pure tensor functions.

One row is one request's chain of γ drafts. ``verify_chain`` is vectorised over rows and
positions; every emitted token is distributed exactly as plain sampling from p (tested
statistically in ``tests/spec/test_spec_verify.py``). Also the analytic acceptance formulas.
"""

from __future__ import annotations

from enum import StrEnum

import torch

from bebop_spec.spec.sampling import sample_from_probs


class DraftMode(StrEnum):
    """How drafts are made and verified: the one list of draft modes (config, CLI, backends).

    A StrEnum, so ``DraftMode.REJECTION_SAMPLING == "rs"`` and the values read and write as
    the plain strings in JSON, metrics labels and on the command line."""

    REJECTION_SAMPLING = "rs"
    """Drafts sampled x ~ q, accepted with min(1, p/q), residual max(p - q, 0): exact."""
    TARGET_ONLY = "to"
    """Target-only verification: the draft is argmax q and q is taken as one-hot at it, so
    x is accepted with p(x) (vLLM's "greedy" draft_sample_method)."""


DRAFT_MODES = tuple(m.value for m in DraftMode)  # ("rs", "to"), for messages and choices


def _check_mode(mode: str) -> None:
    if mode not in DRAFT_MODES:
        raise ValueError(f"draft mode must be one of {DRAFT_MODES}, got {mode!r}")


def draft_tokens(q: torch.Tensor, u: torch.Tensor, mode: str) -> torch.Tensor:
    """q[...,V], u[...] -> ids[...]: "rs" samples x ~ q (inverse CDF), "to" takes argmax q."""
    _check_mode(mode)
    if mode == DraftMode.REJECTION_SAMPLING:
        return sample_from_probs(q, u)
    return q.argmax(dim=-1)


def verify_chain(
    draft_ids: torch.Tensor,
    q: torch.Tensor | None,
    p: torch.Tensor,
    u_accept: torch.Tensor,
    u_emit: torch.Tensor,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """draft_ids[B,γ], q[B,γ,V], p[B,γ+1,V], u_accept[B,γ], u_emit[B] -> (num_accepted[B], tokens[B,γ+1]).

    tokens[b] = the accepted drafts, then one emitted token (residual or bonus), then -1s.
    "rs": accept x_i with prob min(1, p_i(x_i)/q_i(x_i)); the first rejection emits from
    normalize(max(p_i - q_i, 0)). "to": q_i is taken as one-hot(x_i) and ``q`` is unused
    (may be None), so x_i is accepted with prob p_i(x_i) and a rejection emits from p_i
    without x_i. With all γ accepted the bonus comes from p_{γ+1}: the same residual, q = 0.

    Greedy rows (p_i one-hot at a_i, temperature 0) fall out of this rule exactly, in both
    modes: if x_i = a_i then p(x) = 1 > u·q(x) for every u < 1 and q(x) <= 1, so it is
    accepted; if x_i != a_i then p(x) = 0 and the strict test u·q < 0 never passes; the
    residual max(onehot(a) - q, 0) is positive only at a (or empty, and the fallback p is
    onehot(a)), and the bonus from a one-hot p is a. So: accept iff x_i == argmax p_i, and
    emit argmax p.
    """
    _check_mode(mode)
    batch, gamma = draft_ids.shape
    if p.shape[:2] != (batch, gamma + 1):
        raise ValueError(f"p must be [B, γ+1, V] = [{batch}, {gamma + 1}, V], got {tuple(p.shape)}")
    x = draft_ids.unsqueeze(-1)
    p_x = p[:, :gamma].gather(-1, x).squeeze(-1).double()  # [B,γ]
    if mode == DraftMode.REJECTION_SAMPLING:
        if q is None:
            raise ValueError('mode "rs" needs the draft distribution q')
        # q(x) <= 1 for any distribution; the clamp keeps greedy rows exact even if the
        # caller's q was normalised with rounding just above 1.
        q_x = q.gather(-1, x).squeeze(-1).double().clamp(max=1.0)
    else:
        q_x = torch.ones_like(p_x)
    # Accept with probability min(1, p/q)  <=>  u·q(x) < p(x) for u ~ U[0,1). Strict "<" makes
    # p(x) = 0 a certain rejection even at u = 0; no division, so a q(x) = 0 draft (which the
    # caller should never make) cannot produce inf/nan. float32 products are exact in float64.
    accept = u_accept.double() * q_x < p_x
    num_accepted = accept.long().cumprod(dim=-1).sum(dim=-1)  # length of the leading run

    rows = torch.arange(batch, device=p.device)
    p_n = p[rows, num_accepted]  # [B,V]: p at the emit position (p_{γ+1} when all accepted)
    q_n = _draft_dist_at(q, draft_ids, num_accepted, mode, like=p_n)
    residual = (p_n - q_n).clamp(min=0)  # max(p - q, 0)
    # An empty residual means p == q there (rejection had probability 0, or came from a
    # q(x) = 0 draft): fall back to p. sample_from_probs normalises by the total itself.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    emitted = sample_from_probs(torch.where(empty, p_n, residual), u_emit)

    positions = torch.arange(gamma + 1, device=p.device)
    drafts = torch.nn.functional.pad(draft_ids, (0, 1), value=-1)
    tokens = torch.where(positions < num_accepted.unsqueeze(-1), drafts, -1)
    tokens.scatter_(1, num_accepted.unsqueeze(-1), emitted.unsqueeze(-1))
    return num_accepted, tokens


def _draft_dist_at(
    q: torch.Tensor | None, draft_ids: torch.Tensor, n: torch.Tensor, mode: str, like: torch.Tensor
) -> torch.Tensor:
    """The draft distribution q_n[B,V] at emit position n[B]; all zeros where n == γ (bonus)."""
    gamma = draft_ids.shape[1]
    if gamma == 0:
        return torch.zeros_like(like)
    drafting = (n < gamma).unsqueeze(-1).to(like.dtype)  # [B,1]
    at = n.clamp(max=gamma - 1)
    if mode == DraftMode.TARGET_ONLY:
        x_n = draft_ids.gather(1, at.unsqueeze(-1))
        return torch.zeros_like(like).scatter_(-1, x_n, 1.0) * drafting
    rows = torch.arange(q.shape[0], device=q.device)
    return q[rows, at].to(like.dtype) * drafting


def acceptance_rs(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p[...,V], q[...,V] -> α[...] = Σ_v min(p(v), q(v)) = 1 - TV(p, q)."""
    return torch.minimum(p, q).sum(dim=-1)


def acceptance_to(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """p[...,V], q[...,V] -> α[...] = p(argmax q) (greedy draft, first index on ties)."""
    return p.gather(-1, q.argmax(dim=-1, keepdim=True)).squeeze(-1)


def expected_accepted(alpha: torch.Tensor) -> torch.Tensor:
    """alpha[...,γ] -> E[A][...] = Σ_{j=1..γ} Π_{i<=j} α_i, accepted drafts per step."""
    return alpha.cumprod(dim=-1).sum(dim=-1)


def speedup_bound(e_accepted: float | torch.Tensor, gamma: int, c: float) -> float | torch.Tensor:
    """(1 + E[A]) / (1 + γ·c), c = cost of one draft step / cost of one target forward."""
    return (1 + e_accepted) / (1 + gamma * c)
