"""Building blocks of the dense decoders (Qwen3 / Qwen2 / Llama), named as in transformers.

RMSNorm (standard `w·x̂` and zero-centred `(1+w)·x̂`), rotary embedding, GQA attention over a
KVCache (docs/architecture.md, "Attention contract"), SwiGLU MLP and the pre-norm decoder layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bebop_spec.models.config import ModelConfig
from bebop_spec.models.kv_cache import CacheView


class RMSNorm(nn.Module):
    """y = w·x̂ (Llama/Qwen), or (1 + w)·x̂ when `zero_centered` (Qwen3-Next/3.5 `GemmaRMSNorm`).

    x̂ = x / sqrt(mean(x²) + eps), computed in float32. The two variants round like their HF
    counterparts: standard casts x̂ to the input dtype before scaling, zero-centred after.
    """

    def __init__(self, dim: int, eps: float = 1e-6, zero_centered: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.zero_centered = zero_centered
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, zero_centered={self.zero_centered}"


# ------------------------------------------------------------------------------------ rotary
def rope_parameters(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """(inv_freq[head_dim/2] float32, attention_scaling) for the config's RoPE variant.

    Scaled variants use transformers' own ROPE_INIT_FUNCTIONS when importable (exact parity);
    default / linear / llama3 also have a local implementation for when they are not.
    """
    if config.rope_scaling is not None:
        try:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            fn = ROPE_INIT_FUNCTIONS[config.rope_type]
            inv_freq, scaling = fn(_RopeShim(config), torch.device("cpu"))
            return inv_freq.float(), float(scaling)
        except (ImportError, KeyError, AttributeError, TypeError):
            if config.rope_type == "yarn":
                raise ValueError("yarn RoPE needs transformers' rope functions") from None
    return _local_inv_freq(config), 1.0


def _local_inv_freq(config: ModelConfig) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    rs = config.rope_scaling or {}
    if config.rope_type == "linear":
        return inv_freq / rs["factor"]
    if config.rope_type == "llama3":  # smooth interpolation between low and high frequencies
        factor, old_len = rs["factor"], rs["original_max_position_embeddings"]
        lo, hi = rs["low_freq_factor"], rs["high_freq_factor"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / lo, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / hi) & (wavelen <= old_len / lo)
        return torch.where(medium, smoothed, scaled)
    return inv_freq


class _RopeShim:
    """The attributes transformers' rope init functions read (v4 and v5 spellings)."""

    def __init__(self, config: ModelConfig) -> None:
        self.rope_theta = config.rope_theta
        self.rope_scaling = dict(config.rope_scaling or {})
        self.rope_parameters = {"rope_theta": config.rope_theta, **self.rope_scaling}
        self.head_dim = config.head_dim
        self.hidden_size = config.hidden_size
        self.num_attention_heads = config.num_attention_heads
        self.max_position_embeddings = config.max_position_embeddings

    def standardize_rope_params(self) -> None:  # already standard: ModelConfig.from_hf did it
        pass


class RotaryEmbedding(nn.Module):
    """positions[B,T] -> (cos, sin)[B,T,head_dim] in float32, NeoX (rotate-half) layout."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        with torch.device("cpu"):  # real numbers even when the model is built on "meta"
            inv_freq, self.attention_scaling = rope_parameters(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq.float()
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos() * self.attention_scaling, emb.sin() * self.attention_scaling


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x[B,T,heads,d] rotated by cos, sin[B,T,d]: x·cos + rotate_half(x)·sin."""
    cos = cos[:, :, None].to(x.dtype)
    sin = sin[:, :, None].to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


# --------------------------------------------------------------------------------- attention
class Attention(nn.Module):
    """GQA self-attention. With a CacheView it writes this call's K/V into the cache first,
    then each query at position P attends to its slot's keys at positions 0..P; without one
    it is plain causal attention over the given tokens (training / reference)."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx  # which cache layer this attention reads and writes
        self.n_heads = config.num_attention_heads
        self.n_kv = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        h, bias = config.hidden_size, config.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=config.o_proj_bias)
        if config.qk_norm:  # Qwen3: per-head RMSNorm on q and k, before RoPE
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                view: CacheView | None = None) -> torch.Tensor:  # fmt: skip
        """x[B,T,H] -> [B,T,H]."""
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if view is None:
            mask, causal = None, True
        else:
            view.write(self.layer_idx, k, v)
            k, v = view.read(self.layer_idx)  # [B, kv_len, n_kv, d]
            k, v = k.to(q.dtype), v.to(q.dtype)
            mask, causal = view.mask, False
        # GQA without materialising repeated K/V: SDPA broadcasts kv heads over query groups.
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), attn_mask=mask,
                                             is_causal=causal,
                                             enable_gqa=self.n_heads != self.n_kv)  # fmt: skip
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then + mlp(norm(x)). HF names: self_attn, mlp,
    input_layernorm, post_attention_layernorm."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                view: CacheView | None = None) -> torch.Tensor:  # fmt: skip
        """x[B,T,H] -> [B,T,H]."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, view)
        return x + self.mlp(self.post_attention_layernorm(x))
