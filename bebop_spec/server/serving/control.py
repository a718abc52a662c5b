"""Generation control and tokenizer utilities for the vLLM RL API (/pause, /resume,
/is_paused, /tokenize, ...) and SGLang's extras (/v1/loads, memory occupation) -> engine calls.

vLLM's pause modes on the embedded engine (whose own modes are abort / retract / in_place):
  abort  pause("abort"): in-flight requests end with finish_reason abort; then flush
  wait   close the admission gate (new requests wait in the server), let the in-flight ones
         finish, then pause("in_place") and flush
  keep   pause("in_place"): everything freezes where it is and continues on /resume
New requests sent while paused wait (vLLM holds them too) and run after /resume.
"""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from typing import Any

from bebop_spec import server
from bebop_spec.backends import ServingBackend
from bebop_spec.engine.config import PauseMode
from bebop_spec.server.config import ServerConfig
from bebop_spec.server.errors import ApiError, bad_request
from bebop_spec.server.protocol import vllm as v
from bebop_spec.server.serving.common import AdmissionGate
from bebop_spec.server.serving.openai import OpenAIServing

DRAIN_POLL_S = 0.01


class ControlServing:
    def __init__(self, engine: ServingBackend, config: ServerConfig, gate: AdmissionGate,
                 openai: OpenAIServing) -> None:  # fmt: skip
        self.engine, self.config, self.gate, self.openai = engine, config, gate, openai

    # ----------------------------------------------------------------- pause
    @property
    def paused(self) -> bool:
        return self.engine.paused or self.gate.closed

    async def pause(self, mode: v.PauseMode, clear_cache: bool = True) -> None:
        if mode == v.PauseMode.KEEP:
            await self.engine.pause(PauseMode.IN_PLACE)
            return
        if mode == v.PauseMode.WAIT:
            self.gate.close()
            # an already paused engine would never drain: then only the gate closes
            while not self.engine.paused and self.engine.num_running + self.engine.num_waiting:
                await asyncio.sleep(DRAIN_POLL_S)
            await self.engine.pause(PauseMode.IN_PLACE)
        else:
            await self.engine.pause(PauseMode.ABORT)
        if clear_cache:
            await self.engine.flush_cache()

    async def resume(self) -> None:
        await self.engine.resume()
        self.gate.open()

    async def pause_engine(self, mode: PauseMode) -> None:
        """SGLang's /pause_generation: the engine's own modes (abort / retract / in_place)."""
        await self.engine.pause(mode)

    async def flush(self) -> int:
        """Drop every cached K/V (running requests are recomputed); returns how many."""
        return await self.engine.flush_cache()

    # ---------------------------------------------------- memory occupation
    async def release_memory(self, tags: list[str] | None) -> int:
        """SGLang's /release_memory_occupation on the embedded engine: generation stops,
        running requests are re-queued (recomputed on resume, not lost) and, for the
        `kv_cache` tag (or no tags), the KV pool's memory is freed. Weights stay: the engine
        serves from them, and a trainer updates them in place. Returns KV bytes freed."""
        if not tags or "kv_cache" in tags:
            return await self.engine.release_kv()
        await self.engine.pause(PauseMode.RETRACT)
        return 0

    async def resume_memory(self, tags: list[str] | None) -> None:
        await self.resume()  # any tag: the KV pool is allocated again by the first step

    # -------------------------------------------------------------- tokenizer
    def _tokenizer(self) -> Any:
        tok = self.engine.tokenizer
        if tok is None:
            raise bad_request("this server has no tokenizer (token-id mode)")
        return tok

    def tokenize(
        self, req: v.TokenizeCompletionRequest | v.TokenizeChatRequest
    ) -> v.TokenizeResponse:
        self.openai.check_model(req.model)
        tok = self._tokenizer()
        if isinstance(req, v.TokenizeChatRequest):
            ids = self.openai.render_chat(req)
        else:
            ids = list(tok.encode(req.prompt, add_special_tokens=req.add_special_tokens))
        strs = tok.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return v.TokenizeResponse(count=len(ids), max_model_len=self.engine.max_model_len,
                                  tokens=ids, token_strs=strs)  # fmt: skip

    def detokenize(self, req: v.DetokenizeRequest) -> v.DetokenizeResponse:
        self.openai.check_model(req.model)
        tok = self._tokenizer()
        vocab = int(self.engine.model_config.vocab_size)
        bad = next((t for t in req.tokens if not 0 <= t < vocab), None)
        if bad is not None:
            raise bad_request(f"token id {bad} is outside the vocabulary [0, {vocab})", "tokens")
        return v.DetokenizeResponse(prompt=tok.decode(req.tokens))

    def tokenizer_info(self) -> dict[str, Any]:
        """vLLM's /tokenizer_info: the tokenizer's class and configuration (its
        tokenizer_config.json fields that are JSON), with the chat template."""
        tok = self.engine.tokenizer
        if tok is None:
            raise ApiError(404, "this server has no tokenizer (token-id mode)")
        info = {k: val for k, val in getattr(tok, "init_kwargs", {}).items() if _is_json(val)}
        specials = {
            k: str(val) for k, val in tok.special_tokens_map.items() if isinstance(val, str)
        }
        return info | specials | {"tokenizer_class": type(tok).__name__,
                                  "chat_template": getattr(tok, "chat_template", None),
                                  "model_max_length": self.engine.max_model_len}  # fmt: skip

    # ------------------------------------------------------------------ loads
    def loads(self) -> dict[str, Any]:
        """SGLang's /v1/loads: one data-parallel rank (this engine) and the aggregate."""
        e = self.engine
        running, waiting = e.num_running, e.num_waiting
        slots = e.config.max_num_seqs
        kv = e.kv_cache_info  # the embedded engine's paged pool; None elsewhere
        usage = kv["blocks_used"] / kv["num_blocks"] if kv else (running / slots if slots else 0.0)
        load = {
            "dp_rank": 0,
            "num_running_reqs": running,
            "num_waiting_reqs": waiting,
            "num_total_reqs": running + waiting,
            "max_running_requests": slots,
            "utilization": round(running / slots, 4) if slots else 0.0,
            "token_usage": round(usage, 4),  # KV blocks in use / pool
            "cache_hit_rate": round(kv["prefix_cache_hit_rate"], 4) if kv else 0.0,
        }
        spec = e.spec_totals
        if spec.num_drafts:
            load["speculative"] = {"accept_length": spec.mean_accepted_length,
                                   "accept_rate": spec.acceptance_rate}  # fmt: skip
        aggregate = {"total_running_reqs": running, "total_waiting_reqs": waiting,
                     "total_reqs": running + waiting, "avg_token_usage": load["token_usage"],
                     "avg_utilization": load["utilization"]}  # fmt: skip
        return {"timestamp": datetime.now(UTC).isoformat(), "version": server.__version__,
                "dp_rank_count": 1, "loads": [load], "aggregate": aggregate}  # fmt: skip


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
