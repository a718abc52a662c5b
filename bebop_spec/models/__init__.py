"""Target decoders (Qwen3 / Qwen2 / Llama), the MTP head, HF checkpoint I/O, the KV caches
(slot and paged) and the real default model (SmolLM2-135M-Instruct, docs/models.md).

Contracts: docs/architecture.md ("models/"); MTP conventions: docs/mtp_layout.md.
"""

from bebop_spec.models.config import ModelConfig
from bebop_spec.models.decoder import DenseDecoder
from bebop_spec.models.default_model import ensure_smollm2
from bebop_spec.models.kv_cache import CacheView, KVCache
from bebop_spec.models.loader import (
    LoadedModel,
    init_mtp_head,
    load_config,
    load_model,
    load_tokenizer,
    save_model,
)
from bebop_spec.models.mtp import MTPHead
from bebop_spec.models.mtp_io import load_mtp_head, save_mtp_head
from bebop_spec.models.paged_kv_cache import PagedKVCache, PagedView

__all__ = [
    "CacheView",
    "DenseDecoder",
    "KVCache",
    "LoadedModel",
    "MTPHead",
    "ModelConfig",
    "PagedKVCache",
    "PagedView",
    "ensure_smollm2",
    "init_mtp_head",
    "load_config",
    "load_model",
    "load_mtp_head",
    "load_tokenizer",
    "save_model",
    "save_mtp_head",
]
