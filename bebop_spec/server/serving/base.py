"""What every generating serving class (OpenAI, SGLang /generate, vLLM tokens) holds, and
how it starts engine streams. The reply formatters are typed against this class, so a
formatter never imports the serving class that uses it (no import cycle)."""

from __future__ import annotations

from fastapi import Request

from bebop_spec.backends import ServingBackend
from bebop_spec.server.config import ServerConfig
from bebop_spec.server.errors import engine_refusals
from bebop_spec.server.metrics import ServerMetrics
from bebop_spec.server.serving.common import (
    AdmissionGate,
    PromptChecker,
    TokenText,
    cancel_on_disconnect,
    start_streams,
)


class EngineServing:
    def __init__(self, engine: ServingBackend, config: ServerConfig, metrics: ServerMetrics,
                 gate: AdmissionGate | None = None) -> None:  # fmt: skip
        self.engine, self.config, self.metrics = engine, config, metrics
        self.gate = gate or AdmissionGate()
        self.checker = PromptChecker(engine)
        self.token_text = TokenText(engine.tokenizer)

    async def start_streams(self, raw: Request, streams: list) -> list:
        """Advance each engine stream to its first output, so refusals are a 4xx / 503
        before any reply starts; a client that hangs up meanwhile cancels them."""
        with engine_refusals(self.config.retry_after_s):
            return await cancel_on_disconnect(raw, start_streams(streams))
