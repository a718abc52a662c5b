"""vLLM's tokens-in / tokens-out `/inference/v1/generate` -> engine calls.

Reply (vLLM 0.33.0 GenerateResponse): `{request_id, id, created, model, choices: [{index,
token_ids, finish_reason, logprobs: {content: [{token: "token_id:N", logprob, top_logprobs}]},
text}], usage, prompt_logprobs: null}` plus the `weight_version` extension; streamed, one
event per new tokens (deltas, as vLLM streams this route), then `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from bebop_spec.engine.outputs import CompletionOutput, RequestOutput
from bebop_spec.server.errors import status_of
from bebop_spec.server.protocol import vllm as v
from bebop_spec.server.serving.common import (
    FastJSONResponse,
    SSEResponse,
    cancel_on_disconnect,
    json_logprob,
    last_item,
    make_sampling_params,
    metered_sse,
    reject_unsupported,
    sse,
)
from bebop_spec.server.serving.openai import OpenAIServing


class TokensServing:
    def __init__(self, openai: OpenAIServing) -> None:
        self.openai, self.metrics = openai, openai.metrics

    async def generate(self, req: v.TokensGenerateRequest, raw: Request) -> Response:
        stage = "input_processing"
        try:
            prompt, params = self._job(req)
            rid = req.request_id or f"generate-tokens-{uuid.uuid4().hex}"
            (stream,) = await self.openai.start(raw, rid, [prompt], [params])
            stage = "generation"
            if req.stream:  # the stream counts its own outcome
                return SSEResponse(self._events(req, rid, stream))
            final = await cancel_on_disconnect(raw, last_item(stream))
            reply = FastJSONResponse(self._reply(req, rid, prompt, final))
        except Exception as exc:
            self.metrics.failed(stage, status_of(exc))
            raise
        self.metrics.succeeded([final])
        return reply

    def _job(self, req: v.TokensGenerateRequest) -> tuple[list[int], Any]:
        o, sp = self.openai, req.sampling_params
        o.check_model(req.model)
        reject_unsupported({"prompt_logprobs": (sp.prompt_logprobs, None)})
        prompt = o.checker.check(req.token_ids, param="token_ids")
        o.check_counts(sp.n, sp.logprobs, 1)
        stop = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
        params = make_sampling_params(
            temperature=sp.temperature, top_p=sp.top_p, top_k=sp.top_k, min_p=sp.min_p,
            max_tokens=o.checker.max_new_tokens(len(prompt), sp.max_tokens, clamp=False),
            n=sp.n, seed=sp.seed, stop=stop, stop_token_ids=sp.stop_token_ids,
            ignore_eos=sp.ignore_eos, logprobs=sp.logprobs,
            include_stop_str_in_output=sp.include_stop_str_in_output,
            skip_special_tokens=sp.skip_special_tokens,
            presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
            repetition_penalty=sp.repetition_penalty, min_tokens=sp.min_tokens,
            logit_bias=sp.logit_bias,
        )  # fmt: skip
        return prompt, params

    # ----------------------------------------------------------------- replies
    def _choice(
        self, req: v.TokensGenerateRequest, o: CompletionOutput, a: int, final: bool
    ) -> dict:
        b = len(o.token_ids)
        choice: dict[str, Any] = {"index": o.index, "token_ids": list(o.token_ids[a:b])}
        if req.sampling_params.logprobs is not None:
            choice["logprobs"] = {"content": [self._logprob(o, t) for t in range(a, b)]}
        choice["finish_reason"] = (o.finish_reason or "stop") if final else o.finish_reason
        if req.sampling_params.detokenize and final and a == 0:
            choice["text"] = o.text
        return choice

    @staticmethod
    def _logprob(o: CompletionOutput, t: int) -> dict[str, Any]:
        lps, tops = o.logprobs or [], o.top_logprobs or []
        top = tops[t] if t < len(tops) else {}
        return {
            "token": f"token_id:{o.token_ids[t]}",
            "logprob": json_logprob(lps[t]) if t < len(lps) else -9999.0,
            "top_logprobs": [{"token": f"token_id:{x}", "logprob": json_logprob(lp)}
                             for x, lp in sorted(top.items(), key=lambda kv: -kv[1])],
        }  # fmt: skip

    def _reply(self, req, rid: str, prompt: list[int], final: RequestOutput) -> dict[str, Any]:
        completion = sum(len(o.token_ids) for o in final.outputs)
        return {
            "request_id": rid,
            "id": rid,
            "created": int(time.time()),
            "model": self.openai.config.served_model_name,
            "choices": [self._choice(req, o, 0, True) for o in final.outputs],
            "usage": {"prompt_tokens": len(prompt), "completion_tokens": completion,
                      "total_tokens": len(prompt) + completion},
            "prompt_logprobs": None,
            "weight_version": self.openai.engine.weight_version,  # ext
        }  # fmt: skip

    def _events(self, req, rid: str, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[bytes]:
        sent: dict[int, int] = {}
        done: set[int] = set()
        last = None

        async def body() -> AsyncIterator[bytes]:
            nonlocal last
            async for out in stream:
                last = out
                choices = []
                for o in out.outputs:
                    a = sent.get(o.index, 0)
                    if o.index in done or (len(o.token_ids) == a and not o.finished):
                        continue
                    choices.append(self._choice(req, o, a, o.finished))
                    sent[o.index] = len(o.token_ids)
                    if o.finished:
                        done.add(o.index)
                if choices:
                    yield sse({"request_id": rid, "choices": choices})

        return metered_sse(self.metrics, body(), lambda: [last] if last is not None else [])
