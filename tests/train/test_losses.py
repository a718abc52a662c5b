"""MTP head losses (bebop_spec.train.losses) against plain formulas and the real verifier.

Run: python -m pytest -q tests/train/test_losses.py
"""

from __future__ import annotations

import pytest
import torch

from bebop_spec.train.losses import (
    IGNORE_LABEL,
    LK_ETA,
    LOSSES,
    NLA_FLOOR,
    ce_loss,
    chain_alpha,
    e2e_tv_loss,
    fkl_loss,
    get_loss,
    lk_loss,
    nla_loss,
    rkl_loss,
    soft_acceptance,
    tv_loss,
)

N, GAMMA, V = 5, 3, 13
CHUNKS = [1, 4, 5, 13, 64]  # 4 and 5 do not divide V = 13; 64 > V is a single chunk
MASKS = {
    "none": None,
    "bool": torch.tensor([True, False, True, True, False]),
    "float": torch.tensor([1.0, 0.0, 0.5, 2.0, 1.0], dtype=torch.float64),
}


def _logits(seed: int, scale: float = 2.0, shape=(N, GAMMA, V)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g, dtype=torch.float64)).requires_grad_()


def _chain_mean(per_chain: torch.Tensor, mask) -> torch.Tensor:
    w = torch.ones_like(per_chain) if mask is None else mask.to(per_chain.dtype)
    return (per_chain * w).sum() / w.sum()


def _ref_alpha(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Σ_v min(p, q) with the same tie convention (min := q where q <= p), plain autograd."""
    q, p = z.softmax(-1), w.detach().softmax(-1)
    return torch.where(q <= p, q, p).sum(-1)


def _ref_tv(z, w, mask):
    return _chain_mean(1 - _ref_alpha(z, w).mean(-1), mask)


def _ref_e2e(z, w, mask):
    return _chain_mean(1 - torch.cumprod(_ref_alpha(z, w), -1).mean(-1), mask)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("chunk", CHUNKS)
@pytest.mark.parametrize(
    "loss,ref", [(tv_loss, _ref_tv), (e2e_tv_loss, _ref_e2e)], ids=["tv", "e2e_tv"]
)
def test_tv_losses_match_autograd_reference(loss, ref, chunk, mask_name):
    """Chunked value and analytic gradient equal plain autograd on float64 (abs tol 1e-12),
    for chunk sizes that do and do not divide V, with no mask, a bool mask and float weights."""
    mask = MASKS[mask_name]
    z, w = _logits(0), _logits(1)
    got = loss(z, w, mask, chunk_size=chunk)
    (grad_got,) = torch.autograd.grad(got, z)
    z_ref = z.detach().clone().requires_grad_()
    want = ref(z_ref, w, mask)
    (grad_want,) = torch.autograd.grad(want, z_ref)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad_got, grad_want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("loss", [tv_loss, e2e_tv_loss], ids=["tv", "e2e_tv"])
def test_tv_losses_pass_gradcheck(loss):
    """The analytic backward agrees with central finite differences (torch gradcheck,
    eps 1e-6, atol 1e-5) away from ties; random logits have no ties almost surely."""
    z, w = _logits(2, shape=(3, GAMMA, 7)), _logits(3, shape=(3, GAMMA, 7)).detach()
    assert torch.autograd.gradcheck(lambda x: loss(x, w, None, chunk_size=3), (z,))


@pytest.mark.parametrize("name", list(LOSSES))
def test_gradients_flow_only_into_draft_logits(name):
    """Target logits are detached inside every loss: they get no .grad, the draft does."""
    z, w = _logits(4), _logits(5)
    labels = torch.randint(0, V, (N, GAMMA))
    get_loss(name)(z, w, labels, None, 4).backward()
    assert w.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_tie_convention_gives_zero_loss_and_gradient_at_p_equal_q():
    """Ties count as q-side (1[q <= p]); at p == q every position ties, S = 1, so TV, e2e TV
    and their gradients are 0 (the minimum) up to rounding of Σq = 1 (abs tol 1e-15)."""
    w = _logits(6)
    for loss in (tv_loss, e2e_tv_loss):
        z = w.detach().clone().requires_grad_()
        value = loss(z, w, None, chunk_size=4)
        value.backward()
        assert abs(value.item()) < 1e-12
        assert z.grad.abs().max().item() < 1e-15


def test_fully_masked_batch_is_zero_not_nan():
    """With no counted chain every loss is 0 (not NaN) and gives a zero gradient."""
    mask = torch.zeros(N, dtype=torch.bool)
    for name, fn in LOSSES.items():
        z, w = _logits(7), _logits(8)
        value = fn(z, w, torch.zeros(N, GAMMA, dtype=torch.long), mask, 4)
        value.backward()
        assert value.item() == 0.0, name
        assert z.grad.abs().max().item() == 0.0, name


def test_e2e_tv_equals_tv_when_gamma_is_one():
    """For γ = 1 both objectives are 1 − α_1 (abs tol 1e-12)."""
    z, w = _logits(9, shape=(4, 1, V)), _logits(10, shape=(4, 1, V))
    torch.testing.assert_close(e2e_tv_loss(z, w, None, 5), tv_loss(z, w, None, 5))


def test_float32_and_bfloat16_inputs_keep_their_gradient_dtype():
    """Low-precision logits are computed in float32; the gradient comes back in the input
    dtype and matches the float64 reference within the dtype's resolution."""
    z64, w64 = _logits(11), _logits(12)
    (ref,) = torch.autograd.grad(e2e_tv_loss(z64, w64, None, 4), z64)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        z = z64.detach().to(dtype).requires_grad_()
        loss = e2e_tv_loss(z, w64.detach().to(dtype), None, 4)
        (grad,) = torch.autograd.grad(loss, z)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        torch.testing.assert_close(grad.double(), ref, atol=tol, rtol=0)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_ce_fkl_rkl_values_and_gradients_match_direct_formulas(mask_name):
    """CE = −log q(y), FKL = Σ p log(p/q), RKL = Σ q log(q/p) (abs tol 1e-12), and their
    textbook logit gradients: ∂CE/∂z = q − onehot(y), ∂FKL/∂z = q − p,
    ∂RKL/∂z_j = q_j·(log(q_j/p_j) − RKL), each times the chain weight / (γ·Σ weights)."""
    mask = MASKS[mask_name]
    z, w = _logits(13), _logits(14)
    labels = torch.randint(0, V, (N, GAMMA), generator=torch.Generator().manual_seed(0))
    q, p = z.detach().softmax(-1), w.detach().softmax(-1)
    weights = torch.ones(N, dtype=torch.float64) if mask is None else mask.double()
    scale = (weights / (GAMMA * weights.sum()))[:, None, None]

    ce_pos = -(z.detach().gather(-1, labels[..., None])[..., 0] - z.detach().logsumexp(-1))
    rkl_pos = (q * (q / p).log()).sum(-1)
    cases = {
        "ce": (ce_loss(z, labels, mask), ce_pos, q - torch.nn.functional.one_hot(labels, V)),
        "fkl": (fkl_loss(z, w, mask), (p * (p / q).log()).sum(-1), q - p),
        "rkl": (rkl_loss(z, w, mask), rkl_pos, q * ((q / p).log() - rkl_pos[..., None])),
    }
    for name, (value, per_position, grad_per_position) in cases.items():
        (grad,) = torch.autograd.grad(value, z)
        torch.testing.assert_close(
            value, _chain_mean(per_position.mean(-1), mask), atol=1e-12, rtol=0, msg=name
        )
        torch.testing.assert_close(grad, grad_per_position * scale, atol=1e-12, rtol=0, msg=name)


def test_soft_acceptance_per_position_and_accepted_length():
    """α[γ] is the mask-mean of Σ min(p, q) per position, and E[A] = γ·(1 − e2e TV) (1e-12)."""
    z, w = _logits(15), _logits(16)
    mask = MASKS["bool"]
    acc = soft_acceptance(z, w, mask, chunk_size=5)
    alpha = _ref_alpha(z.detach(), w)
    torch.testing.assert_close(acc.alpha, alpha[mask].mean(0), atol=1e-12, rtol=0)
    torch.testing.assert_close(chain_alpha(z, w, 3), alpha, atol=1e-12, rtol=0)
    e2e = e2e_tv_loss(z, w, mask, chunk_size=5).detach()
    torch.testing.assert_close(acc.accepted_length, GAMMA * (1 - e2e), atol=1e-12, rtol=0)


def test_bad_inputs_raise_clear_errors():
    """Shape mismatches, a bad mask shape, chunk_size < 1 and unknown names are ValueErrors."""
    z, w = _logits(17), _logits(18)
    with pytest.raises(ValueError, match=r"\[N, γ, V\]"):
        tv_loss(z, w[:, :2])
    with pytest.raises(ValueError, match="mask"):
        e2e_tv_loss(z, w, torch.ones(N + 1))
    with pytest.raises(ValueError, match="chunk_size"):
        tv_loss(z, w, None, chunk_size=0)
    with pytest.raises(ValueError, match="labels"):
        ce_loss(z, torch.zeros(N, GAMMA + 1, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown loss"):
        get_loss("mse")


def test_e2e_tv_matches_accepted_count_of_the_real_verifier():
    """γ·(1 − e2e TV) is the expected number of accepted drafts E[A] = Σ_j Π_{i≤j} α_i under
    rejection sampling. Draft 40,000 independent chains from fixed q_1..q_γ with
    spec.verify.draft_tokens, verify them against fixed p with verify_chain("rs"), and
    compare the mean accepted count to γ·(1 − L): |mean − E[A]| < 5 standard errors
    (z-test on the sample mean, false-alarm probability < 1e-6)."""
    verify = pytest.importorskip("bebop_spec.spec.verify")
    gamma, vocab, samples = 3, 6, 40_000
    gen = torch.Generator().manual_seed(0)
    p = torch.softmax(1.5 * torch.randn(gamma + 1, vocab, generator=gen, dtype=torch.float64), -1)
    q = torch.softmax(1.5 * torch.randn(gamma, vocab, generator=gen, dtype=torch.float64), -1)
    q[0] = 0.7 * p[0] + 0.3 * q[0]  # a high-acceptance position so chains do run long
    expected = gamma * (1 - e2e_tv_loss(q.log()[None], p[:gamma].log()[None]).item())

    qb = q.expand(samples, gamma, vocab).contiguous()
    pb = p.expand(samples, gamma + 1, vocab).contiguous()
    draft_ids = torch.stack(
        [
            verify.draft_tokens(
                qb[:, i], torch.rand(samples, generator=gen, dtype=torch.float64), "rs"
            )
            for i in range(gamma)
        ],
        dim=1,
    )
    u_accept = torch.rand(samples, gamma, generator=gen, dtype=torch.float64)
    u_emit = torch.rand(samples, generator=gen, dtype=torch.float64)
    num_accepted, _ = verify.verify_chain(draft_ids, qb, pb, u_accept, u_emit, "rs")
    accepted = num_accepted.double()
    stderr = accepted.std().item() / samples**0.5
    assert abs(accepted.mean().item() - expected) < 5 * stderr, (accepted.mean().item(), expected)


def _ref_nla(z, w, mask):
    return _chain_mean(-_ref_alpha(z, w).clamp_min(NLA_FLOOR).log().mean(-1), mask)


def _ref_lk(z, w, mask, eta=LK_ETA):
    alpha = _ref_alpha(z, w)
    lam = torch.exp(-eta * alpha.detach())
    q_log, p = z.log_softmax(-1), w.detach().softmax(-1)
    kl = (p * (p.log() - q_log)).sum(-1)
    return _chain_mean((lam * kl + (1 - lam) * (1 - alpha)).mean(-1), mask)


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("loss,ref", [(nla_loss, _ref_nla), (lk_loss, _ref_lk)], ids=["nla", "lk"])
def test_nla_and_lk_match_autograd_reference(loss, ref, mask_name):
    """nla = −mean_i log α_i and lk = mean_i [λ·FKL + (1 − λ)·(1 − α_i)], λ = exp(−η·sg(α_i)),
    written with plain autograd: values and logit gradients agree (abs tol 1e-12)."""
    mask = MASKS[mask_name]
    z, w = _logits(21), _logits(22)
    value = loss(z, w, mask, chunk_size=4)
    (grad,) = torch.autograd.grad(value, z)
    z2 = z.detach().clone().requires_grad_()
    expected = ref(z2, w, mask)
    (expected_grad,) = torch.autograd.grad(expected, z2)
    torch.testing.assert_close(value, expected, atol=1e-12, rtol=0)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=0)


def test_nla_passes_gradcheck_and_lk_moves_weight_from_kl_to_tv():
    """nla's analytic backward agrees with finite differences (gradcheck, eps 1e-6); lk's
    KL weight is 1 at α = 0 and exp(−η) at α = 1: at p = q its value is 0, and with q far
    from p (α → 0) it equals forward KL (rel tol 1e-3)."""
    z, w = _logits(23, shape=(3, GAMMA, 7)), _logits(24, shape=(3, GAMMA, 7)).detach()
    assert torch.autograd.gradcheck(lambda x: nla_loss(x, w, None, chunk_size=3), (z,))
    at_p = w.clone().requires_grad_()
    assert abs(lk_loss(at_p, w, None, 3).item()) < 1e-12
    far = torch.zeros(2, 1, 4, dtype=torch.float64)
    far[..., 0], target = 40.0, torch.zeros(2, 1, 4, dtype=torch.float64)
    target[..., 1] = 40.0
    torch.testing.assert_close(lk_loss(far, target), fkl_loss(far, target), rtol=1e-3, atol=0)


def test_losses_over_a_draft_vocabulary_with_minus_inf_logits():
    """Draft logits −∞ on 4 of 13 tokens (q = 0 outside a draft vocabulary): the TV family
    equals its reference on those logits (α = Σ over the support, abs tol 1e-12); FKL and its
    gradient are finite and the gradient vanishes at q = p renormalised over the support
    (abs tol 1e-12); a CE label IGNORE_LABEL counts 0 while the others keep −log q(y)."""
    z, w = _logits(25), _logits(26)
    outside = torch.zeros(V, dtype=torch.bool)
    outside[[2, 5, 7, 11]] = True
    zk = z.detach().masked_fill(outside, float("-inf")).requires_grad_()
    for loss, ref in ((tv_loss, _ref_tv), (e2e_tv_loss, _ref_e2e), (nla_loss, _ref_nla)):
        torch.testing.assert_close(loss(zk, w, None, 4), ref(zk, w, None), atol=1e-12, rtol=0)
        (grad,) = torch.autograd.grad(loss(zk, w, None, 4), zk)
        assert torch.isfinite(grad).all() and grad[..., outside].abs().max() == 0
    renorm = w.detach().masked_fill(outside, float("-inf")).requires_grad_()
    value = fkl_loss(renorm, w)
    (grad,) = torch.autograd.grad(value, renorm)
    assert torch.isfinite(value)
    assert grad[..., ~outside].abs().max().item() < 1e-12
    labels = torch.randint(0, V, (N, GAMMA), generator=torch.Generator().manual_seed(1))
    labels[outside[labels]] = 0  # every counted label inside the support
    ignored = labels.clone()
    ignored[:, 0] = IGNORE_LABEL
    nll = -(zk.detach().log_softmax(-1).gather(-1, labels[..., None])[..., 0])
    nll[:, 0] = 0.0
    assert torch.isfinite(nll).all()
    torch.testing.assert_close(ce_loss(zk, ignored), nll.mean(-1).mean(), atol=1e-12, rtol=0)
