"""MTPHead: the multi-token-prediction draft head, in the two layouts vLLM / SGLang load.

    head = MTPHead(config, layout="qwen3_next", num_layers=1)
    g = head(hidden[B,T,H], next_ids[B,T], positions[B,T], cache, slots, embed=target.embed)
    q_logits = target.compute_logits(g)       # LM head shared with the target

One step computes  g = norm(layer(fc(cat(enorm(embed(next_ids)), hnorm(hidden)))))  where
`hidden` is the target's hidden after its final norm (chain step 0) or the previous step's `g`
(steps >= 1). The pair (h_j, x_{j+1}) sits at position j. Conventions, checked against vLLM
0.33.0, are in docs/mtp_layout.md:

- `qwen3_next` (Qwen3-Next / Qwen3.5): `mtp.fc`, `mtp.pre_fc_norm_embedding`,
  `mtp.pre_fc_norm_hidden`, `mtp.layers.{i}.*`, `mtp.norm`; the three MTP norms are
  zero-centred, `(1 + w)·x̂`.
- `deepseek_v3`: per layer `model.layers.{N+i}.{enorm, hnorm, eh_proj, shared_head.norm}` plus
  the decoder layer's own tensors under the same prefix (N = target num_hidden_layers);
  standard norms; the token embedding is zeroed at position 0 (vLLM deepseek_mtp.py:123).

The decoder layer inside the head is the TARGET family's dense decoder layer (Qwen3 / Qwen2 /
Llama: same attention, q/k norm, biases and standard RMSNorms as the target's layers) — our
targets are dense, unlike the hybrid/MoE Qwen3-Next and MLA DeepSeek-V3 blocks. With several
MTP layers, chain step k (0-based, vLLM's `spec_step_idx`) uses layer `k % num_layers`, whose
attention reads and writes layer `k % num_layers` of the head's own KV cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from bebop_spec.models.config import MTP_LAYOUTS, ModelConfig
from bebop_spec.models.decoder import run_layers
from bebop_spec.models.kv_cache import KVCache
from bebop_spec.models.layers import DecoderLayer, RMSNorm, RotaryEmbedding


class _Qwen3NextMTP(nn.Module):
    """`mtp.*`: one fc and three zero-centred norms shared by all MTP layers."""

    def __init__(self, config: ModelConfig, num_layers: int) -> None:
        super().__init__()
        h, eps = config.hidden_size, config.rms_norm_eps
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(h, eps, zero_centered=True)
        self.pre_fc_norm_hidden = RMSNorm(h, eps, zero_centered=True)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(num_layers))
        self.norm = RMSNorm(h, eps, zero_centered=True)


class _SharedHead(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DeepSeekMTPLayer(DecoderLayer):
    """`model.layers.{N+i}.*`: a target-family decoder layer plus enorm/hnorm/eh_proj/shared_head."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__(config, layer_idx)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(h, eps)
        self.hnorm = RMSNorm(h, eps)
        self.eh_proj = nn.Linear(2 * h, h, bias=False)
        self.shared_head = _SharedHead(config)


class MTPHead(nn.Module):
    """MTP draft head; `state_dict()` keys are the layout's checkpoint names."""

    def __init__(self, config: ModelConfig, layout: str = "qwen3_next", num_layers: int = 1):
        super().__init__()
        if layout not in MTP_LAYOUTS:
            raise ValueError(f"layout={layout!r}: expected one of {MTP_LAYOUTS}")
        if num_layers < 1:
            raise ValueError(f"num_layers={num_layers} must be >= 1")
        self.config = config
        self.layout = layout
        self.num_layers = num_layers
        if layout == "qwen3_next":
            self.mtp = _Qwen3NextMTP(config, num_layers)
        else:
            self.model = nn.Module()
            first = config.num_hidden_layers
            self.model.layers = nn.ModuleDict(
                {str(first + i): DeepSeekMTPLayer(config, i) for i in range(num_layers)}
            )
        self.rotary_emb = RotaryEmbedding(config)

    def parts(self, layer: int) -> tuple[nn.Module, nn.Module, nn.Linear, DecoderLayer, nn.Module]:
        """(enorm, hnorm, fc, decoder layer, final norm) used by MTP layer `layer`."""
        if self.layout == "qwen3_next":
            m = self.mtp
            return m.pre_fc_norm_embedding, m.pre_fc_norm_hidden, m.fc, m.layers[layer], m.norm
        blk = self.model.layers[str(self.config.num_hidden_layers + layer)]
        return blk.enorm, blk.hnorm, blk.eh_proj, blk, blk.shared_head.norm

    def forward(
        self,
        hidden: torch.Tensor,
        next_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        *,
        embed: Callable[[torch.Tensor], torch.Tensor],
        step: int = 0,
    ) -> torch.Tensor:
        """hidden[B,T,H], next_ids[B,T], positions[B,T] -> hidden_out[B,T,H] (after the MTP norm).

        `embed` is the target's embedding function (shared, never copied). `step` is the
        0-based chain step; it picks MTP layer `step % num_layers`. `hidden_out` feeds step+1
        and `target.compute_logits(hidden_out)` gives the draft logits.
        """
        enorm, hnorm, fc, layer, norm = self.parts(step % self.num_layers)
        e = embed(next_ids)
        if self.layout == "deepseek_v3":  # vLLM masks the embedding at position 0
            e = e.masked_fill((positions == 0).unsqueeze(-1), 0.0)
        # concat order: [embedding, hidden] (vLLM qwen3_next_mtp.py:133, deepseek_mtp.py:128)
        x = fc(torch.cat([enorm(e), hnorm(hidden.to(e.dtype))], dim=-1))
        x = run_layers([layer], x, self.rotary_emb, positions, cache, slots)
        return norm(x)
