"""The trainer side of the GRPO example: policy copy, GRPO loss, stale-token weights, and the
optional online MTP-head update.

    policy, head, tokenizer = load_policy(model_dir, head_dir)        # bebop_spec.models
    stats = grpo_step(policy, opt, rollout_samples, cfg)             # one optimiser step
    head_stats = head_step(policy, head, head_opt, samples, "e2e_tv")  # detached hiddens

The policy is the target the server serves, loaded with `bebop_spec.models.load_model`
(Hugging Face parameter names, so its state dict pushes to the server unchanged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bebop_spec.models import load_model
from bebop_spec.train.chain import teacher_forced_chain
from bebop_spec.train.losses import get_loss, soft_acceptance


@dataclass
class TrainSample:
    """One completion as the trainer sees it (from a bebop_client Sample)."""

    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # behaviour log μ(token), per token, from the server
    advantage: float
    token_weights: list[float] = field(default_factory=list)  # staleness weights (1 = fresh)
    lags: list[int] = field(default_factory=list)  # updates since each token's weights


def load_policy(model_dir: str, head_dir: str | None = None):
    """(policy DenseDecoder, MTP head or None, tokenizer), fp32, trainable."""
    loaded = load_model(model_dir, mtp=head_dir if head_dir else False, dtype=torch.float32)
    if loaded.tokenizer is None:
        raise ValueError(f"{model_dir} has no tokenizer: the math task needs one")
    loaded.target.train().requires_grad_(True)
    if loaded.mtp is not None:
        loaded.mtp.train().requires_grad_(True)
    return loaded.target, loaded.mtp, loaded.tokenizer


def named_tensors(module: nn.Module) -> dict[str, Tensor]:
    """Parameters by their checkpoint names (what the server's weight sync expects)."""
    return {k: v.detach().contiguous() for k, v in module.named_parameters()}


# ---------------------------------------------------------------- advantages and staleness


def group_advantages(rewards: list[float]) -> list[float]:
    """GRPO: (r − mean) / (std + 1e-6) within one prompt's group (all 0 when rewards tie)."""
    r = torch.tensor(rewards, dtype=torch.float64)
    if r.numel() < 2 or float(r.std()) == 0.0:
        return [0.0] * r.numel()
    return ((r - r.mean()) / (r.std() + 1e-6)).tolist()


def staleness(token_versions: list[str], policy_version: int) -> list[int]:
    """Updates between the weights that sampled each token and the policy being trained
    (labels that are not integers count as fresh)."""
    out = []
    for v in token_versions:
        try:
            out.append(max(0, policy_version - int(v)))
        except ValueError:
            out.append(0)
    return out


def stale_weights(lags: list[int], max_staleness: int, decay: float) -> list[float] | None:
    """Per-token weights decay**lag; None (drop the sample) when a token is older than
    max_staleness updates."""
    if lags and max(lags) > max_staleness:
        return None
    return [decay**lag for lag in lags]


# ---------------------------------------------------------------- policy loss


def pad_batch(seqs: list[list[int]], starts: list[int]) -> tuple[Tensor, Tensor]:
    """ids[B,T] right-padded with 0, completion mask[B,T] (True from starts[b] to the end)."""
    width = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.bool)
    for b, (s, start) in enumerate(zip(seqs, starts, strict=True)):
        ids[b, : len(s)] = torch.tensor(s)
        mask[b, start : len(s)] = True
    return ids, mask


def token_logprobs(policy: nn.Module, ids: Tensor, mask: Tensor, temperature: float):
    """ids[B,T], mask[B,T] -> (log π_T(x_t)[N], H(π_T)[N], H(π_1)[N]) at the N masked
    tokens; π_T = softmax(logits / T), the distribution the server sampled from."""
    positions = torch.arange(ids.shape[1]).expand_as(ids)
    hidden = policy(ids, positions)  # [B,T,H]; position t-1 predicts token t
    pred = mask[:, 1:]
    logits = policy.compute_logits(hidden[:, :-1][pred])  # [N,V] float32
    logp_all = F.log_softmax(logits / temperature, -1)
    logp = logp_all.gather(-1, ids[:, 1:][pred][:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    if temperature == 1.0:
        return logp, ent, ent.detach()
    with torch.no_grad():
        raw = F.log_softmax(logits.detach(), -1)
        ent_t1 = -(raw.exp() * raw).sum(-1)
    return logp, ent, ent_t1


def grpo_loss(logp: Tensor, old_logp: Tensor, adv: Tensor, weight: Tensor, clip: float) -> Tensor:
    """PPO-clipped surrogate summed over tokens [N]: −Σ w·min(ρ·A, clip(ρ, 1 ± ε)·A),
    ρ = exp(log π − log μ) with μ the (possibly older) weights that sampled each token."""
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    return -(weight * torch.minimum(ratio * adv, clipped * adv)).sum()


def _drift(acc: dict, gap: Tensor, fresh: list[bool]) -> None:
    """Track max |log π − log μ| overall and over fresh tokens (sampled by the very weights
    being trained: ~0 unless the server serves something else than the trainer holds)."""
    if gap.numel():
        acc["drift"] = max(acc["drift"], float(gap.max()))
    sel = torch.tensor(fresh, dtype=torch.bool) if len(fresh) == gap.numel() else None
    if sel is not None and bool(sel.any()):
        acc["fresh"] = max(acc["fresh"] or 0.0, float(gap[sel].max()))


@dataclass
class StepConfig:
    temperature: float = 1.0
    clip: float = 0.2
    entropy_coef: float = 0.0
    micro_batch: int = 16
    grad_clip: float = 1.0


def grpo_step(policy: nn.Module, opt: torch.optim.Optimizer, samples: list[TrainSample],
              cfg: StepConfig) -> dict:  # fmt: skip
    """One optimiser step over all samples (token-level mean, micro-batched); stats."""
    total_w = sum(sum(s.token_weights) for s in samples) or 1.0
    opt.zero_grad(set_to_none=True)
    acc = {"pg": 0.0, "entropy": 0.0, "entropy_t1": 0.0, "drift": 0.0, "fresh": None,
           "clipped": 0.0, "n": 0}  # fmt: skip
    samples = sorted(samples, key=lambda s: len(s.prompt_ids) + len(s.token_ids))  # less padding
    for i in range(0, len(samples), cfg.micro_batch):
        part = samples[i : i + cfg.micro_batch]
        ids, mask = pad_batch([s.prompt_ids + s.token_ids for s in part],
                              [len(s.prompt_ids) for s in part])  # fmt: skip
        logp, ent, ent_t1 = token_logprobs(policy, ids, mask, cfg.temperature)
        old = torch.tensor([lp for s in part for lp in s.logprobs])
        adv = torch.tensor([s.advantage for s in part for _ in s.token_ids])
        w = torch.tensor([x for s in part for x in s.token_weights])
        pg = grpo_loss(logp, old, adv, w, cfg.clip)
        loss = (pg - cfg.entropy_coef * (w * ent).sum()) / total_w
        loss.backward()
        ratio = torch.exp(logp.detach() - old)
        acc["pg"] += float(pg.detach())
        acc["entropy"] += float(ent.detach().sum())
        acc["entropy_t1"] += float(ent_t1.sum())
        _drift(acc, (logp.detach() - old).abs(), [lag == 0 for s in part for lag in s.lags])
        acc["clipped"] += float(((ratio - 1).abs() > cfg.clip).sum())
        acc["n"] += logp.numel()
    grad_norm = float(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip))
    opt.step()
    n = max(acc["n"], 1)
    return {"pg_loss": acc["pg"] / total_w, "policy_entropy": acc["entropy"] / n,
            "policy_entropy_t1": acc["entropy_t1"] / n, "max_logprob_drift": acc["drift"],
            "max_logprob_drift_fresh": acc["fresh"],
            "clip_fraction": acc["clipped"] / n, "grad_norm": grad_norm if math.isfinite(grad_norm)
            else None, "train_tokens": acc["n"]}  # fmt: skip


# ---------------------------------------------------------------- online MTP head


def head_step(policy: nn.Module, head: nn.Module, opt: torch.optim.Optimizer,
              samples: list[TrainSample], loss_name: str, gamma: int = 3,
              max_chains: int = 512, seed: int = 0) -> dict:  # fmt: skip
    """One optimiser step of the MTP head on fresh rollouts: teacher-forced γ-chains over the
    completions, the policy's hiddens detached (it runs under no_grad in the chain)."""
    ids, mask = pad_batch([s.prompt_ids + s.token_ids for s in samples],
                          [len(s.prompt_ids) for s in samples])  # fmt: skip
    gen = torch.Generator().manual_seed(seed)
    chain = teacher_forced_chain(policy, head, ids, mask, gamma, max_chains, gen)
    if chain.num_chains == 0:
        return {"head_loss": None, "head_soft_alpha": None, "head_chains": 0}
    loss = get_loss(loss_name)(chain.draft_logits, chain.target_logits, chain.labels, None, 8192)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
    opt.step()
    acc = soft_acceptance(chain.draft_logits.detach(), chain.target_logits)
    return {"head_loss": float(loss.detach()), "head_soft_alpha": acc.alpha.tolist(),
            "head_chains": chain.num_chains}  # fmt: skip
