"""The teacher-forced γ-step MTP chain used for training (DESIGN §3).

For a start position t of a sequence x:
    step 1 feeds the pair (h_t, x_{t+1}) at position t, h = the frozen target's hidden
           (after its final norm);
    step k feeds (g^{k-1}_t, x_{t+k}) at position t+k-1, g^{k-1} = the head's output hidden
           of step k-1 (after the head's final norm), in a fresh causal pass (no KV cache).
The draft logits of step k at start t predict x_{t+k+1}; they are compared with the target's
logits at position t+k (its distribution over x_{t+k+1}). Gradients flow through the whole
chain into the head; the target is run under no_grad.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bebop_spec.train.data import complete_chain_starts

__all__ = ["ChainOutput", "complete_chain_starts", "select_starts", "teacher_forced_chain"]


@dataclass
class ChainOutput:
    draft_logits: Tensor  # [N, γ, V] float32, differentiable w.r.t. the head
    target_logits: Tensor  # [N, γ, V] float32, no grad
    labels: Tensor  # [N, γ] int64: x_{t+k+1}, the data token step k predicts
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
) -> ChainOutput:
    """input_ids[B,T], loss_mask[B,T] -> the γ-chains of every complete start (N of them), or of
    max_chains of them drawn at random (the [N, γ, V] logits dominate memory)."""
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1, got {gamma}")
    batch, seq = input_ids.shape
    positions = torch.arange(seq, device=input_ids.device).expand(batch, seq)
    rows, starts = select_starts(loss_mask, gamma, max_chains, generator)  # [N] each
    ks = range(1, gamma + 1)
    labels = torch.stack([input_ids[rows, starts + k + 1] for k in ks], dim=1)
    with torch.no_grad():
        hidden = target(input_ids, positions)  # [B,T,H]
        target_logits = torch.stack(
            [target.compute_logits(hidden[rows, starts + k]) for k in ks], dim=1
        )
    # The head may train in higher precision than the frozen target: cast at the boundaries.
    head_dtype = next(head.parameters()).dtype

    def embed(ids: Tensor) -> Tensor:
        return target.embed(ids).to(head_dtype)

    # Causal passes: start t only sees starts <= t, so the passes stop at the last needed start.
    n = int(starts.max()) + 1 if starts.numel() else 0
    g, draft = hidden, []
    for k in ks:
        g = head(
            g[:, :n].to(head_dtype),
            input_ids[:, k : k + n],
            positions[:, k - 1 : k - 1 + n],
            embed=embed,
            step=k - 1,
        )  # [B, n, H]: g^k_t for starts t < n
        draft.append(target.compute_logits(g[rows, starts].to(hidden.dtype)))
    return ChainOutput(
        draft_logits=torch.stack(draft, dim=1),
        target_logits=target_logits,
        labels=labels,
        mask=torch.ones(rows.numel(), dtype=torch.bool, device=input_ids.device),
        starts=torch.stack([rows, starts], dim=1),
    )
