"""SGLang-native `/generate` and `/abort_request` -> engine calls.

Shapes follow SGLang 0.5.23: one prompt with n == 1 answers a dict, otherwise a list ordered
prompt-major, sample-minor. Streams are cumulative (SGLang's default): every event carries
the whole text / output_ids so far, plus `index` for batches; they end with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import Response

from bebop_spec.backends import ServingBackend
from bebop_spec.engine.outputs import CompletionOutput, RequestOutput
from bebop_spec.sampling_params import SamplingParams
from bebop_spec.server.config import ServerConfig
from bebop_spec.server.errors import bad_request, status_of
from bebop_spec.server.metrics import ServerMetrics
from bebop_spec.server.protocol.sglang import GenerateRequest, SGLangSamplingParams
from bebop_spec.server.serving.base import EngineServing
from bebop_spec.server.serving.common import (
    AdmissionGate,
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
from bebop_spec.server.serving.generate_format import GenerateFormatter, GenerateItem


class GenerateServing(EngineServing):
    def __init__(self, engine: ServingBackend, config: ServerConfig, metrics: ServerMetrics,
                 gate: AdmissionGate | None = None) -> None:  # fmt: skip
        super().__init__(engine, config, metrics, gate)
        self.active: set[str] = set()  # engine request ids in flight

    # ---------------------------------------------------------------- parsing
    def _items(self, req: GenerateRequest) -> tuple[list[GenerateItem], bool]:
        reject_unsupported({"lora_path": (req.lora_path, None), "image_data": (req.image_data, None),
                            "input_embeds": (req.input_embeds, None)})  # fmt: skip
        if (req.text is None) == (req.input_ids is None):
            raise bad_request("exactly one of text and input_ids must be given", param="text")
        single = isinstance(req.text, str) or (
            req.input_ids is not None and (not req.input_ids or isinstance(req.input_ids[0], int))
        )
        prompts = self._prompts(req, single)
        b = len(prompts)
        if not 1 <= b <= self.config.max_batch:
            raise bad_request(f"a batch holds 1..{self.config.max_batch} prompts", param="text")
        sps = (
            self._per_prompt(req.sampling_params, b, "sampling_params")
            or [SGLangSamplingParams()] * b
        )
        sps = [sp or SGLangSamplingParams() for sp in sps]
        if len({sp.n or 1 for sp in sps}) > 1:
            raise bad_request(
                "n must be the same for every prompt of a batch", param="sampling_params.n"
            )
        rids = self._rids(req.rid, b)
        items = [
            GenerateItem(rid, p, self._params(sp, len(p), *opts), *opts)
            for rid, p, sp, opts in zip(
                rids, prompts, sps, self._logprob_options(req, b), strict=True
            )  # fmt: skip
        ]
        return items, single and (sps[0].n or 1) == 1

    def _logprob_options(self, req: GenerateRequest, b: int) -> list[tuple]:
        """(return_logprob, top_logprobs_num, logprob_start_len, token_ids_logprob) per prompt."""
        logprob = self._per_prompt(req.return_logprob, b, "return_logprob") or [False] * b
        tops = [
            t or 0 for t in self._per_prompt(req.top_logprobs_num, b, "top_logprobs_num") or [0] * b
        ]
        if not all(0 <= t <= self.config.max_logprobs for t in tops):
            raise bad_request(f"top_logprobs_num must be in [0, {self.config.max_logprobs}]",
                              "top_logprobs_num")  # fmt: skip
        starts = [-1 if s is None else s
                  for s in self._per_prompt(req.logprob_start_len, b, "logprob_start_len")
                  or [-1] * b]  # fmt: skip
        if not all(s >= -1 for s in starts):
            raise bad_request("logprob_start_len must be >= -1", "logprob_start_len")
        ids = req.token_ids_logprob
        per = ([ids] * b if not ids or isinstance(ids[0], int)
               else self._per_prompt(ids, b, "token_ids_logprob"))  # fmt: skip
        if any(len(x or []) > self.config.max_logprobs for x in per):
            raise bad_request(f"at most {self.config.max_logprobs} token_ids_logprob",
                              "token_ids_logprob")  # fmt: skip
        return [(bool(lp), t, s, list(x) if x else None)
                for lp, t, s, x in zip(logprob, tops, starts, per, strict=True)]  # fmt: skip

    def _prompts(self, req: GenerateRequest, single: bool) -> list[list[int]]:
        if req.input_ids is not None:
            raw = [req.input_ids] if single else req.input_ids
            return [self.checker.check(ids, "input_ids") for ids in raw]
        tok = self.engine.tokenizer
        if tok is None:
            raise bad_request("this server has no tokenizer: send input_ids", param="text")
        texts = [req.text] if single else req.text
        return [self.checker.check(list(tok.encode(t)), "text") for t in texts]

    @staticmethod
    def _per_prompt(value: Any, b: int, name: str) -> list | None:
        if value is None:
            return None
        if not isinstance(value, list):
            return [value] * b
        if len(value) != b:
            raise bad_request(f"{name} has {len(value)} entries for {b} prompts", param=name)
        return value

    def _rids(self, rid: Any, b: int) -> list[str]:
        if rid is None:
            base = uuid.uuid4().hex
            return [base] if b == 1 else [f"{base}-{i}" for i in range(b)]
        rids = [rid] if isinstance(rid, str) else rid
        if isinstance(rid, str) and b > 1:
            rids = [f"{rid}-{i}" for i in range(b)]  # SGLang: a string rid prefixes a batch
        if len(rids) != b or len(set(rids)) != b or not all(rids):
            raise bad_request("rid must be one non-empty id per prompt, all distinct", param="rid")
        busy = [r for r in rids if r in self.active]
        if busy:
            raise bad_request(f"request id {busy[0]!r} is already in flight", param="rid")
        return rids

    def _params(self, sp: SGLangSamplingParams, prompt_len: int, logprob: bool, top: int,
                start: int = -1, token_ids: list[int] | None = None) -> SamplingParams | None:  # fmt: skip
        reject_unsupported(
            {
                "json_schema": (sp.json_schema, None),
                "regex": (sp.regex, None),
                "ebnf": (sp.ebnf, None),
                "structural_tag": (sp.structural_tag, None),
                "stop_regex": (sp.stop_regex or None, None),
            }
        )
        n = sp.n or 1
        if n > self.config.max_n:
            raise bad_request(
                f"n={n} exceeds the limit {self.config.max_n}", param="sampling_params.n"
            )
        wanted = 128 if sp.max_new_tokens is None else sp.max_new_tokens
        scoring = logprob and start >= 0
        if wanted == 0 and not scoring:
            return None
        stop = [sp.stop] if isinstance(sp.stop, str) else list(sp.stop or [])
        if len(stop) > self.config.max_stop:
            raise bad_request(
                f"at most {self.config.max_stop} stop strings", "sampling_params.stop"
            )
        return make_sampling_params(
            temperature=sp.temperature,
            top_p=sp.top_p,
            top_k=sp.top_k,
            min_p=sp.min_p,
            max_tokens=self.checker.max_new_tokens(prompt_len, wanted, clamp=True),
            prompt_logprobs=top if scoring else None,
            prompt_logprob_start=max(start, 0),
            logprob_token_ids=token_ids if logprob else None,
            n=n,
            seed=sp.sampling_seed,
            stop=stop,
            stop_token_ids=sp.stop_token_ids,
            ignore_eos=bool(sp.ignore_eos),
            logprobs=top if (logprob or top) else None,
            include_stop_str_in_output=bool(sp.no_stop_trim),
            skip_special_tokens=sp.skip_special_tokens is not False,  # null: the default
            frequency_penalty=sp.frequency_penalty,
            presence_penalty=sp.presence_penalty,
            repetition_penalty=sp.repetition_penalty,
            min_tokens=sp.min_new_tokens,
            logit_bias=sp.logit_bias,
        )

    # -------------------------------------------------------------- serving
    async def generate(self, req: GenerateRequest, raw: Request) -> Response:
        stage = "input_processing"
        try:
            items, single = self._items(req)
            arrival = time.perf_counter()
            streams = await self.start_streams(raw, [self._stream_of(it, arrival) for it in items])
            stage = "generation"
            fmt = GenerateFormatter(
                self, items, req.return_text_in_logprobs, req.return_prompt_token_ids, arrival
            )
            if req.stream:  # the stream counts its own outcome
                return SSEResponse(self._events(fmt, streams, len(items) > 1 or not single))
            finals = await cancel_on_disconnect(
                raw, asyncio.gather(*(last_item(s) for s in streams))
            )
            outs = [d for i, f in enumerate(finals) for d in fmt.outputs(i, f)]
            for d in outs:
                del d["_index"]
            reply = FastJSONResponse(outs[0] if single else outs)
        except Exception as exc:
            self.metrics.failed(stage, status_of(exc))
            raise
        self.metrics.succeeded(finals)
        return reply

    async def _stream_of(self, it: GenerateItem, arrival: float) -> AsyncIterator[RequestOutput]:
        if it.params is None:  # max_new_tokens == 0: a finished, empty completion
            yield RequestOutput(
                it.rid, it.prompt, [CompletionOutput(0, [], finish_reason="length")]
            )
            return
        self.active.add(it.rid)
        try:
            await self.gate.wait()  # held while paused in mode "wait"
            async for out in self.metrics.track(
                self.engine.generate(it.prompt, it.params, it.rid), arrival
            ):
                yield out
        finally:
            self.active.discard(it.rid)

    def _events(self, fmt: GenerateFormatter, streams: list, indexed: bool) -> AsyncIterator[bytes]:
        finals: dict[int, RequestOutput] = {}

        async def body() -> AsyncIterator[bytes]:
            async for i, out in merge_streams(streams):
                finals[i] = out
                for d in fmt.outputs(i, out):
                    index = d.pop("_index")
                    yield sse(d | {"index": index} if indexed else d)

        return metered_sse(self.metrics, body(), lambda: list(finals.values()))

    async def abort(self, rid: str | list[str] | None, abort_all: bool) -> int:
        if abort_all:
            return await self.engine.abort_all()
        wanted = [rid] if isinstance(rid, str) else list(rid or [])
        hits = [r for r in list(self.active) for w in wanted if w and (r == w or r.startswith(w))]
        return sum([await self.engine.abort(r) for r in set(hits)])
