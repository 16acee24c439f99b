"""How concurrent requests share member calls and forward passes, and how replicas leave: the
batching limits the Member deployment and the ingress share, `Coalesce` (the ingress's batching of
member calls by what is in flight), `split_answers` (a batch's answer back as one per request), and
SHUTDOWN, the graceful-stop options of every deployment. Pure asyncio and numpy: testable without Ray.
"""

import asyncio

import numpy as np

# Replicas leave as soon as their in-flight requests are done (checked every 0.2 s, at most 10 s):
# by then the routing no longer sends them anything.
SHUTDOWN = {"graceful_shutdown_wait_loop_s": 0.2, "graceful_shutdown_timeout_s": 10.0}

# Batching. A member call costs ~5 ms of CPU in the member and ~1.5 ms in the ingress (Serve's
# routing, tracing, metrics and serialization; measured on a busy 2-core machine), a small model's
# forward pass a fraction of a ms: calls, not models, bound throughput, and an ensemble makes top_k
# calls where a single model makes one. So concurrent requests share calls: the ingress sends the
# inputs of all requests waiting for the ensemble in one call per member (`Coalesce`), and a member
# answers the calls that queued up meanwhile in one forward pass (Ray's `serve.batch`).
# At most BATCH_REQUESTS requests a call: more than are in flight at the bench's concurrency of 8,
# so one call can carry them all; more would buy little (the calls are already few) and hold more
# memory (BATCH_REQUESTS x MAX_BATCH rows, forwarded in slices of MAX_BATCH rows).
BATCH_REQUESTS = 16
# Nothing waits for company: a lone request goes at once (no latency added at low load) and the
# requests that arrive while a call is busy go together in the next. A timer does not batch at these
# rates: requests reach the ingress ~10-16 ms apart, and with a 2 ms window the ingress sent 1.1
# requests a call at concurrency 8; waiting for what is in flight, it sends ~3.
BATCH_WAIT_S = 0.0
# Member calls in flight per ingress replica and member. One makes the largest batches; with a member
# scaled to several replicas, more would let them work at once.
FAN_OUTS_IN_FLIGHT = 1


def split_answers(probs: np.ndarray, xs: list[np.ndarray]) -> list[np.ndarray]:
    """The answer to a batch of requests, back as one answer per request (`xs`: their inputs)."""
    return np.split(probs, np.cumsum([len(x) for x in xs])[:-1])


class Coalesce:
    """`await coalesce(item)` from concurrent requests, answered by calls of `batch_call(items)` (one
    result per item, in order): while `limit` calls are in flight, new items wait and go together in
    the next one (at most `max_items`). No timer: a lone item goes at once, and batches grow with the
    load. A failed call fails each of its items with the same exception. (Ray's `serve.batch` forms a
    batch by a timer, not by what is in flight.)"""

    def __init__(self, batch_call, limit: int = FAN_OUTS_IN_FLIGHT, max_items: int = BATCH_REQUESTS):
        self.batch_call, self.limit, self.max_items = batch_call, limit, max_items
        self._waiting: list[tuple[object, asyncio.Future]] = []
        self._tasks: set[asyncio.Task] = set()  # referenced: the loop keeps only weak ones
        self.in_flight = 0
        self.calls = 0

    async def __call__(self, item):
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((item, future))
        if self.in_flight < self.limit:
            self._next()
        return await future

    def _next(self) -> None:
        batch, self._waiting = self._waiting[: self.max_items], self._waiting[self.max_items :]
        self.in_flight += 1
        self.calls += 1
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[object, asyncio.Future]]) -> None:
        try:
            results = await self.batch_call([item for item, _ in batch])
            for (_, future), result in zip(batch, results):
                if not future.done():  # a cancelled request (the client left)
                    future.set_result(result)
        except asyncio.CancelledError:  # the replica is stopping
            for _, future in batch:
                future.cancel()
            raise
        except Exception as e:  # noqa: BLE001 -- handed to each waiting request, which raises it
            for _, future in batch:
                if not future.done():
                    future.set_exception(e)
        finally:
            self.in_flight -= 1
            if self._waiting:
                self._next()
