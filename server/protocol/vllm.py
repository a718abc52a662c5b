"""Request/response models of the vLLM routes RL frameworks drive (names and defaults as
vLLM 0.33.0's `entrypoints/serve`): /tokenize, /detokenize and the RL control API's bodies.
SGLang's memory-occupation bodies live here too (same small shape: optional `tags`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from server.protocol.openai import ChatMessage

PauseMode = Literal["abort", "wait", "keep"]


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
