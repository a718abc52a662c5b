"""Engine configuration: one validated dataclass, built by the CLI or by `LLM(...)`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from bebop_spec.hardware import DTYPES
from bebop_spec.spec.verify import DRAFT_MODES, DraftMode


class PauseMode(StrEnum):
    """What a paused engine does with its running requests (every backend, SGLang's
    /pause_generation). The server's vLLM modes map onto these (server/serving/control.py)."""

    ABORT = "abort"  # end them with finish_reason "abort"
    RETRACT = "retract"  # re-queue them; they are recomputed after resume
    IN_PLACE = "in_place"  # freeze them where they are; they continue after resume


PAUSE_MODES = tuple(m.value for m in PauseMode)  # ("abort", "retract", "in_place")


class WeightSelector(StrEnum):
    """Which weights a weight update (or checksum, or spec) addresses."""

    TARGET = "target"  # the served model
    DRAFT = "draft"  # the MTP head
    ALL = "all"  # both


WEIGHT_SELECTORS = tuple(m.value for m in WeightSelector)  # ("target", "draft", "all")


DRAFT_MODE_OFF = "none"  # the command line's (and metrics') spelling of draft_mode=None


class SpecPolicy(StrEnum):
    """How many tokens each decode step drafts (when speculation is on)."""

    # γ_t in 0..num_speculative_tokens per step, for the best expected tokens/s measured
    # from step timings (engine/gamma.py); never slower than plain decoding by design
    AUTO = "auto"
    # num_speculative_tokens every step: seeded samples are reproducible (no timing input)
    FIXED = "fixed"


SPEC_POLICIES = tuple(m.value for m in SpecPolicy)  # ("auto", "fixed")


@dataclass
class EngineConfig:
    model: str
    mtp: str | None = None  # separate MTP head directory (default: the model directory's own head)
    num_speculative_tokens: int = 3  # γ (fixed policy) or γ_max (auto policy)
    draft_mode: str | None = "rs"  # rs: exact rejection sampling; to: greedy drafts; none/None: off
    spec_policy: str = SpecPolicy.AUTO  # a SpecPolicy (its string accepted): auto | fixed
    max_num_seqs: int = 64  # most sequences decoded together
    max_model_len: int | None = None  # context length (default: the model's max positions)
    max_waiting: int = 1024  # waiting-queue bound; beyond it requests are refused (HTTP 503)
    dtype: str = "auto"  # auto: the checkpoint's bf16/fp16 where the device has bf16 units
    kv_cache_memory_gb: float | None = None  # KV budget (GiB); None: hardware.kv_budget_bytes
    block_size: int = 16  # positions per KV block (engine/block_manager.py)
    num_kv_blocks: int | None = None  # exact block count, overriding kv_cache_memory_gb
    enable_prefix_caching: bool = True  # share prompt blocks across samples and requests
    device: str = "cpu"  # torch device: cpu, cuda, cuda:1, ...
    seed: int = 0  # engine seed of requests that bring none
    # draft over the head's K most frequent tokens (exact; spec/draft_vocab.py); None: the
    # head's own default (its draft_vocab.json), 0: the full vocabulary
    draft_vocab_size: int | None = None
    enforce_no_mtp: bool = False
    threads: int | None = None  # torch CPU threads, process-wide (default: torch's choice)

    def __post_init__(self) -> None:
        if self.draft_mode in (DRAFT_MODE_OFF, ""):
            self.draft_mode = None
        if self.draft_mode is not None and self.draft_mode not in DRAFT_MODES:
            raise ValueError(
                f"draft_mode={self.draft_mode!r} must be one of {', '.join(DRAFT_MODES)}, {DRAFT_MODE_OFF}"
            )
        if self.draft_mode is not None:
            self.draft_mode = DraftMode(self.draft_mode)
        if self.spec_policy not in SPEC_POLICIES:
            raise ValueError(f"spec_policy={self.spec_policy!r} must be auto or fixed")
        self.spec_policy = SpecPolicy(self.spec_policy)
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        if self.max_num_seqs < 1:
            raise ValueError("max_num_seqs must be >= 1")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError("max_model_len must be >= 2")
        if self.max_waiting < 1:
            raise ValueError("max_waiting must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1 (or None)")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {', '.join(DTYPES)}")
        if self.block_size < 1:
            raise ValueError(f"block_size={self.block_size} must be >= 1")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValueError(f"num_kv_blocks={self.num_kv_blocks} must be >= 2")
        if self.draft_vocab_size is not None and self.draft_vocab_size < 0:
            raise ValueError(f"draft_vocab_size={self.draft_vocab_size} must be >= 0 (or None)")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"kv_cache_memory_gb={self.kv_cache_memory_gb} must be > 0")

    @property
    def draft_mode_name(self) -> str:
        """The draft mode as the server reports it (info, metrics labels, logs): "none" when off."""
        return self.draft_mode or DRAFT_MODE_OFF

    @property
    def speculative(self) -> bool:
        return self.draft_mode is not None

    @property
    def gamma(self) -> int:
        return self.num_speculative_tokens if self.speculative else 0
