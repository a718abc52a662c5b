"""SGLang-native request models (names and defaults follow sglang 0.5.23 `io_struct.py`).

`None` for an optional field means "the SGLang default", as SGLang itself treats it.
Fields we know but cannot honour (penalties, grammars, LoRA, ...) are accepted at their
default value and rejected otherwise; unknown sampling keys are rejected (SGLang raises on
them too); unknown top-level keys of /generate are ignored.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bebop_spec.engine.config import PauseMode, WeightSelector


class SGLangSamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_new_tokens: int | None = Field(default=128, ge=0)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None  # unsupported unless empty
    temperature: float | None = Field(default=1.0, ge=0.0, le=100.0)
    top_p: float | None = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(default=-1, ge=-1)
    min_p: float | None = Field(default=0.0, ge=0.0, le=1.0)
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0
    min_new_tokens: int | None = 0
    n: int | None = Field(default=1, ge=1)
    json_schema: str | None = None  # unsupported
    regex: str | None = None  # unsupported
    ebnf: str | None = None  # unsupported
    structural_tag: str | None = None  # unsupported
    ignore_eos: bool | None = False
    skip_special_tokens: bool | None = True
    spaces_between_special_tokens: bool | None = True  # accepted, no effect
    no_stop_trim: bool | None = False
    stream_interval: int | None = None  # accepted, no effect
    logit_bias: dict[str, float] | None = None
    sampling_seed: int | None = None
    custom_params: dict[str, Any] | None = None  # accepted, no effect


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    rid: str | list[str] | None = None
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: SGLangSamplingParams | list[SGLangSamplingParams] | None = None
    return_logprob: bool | list[bool] | None = None
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: list[int] | list[list[int]] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False
    log_metrics: bool = True
    return_prompt_token_ids: bool = False
    lora_path: Any = None  # unsupported
    image_data: Any = None  # unsupported
    input_embeds: Any = None  # unsupported


class _Admin(BaseModel):
    model_config = ConfigDict(extra="ignore")


class UpdateWeightVersionRequest(_Admin):
    new_version: str = Field(min_length=1, max_length=256)
    abort_all_requests: bool = True


class UpdateWeightsFromDiskRequest(_Admin):
    model_path: str
    load_format: str | None = None
    abort_all_requests: bool = False
    weight_version: str | None = None
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    flush_cache: bool = True
    selector: WeightSelector = WeightSelector.ALL  # ext: SGLang loads every runner from disk


class InitWeightsUpdateGroupRequest(_Admin):
    master_address: str
    master_port: int = Field(ge=1, le=65535)
    rank_offset: int = Field(ge=1)
    world_size: int = Field(ge=2)
    group_name: str = Field(default="weight_update_group", min_length=1)
    backend: str = "nccl"


class DestroyWeightsUpdateGroupRequest(_Admin):
    group_name: str | None = None  # None (or an unknown name): the one group there is


class UpdateWeightsFromDistributedRequest(_Admin):
    """Lists of names / dtypes / shapes, one broadcast each (or one flattened bucket). The
    single-tensor form of older SGLang releases, still sent by some trainers (SkyRL):
    `name`, `dtype`, `shape` — accepted and read as one-element lists."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str | None = None  # None (or an unknown name): the one group there is
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    load_format: str | None = None  # None | "flattened_bucket"
    selector: WeightSelector = WeightSelector.ALL
    torch_empty_cache: bool = False

    @model_validator(mode="before")
    @classmethod
    def _singular_form(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not {"name", "dtype", "shape"} & data.keys():
            return data
        if {"names", "dtypes", "shapes"} & data.keys():
            raise ValueError("send either name/dtype/shape or names/dtypes/shapes, not both")
        data = dict(data)
        for one, many in (("name", "names"), ("dtype", "dtypes"), ("shape", "shapes")):
            if one in data:
                data[many] = [data.pop(one)]
        return data


class UpdateWeightsFromTensorRequest(_Admin):
    """JSON form: each entry is a base64-encoded safetensors file (never pickle)."""

    serialized_named_tensors: list[str] = Field(min_length=1)
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    weight_version: str | None = None
    selector: WeightSelector = WeightSelector.ALL
    torch_empty_cache: bool = False


class BeginWeightUpdateRequest(_Admin):
    selector: WeightSelector = WeightSelector.ALL


class EndWeightUpdateRequest(_Admin):
    pass


class PauseGenerationRequest(_Admin):
    mode: PauseMode = PauseMode.ABORT


class ContinueGenerationRequest(_Admin):
    torch_empty_cache: bool = True


class AbortRequest(_Admin):
    rid: str | list[str] | None = ""
    abort_all: bool = False


class UpdateResult(BaseModel):
    success: bool
    message: str
    weight_version: str | None = None  # ext: label serving after the call
    num_paused_requests: int = 0
    timings: dict[str, float] | None = None  # ext: receive / check / swap / total seconds
