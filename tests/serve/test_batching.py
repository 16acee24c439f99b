"""`Coalesce` (the ingress's batching of member calls) and the member's batch arithmetic, without Ray."""

import asyncio

import numpy as np
import pytest

from fedmeta.serve.batching import Coalesce, split_answers
from fedmeta.serve.schemas import MAX_BATCH


def run(coro):
    return asyncio.run(coro)


async def settle():
    """Let the tasks started so far run up to their next wait."""
    for _ in range(5):
        await asyncio.sleep(0)


class Calls:
    """A batch call that records its batches and answers each item doubled, after `release`."""

    def __init__(self, fail_on=None):
        self.batches, self.release, self.fail_on = [], asyncio.Event(), fail_on

    async def __call__(self, items):
        self.batches.append(list(items))
        await self.release.wait()
        if self.fail_on in items:
            raise ValueError(f"bad item {self.fail_on}")
        return [2 * i for i in items]


def test_a_lone_request_goes_at_once_and_waiters_go_together():
    async def main():
        calls = Calls()
        coalesce = Coalesce(calls, limit=1, max_items=16)
        first = asyncio.ensure_future(coalesce(1))
        await settle()
        assert calls.batches == [[1]]  # not held back by a timer
        rest = [asyncio.ensure_future(coalesce(i)) for i in range(2, 6)]
        await settle()
        assert calls.batches == [[1]]  # waiting for the call in flight
        calls.release.set()
        assert await asyncio.gather(first, *rest) == [2, 4, 6, 8, 10]
        assert calls.batches == [[1], [2, 3, 4, 5]] and coalesce.calls == 2

    run(main())


def test_batches_hold_at_most_max_items_and_limit_calls_fly_at_once():
    async def main():
        calls = Calls()
        coalesce = Coalesce(calls, limit=2, max_items=3)
        futures = [asyncio.ensure_future(coalesce(i)) for i in range(8)]
        await settle()
        assert calls.batches == [[0], [1]]  # two in flight at once, then the others wait
        calls.release.set()
        assert await asyncio.gather(*futures) == [2 * i for i in range(8)]
        assert all(len(b) <= 3 for b in calls.batches) and sorted(sum(calls.batches, [])) == list(range(8))

    run(main())


def test_a_failed_call_fails_its_own_items_only():
    async def main():
        calls = Calls(fail_on=3)
        coalesce = Coalesce(calls, limit=1, max_items=16)
        first = asyncio.ensure_future(coalesce(1))
        await settle()
        batch = [asyncio.ensure_future(coalesce(i)) for i in (2, 3)]
        calls.release.set()
        assert await first == 2
        results = await asyncio.gather(*batch, return_exceptions=True)
        assert all(isinstance(r, ValueError) and "bad item 3" in str(r) for r in results)
        assert await coalesce(4) == 8  # and the next call goes on

    run(main())


def test_a_request_that_left_does_not_hold_up_the_others():
    async def main():
        calls = Calls()
        coalesce = Coalesce(calls, limit=1, max_items=16)
        first = asyncio.ensure_future(coalesce(1))
        await settle()
        gone, stays = asyncio.ensure_future(coalesce(2)), asyncio.ensure_future(coalesce(3))
        await settle()
        gone.cancel()
        calls.release.set()
        assert await first == 2 and await stays == 6
        with pytest.raises(asyncio.CancelledError):
            await gone

    run(main())


def test_split_gives_each_request_its_rows():
    xs = [np.zeros((n, 4)) for n in (1, 3, 2)]
    parts = split_answers(np.arange(6 * 2).reshape(6, 2), xs)
    assert [p.shape for p in parts] == [(1, 2), (3, 2), (2, 2)] and parts[2][0].tolist() == [8, 9]
    assert MAX_BATCH >= 1
