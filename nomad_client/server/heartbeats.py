"""Node heartbeats: when a client must next be heard from, and what happens when it is not
(Nomad's heartbeat timers).

A client is given a TTL each time it registers or heartbeats. The TTL grows with the number
of nodes tracked, so that the servers never have to take more than
``max_heartbeats_per_second`` heartbeats on average, never drops under ``min_ttl``, and gets a
random stagger of up to its own length so that clients started together spread out. The node
is declared missed ``grace`` seconds after its TTL ends (the grace covers a slow network or a
busy client).

One task and a heap of deadlines serve every node: a timer per node would cost a task each
for thousands of nodes. A deadline that is moved leaves its old heap entry behind, skipped
when it surfaces. The tracker runs only on the leader (``start``/``stop``); on becoming
leader every known node first gets a fresh full TTL plus grace, so that no client is
declared missed for the time nobody was tracking it.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_MIN_TTL = 10.0
DEFAULT_MAX_PER_SECOND = 50.0
DEFAULT_GRACE = 10.0

OnExpire = Callable[[str], Awaitable[None]]
Sleep = Callable[[float], Awaitable[None]]


def scaled_ttl(nodes: int, min_ttl: float, max_per_second: float) -> float:
    """The TTL that keeps ``nodes`` heartbeats within ``max_per_second`` (at least
    ``min_ttl``), before stagger."""
    if max_per_second <= 0:
        return min_ttl
    return max(min_ttl, nodes / max_per_second)


class HeartbeatTracker:
    """Deadlines of the nodes' heartbeats; ``on_expire(node_id)`` runs (in the tracker's
    task, one at a time) when a deadline passes. ``clock`` (monotonic seconds) and ``sleep``
    are injectable so that a test drives time itself."""

    def __init__(self, on_expire: OnExpire, *, min_ttl: float = DEFAULT_MIN_TTL,
                 max_per_second: float = DEFAULT_MAX_PER_SECOND,
                 grace: float = DEFAULT_GRACE,
                 clock: Callable[[], float] = time.monotonic, sleep: Sleep = asyncio.sleep,
                 rng: random.Random | None = None) -> None:
        self._on_expire = on_expire
        self.min_ttl = min_ttl
        self.max_per_second = max_per_second
        self.grace = grace
        self._clock = clock
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._deadlines: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None

    def __len__(self) -> int:
        return len(self._deadlines)

    def deadline(self, node_id: str) -> float | None:
        """When ``node_id`` is declared missed (on the tracker's clock), if it is tracked."""
        return self._deadlines.get(node_id)

    def next_ttl(self) -> float:
        """A TTL for the next heartbeat, stagger included."""
        ttl = scaled_ttl(len(self._deadlines), self.min_ttl, self.max_per_second)
        return ttl + self._rng.uniform(0, ttl)

    def reset(self, node_id: str) -> float:
        """The node was heard from: its new TTL (what the client is told). Tracked only while
        the tracker runs; otherwise the TTL is still computed, for the reply."""
        ttl = self.next_ttl()
        if self.running:
            self._set(node_id, ttl + self.grace)
        return ttl

    def schedule(self, node_id: str, delay: float) -> None:
        """Call ``on_expire(node_id)`` again in ``delay`` seconds unless a heartbeat comes
        first (a node whose allocations are disconnected for a while)."""
        if self.running:
            self._set(node_id, delay)

    def forget(self, node_id: str) -> None:
        self._deadlines.pop(node_id, None)

    def start(self, node_ids: Iterable[str]) -> None:
        """Begin tracking (on becoming leader): every one of ``node_ids`` gets a full TTL
        plus grace from now."""
        if self._task is not None:
            return
        ids = list(node_ids)
        base = scaled_ttl(len(ids), self.min_ttl, self.max_per_second)
        now = self._clock()
        for node_id in ids:
            self._deadlines[node_id] = now + base + self.grace
        self._heap = [(d, n) for n, d in self._deadlines.items()]
        heapq.heapify(self._heap)
        self._task = asyncio.get_running_loop().create_task(self._run(),
                                                            name="heartbeat-tracker")

    async def stop(self) -> None:
        """Stop tracking (leadership lost, or shutdown); every deadline is dropped."""
        task, self._task = self._task, None
        self._deadlines.clear()
        self._heap.clear()
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    # ---- internals -------------------------------------------------------------------------
    def _set(self, node_id: str, delay: float) -> None:
        deadline = self._clock() + delay
        self._deadlines[node_id] = deadline
        earliest = self._heap[0][0] if self._heap else None
        heapq.heappush(self._heap, (deadline, node_id))
        if earliest is None or deadline < earliest:
            self._wake.set()  # the loop sleeps toward a later deadline
        # A heap of stale entries (every heartbeat leaves one) is rebuilt from the live ones.
        if len(self._heap) > 2 * len(self._deadlines) + 64:
            self._heap = [(d, n) for n, d in self._deadlines.items()]
            heapq.heapify(self._heap)

    def _pop_due(self, now: float) -> list[str]:
        due = []
        while self._heap and self._heap[0][0] <= now:
            deadline, node_id = heapq.heappop(self._heap)
            if self._deadlines.get(node_id) == deadline:
                del self._deadlines[node_id]
                due.append(node_id)
        return due

    def _next_delay(self) -> float | None:
        while self._heap and self._deadlines.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)  # stale
        return None if not self._heap else max(self._heap[0][0] - self._clock(), 0.0)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            for node_id in self._pop_due(self._clock()):
                try:
                    await self._on_expire(node_id)
                except Exception:
                    # One node's failure must not end liveness tracking for all the others.
                    log.exception("handling the missed heartbeat of node %s failed", node_id)
            await self._nap(self._next_delay())

    async def _nap(self, seconds: float | None) -> None:
        """Until ``seconds`` pass (None: until woken) or an earlier deadline is set."""
        waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(self._wake.wait())]
        if seconds is not None:
            waits.append(asyncio.ensure_future(self._sleep(seconds)))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            # Cancelled, or closed with the tracker never stopped: no awaiting here (a
            # coroutine being closed must not), the waiters end on their own once cancelled.
            for waiting in waits:
                waiting.cancel()
            raise
        for waiting in waits:
            waiting.cancel()
        await asyncio.gather(*waits, return_exceptions=True)
