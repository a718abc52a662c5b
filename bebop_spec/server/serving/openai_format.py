"""Engine outputs -> OpenAI response objects, whole or as stream deltas.

Completions and chat share the bookkeeping (what each choice has already been sent) and
differ only in how a choice and its logprobs are spelled.
"""

from __future__ import annotations

import time
from typing import Any

from bebop_spec.engine.outputs import CompletionOutput, PromptLogprobs, RequestOutput
from bebop_spec.server.protocol import openai as oai
from bebop_spec.server.serving.base import EngineServing
from bebop_spec.server.serving.common import LOGPROB_FLOOR, json_logprob, spec_info, version_spans
from bebop_spec.server.serving.prompt_format import echo_logprobs, vllm_prompt_logprobs


def wire(response: Any) -> dict[str, Any]:
    """A response model as sent: unset optional fields left out, except that a finished
    choice always carries `stop_reason` (null for EOS / length), as vLLM writes it."""
    d = response.model_dump(exclude_none=True)
    for choice in d.get("choices", []):
        if "finish_reason" in choice:
            choice.setdefault("stop_reason", None)
    return d


class ChoiceFormatter:
    def __init__(
        self, serving: EngineServing, req: Any, rid: str, prompts: list[list[int]], *, chat: bool
    ):
        self.s, self.req, self.rid, self.prompts, self.chat = serving, req, rid, prompts, chat
        self.n = req.n
        self.created = int(time.time())
        self.model = serving.config.served_model_name
        self.with_logprobs = bool(req.logprobs) if chat else req.logprobs is not None
        self.echo = not chat and req.echo  # the prompt leads each choice's text and logprobs
        self.sent_tokens: dict[int, int] = {}
        self.sent_text: dict[int, str] = {}
        self.done: set[int] = set()

    def _head(self) -> dict[str, Any]:
        return {"id": self.rid, "created": self.created, "model": self.model}

    # ------------------------------------------------------------ whole reply
    def full_response(
        self, finals: list[RequestOutput]
    ) -> oai.CompletionResponse | oai.ChatCompletionResponse:
        choices = []
        for i, out in enumerate(finals):
            for o in out.outputs:
                k = i * self.n + o.index
                choices.append(
                    self._choice(
                        k, o, 0, len(o.token_ids), o.text, final=True, pl=out.prompt_logprobs
                    )  # fmt: skip
                )
        head = self._head() | self._extras(finals)
        if self.chat:
            ids = self.prompts[0] if self.req.return_token_ids else None
            return oai.ChatCompletionResponse(
                **head, choices=choices, usage=self._usage(finals), prompt_token_ids=ids
            )
        return oai.CompletionResponse(**head, choices=choices, usage=self._usage(finals))

    def _extras(self, finals: list[RequestOutput]) -> dict[str, Any]:
        label = self.s.engine.weight_version
        return {
            "weight_version": label,
            "metadata": {"weight_version": label},
            "spec_stats": self._spec(finals),
        }

    def _spans(self, o: CompletionOutput) -> list[oai.WeightVersionSpan]:
        """Which weights produced which of this sample's tokens."""
        return [
            oai.WeightVersionSpan(**d)
            for d in version_spans(o.weight_versions, self.s.engine.version_labels)
        ]

    @staticmethod
    def _spec(finals: list[RequestOutput]) -> oai.SpecStatsInfo:
        """Speculative counters summed over every sample of the reply."""
        everything = RequestOutput("", [], [o for f in finals for o in f.outputs])
        return oai.SpecStatsInfo(**spec_info(everything.spec))

    def _usage(self, finals: list[RequestOutput]) -> oai.UsageInfo:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(len(o.token_ids) for f in finals for o in f.outputs)
        return oai.UsageInfo(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )

    # ---------------------------------------------------------------- streams
    def first_chunk(self) -> oai.ChatCompletionStreamResponse | None:
        if not self.chat:
            return None
        choices = [
            oai.ChatStreamChoice(index=k, delta=oai.ChatDelta(role="assistant", content=""))
            for k in range(len(self.prompts) * self.n)
        ]
        ids = self.prompts[0] if self.req.return_token_ids else None
        return oai.ChatCompletionStreamResponse(
            **self._head(), choices=choices, prompt_token_ids=ids
        )

    def delta_chunks(self, i: int, out: RequestOutput) -> list[Any]:
        chunks = []
        for o in out.outputs:
            k = i * self.n + o.index
            start = self.sent_tokens.get(k, 0)
            if k in self.done or (len(o.token_ids) == start and not o.finished):
                continue
            prev = self.sent_text.get(k, "")
            delta = (
                o.text[len(prev) :] if o.text.startswith(prev) else o.text[_common(prev, o.text) :]
            )
            self.sent_tokens[k], self.sent_text[k] = len(o.token_ids), o.text
            choice = self._choice(k, o, start, len(o.token_ids), delta, final=o.finished,
                                  stream=True, pl=out.prompt_logprobs)  # fmt: skip
            if o.finished:
                self.done.add(k)
            head = self._head()
            if o.finished:
                head["weight_version"] = self.s.engine.weight_version
            if self.chat:
                chunks.append(oai.ChatCompletionStreamResponse(**head, choices=[choice]))
            else:
                chunks.append(oai.CompletionStreamResponse(**head, choices=[choice]))
        return chunks

    def usage_chunk(self, finals: list[RequestOutput]) -> Any:
        opts = self.req.stream_options
        if opts is None or not opts.include_usage:
            return None
        head = self._head() | self._extras(finals)
        cls = oai.ChatCompletionStreamResponse if self.chat else oai.CompletionStreamResponse
        return cls(**head, choices=[], usage=self._usage(finals))

    # ---------------------------------------------------------------- choices
    def _choice(
        self,
        k: int,
        o: CompletionOutput,
        a: int,
        b: int,
        text: str,
        *,
        final: bool,
        stream: bool = False,
        pl: PromptLogprobs | None = None,
    ):
        spans = None
        if final:
            spans = self._spans(o)
        finish = o.finish_reason if final else None
        stop = self._stop_reason(o) if final else None
        ids = o.token_ids[a:b] if self.req.return_token_ids else None
        if self.chat:
            logprobs = self._chat_logprobs(o, a, b) if self.with_logprobs else None
            if stream:
                return oai.ChatStreamChoice(
                    index=k, delta=oai.ChatDelta(content=text), logprobs=logprobs, finish_reason=finish,
                    stop_reason=stop, token_ids=ids, weight_versions=spans,
                )  # fmt: skip
            return oai.ChatChoice(
                index=k, message=oai.ChatMessageOut(content=text), logprobs=logprobs,
                finish_reason=finish, stop_reason=stop, token_ids=ids, weight_versions=spans,
            )  # fmt: skip
        prompt = self.prompts[k // self.n]
        lps = self._completion_logprobs(o, a, b, prompt) if self.with_logprobs else None
        if self.echo and a == 0:
            text, lps = self._echo(prompt, text, lps, pl)
        scored = None
        if final and pl is not None and self.req.prompt_logprobs is not None:
            scored = vllm_prompt_logprobs(pl, prompt, self.s.token_text)
        return oai.CompletionChoice(
            index=k, text=text, logprobs=lps, finish_reason=finish, stop_reason=stop,
            prompt_token_ids=prompt if self.req.return_token_ids and a == 0 else None,
            token_ids=ids, weight_versions=spans, prompt_logprobs=scored,
        )  # fmt: skip

    def _echo(self, prompt: list[int], text: str, lps: oai.CompletionLogProbs | None,
              pl: PromptLogprobs | None) -> tuple[str, oai.CompletionLogProbs | None]:  # fmt: skip
        """The choice's first piece with the prompt in front of its text and logprobs."""
        tok = self.s.engine.tokenizer
        head = tok.decode(prompt, skip_special_tokens=self.req.skip_special_tokens) if tok else ""
        if lps is None or pl is None:
            return head + text, lps
        p = echo_logprobs(pl, prompt, self.s.token_text, top=self.req.logprobs > 0)
        return head + text, oai.CompletionLogProbs(
            text_offset=p.text_offset + lps.text_offset, tokens=p.tokens + lps.tokens,
            token_logprobs=p.token_logprobs + lps.token_logprobs,
            top_logprobs=p.top_logprobs + lps.top_logprobs,
        )  # fmt: skip

    def _stop_reason(self, o: CompletionOutput) -> int | str | None:
        """vLLM's stop_reason: the matched stop string or stop_token_ids id; None for an EOS
        stop (the engine records the EOS id there) and for any other finish."""
        eos = getattr(self.s.engine.model_config, "eos_token_ids", None) or []
        if isinstance(o.stop_reason, int) and o.stop_reason in eos and not self.req.ignore_eos:
            return None
        return o.stop_reason

    def _top(self, o: CompletionOutput, t: int) -> dict[int, float] | None:
        """Alternatives at output position t: the logprob_token_ids when asked (vLLM: they
        replace the top-k), else the top-k."""
        alts = o.token_ids_logprobs or o.top_logprobs
        if not alts or t >= len(alts):
            return None
        return alts[t]

    def _completion_logprobs(self, o: CompletionOutput, a: int, b: int,
                             prompt: list[int]) -> oai.CompletionLogProbs:  # fmt: skip
        tt, lps = self.s.token_text, o.logprobs or []
        res = oai.CompletionLogProbs()
        offset = sum(len(tt(x)) for x in o.token_ids[:a])
        if self.echo:  # offsets count the echoed prompt's tokens first
            offset += sum(len(tt(x)) for x in prompt)
        for t in range(a, b):
            tok = tt(o.token_ids[t])
            res.tokens.append(tok)
            res.token_logprobs.append(json_logprob(lps[t]) if t < len(lps) else None)
            res.text_offset.append(offset)
            offset += len(tok)
            top = self._top(o, t)
            res.top_logprobs.append(
                None if top is None else {tt(x): json_logprob(lp) for x, lp in top.items()}
            )
        return res

    def _chat_logprobs(self, o: CompletionOutput, a: int, b: int) -> oai.ChatLogProbs:
        tt, lps = self.s.token_text, o.logprobs or []
        content = []
        for t in range(a, b):
            tok = tt(o.token_ids[t])
            top = self._top(o, t) or {}
            alts = [
                oai.TopLogprob(token=tt(x), logprob=json_logprob(lp), bytes=list(tt(x).encode()))
                for x, lp in top.items()
            ]
            lp = json_logprob(lps[t]) if t < len(lps) else LOGPROB_FLOOR  # OpenAI's "unknown"
            content.append(
                oai.ChatTokenLogprob(
                    token=tok, logprob=lp, bytes=list(tok.encode()), top_logprobs=alts
                )
            )
        return oai.ChatLogProbs(content=content)


def _common(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n
