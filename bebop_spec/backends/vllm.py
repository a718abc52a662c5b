"""`bebop serve --backend vllm`: the server's engine surface over vLLM's `AsyncLLM`.

vLLM is imported when the backend starts, never at module import. Mapping:

    generate(ids, params, rid)      AsyncLLM.generate({"prompt_token_ids": ids}, SamplingParams(...,
                                    output_kind=CUMULATIVE), rid)
    abort / abort_all               AsyncLLM.abort(ids)
    pause(abort | retract | in_place)  pause_generation(mode="abort" | "keep" | "keep")
    resume                          resume_generation()
    update_weights(t, selector, v)  native weight transfer (IPC backend, same node):
                                    start_weight_update / start_draft_weight_update,
                                    update_weights(IPC handles), finish_weight_update(v),
                                    bracketed by pause(keep) / resume so no step mixes versions
    flush_cache                     reset_prefix_cache()

Engine defaults Bebop needs (override with `engine_args`): MTP speculation with
`draft_sample_method="probabilistic"` for draft_mode "rs" ("greedy" for "to"),
`logprobs_mode="processed_logprobs"` (logprobs under the processed p, like the embedded
engine), per-request spec metrics ("summary"), `weight_transfer_config={"backend": "ipc"}`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import torch

from bebop_spec.backends.remote import RemoteBackend, with_overrides
from bebop_spec.engine.config import EngineConfig, PauseMode, WeightSelector
from bebop_spec.engine.outputs import CompletionOutput, RequestOutput, SpecStats
from bebop_spec.patching.vllm_plugin import check_speculative_config
from bebop_spec.sampling_params import SamplingParams
from bebop_spec.spec.verify import DraftMode

# our pause modes -> vLLM's pause_generation modes
PAUSE_MODES = {PauseMode.ABORT: "abort", PauseMode.RETRACT: "keep", PauseMode.IN_PLACE: "keep"}
# our draft modes -> vLLM's draft_sample_method
DRAFT_SAMPLE_METHODS = {
    DraftMode.REJECTION_SAMPLING: "probabilistic",
    DraftMode.TARGET_ONLY: "greedy",
}


def engine_args(config: EngineConfig, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """AsyncEngineArgs keywords for an EngineConfig (extra wins; $BEBOP_ENGINE_ARGS is JSON)."""
    args: dict[str, Any] = {
        "model": config.model,
        "dtype": config.dtype,  # auto | float32 | bfloat16 | float16: both engines take these
        "seed": config.seed,
        "max_num_seqs": config.max_num_seqs,
        "logprobs_mode": "processed_logprobs",
        "per_request_spec_decode_metrics": "summary",
        "weight_transfer_config": {"backend": "ipc"},
    }
    if config.max_model_len:
        args["max_model_len"] = config.max_model_len
    if config.speculative:
        spec = {
            "method": "mtp",
            "num_speculative_tokens": config.num_speculative_tokens,
            "draft_sample_method": DRAFT_SAMPLE_METHODS[config.draft_mode],
        }
        if config.mtp:
            spec["model"] = config.mtp
        args["speculative_config"] = spec
    return with_overrides(args, extra)


def sampling_params_kwargs(params: SamplingParams) -> dict[str, Any]:
    """vllm.SamplingParams keywords for ours (cumulative outputs are set by the caller)."""
    return {
        "n": params.n,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.effective_top_k,  # vLLM: 0 disables
        "min_p": params.min_p,
        "seed": params.seed,
        "stop": list(params.stop) or None,
        "stop_token_ids": list(params.stop_token_ids) or None,
        "ignore_eos": params.ignore_eos,
        "max_tokens": params.max_tokens,
        "logprobs": params.logprobs,
        "include_stop_str_in_output": params.include_stop_str_in_output,
        "skip_special_tokens": params.skip_special_tokens,
        "presence_penalty": params.presence_penalty,
        "frequency_penalty": params.frequency_penalty,
        "repetition_penalty": params.repetition_penalty,
        "min_tokens": params.min_tokens,
        "logit_bias": params.logit_bias,
    }


def spec_from_metrics(metrics: Any) -> SpecStats | None:
    """SpecStats of one sequence from vLLM's RequestSpecDecodeMetrics (histogram over j accepted)."""
    if metrics is None or not getattr(metrics, "histogram", None):
        return None
    hist = list(metrics.histogram)
    spec = SpecStats(
        num_drafts=sum(hist),
        num_draft_tokens=int(metrics.num_draft_tokens),
        num_accepted_tokens=sum(j * n for j, n in enumerate(hist)),
    )
    spec.accepted_per_pos = [
        sum(hist[j] for j in range(i + 1, len(hist))) for i in range(len(hist) - 1)
    ]
    return spec


def _logprobs(
    token_ids: list[int], entries: Any, want_top: int | None
) -> tuple[list[float] | None, list[dict[int, float]] | None]:
    if entries is None:
        return None, None
    sampled = [
        float(e[t].logprob) if t in e else float("nan")
        for t, e in zip(token_ids, entries, strict=True)
    ]
    if not want_top:
        return sampled, None
    top = [
        dict(
            sorted(((tid, float(lp.logprob)) for tid, lp in e.items()), key=lambda kv: -kv[1])[
                :want_top
            ]
        )
        for e in entries
    ]
    return sampled, top


def convert_output(
    out: Any, params: SamplingParams, versions: dict[int, list[int]], current: int, label_to_version
) -> RequestOutput:
    """vLLM RequestOutput -> ours. `versions` holds the per-sample version list between calls."""
    completions = []
    for c in out.outputs:
        ids = list(c.token_ids)
        vs = versions.setdefault(c.index, [])
        vs += [current] * (len(ids) - len(vs))  # tokens that arrived since the last output
        for span in getattr(c, "weight_versions", None) or []:  # final output: exact spans
            v = label_to_version(span.version)
            vs[span.start : span.end] = [v] * (min(span.end, len(vs)) - span.start)
        lps, top = _logprobs(ids, c.logprobs, params.logprobs)
        completions.append(
            CompletionOutput(
                index=c.index,
                token_ids=ids,
                text=c.text or "",
                logprobs=lps,
                top_logprobs=top,
                weight_versions=list(vs),
                finish_reason=c.finish_reason,
                stop_reason=c.stop_reason,
                spec=spec_from_metrics(getattr(c, "spec_decode_metrics", None)) or SpecStats(),
            )
        )
    return RequestOutput(
        request_id=out.request_id,
        prompt_token_ids=list(out.prompt_token_ids or []),
        outputs=completions,
        prompt=getattr(out, "prompt", None),
    )


class VLLMBackend(RemoteBackend):
    """ServingBackend over vllm.v1.engine.async_llm.AsyncLLM (see module docstring)."""

    backend_name = "vllm"
    make_engine_args = staticmethod(engine_args)

    def __init__(self, config: EngineConfig, engine_args_override: Mapping[str, Any] | None = None,
                 engine: Any = None) -> None:  # fmt: skip
        super().__init__(config, engine_args_override, engine)
        self.warnings = check_speculative_config(self.engine_args.get("speculative_config"))

    @property
    def tokenizer(self) -> Any:
        tok = getattr(self._engine, "tokenizer", None)
        return tok if tok is not None else super().tokenizer

    async def start(self) -> None:
        if self._engine is not None:
            return
        # IPC handles of weight updates travel to the engine core pickled (vLLM's own IPC
        # path, local sockets only); vLLM refuses them without this flag.
        os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))
        await self._engine.init_weight_transfer_engine(WeightTransferInitRequest(init_info={}))

    def _vllm_params(self, params: SamplingParams) -> Any:
        from vllm import SamplingParams as VSamplingParams
        from vllm.sampling_params import RequestOutputKind

        return VSamplingParams(
            **sampling_params_kwargs(params), output_kind=RequestOutputKind.CUMULATIVE
        )

    # ------------------------------------------------------------------ RemoteBackend hooks
    async def _open_stream(self, ids: list[int], params: SamplingParams,
                           request_id: str) -> AsyncIterator[Any]:  # fmt: skip
        return self._engine.generate(
            {"prompt_token_ids": ids}, self._vllm_params(params), request_id
        )

    def _converter(self, ids: list[int], params: SamplingParams, request_id: str):
        versions: dict[int, list[int]] = {}  # per-sample versions between outputs
        return lambda out: convert_output(out, params, versions, self.version, self._version_of)

    async def _abort_engine(self, request_id: str) -> None:
        await self._engine.abort(request_id)

    async def _abort_all_engine(self, request_ids: list[str]) -> None:
        if request_ids:
            await self._engine.abort(request_ids)

    async def _pause_engine(self, mode: str) -> None:
        await self._engine.pause_generation(
            mode=PAUSE_MODES[mode], clear_cache=mode == PauseMode.ABORT
        )

    async def _resume_engine(self) -> None:
        await self._engine.resume_generation()

    async def _flush_engine(self) -> None:
        await self._engine.reset_prefix_cache()

    async def _send_weights(self, tensors: Mapping[str, torch.Tensor], selector: str,
                            label: str) -> None:  # fmt: skip
        """Through vLLM's weight transfer, target and head in turn, paused in place."""
        target, draft = WeightSelector.TARGET, WeightSelector.DRAFT
        draft_names = set(self.weight_spec(draft)) if selector != target else set()
        groups = {
            target: {k: v for k, v in tensors.items() if k not in draft_names},
            draft: {k: v for k, v in tensors.items() if k in draft_names},
        }
        outside = groups[target if selector == draft else draft]
        if selector != WeightSelector.ALL and outside:
            raise ValueError(f"tensors outside selector={selector!r}: {sorted(outside)[:3]}")
        was_paused = self.paused
        if not was_paused:
            await self._engine.pause_generation(mode="keep", clear_cache=False)
        try:
            for which, part in groups.items():
                if part:
                    await self._send(part, draft=which == draft, label=label)
            await self._engine.reset_prefix_cache()  # cached K/V came from the old weights
        finally:
            if not was_paused:
                await self._engine.resume_generation()

    async def _send(self, tensors: Mapping[str, torch.Tensor], draft: bool, label: str) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest

        update_info, keep_alive = ipc_update_info(tensors)
        await (
            self._engine.start_draft_weight_update()
            if draft
            else self._engine.start_weight_update()
        )
        await self._engine.update_weights(WeightTransferUpdateRequest(update_info=update_info))
        await self._engine.finish_weight_update(weight_version=label)
        del keep_alive  # the engine has copied the weights; the IPC source may go


def ipc_update_info(
    tensors: Mapping[str, torch.Tensor],
) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """vLLM IPC update_info (unpacked) for same-node CUDA tensors, and the tensors to keep alive."""
    import base64
    import pickle

    from torch.multiprocessing.reductions import reduce_tensor

    if not torch.cuda.is_available():
        raise RuntimeError("vLLM weight updates from the server use CUDA IPC: a GPU is required")
    uuid = str(torch.cuda.get_device_properties(torch.cuda.current_device()).uuid)
    names, dtypes, shapes, handles, keep = [], [], [], [], []
    for name, t in tensors.items():
        w = t.detach().to("cuda", non_blocking=True).contiguous()
        keep.append(w)
        names.append(name)
        dtypes.append(str(w.dtype).split(".")[-1])
        shapes.append(list(w.shape))
        handles.append({uuid: reduce_tensor(w)[1]})
    torch.cuda.synchronize()
    pickled = base64.b64encode(pickle.dumps(handles)).decode()
    return {
        "names": names,
        "dtype_names": dtypes,
        "shapes": shapes,
        "ipc_handles_pickled": pickled,
    }, keep
