"""OpenAI routes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from bebop_spec.server.protocol import openai as oai
from bebop_spec.server.serving.openai import OpenAIServing


def openai_router(serving: OpenAIServing) -> APIRouter:
    r = APIRouter()

    @r.get("/v1/models")
    async def models() -> oai.ModelList:
        return serving.models()

    @r.get("/v1/models/{model:path}")
    async def model(model: str) -> oai.ModelCard:
        return serving.model_card(model)

    @r.post("/v1/completions")
    async def completions(req: oai.CompletionRequest, raw: Request) -> Response:
        return await serving.completions(req, raw)

    @r.post("/v1/chat/completions")
    async def chat(req: oai.ChatCompletionRequest, raw: Request) -> Response:
        return await serving.chat(req, raw)

    return r
