"""OpenAI serving: `/v1/models`, `/v1/completions`, `/v1/chat/completions` -> engine calls.

One engine request per prompt (its n samples ride inside it); choice index = prompt * n +
sample, as OpenAI numbers them. Streams end with `data: [DONE]`; closing a stream (client
gone) closes the engine iterators, which aborts the requests.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from bebop_spec.engine.outputs import RequestOutput
from bebop_spec.sampling_params import SamplingParams
from bebop_spec.server.errors import ApiError, bad_request, status_of
from bebop_spec.server.protocol import openai as oai
from bebop_spec.server.serving.base import EngineServing
from bebop_spec.server.serving.common import (
    FastJSONResponse,
    SSEResponse,
    cancel_on_disconnect,
    last_item,
    make_sampling_params,
    merge_streams,
    metered_sse,
    reject_unsupported,
    sse,
)
from bebop_spec.server.serving.openai_format import ChoiceFormatter, wire


class OpenAIServing(EngineServing):
    # ------------------------------------------------------------------ models
    def models(self) -> oai.ModelList:
        name = self.config.served_model_name
        card = oai.ModelCard(
            id=name, root=self.engine.config.model, max_model_len=self.engine.max_model_len
        )
        return oai.ModelList(data=[card])

    def model_card(self, name: str) -> oai.ModelCard:
        self.check_model(name)
        return self.models().data[0]

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.served_model_name:
            raise ApiError(
                404, f"The model '{name}' does not exist", param="model", code="model_not_found"
            )

    # ------------------------------------------------------------- completions
    async def completions(self, req: oai.CompletionRequest, raw: Request) -> Response:
        return await self._run(req, raw, lambda: self._completion_job(req), chat=False)

    def _completion_job(self, req: oai.CompletionRequest) -> tuple[list, list[SamplingParams]]:
        """(prompts, sampling params) of a completion request, or a 4xx."""
        self.check_model(req.model)
        reject_unsupported({"suffix": (req.suffix, None)})
        if req.best_of is not None and req.best_of != req.n:
            raise bad_request("best_of is not supported (only best_of == n)", param="best_of")
        prompts = self._completion_prompts(req.prompt)
        self.check_counts(req.n, req.logprobs, len(prompts))
        scoring = self._scoring(req)
        params = [
            self._params(
                req,
                req.logprobs,
                self.checker.max_new_tokens(len(p), req.max_tokens, clamp=False),
                **scoring,
            )  # fmt: skip
            for p in prompts
        ]
        return prompts, params

    def _scoring(self, req: oai.CompletionRequest) -> dict[str, Any]:
        """Prompt-scoring keywords of a completion (vLLM's rules): `echo` scores the prompt
        with `logprobs` alternatives unless `prompt_logprobs` says otherwise; max_tokens=0
        needs echo; logprob_token_ids needs logprobs."""
        k = req.prompt_logprobs
        if k is None and req.echo and (req.logprobs is not None or req.max_tokens == 0):
            k = req.logprobs or 0
        if req.max_tokens == 0 and not req.echo:
            raise bad_request("max_tokens=0 needs echo=true (it only scores the prompt)",
                              "max_tokens")  # fmt: skip
        if k is not None and k > self.config.max_logprobs:
            raise bad_request(f"prompt_logprobs={k} exceeds the limit "
                              f"{self.config.max_logprobs}", "prompt_logprobs")  # fmt: skip
        if req.stream and req.prompt_logprobs is not None:
            raise bad_request("prompt_logprobs are not available when stream=true (use echo)",
                              "prompt_logprobs")  # fmt: skip
        ids = req.logprob_token_ids or None
        if ids is not None and req.logprobs is None:
            raise bad_request("logprob_token_ids needs logprobs to be set", "logprob_token_ids")
        if ids is not None and len(ids) > self.config.max_logprobs:
            raise bad_request(f"at most {self.config.max_logprobs} logprob_token_ids",
                              "logprob_token_ids")  # fmt: skip
        return {"prompt_logprobs": k, "logprob_token_ids": ids}

    def _completion_prompts(self, prompt: Any) -> list[list[int]]:
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise bad_request("prompt is empty", param="prompt")
        if len(prompt) > self.config.max_batch:
            raise bad_request(f"at most {self.config.max_batch} prompts per request", "prompt")
        return [self.checker.check(self._encode(p) if isinstance(p, str) else p) for p in prompt]

    def _encode(self, text: str) -> list[int]:
        tok = self.engine.tokenizer
        if tok is None:
            raise bad_request("this server has no tokenizer: send token ids", param="prompt")
        return list(tok.encode(text, add_special_tokens=True))

    # -------------------------------------------------------------------- chat
    async def chat(self, req: oai.ChatCompletionRequest, raw: Request) -> Response:
        return await self._run(req, raw, lambda: self._chat_job(req), chat=True)

    def _chat_job(self, req: oai.ChatCompletionRequest) -> tuple[list, list[SamplingParams]]:
        """([prompt], [sampling params]) of a chat request, or a 4xx."""
        self.check_model(req.model)
        reject_unsupported(
            {
                "tools": (req.tools or None, None),
            }
        )
        if req.response_format and req.response_format.get("type", "text") != "text":
            raise bad_request("only response_format {type: text} is supported", "response_format")
        top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs and not req.logprobs:
            raise bad_request("top_logprobs requires logprobs: true", param="top_logprobs")
        self.check_counts(req.n, top, 1)
        prompt = self.checker.check(self.render_chat(req), param="messages")
        wanted = req.max_completion_tokens or req.max_tokens
        params = [
            self._params(req, top, self.checker.max_new_tokens(len(prompt), wanted, clamp=False))
        ]
        return [prompt], params

    def render_chat(self, req: Any) -> list[int]:
        """Token ids of `req.messages` under the chat template (a chat completion or a
        /tokenize chat request: messages, add_generation_prompt, continue_final_message,
        chat_template_kwargs)."""
        tok = self.engine.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            raise bad_request("this model's tokenizer has no chat template", param="messages")
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            text = tok.apply_chat_template(
                messages,
                tokenize=False,
                add_generation_prompt=req.add_generation_prompt and not req.continue_final_message,
                continue_final_message=req.continue_final_message,
                **(req.chat_template_kwargs or {}),
            )
        except Exception as exc:  # template errors are about the messages
            raise bad_request(f"cannot apply the chat template: {exc}", param="messages") from exc
        return list(tok.encode(text, add_special_tokens=False))

    # ------------------------------------------------------------------ common
    def check_counts(self, n: int, logprobs: int | None, num_prompts: int) -> None:
        if n > self.config.max_n:
            raise bad_request(f"n={n} exceeds the limit {self.config.max_n}", param="n")
        if logprobs is not None and logprobs > self.config.max_logprobs:
            raise bad_request(
                f"logprobs={logprobs} exceeds the limit {self.config.max_logprobs}", "logprobs"
            )
        if num_prompts * n > self.config.max_batch:
            raise bad_request(f"prompts x n exceeds the limit {self.config.max_batch}", param="n")

    def _params(self, req: Any, logprobs: int | None, max_tokens: int,
                **scoring: Any) -> SamplingParams:  # fmt: skip
        stop = [req.stop] if isinstance(req.stop, str) else (req.stop or [])
        if len(stop) > self.config.max_stop:
            raise bad_request(f"at most {self.config.max_stop} stop strings", param="stop")
        return make_sampling_params(
            temperature=req.temperature,
            top_p=req.top_p,
            top_k=req.top_k,
            min_p=req.min_p,
            max_tokens=max_tokens,
            n=req.n,
            seed=req.seed,
            stop=stop,
            stop_token_ids=req.stop_token_ids,
            ignore_eos=req.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=req.include_stop_str_in_output,
            skip_special_tokens=req.skip_special_tokens,
            presence_penalty=req.presence_penalty,
            frequency_penalty=req.frequency_penalty,
            repetition_penalty=req.repetition_penalty,
            min_tokens=req.min_tokens,
            # OpenAI: biases lie in [-100, 100] (vLLM clamps them the same way)
            logit_bias={t: min(100.0, max(-100.0, b)) for t, b in (req.logit_bias or {}).items()},
            **scoring,
        )

    async def _run(self, req, raw, job, *, chat: bool) -> Response:
        """Run `job()`'s prompts; every request is counted once in /metrics: a failure by
        stage, or its samples once the reply is built (a stream counts its own outcome)."""
        stage = "input_processing"
        try:
            prompts, params = job()
            rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
            streams = await self.start(raw, rid, prompts, params)
            stage = "generation"
            fmt = ChoiceFormatter(self, req, rid, prompts, chat=chat)
            if req.stream:
                return SSEResponse(self._stream(fmt, streams))
            finals = await cancel_on_disconnect(raw, self._collect(streams))
            reply = FastJSONResponse(wire(fmt.full_response(finals)))
        except Exception as exc:
            self.metrics.failed(stage, status_of(exc))
            raise
        self.metrics.succeeded(finals)
        return reply

    async def start(self, raw: Request, rid: str, prompts: list, params: list) -> list:
        """One tracked engine stream per prompt, advanced to its first output (4xx / 503
        before any reply starts); held at the admission gate while paused in mode wait."""
        arrival = time.perf_counter()
        await cancel_on_disconnect(raw, self.gate.wait())  # held while paused in mode "wait"
        streams = [
            self.metrics.track(self.engine.generate(p, sp, f"{rid}-{i}"), arrival)
            for i, (p, sp) in enumerate(zip(prompts, params, strict=True))
        ]
        return await self.start_streams(raw, streams)

    @staticmethod
    async def _collect(streams: list[AsyncIterator[RequestOutput]]) -> list[RequestOutput]:
        return list(await asyncio.gather(*(last_item(s) for s in streams)))

    def _stream(self, fmt: ChoiceFormatter, streams) -> AsyncIterator[bytes]:
        finals: dict[int, RequestOutput] = {}

        async def body() -> AsyncIterator[bytes]:
            first = fmt.first_chunk()
            if first is not None:
                yield sse(wire(first))
            async for i, out in merge_streams(streams):
                finals[i] = out
                for chunk in fmt.delta_chunks(i, out):
                    yield sse(wire(chunk))
            usage = fmt.usage_chunk([finals[i] for i in sorted(finals)])
            if usage is not None:
                yield sse(wire(usage))

        return metered_sse(self.metrics, body(), lambda: list(finals.values()))
