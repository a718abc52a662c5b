"""vLLM's four-phase weight transfer (/init_weight_transfer_engine, /start_weight_update,
/update_weights, /finish_weight_update, plus /weight_info and /weight_checker) mapped onto
the SGLang-style group mechanism of WeightServing:

  init_weight_transfer_engine {init_info}   -> init_group (TCP rendezvous, PrefixStore,
                                               new process group: SGLang's, not vLLM's
                                               StatelessProcessGroup + PyNccl)
  start_weight_update / start_draft_weight_update
                                            -> open a session: selector target / draft
                                               (without one, updates go to the target)
  update_weights {update_info}              -> from_distributed on the one group, with the
                                               session's selector (checked, then swapped)
  finish_weight_update {weight_version?}    -> close the session; label the new weights

So the trainer forms its end of the group with `init_custom_process_group` (ours, SGLang's or
slime's) and broadcasts one tensor per name, as it would for SGLang.
"""

from __future__ import annotations

from typing import Any

import torch

from bebop_spec.engine.config import WeightSelector
from bebop_spec.engine.weights import check_update
from bebop_spec.errors import BackendUnsupported
from bebop_spec.server.errors import ApiError
from bebop_spec.server.protocol import sglang as sgl
from bebop_spec.server.protocol import vllm as v
from bebop_spec.server.serving.control import ControlServing
from bebop_spec.server.serving.weights import WeightServing


def _failure(message: str, status: int = 400) -> ApiError:
    return ApiError(status, message, code="weight_update_failed")


class WeightTransferServing:
    def __init__(self, weights: WeightServing, control: ControlServing) -> None:
        self.weights, self.control, self.engine = weights, control, weights.engine

    async def init(self, info: v.WeightTransferInitInfo) -> None:
        cuda = self.engine.config.device.startswith("cuda")
        req = sgl.InitWeightsUpdateGroupRequest(
            master_address=info.master_address, master_port=info.master_port,
            rank_offset=info.rank_offset, world_size=info.world_size,
            group_name=info.group_name, backend=info.backend or ("nccl" if cuda else "gloo"),
        )  # fmt: skip
        await self.weights.init_group(req)

    def start(self, selector: WeightSelector) -> None:
        self.weights.begin(selector)

    async def update(self, info: v.WeightTransferUpdateInfo) -> sgl.UpdateResult:
        if info.packed:
            raise _failure("update_info.packed (vLLM's packed broadcast) is not supported: "
                           "send packed=false, one broadcast per tensor")  # fmt: skip
        req = sgl.UpdateWeightsFromDistributedRequest(  # no start_weight_update: the target
            names=info.names, dtypes=info.dtype_names, shapes=info.shapes,
            selector=self.weights.session or WeightSelector.TARGET, flush_cache=True,
        )  # fmt: skip
        return await self.weights.from_distributed(req)

    async def finish(self, weight_version: str | None) -> str:
        self.weights.session = None  # closes a start_*_weight_update, if there was one
        if weight_version:
            await self.weights.relabel(weight_version, abort_all=False)
        return self.engine.weight_version

    # ---------------------------------------------------------------- checker
    async def checker(self, req: v.WeightCheckerRequest) -> dict[str, Any]:
        """vLLM's /weight_checker: SHA-256 of every served target weight (checksum / compare),
        or zeroed weights (reset, as vLLM's zero_weights). 409 while paused, as vLLM."""
        if self.control.paused:
            raise ApiError(409, "weight_checker requires an awake, unpaused engine")
        if req.action == "compare" and req.baseline is None:
            raise ApiError(400, "action='compare' requires a 'baseline' object")
        if req.action == "reset":
            await self._reset()
            return {"status": "reset"}
        sums = await self.checksums()
        if req.action == "checksum":
            return {"checksums": sums}
        baseline = req.baseline or {}
        mismatches = sorted(
            k for k in baseline.keys() | sums.keys() if baseline.get(k) != sums.get(k)
        )
        return {"match": not mismatches, "mismatches": mismatches}

    async def checksums(self) -> dict[str, str]:
        """{name: sha256 hex} of the served target weights (the backend reads them)."""
        try:
            return await self.engine.weight_checksums(WeightSelector.TARGET)
        except BackendUnsupported as exc:
            raise ApiError(501, str(exc)) from exc

    async def _reset(self) -> None:
        """Zero weights of the served shapes (vLLM's reset), through the ordinary checked
        update path (the label stays; the version counter moves)."""
        spec = self.engine.weight_spec(WeightSelector.TARGET)
        zeros = {k: torch.zeros(shape, dtype=dtype) for k, (shape, dtype) in spec.items()}
        ready = check_update(zeros, spec)
        await self.engine.update_weights(ready, selector=WeightSelector.TARGET,
                                         weight_version=self.engine.weight_version)  # fmt: skip
