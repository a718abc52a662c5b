"""Server facts and liveness: SGLang's /get_model_info and /get_server_info, /health and
/health_generate (the ops router serves the last two with /metrics)."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from bebop_spec import server
from bebop_spec.backends import ServingBackend
from bebop_spec.sampling_params import SamplingParams
from bebop_spec.server.config import ServerConfig
from bebop_spec.server.serving.control import ControlServing

HEALTH_TIMEOUT_S = 20.0
SECRETS = ("admin_token", "api_key")  # never in /get_server_info


class InfoServing:
    def __init__(self, engine: ServingBackend, config: ServerConfig,
                 control: ControlServing) -> None:  # fmt: skip
        self.engine, self.config, self.control = engine, config, control
        self.started_at = time.time()
        self.shutting_down = False  # set by the app's lifespan: /health answers 503

    # ------------------------------------------------------------------ liveness
    def health(self) -> int:
        return 503 if self.shutting_down else 200

    async def health_generate(self) -> int:
        """200 when one greedy token comes out (or the engine is busy / paused on purpose:
        alive); 503 when shutting down or the token does not come within the timeout."""
        e = self.engine
        if self.shutting_down:
            return 503
        if e.paused or e.num_running > 0:
            return 200
        stream = e.generate([0], SamplingParams(temperature=0.0, max_tokens=1),
                            f"health-{uuid.uuid4().hex}")  # fmt: skip

        async def run() -> None:
            async for _ in stream:
                pass

        try:
            await asyncio.wait_for(run(), HEALTH_TIMEOUT_S)
            return 200
        except Exception:
            return 503

    # ------------------------------------------------------------------ facts
    def weight_version(self) -> dict[str, Any]:
        return {"weight_version": self.engine.weight_version, "version": self.engine.version}

    def model_info(self, served_model_name: str) -> dict[str, Any]:
        e, mc = self.engine, self.engine.model_config
        return {
            "model_path": e.config.model,
            "tokenizer_path": e.config.model if e.tokenizer is not None else None,
            "served_model_name": served_model_name,
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": e.weight_version,
            "model_type": getattr(mc, "family", None),
            "architectures": _architectures(mc),
            # ext
            "mtp_path": e.config.mtp,
            "draft_mode": e.config.draft_mode_name,
            "num_speculative_tokens": self.gamma,
            "max_model_len": e.max_model_len,
            "vocab_size": getattr(mc, "vocab_size", None),
            "eos_token_ids": list(getattr(mc, "eos_token_ids", []) or []),
        }

    def server_info(self) -> dict[str, Any]:
        e = self.engine
        spec = e.spec_totals
        engine_args = dataclasses.asdict(e.config) if dataclasses.is_dataclass(e.config) else {}
        server_args = {k: v for k, v in dataclasses.asdict(self.config).items()
                       if k not in SECRETS}  # fmt: skip
        return {
            **engine_args,
            **server_args,
            "num_speculative_tokens": self.gamma,  # None without speculation, not the unused γ
            "draft_mode": e.config.draft_mode_name,
            "admin_protected": self.config.admin_protected,
            "internal_states": [
                {
                    "avg_spec_accept_length": spec.mean_accepted_length,
                    # decode steps per draft length 0, 1, … (auto policy; null when fixed or none)
                    "spec_draft_length_steps": e.gamma_chosen,
                    "spec_accept_rate": spec.acceptance_rate,
                    "kv_cache": e.kv_cache_info,  # None where the backend cannot tell
                    "num_running": e.num_running,
                    "num_waiting": e.num_waiting,
                    "paused": self.control.paused,
                    "weight_version": e.weight_version,
                }
            ],
            "startup_time": self.started_at,
            "version": server.__version__,
            "frontend": "bebop",
        }

    @property
    def gamma(self) -> int | None:
        """Drafts per step (γ, the most under the auto policy); None when not speculating."""
        c = self.engine.config
        return c.num_speculative_tokens if c.draft_mode else None


def _architectures(mc: Any) -> list[str] | None:
    """From the model's config.json, as SGLang reports them (the family's class if absent)."""
    if hasattr(mc, "to_hf"):
        return list(mc.to_hf().get("architectures") or []) or None
    return list(getattr(mc, "hf", {}).get("architectures") or []) or None
