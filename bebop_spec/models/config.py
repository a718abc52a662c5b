"""ModelConfig: the validated subset of a Hugging Face `config.json` our decoder needs.

    cfg = ModelConfig.from_hf(json.load(open("config.json")))

Families: `qwen3` (q_norm/k_norm per head), `qwen2` (q/k/v bias), `llama` (optional
`attention_bias`). RoPE parameters are read from `rope_parameters` (transformers 5) or the
older `rope_theta` + `rope_scaling` pair. MTP heads are detected from `mtp_num_hidden_layers`
(Qwen3-Next / Qwen3.5 layout `qwen3_next`) or `num_nextn_predict_layers` (DeepSeek-V3 layout
`deepseek_v3`); see docs/mtp_layout.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

FAMILIES = ("qwen3", "qwen2", "llama")
MTP_LAYOUTS = ("qwen3_next", "deepseek_v3")
# rope_type -> keys it needs (besides rope_theta). "dynamic" / "longrope" recompute frequencies
# from the batch's sequence length, which a position-indexed KV cache cannot honour.
ROPE_TYPES: dict[str, tuple[str, ...]] = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}
_ARCH_FAMILY = {
    "Qwen3ForCausalLM": "qwen3",
    "Qwen2ForCausalLM": "qwen2",
    "LlamaForCausalLM": "llama",
}


@dataclass
class ModelConfig:
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # None = plain RoPE; else has "rope_type"
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v (and for llama/qwen3 also o_proj) carry a bias
    qk_norm: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    mtp_num_layers: int = 0  # 0 = the checkpoint declares no MTP head
    mtp_layout: str | None = None  # "qwen3_next" | "deepseek_v3" | None
    hf: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)  # raw config.json

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family={self.family!r}: supported families are {FAMILIES}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim",
                     "max_position_embeddings"):  # fmt: skip
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta={self.rope_theta} must be > 0")
        _check_rope_scaling(self.rope_scaling)
        if self.mtp_num_layers < 0:
            raise ValueError(f"mtp_num_layers={self.mtp_num_layers} must be >= 0")
        if self.mtp_layout not in (None, *MTP_LAYOUTS):
            raise ValueError(f"mtp_layout={self.mtp_layout!r}: expected one of {MTP_LAYOUTS}")
        if (self.mtp_num_layers > 0) != (self.mtp_layout is not None):
            raise ValueError(
                f"mtp_num_layers={self.mtp_num_layers} and mtp_layout={self.mtp_layout!r} "
                "disagree (a head needs both, no head needs neither)"
            )
        if self.qk_norm and self.family != "qwen3":
            raise ValueError("qk_norm is a qwen3 feature")

    @property
    def rope_type(self) -> str:
        return self.rope_scaling["rope_type"] if self.rope_scaling else "default"

    @property
    def o_proj_bias(self) -> bool:
        """Qwen2 biases q/k/v only; Llama and Qwen3 apply `attention_bias` to o_proj too."""
        return self.attention_bias and self.family != "qwen2"

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a parsed HF `config.json`; ValueError on anything we cannot run exactly."""
        if not isinstance(hf, dict):
            raise ValueError(f"config must be a dict, got {type(hf).__name__}")
        family = _family(hf)
        _reject_unsupported(hf, family)
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size",
                               "num_hidden_layers", "num_attention_heads") if k not in hf]  # fmt: skip
        if missing:
            raise ValueError(f"config.json lacks required keys: {missing}")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or _div(hf["hidden_size"], heads, "hidden_size")
        rope_theta, rope_scaling = _rope(hf)
        mtp_layers, mtp_layout = detect_mtp(hf)
        return cls(
            family=family,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 32768),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if family == "qwen2" else bool(hf.get("attention_bias", False)),
            qk_norm=family == "qwen3",
            eos_token_ids=_id_list(hf.get("eos_token_id")),
            bos_token_id=hf.get("bos_token_id"),
            mtp_num_layers=mtp_layers,
            mtp_layout=mtp_layout,
            hf=copy.deepcopy(hf),
        )

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict for this model: the original keys, with ours written over them."""
        out = copy.deepcopy(self.hf)
        rope = {"rope_theta": self.rope_theta, "rope_type": "default"}
        rope.update(self.rope_scaling or {})
        out.update(
            model_type=self.family,
            architectures=out.get("architectures") or [_family_arch(self.family)],
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_parameters=rope,
            max_position_embeddings=self.max_position_embeddings,
            tie_word_embeddings=self.tie_word_embeddings,
            hidden_act="silu",
        )
        out.pop("rope_scaling", None)
        out.pop("rope_theta", None)
        for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
            out.pop(key, None)
        if self.mtp_layout == "qwen3_next":
            out["mtp_num_hidden_layers"] = self.mtp_num_layers
        elif self.mtp_layout == "deepseek_v3":
            out["num_nextn_predict_layers"] = self.mtp_num_layers
        if self.family != "qwen2":
            out["attention_bias"] = self.attention_bias
        return out


def _family_arch(family: str) -> str:
    return {v: k for k, v in _ARCH_FAMILY.items()}[family]


def _family(hf: dict[str, Any]) -> str:
    model_type = hf.get("model_type")
    if model_type in FAMILIES:
        return model_type
    for arch in hf.get("architectures") or []:
        if arch in _ARCH_FAMILY:
            return _ARCH_FAMILY[arch]
    raise ValueError(
        f"unsupported model: model_type={model_type!r}, architectures={hf.get('architectures')}; "
        f"bebop runs dense {', '.join(FAMILIES)} targets"
    )


def _reject_unsupported(hf: dict[str, Any], family: str) -> None:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ValueError(f"hidden_act={act!r}: only SwiGLU (silu) MLPs are supported")
    if hf.get("use_sliding_window"):
        raise ValueError("use_sliding_window=true is not supported (full attention only)")
    layer_types = hf.get("layer_types") or []
    if any(t != "full_attention" for t in layer_types):
        raise ValueError(f"layer_types={sorted(set(layer_types))}: full attention only")
    if hf.get("mlp_bias"):
        raise ValueError("mlp_bias=true is not supported")
    if family == "llama" and hf.get("pretraining_tp", 1) not in (1, None):
        raise ValueError("pretraining_tp != 1 is not supported")


def _div(a: int, b: int, name: str) -> int:
    if a % b:
        raise ValueError(f"{name}={a} is not divisible by num_attention_heads={b}; set head_dim")
    return a // b


def _id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def _rope(hf: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, rope_scaling or None) from transformers-5 or legacy keys."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if params and all(isinstance(v, dict) for v in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported")
    theta = float(params.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    if params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    params.pop("partial_rotary_factor", None)
    if rope_type == "default":
        return theta, None
    if rope_type in ("llama3", "yarn"):
        # transformers fills this from max_position_embeddings when a config omits it
        params.setdefault(
            "original_max_position_embeddings", hf.get("max_position_embeddings", 32768)
        )
    return theta, {"rope_type": rope_type, **params}


def _check_rope_scaling(scaling: dict[str, Any] | None) -> None:
    if scaling is None:
        return
    rope_type = scaling.get("rope_type")
    if rope_type not in ROPE_TYPES or rope_type == "default":
        raise ValueError(
            f"rope_type={rope_type!r} is not supported; use one of {sorted(ROPE_TYPES)} "
            "(dynamic/longrope rescale with the batch length, which a KV cache cannot honour)"
        )
    missing = [k for k in ROPE_TYPES[rope_type] if scaling.get(k) is None]
    if missing:
        raise ValueError(f"rope_scaling of type {rope_type!r} lacks {missing}")
    if not scaling["factor"] > 0:
        raise ValueError(f"rope factor={scaling['factor']} must be > 0")


def detect_mtp(hf: dict[str, Any]) -> tuple[int, str | None]:
    """(num MTP layers, layout). `mtp_num_hidden_layers` wins over `num_nextn_predict_layers`."""
    n = hf.get("mtp_num_hidden_layers")
    if n:
        return int(n), "qwen3_next"
    n = hf.get("num_nextn_predict_layers")
    if n:
        return int(n), "deepseek_v3"
    return 0, None
