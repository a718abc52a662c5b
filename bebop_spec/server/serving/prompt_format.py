"""Prompt scores (engine `PromptLogprobs`) spelled as each API spells them.

- OpenAI completions with `echo`: the prompt's tokens lead `logprobs`, the first with a null
  logprob and null top_logprobs (nothing predicts token 0), as vLLM and OpenAI write them.
- vLLM's `prompt_logprobs` choice field: one entry per prompt token, null first, each a dict
  {token id: {logprob, rank, decoded_token}} holding the prompt token and the top-k.
- SGLang's `input_*` meta_info lists: entries for positions logprob_start_len..P-1, the first
  with a null logprob (SGLang scores from the row at logprob_start_len on).

Logprobs go through `json_logprob` (−∞ → −9999.0) like every other logprob the server writes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bebop_spec.engine.outputs import PromptLogprobs
from bebop_spec.server.protocol import openai as oai
from bebop_spec.server.serving.common import json_logprob


def _rows(pl: PromptLogprobs, prompt: list[int], first: int) -> list[int | None]:
    """Index into pl's lists of each prompt position first..P-1 (None where unscored)."""
    return [i - pl.start if i >= pl.start else None for i in range(first, len(prompt))]


def _alternatives(pl: PromptLogprobs, t: int, token: int, chosen: bool = True) -> dict[int, float]:
    """The prompt token's own logprob with the top-k (or the chosen ids) at row t."""
    alts = dict(pl.chosen[t]) if pl.chosen and chosen else dict(pl.top[t] if pl.top else {})
    alts[token] = pl.logprobs[t]
    return alts


def echo_logprobs(pl: PromptLogprobs, prompt: list[int], text: Callable[[int], str],
                  top: bool) -> oai.CompletionLogProbs:  # fmt: skip
    """The prompt's part of an echoed completion's `logprobs` (text offsets from 0)."""
    res = oai.CompletionLogProbs()
    offset = 0
    for i, t in enumerate(_rows(pl, prompt, 0)):
        tok = text(prompt[i])
        res.tokens.append(tok)
        res.text_offset.append(offset)
        offset += len(tok)
        res.token_logprobs.append(None if t is None else json_logprob(pl.logprobs[t]))
        alts = None if t is None or not top else _alternatives(pl, t, prompt[i])
        res.top_logprobs.append(
            None if alts is None else {text(x): json_logprob(v) for x, v in alts.items()}
        )
    return res


def vllm_prompt_logprobs(pl: PromptLogprobs, prompt: list[int],
                         text: Callable[[int], str]) -> list[dict[str, Any] | None]:  # fmt: skip
    """vLLM's `prompt_logprobs`: [None, {id: {logprob, rank, decoded_token}}, ...]."""
    out: list[dict[str, Any] | None] = []
    for i, t in enumerate(_rows(pl, prompt, 0)):
        if t is None:
            out.append(None)
            continue
        ranked = sorted(
            _alternatives(pl, t, prompt[i], chosen=False).items(), key=lambda kv: -kv[1]
        )  # top-k: rank = place in this order
        entry = {}
        for r, (x, v) in enumerate(ranked, 1):
            rank = pl.ranks[t] if x == prompt[i] else r
            entry[str(x)] = {"logprob": json_logprob(v), "rank": rank, "decoded_token": text(x)}
        out.append(entry)
    return out


def sglang_input_logprobs(pl: PromptLogprobs | None, prompt: list[int], start: int, top_n: int,
                          token_ids: list[int] | None,
                          text: Callable[[int], str | None]) -> dict[str, Any]:  # fmt: skip
    """SGLang's input_token_logprobs / input_top_logprobs / input_token_ids_logprobs for
    logprob_start_len = start ([] when the prompt was not scored: start = -1)."""
    if pl is None:
        meta: dict[str, Any] = {"input_token_logprobs": []}
        if top_n:
            meta["input_top_logprobs"] = []
        if token_ids:
            meta["input_token_ids_logprobs"] = []
        return meta

    def triple(v: float, x: int) -> list:
        return [json_logprob(v), x, text(x)]

    rows = _rows(pl, prompt, start)  # the engine scored from start + 1: the first is None
    meta = {
        "input_token_logprobs": [
            [
                None if t is None else json_logprob(pl.logprobs[t]),
                prompt[start + j],
                text(prompt[start + j]),
            ]
            for j, t in enumerate(rows)
        ]  # fmt: skip
    }
    if top_n:
        meta["input_top_logprobs"] = [
            None if t is None else [triple(v, x) for x, v in pl.top[t].items()] for t in rows
        ]
    if token_ids:
        meta["input_token_ids_logprobs"] = [
            None if t is None else [triple(v, x) for x, v in pl.chosen[t].items()] for t in rows
        ]
    return meta
