"""AsyncEngine: streaming, abort on close, pause modes, atomic weight swaps with versions."""

from __future__ import annotations

import asyncio

import pytest
import torch

from bebop_spec.engine.async_engine import AsyncEngine, EngineStepError
from bebop_spec.engine.config import EngineConfig
from bebop_spec.errors import InvalidRequest, WeightUpdateError
from bebop_spec.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def engine(tiny_model):
    return AsyncEngine(EngineConfig(model=str(tiny_model), mtp=str(tiny_model / "mtp")))


async def _collect(eng, prompt, params, rid):
    last = None
    async for out in eng.generate(prompt, params, rid):
        last = out
    return last


def test_stream_is_cumulative_and_finishes(engine):
    """Increments grow monotonically and the last one is finished with all tokens."""

    async def main():
        await engine.start()
        seen = []
        async for out in engine.generate([1, 2, 3], GREEDY, "a"):
            seen.append(len(out.outputs[0].token_ids))
        await engine.shutdown()
        return seen

    seen = run(main())
    assert seen == sorted(seen) and seen[-1] == 12


def test_closing_stream_aborts_request(engine):
    """Leaving the stream early frees the request (nothing keeps running)."""

    async def main():
        await engine.start()
        params = SamplingParams(max_tokens=400, ignore_eos=True)
        async for _ in engine.generate([1, 2, 3], params, "b"):
            break
        for _ in range(100):
            if engine.num_running == 0 and engine.num_waiting == 0:
                break
            await asyncio.sleep(0.01)
        running = engine.num_running + engine.num_waiting
        await engine.shutdown()
        return running

    assert run(main()) == 0


def test_weight_update_versions_and_rejection(engine):
    """A valid update bumps the version and changes greedy output; a bad one changes nothing."""

    async def main():
        await engine.start()
        before = await _collect(engine, [1, 2, 3], GREEDY, "c1")
        name = "model.norm.weight"
        shape, _ = engine.weight_spec("target")[name]
        with pytest.raises(WeightUpdateError):  # wrong shape: rejected atomically
            await engine.update_weights({name: torch.ones(shape[0] + 1)}, "target")
        with pytest.raises(WeightUpdateError):  # NaN
            await engine.update_weights({name: torch.full(shape, float("nan"))}, "target")
        assert engine.version == 0
        same = await _collect(engine, [1, 2, 3], GREEDY, "c2")
        lm = "lm_head.weight"
        new = torch.randn(engine.weight_spec("target")[lm][0]) * 0.3
        label = await engine.update_weights({lm: new}, "target", weight_version="v7")
        after = await _collect(engine, [1, 2, 3], GREEDY, "c3")
        await engine.shutdown()
        return before, same, after, label

    before, same, after, label = run(main())
    assert same.outputs[0].token_ids == before.outputs[0].token_ids
    assert label == "v7" and engine.version == 1 and engine.version_labels[1] == "v7"
    assert after.outputs[0].weight_versions == [1] * 12
    assert after.outputs[0].token_ids != before.outputs[0].token_ids


def test_pause_abort_and_resume(engine):
    """pause(abort) ends in-flight requests with finish_reason abort; resume serves again."""

    async def main():
        await engine.start()
        params = SamplingParams(max_tokens=2000, ignore_eos=True)
        task = asyncio.create_task(_collect(engine, [1, 2], params, "d"))
        await asyncio.sleep(0.2)
        await engine.pause("abort")
        aborted = await asyncio.wait_for(task, 10)
        await engine.resume()
        ok = await _collect(engine, [1, 2], GREEDY, "e")
        await engine.shutdown()
        return aborted, ok

    aborted, ok = run(main())
    assert aborted.outputs[0].finish_reason == "abort"
    assert ok.outputs[0].finish_reason == "length"


def test_retract_keeps_generating_same_tokens(engine):
    """pause(retract) mid-stream + resume recomputes the cache; greedy output is unchanged."""
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)

    async def main():
        await engine.start()
        ref = await _collect(engine, [4, 5, 6], params, "f0")
        stream = engine.generate([4, 5, 6], params, "f1")
        first = await stream.__anext__()
        await engine.pause("retract")
        retracted = engine.num_waiting
        await engine.resume()
        last = first
        async for out in stream:
            last = out
        await engine.shutdown()
        return ref, first, retracted, last

    ref, first, retracted, out = run(main())
    assert not first.finished and retracted == 1
    assert out.outputs[0].token_ids == ref.outputs[0].token_ids


def test_bad_request_and_step_failure_are_contained(engine):
    """Invalid prompts raise at the first item. A step that raises because of one request
    fails only that request (EngineStepError); a request batched with it in the same step
    completes, and the engine keeps serving."""

    async def main():
        await engine.start()
        with pytest.raises(InvalidRequest):
            await _collect(engine, [10**6], GREEDY, "g")
        original = engine.engine.runner.decode

        def poisoned(seqs, *args):
            if any(s.prompt_ids[0] == 63 for s in seqs):
                raise RuntimeError("boom")
            return original(seqs, *args)

        engine.engine.runner.decode = poisoned
        healthy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
        good = asyncio.create_task(_collect(engine, [1, 2], healthy, "h-ok"))
        bad = asyncio.create_task(_collect(engine, [63, 2], GREEDY, "h-bad"))
        with pytest.raises(EngineStepError, match="boom"):
            await bad
        ok = await good
        after = await _collect(engine, [1, 2], GREEDY, "i")
        await engine.shutdown()
        return ok, after

    ok, after = run(main())
    assert ok.outputs[0].finish_reason == "length" and len(ok.outputs[0].token_ids) == 40
    assert after.outputs[0].finish_reason == "length"
