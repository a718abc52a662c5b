"""Training objectives for MTP heads over teacher-forced γ-chains (DESIGN §2).

Every loss takes draft logits z[N, γ, V] (the head's chain) and, except CE, target logits
w[N, γ, V] (the frozen policy, detached here), an optional chain mask[N] (bool or float
weights; masked chains do not count) and returns a scalar: the mask-weighted mean over
chains of the per-chain loss. With no counted chain the loss is 0.

`tv`, `e2e_tv` and `nla` are one autograd Function with the analytic backward: each is a
function of the soft acceptances α_i = Σ_v min(p_i, q_i) of a chain, so only ∂L/∂α differs.
They never hold more than one vocab chunk of probabilities per token: pass 1 takes a chunked
logsumexp per row, pass 2 walks the chunks accumulating α and S = Σ q·1[q ≤ p]; the backward
recomputes p and q chunk by chunk. `lk` mixes forward KL and TV with a weight that follows
the acceptance (below).

Draft logits may be −∞ (q = 0: a token outside the head's draft vocabulary,
train/chain.py). The TV family needs nothing special; FKL and CE then run over the draft's
support (FKL's minimiser is p renormalised there), and a CE label of −100 counts 0.

Tie convention: where q_v == p_v, min(p, q) is taken as q (indicator 1[q_v ≤ p_v]), so a
tie passes q's gradient. At p == q this gives S = 1 and a zero gradient (the minimum).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

DEFAULT_CHUNK_SIZE = 8192


# ---------------------------------------------------------------- chunked primitives


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _chunks(vocab: int, chunk_size: int) -> list[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(s, min(s + chunk_size, vocab)) for s in range(0, vocab, chunk_size)]


def _logsumexp(x: Tensor, chunk_size: int) -> Tensor:
    """x[R, V] -> logsumexp over V [R], one chunk of V at a time."""
    dt = _compute_dtype(x)
    parts = [torch.logsumexp(x[:, c].to(dt), dim=-1) for c in _chunks(x.shape[-1], chunk_size)]
    return torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)


def _probs(x: Tensor, lse: Tensor, c: slice) -> Tensor:
    """softmax(x)[:, c] from the row's logsumexp: one chunk of probabilities [R, |c|]."""
    return (x[:, c].to(lse.dtype) - lse[:, None]).exp()


def _alpha_and_s(z: Tensor, w: Tensor, chunk_size: int) -> tuple[Tensor, ...]:
    """z, w [R, V] -> α = Σ min(p, q) [R], S = Σ q·1[q ≤ p] [R], lse_z [R], lse_w [R]."""
    lse_z, lse_w = _logsumexp(z, chunk_size), _logsumexp(w, chunk_size)
    alpha = torch.zeros_like(lse_z)
    s = torch.zeros_like(lse_z)
    for c in _chunks(z.shape[-1], chunk_size):
        q, p = _probs(z, lse_z, c), _probs(w, lse_w, c)
        q_below = q <= p  # tie convention: min(p, q) := q
        alpha += torch.where(q_below, q, p).sum(-1)
        s += torch.where(q_below, q, 0.0).sum(-1)
    return alpha, s, lse_z, lse_w


def _grad_logits(
    z: Tensor, w: Tensor, lse_z: Tensor, lse_w: Tensor, s: Tensor, g: Tensor, chunk_size: int
) -> Tensor:
    """dL/dz[R, V] = dL/dα[R] · ∂α/∂z, with ∂α/∂z_j = q_j·(1[q_j ≤ p_j] − S) (= −∂TV/∂z_j)."""
    grad = torch.empty_like(z)
    for c in _chunks(z.shape[-1], chunk_size):
        q, p = _probs(z, lse_z, c), _probs(w, lse_w, c)
        grad[:, c] = (g[:, None] * q * ((q <= p).to(q.dtype) - s[:, None])).to(z.dtype)
    return grad


def _chain_weights(mask: Tensor | None, n: int, dtype: torch.dtype, device) -> Tensor:
    """mask[N] (bool / float / None) -> weights[N] normalised to sum 1 (all 0 if none count)."""
    if mask is None:
        weights = torch.ones(n, dtype=dtype, device=device)
    else:
        if mask.shape != (n,):
            raise ValueError(f"mask must have shape [{n}], got {list(mask.shape)}")
        weights = mask.detach().to(device=device, dtype=dtype)
    return weights / weights.sum().clamp_min(torch.finfo(dtype).tiny)


def _check_pair(draft_logits: Tensor, target_logits: Tensor) -> None:
    if draft_logits.dim() != 3 or draft_logits.shape != target_logits.shape:
        raise ValueError(
            "draft and target logits must both be [N, γ, V]; got "
            f"{list(draft_logits.shape)} and {list(target_logits.shape)}"
        )


# ---------------------------------------------------------------- TV and e2e TV


def _e2e_grad_alpha(alpha: Tensor) -> Tensor:
    """α[N, γ] -> ∂L/∂α_d = −(1/γ)·Π_{i<d} α_i·(1 + α_{d+1} + α_{d+1}α_{d+2} + …)."""
    gamma = alpha.shape[-1]
    prefix = torch.cumprod(torch.cat([torch.ones_like(alpha[:, :1]), alpha[:, :-1]], -1), -1)
    tail = torch.ones_like(alpha)  # tail_d = 1 + α_{d+1}·tail_{d+1}, tail_γ = 1
    for d in range(gamma - 2, -1, -1):
        tail[:, d] = 1 + alpha[:, d + 1] * tail[:, d + 1]
    return -(prefix * tail) / gamma


NLA_FLOOR = 1e-6  # nla: log α is taken of max(α, NLA_FLOOR), so a chain with α = 0 stays finite


def _objective(kind: str, alpha: Tensor, position_weights: Tensor | None) -> tuple[Tensor, Tensor]:
    """α[N, γ] -> (per-chain loss L_n [N], ∂L_n/∂α [N, γ]) of the TV family."""
    gamma = alpha.shape[-1]
    if kind == "e2e_tv":  # L_n = 1 − (1/γ)·Σ_j Π_{i≤j} α_i
        return 1 - torch.cumprod(alpha, -1).mean(-1), _e2e_grad_alpha(alpha)
    if kind == "nla":  # L_n = −(1/γ)·Σ_i log α_i
        a = alpha.clamp_min(NLA_FLOOR)
        return -a.log().mean(-1), torch.where(alpha > NLA_FLOOR, -1.0 / (gamma * a), 0.0)
    # tv: L_n = (1/γ)·Σ_i u_i·(1 − α_i), u = position_weights (1 by default)
    u = torch.ones_like(alpha) if position_weights is None else position_weights.to(alpha.dtype)
    return (u * (1 - alpha)).mean(-1), -u / gamma


class _ChainTV(torch.autograd.Function):
    """Mask-weighted mean over chains of a per-chain function of α; analytic backward."""

    @staticmethod
    def forward(ctx, z, w, weights, chunk_size, kind, position_weights):  # z, w [N, γ, V]
        n, gamma, vocab = z.shape
        z2, w2 = z.reshape(n * gamma, vocab), w.reshape(n * gamma, vocab)
        alpha, s, lse_z, lse_w = _alpha_and_s(z2, w2, chunk_size)
        per_chain, grad_alpha = _objective(kind, alpha.view(n, gamma), position_weights)
        grad_alpha = grad_alpha * weights[:, None].to(alpha.dtype)
        ctx.save_for_backward(z2, w2, lse_z, lse_w, s, grad_alpha.reshape(-1))
        ctx.chunk_size, ctx.shape = chunk_size, z.shape
        return (per_chain * weights.to(alpha.dtype)).sum()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        z2, w2, lse_z, lse_w, s, grad_alpha = ctx.saved_tensors
        g = grad_alpha * grad_out.to(grad_alpha.dtype)
        grad = _grad_logits(z2, w2, lse_z, lse_w, s, g, ctx.chunk_size)
        return grad.view(ctx.shape), None, None, None, None, None


def _tv_objective(draft_logits, target_logits, mask, chunk_size, kind,
                  position_weights: Tensor | None = None) -> Tensor:  # fmt: skip
    _check_pair(draft_logits, target_logits)
    weights = _chain_weights(
        mask, draft_logits.shape[0], _compute_dtype(draft_logits), draft_logits.device
    )
    return _ChainTV.apply(draft_logits, target_logits.detach(), weights, chunk_size, kind,
                          position_weights)  # fmt: skip


def tv_loss(
    draft_logits: Tensor,
    target_logits: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """TV = 1 − Σ_v min(p, q), mean over the γ positions, mask-mean over chains -> scalar."""
    return _tv_objective(draft_logits, target_logits, mask, chunk_size, "tv")


def e2e_tv_loss(
    draft_logits: Tensor,
    target_logits: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """L = 1 − (1/γ)·Σ_j Π_{i≤j} α_i per chain (α_i = 1 − TV_i), mask-mean over chains."""
    return _tv_objective(draft_logits, target_logits, mask, chunk_size, "e2e_tv")


def nla_loss(
    draft_logits: Tensor,
    target_logits: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Tensor:
    """Negative log acceptance −(1/γ)·Σ_i log α_i per chain (vllm-project/speculators' `nla`,
    the LK paper's L_α): TV's gradient scaled by 1/α_i, so it stays large while α is small."""
    return _tv_objective(draft_logits, target_logits, mask, chunk_size, "nla")


LK_ETA = 3.0  # lk: λ = exp(−η·α); η = 3 puts 5 % of the weight on KL at α = 1


def lk_loss(
    draft_logits: Tensor,
    target_logits: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    eta: float = LK_ETA,
) -> Tensor:
    """LK hybrid (arXiv 2602.23881, SpecForge's / speculators' `lk_hybrid`): per position
    λ·FKL + (1 − λ)·TV with λ = exp(−η·sg(α)), α the position's own soft acceptance, not
    differentiated. KL carries the gradient while α is small (TV's is tiny there); TV, the
    acceptance itself, takes over as α grows. The weight schedule is Bebop's reading of the
    paper's λ-adaptive mix (its code was not at hand), with η exposed."""
    alpha = chain_alpha(draft_logits, target_logits, chunk_size)
    lam = torch.exp(-eta * alpha)  # [N, γ], no grad
    kl = _masked_chain_mean(lam * _fkl_per_position(draft_logits, target_logits), mask)
    return kl + _tv_objective(draft_logits, target_logits, mask, chunk_size, "tv", 1 - lam)


# ---------------------------------------------------------------- CE and KL


def _masked_chain_mean(per_position: Tensor, mask: Tensor | None) -> Tensor:
    """per_position[N, γ] -> mask-weighted mean over chains of the per-chain mean."""
    weights = _chain_weights(mask, per_position.shape[0], per_position.dtype, per_position.device)
    return (per_position.mean(-1) * weights).sum()


IGNORE_LABEL = -100  # a CE label outside the head's draft vocabulary: counts 0


def ce_loss(draft_logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> Tensor:
    """−log q(y), z[N, γ, V], labels[N, γ] -> scalar (a label IGNORE_LABEL counts 0)."""
    n, gamma, vocab = draft_logits.shape
    if labels.shape != (n, gamma):
        raise ValueError(f"labels must be [{n}, {gamma}], got {list(labels.shape)}")
    logits = draft_logits.reshape(n * gamma, vocab).to(_compute_dtype(draft_logits))
    nll = F.cross_entropy(
        logits, labels.reshape(-1).long(), reduction="none", ignore_index=IGNORE_LABEL
    )
    return _masked_chain_mean(nll.view(n, gamma), mask)


def _log_probs(draft_logits: Tensor, target_logits: Tensor) -> tuple[Tensor, Tensor]:
    _check_pair(draft_logits, target_logits)
    dt = _compute_dtype(draft_logits)
    return (
        F.log_softmax(draft_logits.to(dt), -1),
        F.log_softmax(target_logits.detach().to(dt), -1),
    )


def _fkl_per_position(draft_logits: Tensor, target_logits: Tensor) -> Tensor:
    """Σ_v p·log(p/q) over the draft's support (q > 0) [N, γ]; terms with p = 0 are 0."""
    log_q, log_p = _log_probs(draft_logits, target_logits)
    p = log_p.exp()
    keep = (p > 0) & (log_q > float("-inf"))
    return torch.where(keep, p * (log_p - log_q), 0.0).sum(-1)


def fkl_loss(draft_logits: Tensor, target_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Forward KL Σ_v p·log(p/q) -> scalar (terms with p = 0, or q = 0, are 0)."""
    return _masked_chain_mean(_fkl_per_position(draft_logits, target_logits), mask)


def rkl_loss(draft_logits: Tensor, target_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Reverse KL Σ_v q·log(q/p) -> scalar (terms with q = 0 are 0)."""
    log_q, log_p = _log_probs(draft_logits, target_logits)
    q = log_q.exp()
    kl = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1)
    return _masked_chain_mean(kl, mask)


# ---------------------------------------------------------------- registry


LossFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None", int], Tensor]
"""Uniform signature: (draft_logits, target_logits, labels, mask, chunk_size) -> scalar."""

LOSSES: dict[str, LossFn] = {
    "ce": lambda z, w, y, m, c: ce_loss(z, y, m),
    "fkl": lambda z, w, y, m, c: fkl_loss(z, w, m),
    "rkl": lambda z, w, y, m, c: rkl_loss(z, w, m),
    "tv": lambda z, w, y, m, c: tv_loss(z, w, m, c),
    "e2e_tv": lambda z, w, y, m, c: e2e_tv_loss(z, w, m, c),
    "nla": lambda z, w, y, m, c: nla_loss(z, w, m, c),
    "lk": lambda z, w, y, m, c: lk_loss(z, w, m, c),
}


def get_loss(name: str) -> LossFn:
    """Look a loss up by name; ValueError listing the known names."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose from {sorted(LOSSES)}")
    return LOSSES[name]


# ---------------------------------------------------------------- diagnostics


class Acceptance(NamedTuple):
    alpha: Tensor  # [γ] mask-mean over chains of Σ_v min(p_i, q_i)
    accepted_length: Tensor  # scalar: mask-mean over chains of E[A] = Σ_j Π_{i≤j} α_i


@torch.no_grad()
def chain_alpha(
    draft_logits: Tensor, target_logits: Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> Tensor:
    """Soft acceptance α = Σ_v min(p, q) per chain and position: [N, γ, V] x2 -> [N, γ]."""
    _check_pair(draft_logits, target_logits)
    n, gamma, vocab = draft_logits.shape
    alpha, *_ = _alpha_and_s(
        draft_logits.reshape(n * gamma, vocab), target_logits.reshape(n * gamma, vocab), chunk_size
    )
    return alpha.view(n, gamma)


@torch.no_grad()
def soft_acceptance(
    draft_logits: Tensor,
    target_logits: Tensor,
    mask: Tensor | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> Acceptance:
    """RS acceptance per position α[γ] and expected accepted drafts per step (scalar)."""
    alpha = chain_alpha(draft_logits, target_logits, chunk_size)
    weights = _chain_weights(mask, alpha.shape[0], alpha.dtype, alpha.device)
    accepted = torch.cumprod(alpha, -1).sum(-1)
    return Acceptance((alpha * weights[:, None]).sum(0), (accepted * weights).sum())
