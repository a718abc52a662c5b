"""Offline API shaped like vLLM's:

from bebop_spec import LLM, SamplingParams
llm = LLM(model="path/to/hf_dir", num_speculative_tokens=3, draft_mode="rs")
outs = llm.generate(["Hello"], SamplingParams(temperature=1.0, max_tokens=64))
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from typing import Any

from tqdm.auto import tqdm

from bebop_spec.engine.config import EngineConfig
from bebop_spec.engine.llm_engine import LLMEngine
from bebop_spec.engine.outputs import RequestOutput, SpecStats
from bebop_spec.errors import InvalidRequest
from bebop_spec.models.defaults import DEMO, resolve_model
from bebop_spec.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str | None = None, mtp: str | None = None,
                 **engine_kwargs: Any) -> None:  # fmt: skip
        """`engine_kwargs`: any EngineConfig field (draft_mode, num_speculative_tokens, ...),
        with EngineConfig's defaults."""
        if model is None or model == DEMO:  # SmolLM2-135M-Instruct + its head, or the demo
            model, mtp = resolve_model(model, mtp)
            if mtp is None:  # an install without the shipped head: serve without drafts
                engine_kwargs["draft_mode"] = None
        engine_kwargs.setdefault("max_waiting", 1 << 30)  # offline: the whole batch is queued
        config = EngineConfig(model=str(model), mtp=None if mtp is None else str(mtp),
                              **engine_kwargs)  # fmt: skip
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def spec_stats(self) -> SpecStats:
        """Totals over everything this LLM generated."""
        return self.engine.spec_totals

    def encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequest("text prompts need a tokenizer; pass token ids")
            return list(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return [int(t) for t in prompt]

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """One RequestOutput per prompt, in order. A flat list of ints is one prompt."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if params is None:
            params = SamplingParams()
        plist = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} SamplingParams for {len(prompts)} prompts")
        encoded = [self.encode(p) for p in prompts]
        rids = []
        for ids, p in zip(encoded, plist, strict=True):
            rid = f"offline-{next(self._ids)}"
            self.engine.add_request(rid, ids, p)
            rids.append(rid)
        done: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(rids), desc="generate", disable=not use_tqdm)
        while self.engine.has_unfinished():
            outputs = self.engine.step(only_finished=True)
            if self.engine.failed:
                rid, message = next(iter(self.engine.failed.items()))
                self.engine.abort_all()
                self.engine.failed.clear()
                raise RuntimeError(f"request {rid}: {message}")
            for out in outputs:
                if out.finished:
                    done[out.request_id] = out
                    bar.update(1)
        bar.close()
        results = [done[r] for r in rids]
        for r, p in zip(results, prompts, strict=True):
            r.prompt = p if isinstance(p, str) else None
        return results
