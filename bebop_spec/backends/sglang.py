"""`bebop serve --backend sglang`: the server's engine surface over `sglang.Engine`.

SGLang is imported when the backend starts, never at module import. The Engine's own
sync helpers run their own event loop, so this backend awaits its TokenizerManager
directly, as SGLang's HTTP server does. Mapping (SGLang's names are the server's names):

    generate(ids, params, rid)      Engine.async_generate(input_ids=ids, sampling_params={...},
                                    rid=rid, stream=True, return_logprob=...)
    abort / abort_all               tokenizer_manager.abort_request(rid= | abort_all=True)
    pause(mode) / resume            pause_generation(mode) / continue_generation()
    update_weights(t, selector, v)  update_weights_from_tensor(selector=, weight_version=)
    flush_cache                     flush_cache()

Engine defaults Bebop needs (override with `engine_args`): EAGLE/MTP speculation with
topk 1 and `speculative_use_rejection_sampling` for draft_mode "rs".
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Any

import torch

from bebop_spec.backends.remote import RemoteBackend, with_overrides
from bebop_spec.engine.config import EngineConfig
from bebop_spec.engine.outputs import CompletionOutput, RequestOutput, SpecStats
from bebop_spec.errors import WeightUpdateError
from bebop_spec.sampling_params import SamplingParams
from bebop_spec.spec.verify import DraftMode


def engine_args(config: EngineConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """sglang.Engine keywords (ServerArgs) for an EngineConfig; extra / $BEBOP_ENGINE_ARGS win."""
    args: dict[str, Any] = {
        "model_path": config.model,
        "dtype": config.dtype,  # auto | float32 | bfloat16 | float16: both engines take these
        "random_seed": config.seed,
        "max_running_requests": config.max_num_seqs,
        "enable_metrics": True,
    }
    if config.max_model_len:
        args["context_length"] = config.max_model_len
    if config.speculative:
        args.update(
            speculative_algorithm="EAGLE",
            speculative_num_steps=config.num_speculative_tokens,
            speculative_eagle_topk=1,
            speculative_num_draft_tokens=config.num_speculative_tokens + 1,
            speculative_use_rejection_sampling=config.draft_mode == DraftMode.REJECTION_SAMPLING,
        )
        if config.mtp:
            args["speculative_draft_model_path"] = config.mtp
    return with_overrides(args, extra)


def sampling_params_dict(params: SamplingParams) -> dict[str, Any]:
    """SGLang's sampling_params (native /generate names) for ours; one sample per request."""
    out = {
        "max_new_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.effective_top_k or -1,
        "min_p": params.min_p,
        "stop": list(params.stop) or None,
        "stop_token_ids": list(params.stop_token_ids) or None,
        "ignore_eos": params.ignore_eos,
        "no_stop_trim": params.include_stop_str_in_output,
        "skip_special_tokens": params.skip_special_tokens,
        "frequency_penalty": params.frequency_penalty,
        "presence_penalty": params.presence_penalty,
        "repetition_penalty": params.repetition_penalty,
        "min_new_tokens": params.min_tokens,
        "n": 1,
    }
    if params.logit_bias:
        out["logit_bias"] = {str(t): b for t, b in params.logit_bias.items()}
    if params.seed is not None:
        out["sampling_seed"] = params.seed
    return out


def finish_reason(meta: Mapping[str, Any]) -> tuple[str | None, str | int | None]:
    fr = meta.get("finish_reason")
    if not fr:
        return None, None
    kind = fr.get("type") if isinstance(fr, Mapping) else str(fr)
    return kind, (fr.get("matched") if isinstance(fr, Mapping) else None)


def spec_from_meta(meta: Mapping[str, Any], gamma: int) -> SpecStats | None:
    """Per-request spec counters from meta_info: each verify emits accepted drafts + 1."""
    verify = int(meta.get("spec_verify_ct") or 0)
    if not verify:
        return None
    tokens = int(meta.get("completion_tokens") or 0)
    return SpecStats(
        num_drafts=verify,
        num_draft_tokens=verify * gamma,
        num_accepted_tokens=max(tokens - verify, 0),
    )


def convert_chunk(
    chunk: Mapping[str, Any], request_id: str, prompt_ids: list[int], state: dict[str, Any],
    current_version: int, label_to_version, gamma: int,
) -> RequestOutput:  # fmt: skip
    """One streamed SGLang dict -> our cumulative RequestOutput (`state` carries the request)."""
    meta = chunk.get("meta_info", {})
    ids = list(chunk.get("output_ids") or [])
    if state.get("incremental") or (state["ids"] and ids[: len(state["ids"])] != state["ids"]):
        state["incremental"] = True  # --incremental-streaming-output: chunks are deltas
        ids = state["ids"] + ids
    text = chunk.get("text", "")
    if state.get("incremental"):
        text = state["text"] + text
    new = len(ids) - len(state["ids"])
    label = meta.get("weight_version")
    version = label_to_version(label) if label is not None else current_version
    state["versions"] += [version] * new
    state["ids"], state["text"] = ids, text
    lp = meta.get("output_token_logprobs")
    if lp is not None:
        vals = [float(x[0]) for x in lp]
        # cumulative unless this chunk carries only the new tokens' entries
        prev_lp = state.get("logprobs", [])
        state["logprobs"] = vals if len(vals) == len(ids) else prev_lp + vals
    reason, matched = finish_reason(meta)
    spec = spec_from_meta(meta, gamma) if reason else None
    return RequestOutput(
        request_id=request_id,
        prompt_token_ids=prompt_ids,
        outputs=[
            CompletionOutput(
                index=0,
                token_ids=ids,
                text=text,
                logprobs=list(state["logprobs"]) if "logprobs" in state else None,
                weight_versions=list(state["versions"]),
                finish_reason=reason,
                stop_reason=matched,
                spec=spec or SpecStats(),
            )
        ],
    )


class SGLangBackend(RemoteBackend):
    """ServingBackend over sglang.Engine (see module docstring)."""

    backend_name = "sglang"
    make_engine_args = staticmethod(engine_args)

    @property
    def _tm(self) -> Any:
        return self._engine.tokenizer_manager

    async def start(self) -> None:
        if self._engine is None:
            import sglang

            self._engine = sglang.Engine(**self.engine_args)

    def check_params(self, params: SamplingParams) -> None:
        super().check_params(params)
        if params.n != 1:
            from bebop_spec.errors import InvalidRequest

            raise InvalidRequest("the sglang backend takes one sample per request (n=1)")

    # ------------------------------------------------------------------ RemoteBackend hooks
    async def _open_stream(self, ids: list[int], params: SamplingParams,
                           request_id: str) -> AsyncIterator[Any]:  # fmt: skip
        return await self._engine.async_generate(
            input_ids=ids,
            sampling_params=sampling_params_dict(params),
            rid=request_id,
            stream=True,
            return_logprob=params.logprobs is not None,
            top_logprobs_num=params.logprobs or 0,
        )

    def _converter(self, ids: list[int], params: SamplingParams, request_id: str):
        state: dict[str, Any] = {"ids": [], "text": "", "versions": []}
        gamma = self.config.gamma
        return lambda chunk: convert_chunk(
            chunk, request_id, ids, state, self.version, self._version_of, gamma
        )

    async def _abort_engine(self, request_id: str) -> None:
        self._tm.abort_request(rid=request_id)

    async def _abort_all_engine(self, request_ids: list[str]) -> None:
        self._tm.abort_request(abort_all=True)

    async def _pause_engine(self, mode: str) -> None:
        from sglang.srt.managers.io_struct import PauseGenerationReqInput

        await self._tm.pause_generation(PauseGenerationReqInput(mode=mode))

    async def _resume_engine(self) -> None:
        from sglang.srt.managers.io_struct import ContinueGenerationReqInput

        await self._tm.continue_generation(ContinueGenerationReqInput())

    async def _flush_engine(self) -> None:
        await self._tm.flush_cache()

    async def _send_weights(self, tensors: Mapping[str, torch.Tensor], selector: str,
                            label: str) -> None:  # fmt: skip
        """SGLang's update_weights_from_tensor with its own selector and weight_version."""
        from sglang.srt.managers.io_struct import UpdateWeightsFromTensorReqInput
        from sglang.srt.utils import MultiprocessingSerializer

        named = list(tensors.items())
        tp = int(self.engine_args.get("tp_size", 1))
        req = UpdateWeightsFromTensorReqInput(
            serialized_named_tensors=[
                MultiprocessingSerializer.serialize(named) for _ in range(tp)
            ],
            flush_cache=True,
            weight_version=label,
            selector=selector,
        )
        result = await self._tm.update_weights_from_tensor(req, None)
        ok, message = (
            (result[0], result[1])
            if isinstance(result, tuple)
            else (result.success, result.message)
        )
        if not ok:
            raise WeightUpdateError(f"sglang rejected the update: {message}")
