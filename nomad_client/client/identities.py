"""The client's workload identities: each task's current token, kept in memory only, and one
scheduler that renews the identities that expire.

Tokens come with the allocations (``Alloc.GetAllocs``) or are signed on demand
(``Alloc.SignIdentities``: a task restored after an agent restart, a token past the point
where it should have been renewed). A watched identity is renewed at about half its remaining
lifetime, with jitter so that tasks started together do not renew together; a failed renewal
is retried with exponential backoff. One background task serves every watched identity and
wakes only when the earliest one is due. No token is ever logged, put in an event or
persisted here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import heapq
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

import attrs

from nomad_client.structs import models as m
from nomad_client.structs.models import TaskEvent

log = logging.getLogger(__name__)

# Renew at RENEW_AT of the remaining lifetime, give or take RENEW_JITTER of it.
RENEW_AT = 0.5
RENEW_JITTER = 0.1
# A floor on the renewal cadence, so a tiny ttl cannot turn into a busy loop.
MIN_RENEW_DELAY = 1.0
# Retries double from RETRY_BASE up to RETRY_MAX seconds, each jittered by +-RETRY_JITTER.
RETRY_BASE = 1.0
RETRY_MAX = 60.0
RETRY_JITTER = 0.2
# A signing request that hangs counts as a failure (and is retried), never stalls renewals.
SIGN_TIMEOUT = 30.0

Signer = Callable[[str, Sequence[str]], Awaitable[Mapping[str, str]]]
Deliver = Callable[[str], Awaitable[None]]
Report = Callable[[TaskEvent], None]
_Key = tuple[str, str]  # (alloc ID, task name)


class IdentityUnavailable(Exception):
    """The servers did not sign an identity that was asked for."""


def renewal_delay(remaining: float, rng: random.Random) -> float:
    """Seconds to wait before renewing an identity valid for ``remaining`` more seconds:
    about half of that, jittered; at once when it has already expired."""
    if remaining <= 0:
        return 0.0
    fraction = rng.uniform(RENEW_AT - RENEW_JITTER, RENEW_AT + RENEW_JITTER)
    return min(remaining, max(MIN_RENEW_DELAY, remaining * fraction))


def retry_delay(failures: int, rng: random.Random) -> float:
    """Seconds to wait after the ``failures``-th failed renewal in a row."""
    base = min(RETRY_MAX, RETRY_BASE * 2.0 ** min(max(failures - 1, 0), 32))
    return base * rng.uniform(1 - RETRY_JITTER, 1 + RETRY_JITTER)


def token_window(token: str) -> tuple[int, int | None]:
    """``(iat, exp)`` of a token our servers signed (``exp`` None: it never expires).

    Read without verifying the signature: the client trusts its servers and only needs to
    know when to renew. The token itself never appears in the error.
    """
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        expires = claims.get("exp")
        return int(claims["iat"]), None if expires is None else int(expires)
    except (IndexError, KeyError, TypeError, ValueError, AttributeError, binascii.Error):
        raise IdentityUnavailable("the signed identity is not a readable JWT") from None


@attrs.define(eq=False)
class _Watch:
    alloc_id: str
    task: str
    deliver: Deliver
    report: Report
    due: float = 0.0
    seq: int = -1  # matches the live heap entry; older entries for this watch are stale
    failures: int = 0

    @property
    def key(self) -> _Key:
        return (self.alloc_id, self.task)


class IdentityManager:
    """Implements ``allocrunner.hooks.WorkloadIdentities`` for the client.

    ``sign(alloc_id, tasks)`` asks the servers for fresh identities; ``clock`` (wall-clock
    seconds, the time base of the tokens' claims) and ``rng`` are injectable for tests.
    ``run()`` is the scheduler; its owner cancels and awaits it.
    """

    def __init__(self, sign: Signer, *, clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None) -> None:
        self._sign = sign
        self._clock = clock
        self._rng = rng or random.Random()
        self._tokens: dict[_Key, str] = {}
        self._watches: dict[_Key, _Watch] = {}
        # (due, seq, key); entries whose seq no longer matches their watch are skipped.
        self._heap: list[tuple[float, int, _Key]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        # When the sleeping scheduler will next wake by itself; None while it is busy.
        self._sleeping_until: float | None = None

    # ---- tokens ------------------------------------------------------------------------
    def seed(self, alloc_id: str, tokens: Mapping[str, str]) -> None:
        """Identities that came with an allocation; a task's existing one is kept."""
        for task, token in tokens.items():
            self._tokens.setdefault((alloc_id, task), token)

    async def token(self, alloc_id: str, task: str) -> str:
        key = (alloc_id, task)
        token = self._tokens.get(key)
        if token is None or self._past_renewal_point(token):
            token = (await self._sign_checked(alloc_id, [task]))[task]
            self._tokens[key] = token
        return token

    def _past_renewal_point(self, token: str) -> bool:
        issued, expires = token_window(token)
        return expires is not None and self._clock() >= issued + (expires - issued) * RENEW_AT

    async def _sign_checked(self, alloc_id: str, tasks: Sequence[str]) -> Mapping[str, str]:
        async with asyncio.timeout(SIGN_TIMEOUT):
            tokens = await self._sign(alloc_id, tasks)
        missing = [t for t in tasks if not tokens.get(t)]
        if missing:
            raise IdentityUnavailable(f"no identity was signed for task {missing[0]!r}")
        return tokens

    # ---- watching ----------------------------------------------------------------------
    def watch(self, alloc_id: str, task: str, token: str | None, *, deliver: Deliver,
              report: Report) -> None:
        expires = None if token is None else token_window(token)[1]
        if token is not None and expires is None:
            return  # nothing to renew
        watch = self._watches.get((alloc_id, task))
        if watch is None:
            watch = _Watch(alloc_id, task, deliver, report)
            self._watches[watch.key] = watch
        else:
            watch.deliver, watch.report = deliver, report
        now = self._clock()
        # No token: the task could not get one; fetching it is due at once (then retried).
        delay = 0.0 if expires is None else renewal_delay(expires - now, self._rng)
        self._schedule(watch, now + delay)

    def forget(self, alloc_id: str, task: str) -> None:
        self._watches.pop((alloc_id, task), None)
        self._tokens.pop((alloc_id, task), None)

    def forget_alloc(self, alloc_id: str) -> None:
        for key in [k for k in self._tokens if k[0] == alloc_id]:
            del self._tokens[key]
        for key in [k for k in self._watches if k[0] == alloc_id]:
            del self._watches[key]

    def next_due(self) -> float | None:
        """When the earliest watched identity is due for renewal; None if none is watched."""
        while self._heap:
            due, seq, key = self._heap[0]
            watch = self._watches.get(key)
            if watch is not None and watch.seq == seq:
                return due
            heapq.heappop(self._heap)
        return None

    def _schedule(self, watch: _Watch, due: float) -> None:
        watch.due, watch.seq = due, next(self._seq)
        heapq.heappush(self._heap, (due, watch.seq, watch.key))
        if len(self._heap) > 64 and len(self._heap) > 4 * len(self._watches):
            self._compact()
        if self._sleeping_until is not None and due < self._sleeping_until:
            self._wakeup.set()  # the scheduler sleeps past this one: wake it early

    def _compact(self) -> None:
        self._heap = [(w.due, w.seq, w.key) for w in self._watches.values() if w.seq >= 0]
        heapq.heapify(self._heap)

    # ---- the scheduler -----------------------------------------------------------------
    async def run(self) -> None:
        """Renew identities as they fall due, until cancelled."""
        while True:
            self._wakeup.clear()
            due = self.next_due()
            delay = None if due is None else due - self._clock()
            if delay is not None and delay <= 0:
                await self.renew_due()
                continue
            self._sleeping_until = math.inf if due is None else due
            try:
                async with asyncio.timeout(delay):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            finally:
                self._sleeping_until = None

    async def renew_due(self) -> None:
        """Renew every watched identity due by now: one signing request per allocation."""
        now = self._clock()
        by_alloc: dict[str, list[_Watch]] = {}
        while (due := self.next_due()) is not None and due <= now:
            _, _, key = heapq.heappop(self._heap)
            watch = self._watches[key]
            watch.seq = -1  # in flight: no heap entry until it is rescheduled
            by_alloc.setdefault(watch.alloc_id, []).append(watch)
        for alloc_id, watches in by_alloc.items():
            await self._renew(alloc_id, watches)

    async def _renew(self, alloc_id: str, watches: list[_Watch]) -> None:
        try:
            tokens = await self._sign_checked(alloc_id, [w.task for w in watches])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            for watch in watches:
                self._failed(watch, exc)
            return
        for watch in watches:
            if self._watches.get(watch.key) is not watch:
                continue  # the task stopped meanwhile
            token = tokens[watch.task]
            try:
                await watch.deliver(token)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self._failed(watch, exc)
                continue
            if self._watches.get(watch.key) is watch:
                self._tokens[watch.key] = token
                self._renewed(watch, token)

    def _renewed(self, watch: _Watch, token: str) -> None:
        if watch.failures:
            watch.failures = 0
            watch.report(TaskEvent(type=m.EVENT_HOOK_MESSAGE,
                                   display_message="Workload identity renewed"))
        _, expires = token_window(token)
        if expires is None:
            del self._watches[watch.key]  # the new identity no longer expires
            return
        now = self._clock()
        delay = renewal_delay(expires - now, self._rng)
        log.debug("alloc %s task %s: workload identity renewed; next renewal in %.1fs",
                  watch.alloc_id, watch.task, delay)
        self._schedule(watch, now + delay)

    def _failed(self, watch: _Watch, exc: BaseException) -> None:
        if self._watches.get(watch.key) is not watch:
            return  # the task stopped meanwhile: nothing to retry or report
        watch.failures += 1
        delay = retry_delay(watch.failures, self._rng)
        # Our own error messages; none carries a token.
        reason = str(exc) or type(exc).__name__
        log.warning("alloc %s task %s: renewing the workload identity failed (attempt %d, "
                    "retrying in %.1fs): %s", watch.alloc_id, watch.task, watch.failures,
                    delay, reason)
        if watch.failures == 1:  # once per streak: retries must not flood the task's events
            message = f"Workload identity renewal failed, retrying: {reason}"
            watch.report(TaskEvent(type=m.EVENT_HOOK_MESSAGE, message=message,
                                   display_message=message))
        self._schedule(watch, self._clock() + delay)
