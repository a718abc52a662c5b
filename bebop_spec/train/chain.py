"""The teacher-forced γ-step MTP chain used for training (DESIGN §3).

For a start position t of a sequence x, chain step k (0-based, the engine's `step`) feeds
    k = 0:  the pair (h_t, x_{t+1}) at position t, h = the frozen target's hidden (after its
            final norm);
    k >= 1: (g^{k-1}_t, x_{t+k+1}) at position t+k, g^{k-1} = the head's output hidden of step
            k-1 (after the head's final norm).
Its draft logits predict x_{t+k+2} and are compared with the target's logits at position t+k+1.
Gradients flow through the whole chain into the head; the target runs under no_grad.

What the head's attention sees (`context`):
    "serve"  (default) exactly what the engine's draft round from t sees (engine/runner.py
             `_draft`): the head's KV cache holds step-0 entries (h_j, x_{j+1}) at positions
             j <= t, plus the entries this round's own steps 1..k wrote at t+1..t+k. So the
             query of (t, k) attends to step-0 keys 0..t and to its own chain keys — never to
             another start's chain keys (EAGLE-3's "training-time test"). One-layer heads only:
             with several layers the engine's caches of layers >= 1 hold no step-0 entries.
    "causal" the earlier approximation: step k is a plain causal pass over the step-k inputs of
             all starts, so (t, k) also attends to the step-k keys of every start t' < t, which
             the engine never has.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bebop_spec.models.layers import apply_rotary
from bebop_spec.train.data import complete_chain_starts
from bebop_spec.train.losses import IGNORE_LABEL

__all__ = [
    "CONTEXTS",
    "ChainOutput",
    "complete_chain_starts",
    "draft_vocab_view",
    "select_starts",
    "serve_attention",
    "teacher_forced_chain",
]

CONTEXTS = ("serve", "causal")


@dataclass
class ChainOutput:
    draft_logits: Tensor  # [N, γ, V] float32, differentiable w.r.t. the head ([N, γ, K+1])
    target_logits: Tensor  # [N, γ, V] float32, no grad ([N, γ, K+1]: draft_vocab_view)
    labels: Tensor  # [N, γ] int64: x_{t+k+1}, the data token step k predicts (its column)
    mask: Tensor  # [N] bool, all True: only complete chains are gathered
    starts: Tensor  # [N, 2] int64: (row b, start t) of each chain

    @property
    def num_chains(self) -> int:
        return self.mask.numel()


def select_starts(
    loss_mask: Tensor, gamma: int, max_chains: int = 0, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(rows[N], starts[N]) of the complete chains, in order; a random subset of max_chains of
    them when max_chains > 0 (draws from `generator` on the CPU)."""
    rows, starts = complete_chain_starts(loss_mask, gamma).nonzero(as_tuple=True)
    if 0 < max_chains < rows.numel():
        keep = torch.randperm(rows.numel(), generator=generator)[:max_chains].sort().values
        keep = keep.to(rows.device)
        rows, starts = rows[keep], starts[keep]
    return rows, starts


def teacher_forced_chain(
    target: nn.Module,
    head: nn.Module,
    input_ids: Tensor,
    loss_mask: Tensor,
    gamma: int,
    max_chains: int = 0,
    generator: torch.Generator | None = None,
    *,
    context: str = "serve",
    chains: tuple[Tensor, Tensor] | None = None,
    hidden: Tensor | None = None,
    draft_ids: Tensor | None = None,
) -> ChainOutput:
    """input_ids[B,T], loss_mask[B,T] -> the γ-chains of every complete start (N of them), or of
    max_chains of them drawn at random (the [N, γ, V] logits dominate memory). `context`:
    "serve" | "causal", what the head's attention sees (module docstring). `chains`: given
    (rows[N], starts[N]) instead of select_starts' (a rank's share of a global draw);
    `hidden`: the target's hidden[B,T,H], when already at hand (a cache), instead of its
    forward. `draft_ids` [K]: the head drafts over these tokens only (a draft vocabulary,
    spec/draft_vocab.py); the logits then cover K + 1 columns (draft_vocab_view)."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    if context not in CONTEXTS:
        raise ValueError(f"context={context!r}: expected one of {CONTEXTS}")
    if context == "serve" and head.num_layers != 1:
        raise ValueError(
            f"context='serve' needs a one-layer head (this one has {head.num_layers}): the "
            "engine's caches of MTP layers >= 1 hold no step-0 entries; use context='causal'"
        )
    batch, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    if chains is None:
        chains = select_starts(loss_mask, gamma, max_chains, generator)
    rows, starts = chains  # [N] each
    ks = range(1, gamma + 1)
    labels = torch.stack([input_ids[rows, starts + k + 1] for k in ks], dim=1)
    with torch.no_grad():
        if hidden is None:
            hidden = target(input_ids, positions)  # [B,T,H]
        target_logits = torch.stack(
            [target.compute_logits(hidden[rows, starts + k]) for k in ks], dim=1
        )
    # The head may train in higher precision than the frozen target: cast at the boundaries.
    head_dtype = next(head.parameters()).dtype

    def embed(ids: Tensor) -> Tensor:
        return target.embed(ids).to(head_dtype)

    # Start t only needs pairs and starts <= t, so every pass stops at the last needed start.
    n = int(starts.max()) + 1 if starts.numel() else 0
    chain = _serve_chain if context == "serve" else _causal_chain
    outs = chain(head, hidden[:, :n].to(head_dtype), input_ids, positions, n, gamma, embed)
    draft_logits = _draft_logits(target, outs, rows, starts, hidden.dtype, draft_ids)
    if draft_ids is not None:
        target_logits, labels = draft_vocab_view(target_logits, labels, draft_ids)
    return ChainOutput(
        draft_logits=draft_logits,
        target_logits=target_logits,
        labels=labels,
        mask=torch.ones(rows.numel(), dtype=torch.bool, device=input_ids.device),
        starts=torch.stack([rows, starts], dim=1),
    )


def _draft_logits(target: nn.Module, outs: list[Tensor], rows: Tensor, starts: Tensor,
                  dtype: torch.dtype, draft_ids: Tensor | None) -> Tensor:  # fmt: skip
    """The head's hidden per step -> draft logits [N, γ, V], or [N, γ, K + 1] over a draft
    vocabulary (LM-head rows draft_ids only; the last column −∞: q = 0 for the rest)."""
    if draft_ids is None:
        return torch.stack([target.compute_logits(g[rows, starts].to(dtype)) for g in outs], 1)
    weight = target.lm_head_weight[draft_ids]
    sub = torch.stack([F.linear(g[rows, starts].to(dtype), weight).float() for g in outs], 1)
    return F.pad(sub, (0, 1), value=float("-inf"))


def draft_vocab_view(target_logits: Tensor, labels: Tensor, draft_ids: Tensor
                     ) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Target logits [N, γ, V] and labels [N, γ] as a head drafting over draft_ids [K] sees
    them: logits [N, γ, K + 1] = (w_K, log Σ_{v∉K} e^{w_v}), so the softmax over K + 1 columns
    gives p exactly on K and p's remaining mass in the last column (where q = 0): Σ min(p, q)
    is the real acceptance. Labels become column indices, IGNORE_LABEL outside K."""
    lse = torch.logsumexp(target_logits, -1, keepdim=True)
    inside = target_logits[..., draft_ids]
    rest_share = torch.exp(torch.logsumexp(inside, -1, keepdim=True) - lse).clamp(max=1.0)
    rest = lse + torch.log1p(-rest_share)  # −∞ when K holds all of p
    column = torch.full((target_logits.shape[-1],), IGNORE_LABEL, dtype=torch.long,
                        device=labels.device)  # fmt: skip
    column[draft_ids] = torch.arange(draft_ids.numel(), device=labels.device)
    return torch.cat([inside, rest], -1), column[labels]


Embed = Callable[[Tensor], Tensor]


def _causal_chain(head: nn.Module, h: Tensor, ids: Tensor, positions: Tensor, n: int,
                  gamma: int, embed: Embed) -> list[Tensor]:  # fmt: skip
    """h[B,n,H] -> [g^k[B,n,H] for k < γ]: step k is one causal pass over all starts' step-k
    pairs (start t at position t+k attends to the step-k inputs of starts <= t)."""
    g, outs = h, []
    for k in range(gamma):
        g = head(g, ids[:, k + 1 : k + 1 + n], positions[:, k : k + n], embed=embed, step=k)
        outs.append(g)
    return outs


def _serve_chain(head: nn.Module, h: Tensor, ids: Tensor, positions: Tensor, n: int,
                 gamma: int, embed: Embed) -> list[Tensor]:  # fmt: skip
    """h[B,n,H] -> [g^k[B,n,H] for k < γ] with the engine's attention context: start t at step k
    attends to the step-0 keys of positions 0..t and to its own keys of steps 1..k.

    The head's one decoder layer, written out from its submodules (MTPHead.forward +
    DecoderLayer.forward) so the keys of every step stay at hand: step-0 K/V [B,n,kv,d] for all
    positions, and per step k >= 1 one more K/V [B,n,kv,d] per start (its chain keys)."""
    enorm, hnorm, fc, layer, norm = head.parts(0)
    attn = layer.self_attn
    g, outs = h, []
    k0 = v0 = None
    chain_k: list[Tensor] = []
    chain_v: list[Tensor] = []
    for k in range(gamma):
        pos = positions[:, k : k + n]
        e = embed(ids[:, k + 1 : k + 1 + n])
        if head.layout == "deepseek_v3":  # vLLM masks the embedding at position 0
            e = e.masked_fill((pos == 0).unsqueeze(-1), 0.0)
        x = fc(torch.cat([enorm(e), hnorm(g.to(e.dtype))], dim=-1))
        q, key, val = _project(attn, layer.input_layernorm(x), *head.rotary_emb(pos))
        if k == 0:
            k0, v0 = key, val
        else:
            chain_k.append(key)
            chain_v.append(val)
        a = serve_attention(q, k0, v0, chain_k, chain_v)  # [B, n, heads, d]
        x = x + attn.o_proj(a.flatten(2))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
        g = norm(x)
        outs.append(g)
    return outs


def _project(attn: nn.Module, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
    """x[B,n,H] -> q[B,n,heads,d], k, v[B,n,kv,d]: projections, q/k norm, rotary (as Attention)."""
    b, n, _ = x.shape
    q = attn.q_proj(x).view(b, n, attn.n_heads, attn.head_dim)
    k = attn.k_proj(x).view(b, n, attn.n_kv, attn.head_dim)
    v = attn.v_proj(x).view(b, n, attn.n_kv, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


def serve_attention(
    q: Tensor, k0: Tensor, v0: Tensor, chain_k: list[Tensor], chain_v: list[Tensor]
) -> Tensor:
    """q[B,n,heads,d] (query of start t at step k), k0, v0[B,n,kv,d] (step-0 keys of positions
    0..n-1), chain_k, chain_v: k tensors [B,n,kv,d] (start t's own keys of steps 1..k)
    -> out[B,n,heads,d].

    One SDPA over the keys [k0 | chain step 1 | ... | chain step k] ([B, kv, (k+1)·n, d]) with
    the mask: k0_j visible to start t iff j <= t, chain key (i, t') iff t' == t. SDPA's own
    scale and GQA (query head h reads kv head h // (heads / kv)), as the engine's attention."""
    n, heads, kv = q.shape[1], q.shape[2], k0.shape[2]
    if chain_k:
        idx = torch.arange(n, device=q.device)
        own = idx[None, :] == idx[:, None]  # [t, t']: the start's own chain key
        mask = torch.cat([idx[None, :] <= idx[:, None]] + [own] * len(chain_k), dim=1)
        causal = False
    else:  # step 0: a plain causal pass
        mask, causal = None, True
    keys = torch.cat([k0, *chain_k], dim=1).transpose(1, 2)
    values = torch.cat([v0, *chain_v], dim=1).transpose(1, 2)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask,
                                         is_causal=causal, enable_gqa=heads != kv)  # fmt: skip
    return out.transpose(1, 2)
