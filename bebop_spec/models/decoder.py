"""DenseDecoder: Qwen3 / Qwen2 / Llama causal LM with Hugging Face parameter names.

    target = DenseDecoder(config)
    target.load_state_dict(hf_state_dict)            # names match transformers' *ForCausalLM
    hidden = target(ids[B,T], positions[B,T], cache, slots[B])   # after the final norm
    logits = target.compute_logits(hidden)           # float32

`hidden` is what vLLM hands to MTP heads (docs/mtp_layout.md): the output of the final norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bebop_spec.models.config import ModelConfig
from bebop_spec.models.kv_cache import KVCache
from bebop_spec.models.layers import DecoderLayer, RMSNorm, RotaryEmbedding, linear


def run_layers(
    layers: list[nn.Module] | nn.ModuleList,
    x: torch.Tensor,
    rotary: RotaryEmbedding,
    positions: torch.Tensor,
    cache: KVCache | None,
    slots: torch.Tensor | None,
) -> torch.Tensor:
    """x[B,T,H] through `layers` at positions[B,T], with or without a KV cache -> [B,T,H]."""
    if x.shape[:2] != positions.shape:
        raise ValueError(f"positions {tuple(positions.shape)} != tokens {tuple(x.shape[:2])}")
    view = None
    if cache is not None:
        if slots is None:
            raise ValueError("a KV cache needs slots[B]")
        view = cache.view(slots, positions)
    elif slots is not None:
        raise ValueError("slots given without a cache")
    cos, sin = rotary(positions)
    for layer in layers:
        x = layer(x, cos, sin, view)
    return x


class _Backbone(nn.Module):
    """The `model.*` part of an HF *ForCausalLM: embed_tokens, layers, norm."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


class DenseDecoder(nn.Module):
    """Dense decoder-only LM; `state_dict()` keys are the HF checkpoint's."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = _Backbone(config)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """[V, H]; the embedding matrix when tied."""
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids[...] -> [..., H]."""
        return self.model.embed_tokens(input_ids)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids[B,T], positions[B,T] -> hidden[B,T,H] after the final norm.

        With a cache: writes K/V at (slots[b], positions[b,t]) and attends to keys 0..P of the
        slot; `positions == cache.scratch` marks padding. Without: causal over the given tokens.
        """
        x = run_layers(self.model.layers, self.embed(input_ids), self.model.rotary_emb,
                       positions, cache, slots)  # fmt: skip
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden[..., H] -> logits[..., V] in float32."""
        if torch.is_grad_enabled():
            return F.linear(hidden, self.lm_head_weight).float()
        return linear(hidden, self.lm_head_weight).float()
