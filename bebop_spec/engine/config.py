"""Engine configuration: one validated dataclass, built by the CLI or by `LLM(...)`."""

from __future__ import annotations

from dataclasses import dataclass

DRAFT_MODES = ("rs", "to")


@dataclass
class EngineConfig:
    model: str
    mtp: str | None = None  # separate MTP head directory; None: the model dir's own head, if any
    num_speculative_tokens: int = 3
    draft_mode: str | None = "rs"  # "rs" | "to" | None (no speculation)
    max_num_seqs: int = 64
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    max_waiting: int = 1024  # waiting-queue bound; beyond it requests are refused (HTTP 503)
    dtype: str = "float32"
    device: str = "cpu"
    seed: int = 0
    enforce_no_mtp: bool = False
    threads: int | None = None  # torch intra-op CPU threads (process-wide); None: leave as is

    def __post_init__(self) -> None:
        if self.draft_mode in ("none", ""):
            self.draft_mode = None
        if self.draft_mode is not None and self.draft_mode not in DRAFT_MODES:
            raise ValueError(f"draft_mode={self.draft_mode!r} must be one of rs, to, none")
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
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r} must be float32, bfloat16 or float16")

    @property
    def speculative(self) -> bool:
        return self.draft_mode is not None

    @property
    def gamma(self) -> int:
        return self.num_speculative_tokens if self.speculative else 0
