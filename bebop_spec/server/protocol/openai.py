"""OpenAI request/response models (field order follows the OpenAI API reference).

Fields marked `# ext` are extensions (vLLM / SGLang spelling) that the official API lacks.
Unknown request fields are ignored, as OpenAI-compatible servers usually do; fields we know
but cannot honour (tools, echo, suffix, ...) are rejected by the serving layer when
set to a non-default value, never silently dropped.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Strict bounds that hold whatever the server configuration; configurable ones
# (n, logprobs, batch size) are checked in serving/.
_TEMPERATURE = Field(default=None, ge=0.0, le=100.0)
_TOP_P = Field(default=None, gt=0.0, le=1.0)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # ext (vLLM)


class _SamplingRequest(_Request):
    """The fields completions and chat completions share, in OpenAI order (model, sampling,
    stop, stream, user), then the vLLM extensions. Each request adds its own: the prompt or
    messages, `logprobs` (a count for completions, a flag for chat) and `max_tokens`."""

    model: str | None = None
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    n: int = Field(default=1, ge=1)
    presence_penalty: float | None = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = _TEMPERATURE
    top_p: float | None = _TOP_P
    user: str | None = None
    # ext
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    repetition_penalty: float | None = None
    min_tokens: int | None = Field(default=None, ge=0)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True  # drop special tokens (EOS, ...) from the text
    return_token_ids: bool = False


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    best_of: int | None = None
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=16, ge=0)  # 0: with echo, only score the prompt
    suffix: str | None = None
    # ext
    prompt_logprobs: int | None = Field(default=None, ge=0)
    logprob_token_ids: list[int] | None = None  # these ids' logprobs instead of the top-k


class TextContent(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextContent] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    # ext
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None


# ---------------------------------------------------------------- responses


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class WeightVersionSpan(BaseModel):
    """Output tokens [start, end) were produced by weights labelled `version`."""

    version: str
    start: int
    end: int


class SpecStatsInfo(BaseModel):  # ext: speculative-decoding counters of this response
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: list[int] = Field(default_factory=list)
    acceptance_rate: float = 0.0
    mean_accepted_length: float = 0.0


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class PromptTokenLogprob(BaseModel):  # ext (vLLM's Logprob)
    logprob: float
    rank: int
    decoded_token: str


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # ext (vLLM): matched stop string / token id
    prompt_token_ids: list[int] | None = None  # ext: when return_token_ids
    token_ids: list[int] | None = None  # ext: when return_token_ids
    weight_versions: list[WeightVersionSpan] | None = None  # ext
    prompt_logprobs: list[dict[str, PromptTokenLogprob] | None] | None = None  # ext (vLLM)


class _Response(BaseModel):
    id: str
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = None
    weight_version: str | None = None  # ext: label of the weights serving at the end
    metadata: dict[str, Any] | None = None  # ext (SGLang): weight_version(s)
    spec_stats: SpecStatsInfo | None = None  # ext


class CompletionResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class CompletionStreamResponse(_Response):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatTokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # ext
    token_ids: list[int] | None = None  # ext
    weight_versions: list[WeightVersionSpan] | None = None  # ext


class ChatCompletionResponse(_Response):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # ext: when return_token_ids


class ChatStreamChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogProbs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # ext
    token_ids: list[int] | None = None  # ext: ids of this delta
    weight_versions: list[WeightVersionSpan] | None = None  # ext: on the last chunk


class ChatCompletionStreamResponse(_Response):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None
    prompt_token_ids: list[int] | None = None  # ext: first chunk, when return_token_ids


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "bebop"
    root: str | None = None
    max_model_len: int | None = None  # ext


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
