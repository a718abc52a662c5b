"""Engine outputs -> SGLang `/generate` replies: `{text, output_ids, meta_info}` per sample,
with meta_info as SGLang 0.5.23 spells it (finish_reason, prompt/completion tokens,
weight_version + per-token weight_versions spans, spec_* stats, output_token_logprobs)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bebop_spec.engine.outputs import CompletionOutput, RequestOutput
from bebop_spec.sampling_params import SamplingParams
from bebop_spec.server.serving.base import EngineServing
from bebop_spec.server.serving.common import json_logprob, version_spans
from bebop_spec.server.serving.prompt_format import sglang_input_logprobs


@dataclass
class GenerateItem:
    """One prompt of a /generate call."""

    rid: str
    prompt: list[int]
    params: SamplingParams | None  # None: max_new_tokens == 0, nothing to run
    logprob: bool
    top_logprobs: int
    logprob_start: int = -1  # SGLang's logprob_start_len: -1 scores no prompt token
    token_ids: list[int] | None = None  # token_ids_logprob


class GenerateFormatter:
    """Engine outputs -> SGLang `{text, output_ids, meta_info}` dicts."""

    def __init__(self, s: EngineServing, items: list[GenerateItem], logprob_text: bool, prompt_ids: bool,
                 arrival: float) -> None:  # fmt: skip
        self.s, self.items, self.arrival = s, items, arrival
        self.logprob_text, self.prompt_ids = logprob_text, prompt_ids

    def outputs(self, i: int, out: RequestOutput) -> list[dict[str, Any]]:
        it = self.items[i]
        n = len(out.outputs)
        res = []
        for o in out.outputs:
            meta = self._meta(it, o, n)
            if it.logprob:
                meta |= sglang_input_logprobs(out.prompt_logprobs, it.prompt, it.logprob_start,
                                              it.top_logprobs, it.token_ids, self._text)  # fmt: skip
            d = {"text": o.text, "output_ids": list(o.token_ids), "meta_info": meta}
            if self.prompt_ids:
                d["prompt_token_ids"] = list(it.prompt)
            d["_index"] = i * n + o.index
            res.append(d)
        return res

    def _meta(self, it: GenerateItem, o: CompletionOutput, n: int) -> dict[str, Any]:
        engine = self.s.engine
        spans = version_spans(o.weight_versions, engine.version_labels)
        spec = o.spec
        meta: dict[str, Any] = {
            "id": it.rid if n == 1 else f"{it.rid}-{o.index}",
            "finish_reason": _finish_reason(o),
            "prompt_tokens": len(it.prompt),
            "completion_tokens": len(o.token_ids),
            "cached_tokens": 0,
            "weight_version": spans[-1]["version"] if spans else engine.weight_version,
            "weight_versions": spans,
            "e2e_latency": time.perf_counter() - self.arrival,
        }
        if spec.num_drafts:
            meta |= {
                "spec_accept_rate": spec.acceptance_rate,
                "spec_accept_length": len(o.token_ids) / spec.num_drafts,
                "spec_verify_ct": spec.num_drafts,
                "spec_num_correct_drafts": spec.num_accepted_tokens,
                "spec_num_proposed_drafts": spec.num_draft_tokens,
                "spec_accepted_per_pos": list(spec.accepted_per_pos),  # ext
            }
        if it.logprob:
            meta["output_token_logprobs"] = [
                [json_logprob(lp), t, self._text(t)]
                for lp, t in zip(o.logprobs or [], o.token_ids, strict=False)
            ]
        if it.top_logprobs:
            meta["output_top_logprobs"] = [
                [
                    [json_logprob(lp), t, self._text(t)]
                    for t, lp in sorted(top.items(), key=lambda kv: -kv[1])
                ]
                for top in (o.top_logprobs or [])
            ]
        if it.logprob and it.token_ids:
            meta["output_token_ids_logprobs"] = [
                [[json_logprob(lp), t, self._text(t)] for t, lp in row.items()]
                for row in (o.token_ids_logprobs or [])
            ]
        return meta

    def _text(self, token_id: int) -> str | None:
        return self.s.token_text(token_id) if self.logprob_text else None


def _finish_reason(o: CompletionOutput) -> dict[str, Any] | None:
    if o.finish_reason is None:
        return None
    if o.finish_reason == "length":
        return {"type": "length", "length": len(o.token_ids)}
    if o.finish_reason == "abort":
        return {
            "type": "abort",
            "message": "Abort before prefill" if not o.token_ids else "Abort in decode",
        }
    matched = (
        o.stop_reason if o.stop_reason is not None else (o.token_ids[-1] if o.token_ids else None)
    )
    return {"type": "stop", "matched": matched}
