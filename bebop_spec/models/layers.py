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
        if x.dtype == torch.float32:  # the common case without the no-op casts
            h = F.rms_norm(x, (x.shape[-1],), eps=self.eps)
            return h * (1.0 + self.weight) if self.zero_centered else self.weight * h
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)  # x̂ = x / rms(x), float32
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
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    if x.dtype != cos.dtype:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
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
        self.qkv: FusedLinear | None = None  # set by fuse_projections (inference only)

    def _fused_qkv(self, x: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
        """Inference path, same numbers as the separate one with a third of the ops: one
        matmul for q/k/v, one q/k-norm over the q and k heads together, one rotation."""
        b, t, _ = x.shape
        nq = self.n_heads + self.n_kv
        qkv = self.qkv(x).view(b, t, nq + self.n_kv, self.head_dim)
        qk, v = qkv[:, :, :nq], qkv[:, :, nq:]
        if self.q_norm is not None:
            d = self.head_dim
            w = torch.cat((self.q_norm.weight.expand(self.n_heads, d),
                           self.k_norm.weight.expand(self.n_kv, d)))  # fmt: skip
            qk = w * F.rms_norm(qk.float(), (d,), eps=self.q_norm.eps).to(qk.dtype)
        qk = apply_rotary(qk, cos, sin)
        return qk[:, :, : self.n_heads], qk[:, :, self.n_heads :], v

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                view: CacheView | None = None) -> torch.Tensor:  # fmt: skip
        """x[B,T,H] -> [B,T,H]."""
        b, t, _ = x.shape
        if self.qkv is not None and not torch.is_grad_enabled():
            q, k, v = self._fused_qkv(x, cos, sin)
        else:
            q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim)
            k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim)
            v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if view is None:  # GQA without materialising repeated K/V: SDPA broadcasts them
            out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                 v.transpose(1, 2), is_causal=True,
                                                 enable_gqa=self.n_heads != self.n_kv)  # fmt: skip
        else:
            view.write(self.layer_idx, k, v)
            k, v = view.read(self.layer_idx)  # [B, n_kv, kv_len, d]: heads-first already
            out = cached_attention(q.transpose(1, 2), k.to(q.dtype), v.to(q.dtype), view.mask)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)
        if self.qkv is not None and not torch.is_grad_enabled():
            return linear(out, self.o_proj.weight, self.o_proj.bias)
        return self.o_proj(out)


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:  # fmt: skip
    """q[B, H, T, d] over cached k, v[B, kv, L, d] with mask[B, 1, T, L] (True = attend) or
    None -> [B, H, T, d].

    GQA by folding each kv head's query group into the query axis (q as [B, kv, g·T, d], the
    mask repeated per group) instead of SDPA's enable_gqa: the same dot products, one head
    per kv head. On CPU it is what makes bf16 decode attention cheap: measured here (2 threads,
    9 / 3 heads, 200 keys) a bf16 decode step at batch 16 took 1.22 ms with enable_gqa and
    0.24 ms folded, a 4-token verify 0.59 vs 0.46 ms; float32 single-token queries keep
    enable_gqa, which is ~1.2x faster for them."""
    b, h, t, d = q.shape
    kv = k.shape[1]
    if kv == h or (t == 1 and q.dtype == torch.float32):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=kv != h)
    g = h // kv
    if mask is not None:  # [B, 1, T, L] -> [B, 1, g·T, L], query j·T + i is query i of head j
        mask = mask.unsqueeze(2).expand(b, 1, g, t, mask.shape[-1]).reshape(b, 1, g * t, -1)
    out = F.scaled_dot_product_attention(q.reshape(b, kv, g * t, d), k, v, attn_mask=mask)
    return out.view(b, h, t, d)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) · up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        h, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)
        self.gate_up: FusedLinear | None = None  # set by fuse_projections (inference only)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is not None and not torch.is_grad_enabled():
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return linear(F.silu(gate) * up, self.down_proj.weight)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedLinear:
    """Several nn.Linear sharing one input, run as one matmul over their stacked weights.

    The stacked weight owns the storage and the original Parameters are rebound as views
    into it, so names, state_dict and in-place weight updates (`param.copy_`) are unchanged
    and the fused matmul always sees the current values. One [N,H] matmul instead of three
    (q/k/v) or two (gate/up) halves the linear time of a decode step on CPU. Not a Module:
    it must not appear in state_dict or parameters().
    """

    def __init__(self, linears: list[nn.Linear]) -> None:
        self.weight = _stack_and_rebind(linears, "weight")
        has_bias = [lin.bias is not None for lin in linears]
        if any(has_bias) and not all(has_bias):
            raise ValueError("FusedLinear: either every projection has a bias or none")
        self.bias = _stack_and_rebind(linears, "bias") if all(has_bias) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


# CPU float32 GEMM shapes where W·xᵀ beats x·Wᵀ: with 2-8 rows (a verify step's γ+1 tokens
# at batch 1-2, a short MTP catch-up) MKL's x·Wᵀ takes its packed-GEMM path and costs ~2x a
# single-row GEMV, while W·xᵀ streams W once (measured: 4 rows 1.1 ms vs 2.3 ms for the demo
# model's matmuls; SmolLM2's 49k-row LM head 2.8 vs 9.2 ms). Same dot products, summed in
# another order (~1e-7). In bfloat16 (oneDNN) it is the other way round: the LM head at 2-8
# rows took 3.5 ms as W·xᵀ and 1.7-2.1 ms as x·Wᵀ on a CPU with avx512_bf16.
_WXT_ROWS = range(2, 9)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for inference, choosing the faster CPU GEMM orientation for a few rows."""
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if rows in _WXT_ROWS and x.device.type == "cpu" and x.dtype == torch.float32:
        y = torch.mm(weight, x.reshape(rows, x.shape[-1]).T).T
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def _stack_and_rebind(linears: list[nn.Linear], attr: str) -> torch.Tensor:
    parts = [getattr(lin, attr) for lin in linears]
    stacked = torch.cat([p.detach() for p in parts], dim=0)
    start = 0
    for lin, p in zip(linears, parts, strict=True):
        n = p.shape[0]
        setattr(lin, attr, nn.Parameter(stacked[start : start + n], requires_grad=p.requires_grad))
        start += n
    return stacked


def fuse_projections(module: nn.Module) -> nn.Module:
    """Fuse q/k/v and gate/up of every Attention / MLP in `module` for inference (in place).

    Call after the module's final `.to(device, dtype)` (which would reallocate the views).
    The fused path runs only when autograd is off; with grad enabled the separate
    projections run, so training a fused module still works.
    """
    for m in module.modules():
        if isinstance(m, Attention) and m.qkv is None:
            m.qkv = FusedLinear([m.q_proj, m.k_proj, m.v_proj])
        elif isinstance(m, MLP) and m.gate_up is None:
            m.gate_up = FusedLinear([m.gate_proj, m.up_proj])
    return module


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
