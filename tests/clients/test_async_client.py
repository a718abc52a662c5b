"""The asyncio client offers what the sync one does, over the same plans (bebop_client.calls):
the same public calls with the same parameters, and the same answers from a real server."""

from __future__ import annotations

import asyncio
import inspect

from bebop_client import AsyncRolloutClient, RolloutClient

PROMPT = [3, 1, 4, 1, 5]
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
CLOSE = {"close", "aclose"}  # each client's own spelling of closing


def _public(cls: type) -> dict[str, inspect.Signature]:
    return {n: inspect.signature(f) for n, f in inspect.getmembers(cls, inspect.isfunction)
            if not n.startswith("_") and n not in CLOSE}  # fmt: skip


def test_clients_offer_the_same_calls():
    """Invariant: every public method of RolloutClient exists on AsyncRolloutClient with the
    same parameters and defaults (and vice versa), as a coroutine there; only closing is
    spelled differently (close / aclose)."""
    sync, aio = _public(RolloutClient), _public(AsyncRolloutClient)
    assert sync.keys() == aio.keys()
    for name, sig in sync.items():
        assert str(aio[name]) == str(sig), name
        assert inspect.iscoroutinefunction(getattr(AsyncRolloutClient, name)), name


def test_async_calls_answer_as_the_sync_ones(real):
    """Against one real server the async client returns what the sync one does: the same
    greedy tokens and logprobs, weight versions, model / server info, health and readiness,
    metrics text that parses, flush_cache and pause/resume accepted."""
    client = real[0]
    expect = client.generate(PROMPT, GREEDY)[0]

    async def run():
        async with AsyncRolloutClient(client.urls) as ac:
            await ac.wait_ready(timeout=30)
            (s,) = await ac.generate(PROMPT, GREEDY)
            batch = await ac.generate_batch([PROMPT, PROMPT], GREEDY, n=2)
            await ac.pause()
            await ac.resume()
            await ac.flush_cache()
            return (s, batch, await ac.weight_versions(), await ac.model_info(),
                    await ac.server_info(), await ac.health(), await ac.metrics_text(),
                    await ac.metrics())  # fmt: skip

    s, batch, versions, model, server, healthy, text, metrics = asyncio.run(run())
    assert (s.token_ids, s.logprobs) == (expect.token_ids, expect.logprobs)
    assert [[x.token_ids for x in g] for g in batch] == [[expect.token_ids] * 2] * 2
    assert versions == client.weight_versions() and model == client.model_info()
    assert server.keys() == client.server_info().keys() and healthy
    assert "bebop:spec_decode_num_drafts" in text and metrics.num_drafts > 0
