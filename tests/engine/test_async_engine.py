"""The asyncio face: streaming, aborts on disconnect, a dead loop failing every waiter."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.async_engine import AsyncEngine
from engine.errors import (
    EngineDeadError,
    QueueTimeoutError,
    RequestRejected,
    RequestStoppedError,
    SlowConsumerError,
)
from engine.outputs import OUTPUT_BYTES
from tests.engine.helpers import greedy, make_engine, tokens

PROMPT = [1, *range(100, 120)]


async def collect(engine: AsyncEngine, rid: str, prompt=PROMPT, params=None):
    return [o async for o in engine.generate(prompt, params or greedy(12), rid)]


def test_generate_streams_tokens_and_concurrent_requests_match_alone(hf_dir):
    async def main():
        engine = AsyncEngine(lambda: make_engine(hf_dir))
        engine.start()
        await engine.wait_ready()
        alone = await collect(engine, "solo")
        together = await asyncio.gather(*(collect(engine, f"r{i}") for i in range(4)))
        await engine.shutdown()
        return alone, together

    alone, together = asyncio.run(main())
    assert len(alone) == 12 and all(len(o.new_token_ids) == 1 for o in alone)
    assert [o.finished for o in alone] == [False] * 11 + [True]
    for outs in together:
        assert tokens(outs) == tokens(alone)


def test_leaving_the_stream_aborts_and_frees_blocks(hf_dir):
    async def main():
        engine = AsyncEngine(lambda: make_engine(hf_dir))
        engine.start()
        await engine.wait_ready()
        stream = engine.generate(PROMPT, greedy(200), "gone")
        async for _ in stream:
            break  # the client disconnects after the first token
        await stream.aclose()
        blocks = engine.engine.scheduler.blocks
        deadline = time.monotonic() + 5
        while blocks.num_free_blocks != blocks.num_blocks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        steps_after = engine.engine.num_steps
        await engine.shutdown()
        return blocks.num_free_blocks == blocks.num_blocks, engine.engine.has_work, steps_after

    freed, has_work, steps = asyncio.run(main())
    assert freed and not has_work
    assert steps < 50  # stopped long before its 200 tokens


def test_rejected_request_raises_before_any_work(hf_dir):
    async def main():
        engine = AsyncEngine(lambda: make_engine(hf_dir, max_model_len=32))
        engine.start()
        await engine.wait_ready()
        with pytest.raises(RequestRejected):
            await collect(engine, "long", prompt=list(range(1, 40)))
        ok = await collect(engine, "ok", prompt=[1, 2, 3], params=greedy(4))
        await engine.shutdown()
        return ok

    assert len(asyncio.run(main())) == 4


def test_dead_loop_fails_every_waiter_promptly(hf_dir):
    async def main():
        engine = AsyncEngine(lambda: make_engine(hf_dir))
        engine.start()
        await engine.wait_ready()
        calls = 0

        def die():
            nonlocal calls
            calls += 1
            if calls == 5:
                raise SystemError("injected: the loop dies")

        engine.step_hook = die
        start = time.monotonic()
        results = await asyncio.wait_for(
            asyncio.gather(
                *(collect(engine, f"w{i}", params=greedy(100)) for i in range(3)), return_exceptions=True
            ),
            timeout=10,
        )
        elapsed = time.monotonic() - start
        assert not engine.is_healthy
        with pytest.raises(EngineDeadError):
            await collect(engine, "late")
        return results, elapsed

    results, elapsed = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) for r in results), results
    assert elapsed < 5


def test_request_not_started_within_the_bound_raises_queue_timeout(hf_dir):
    async def main():
        engine = AsyncEngine(lambda: make_engine(hf_dir, max_num_seqs=1, max_queue_time_s=0.2))
        engine.step_hook = lambda: time.sleep(0.005)  # >= 1 s for the 200 tokens of the first request
        engine.start()
        await engine.wait_ready()
        first = asyncio.create_task(collect(engine, "first", params=greedy(200)))
        await asyncio.sleep(0.05)  # "first" holds the only slot
        with pytest.raises(QueueTimeoutError, match="waited more than 0.2 s"):
            await collect(engine, "second")
        done = await first
        await engine.shutdown()
        return done, engine

    done, engine = asyncio.run(main())
    assert len(tokens(done)) == 200  # the running request was not disturbed
    assert engine.num_active_requests == 0


def test_a_reader_that_stops_reading_has_its_request_aborted_at_the_backlog_bound(hf_dir):
    """The outputs a caller leaves unread are bounded: past `max_backlog_bytes` the request is
    aborted in the engine (its blocks freed), later outputs are dropped, and the reader, if it
    comes back, gets what was kept and then `SlowConsumerError`."""
    # Fifteen plain outputs: the stalled request's 200 overflow it; the 12 of the request that
    # follows never can, however far its reader falls behind a fast engine (five could: with the
    # native CPU step the engine ran more than five steps ahead of this reader in CI runs).
    bound = 15 * OUTPUT_BYTES

    async def main():
        engine = AsyncEngine(lambda: make_engine(hf_dir), max_backlog_bytes=bound)
        engine.start()
        await engine.wait_ready()
        stream = engine.generate(PROMPT, greedy(200), "stalled")
        first = await anext(stream)  # then stop reading
        blocks = engine.engine.scheduler.blocks
        deadline = time.monotonic() + 10
        while (
            blocks.num_free_blocks != blocks.num_blocks or engine.engine.has_work
        ) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        held = engine._queues["stalled"].backlog
        kept = []
        with pytest.raises(SlowConsumerError, match=f"more than {bound} bytes"):
            async for out in stream:
                kept.append(out)
        other = await collect(engine, "next")  # the engine serves on
        await engine.shutdown()
        return first, blocks.num_free_blocks == blocks.num_blocks, held, kept, other, engine

    first, freed, held, kept, other, engine = asyncio.run(main())
    assert first.new_token_ids and freed
    assert held <= bound and len(kept) <= 15  # nothing beyond the bound was kept
    assert len(tokens(other)) == 12 and engine.num_active_requests == 0


def test_stopping_ends_every_request_and_refuses_new_ones(hf_dir):
    async def main():
        engine = AsyncEngine(lambda: make_engine(hf_dir))
        engine.step_hook = lambda: time.sleep(0.002)
        engine.start()
        await engine.wait_ready()
        running = [asyncio.create_task(collect(engine, f"r{i}", params=greedy(200))) for i in range(3)]
        await asyncio.sleep(0.2)
        count = engine.stop_requests(RequestStoppedError("the drain timed out"))
        results = await asyncio.gather(*running, return_exceptions=True)
        with pytest.raises(RequestStoppedError):
            await collect(engine, "late")
        blocks = engine.engine.scheduler.blocks
        deadline = time.monotonic() + 5
        while blocks.num_free_blocks != blocks.num_blocks and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await engine.shutdown()
        return count, results, blocks.num_free_blocks == blocks.num_blocks

    count, results, freed = asyncio.run(main())
    assert count == 3 and all(isinstance(r, RequestStoppedError) for r in results) and freed
