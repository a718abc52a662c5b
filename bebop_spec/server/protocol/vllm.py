"""Request/response models of the vLLM routes RL frameworks drive (names and defaults as
vLLM 0.33.0's `entrypoints/serve`): /tokenize, /detokenize and the RL control API's bodies.
SGLang's memory-occupation bodies live here too (same small shape: optional `tags`)."""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from bebop_spec.server.protocol.openai import ChatMessage


class PauseMode(StrEnum):
    """vLLM's /pause modes (mapped onto the engine's PauseMode in server/serving/control.py)."""

    ABORT = "abort"  # in-flight requests end with finish_reason abort
    WAIT = "wait"  # new requests wait, in-flight ones finish, then the engine pauses
    KEEP = "keep"  # everything freezes where it is and continues on /resume


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TokenizeCompletionRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False


class TokenizeChatRequest(_Request):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    return_token_strs: bool | None = False
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class MemoryOccupationRequest(_Request):
    """SGLang's /release_memory_occupation and /resume_memory_occupation body."""

    tags: list[str] | None = None  # "weights" / "kv_cache" / ...; None: all


class WeightTransferInitInfo(_Request):
    """vLLM's NCCL `init_info`; `backend` / `group_name` are extensions (a CPU engine joins
    over gloo). The group is formed as SGLang's init_custom_process_group (torch.distributed
    rendezvous), not with vLLM's StatelessProcessGroup + PyNccl."""

    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(default=1, ge=1)
    world_size: int = Field(ge=2)
    backend: str | None = None  # ext: None -> nccl on a GPU engine, gloo on a CPU one
    group_name: str = "weight_update_group"  # ext


class InitWeightTransferRequest(_Request):
    init_info: WeightTransferInitInfo


class WeightTransferUpdateInfo(_Request):
    """vLLM's NCCL `update_info`: one broadcast per tensor, in `names` order."""

    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    packed: bool = False  # vLLM's packed double-buffered broadcast: refused (not the same
    # layout as SGLang's flattened bucket)


class UpdateWeightsRequest(_Request):
    update_info: WeightTransferUpdateInfo


class FinishWeightUpdateRequest(_Request):
    weight_version: str | None = None


class WeightCheckerRequest(_Request):
    action: Literal["checksum", "reset", "compare"]
    baseline: dict[str, str] | None = None


class TokensSamplingParams(_Request):
    """vLLM's SamplingParams as /inference/v1/generate takes them (the fields RL clients
    send). prompt_logprobs is refused unless default."""

    n: int = Field(default=1, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    seed: int | None = None
    max_tokens: int | None = Field(default=None, ge=1)  # None: the context left
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    include_stop_str_in_output: bool = False
    detokenize: bool = True
    skip_special_tokens: bool = True
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    logit_bias: dict[str, float] | None = None
    prompt_logprobs: int | None = None


class TokensGenerateRequest(_Request):
    """vLLM's tokens-in / tokens-out /inference/v1/generate (SkyRL's RemoteInferenceClient)."""

    request_id: str | None = None
    token_ids: list[int]
    sampling_params: TokensSamplingParams = Field(default_factory=TokensSamplingParams)
    model: str | None = None
    stream: bool = False
