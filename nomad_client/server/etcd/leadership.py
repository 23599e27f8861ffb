"""Server membership and leader election on etcd.

Each server holds one lease, refreshed in the background. Under it, the server registers
``<prefix>servers/<id>`` (msgpack of its info) and campaigns for ``<prefix>leader``: a
transaction puts its ID there on its lease if the key is absent. The key, and so the
leadership, goes away when the leader resigns or its lease ends; every server watches it and
campaigns again then. Membership is the set of ``servers/`` keys, kept current by a watch.

Fencing: a leader that cannot refresh its lease steps down (``on_loss``) once
``ttl - margin`` has passed since the last refresh it sent that succeeded, even when etcd is out
of reach. etcd cannot expire the lease before ``ttl`` after that refresh arrived, so the old
leader has stopped before any other server can win. Leader-only writes add ``fence()`` to
their transaction's compares, so a write of a leader that was deposed meanwhile fails in etcd.

One task calls ``on_gain`` and ``on_loss``: they never overlap and alternate, starting with
``on_gain``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import msgpack

from nomad_client.server.etcd.client import (
    KV,
    Compacted,
    Compare,
    EtcdClient,
    EtcdError,
    LeaseExpired,
    absent,
    mod_revision_equals,
    op_get,
    op_put,
)

__all__ = ["Leadership"]

log = logging.getLogger(__name__)

_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 2.0


class Leadership:
    def __init__(self, client: EtcdClient, *, server_id: str, info: Mapping[str, Any],
                 ttl: int = 10, on_gain: Callable[[], Awaitable[None]],
                 on_loss: Callable[[], Awaitable[None]],
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl < 2:
            raise ValueError("the leader lease TTL must be at least 2 seconds")
        if not server_id or "/" in server_id:
            raise ValueError(f"invalid server ID {server_id!r}")
        self._client = client
        self.server_id = server_id
        self._id = server_id.encode()
        self._info = msgpack.packb(dict(info), use_bin_type=True)
        self._ttl = ttl
        # Step down this long before etcd could expire the lease (clock drift, slow hooks).
        self._margin = max(1.0, ttl / 3)
        # Three refresh attempts fit in the fencing window.
        self._refresh_every = (ttl - self._margin) / 3
        self._on_gain = on_gain
        self._on_loss = on_loss
        self._clock = clock

        self._leader_key = client.key("leader")
        self._member_key = client.key("servers", server_id)
        self._members_prefix = client.key("servers", "")

        self.leader_id: str | None = None
        self._members: dict[str, dict[str, Any]] = {}
        self._lease: int | None = None
        self._registered = False
        self._last_refresh = float("-inf")
        # The leader key's mod revision while this server holds it, else None.
        self._won_revision: int | None = None
        # The highest revision the leader key's state was learnt at (drops stale events).
        self._leader_seen = 0
        # Whether on_gain was delivered and on_loss not yet.
        self._acting = False

        self._wake = asyncio.Event()  # the driver re-evaluates
        self._vacant = asyncio.Event()  # the session loop campaigns
        self._driver: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._started = False

    # -- public ----------------------------------------------------------------------------

    @property
    def is_leader(self) -> bool:
        """Whether this server acts as leader now (on_gain delivered) and may still do so."""
        return self._acting and self._holds()

    def leader(self) -> dict[str, Any] | None:
        """The current leader's registered info (None: no leader, or not registered)."""
        return None if self.leader_id is None else self._members.get(self.leader_id)

    def members(self) -> list[dict[str, Any]]:
        """Every live server's registered info, in server ID order."""
        return [self._members[k] for k in sorted(self._members)]

    def member_ids(self) -> list[str]:
        return sorted(self._members)

    def fence(self) -> Compare:
        """A compare that holds only while this server holds the leader key it won: leader-only
        transactions add it. Never holds when this server does not lead."""
        won = self._won_revision if self._holds() else None
        # mod revision -1 matches no key, present or absent.
        return mod_revision_equals(self._leader_key, -1 if won is None else won)

    async def start(self) -> None:
        """Register this server and campaign; raises EtcdError when etcd cannot be reached (and
        leaves nothing behind). Leadership then runs in background tasks until close()."""
        if self._started:
            raise RuntimeError("Leadership already started")
        self._started = True
        try:
            await self._open_session()
            members, members_rev = await self._client.get_prefix(self._members_prefix)
            self._members = {}
            for kv in members:
                self._apply_member(kv, deleted=False)
            leader_rows, leader_rev = await self._client.get_prefix(self._leader_key)
            self._apply_leader(_exact(leader_rows, self._leader_key), leader_rev)
            await self._campaign()
        except BaseException:
            await self._abandon_session()
            raise
        self._driver = asyncio.create_task(self._drive(), name=f"leadership-{self.server_id}")
        self._tasks = [
            asyncio.create_task(self._session_loop(), name="leadership-session"),
            asyncio.create_task(self._watch(self._members_prefix, members_rev, self._load_members,
                                            self._member_events), name="leadership-members"),
            asyncio.create_task(self._watch(self._leader_key, leader_rev, self._load_leader,
                                            self._leader_events), name="leadership-leader"),
        ]
        self._wake.set()

    async def close(self) -> None:
        """Resign: on_loss if leading, then revoke the lease (deleting this server's keys, so
        another server takes over at once), and stop every task."""
        if self._closing:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        self._won_revision = None
        if self._driver is not None:
            self._wake.set()
            await self._driver
            self._driver = None
        await self._abandon_session()

    # -- leadership state ------------------------------------------------------------------

    def _fresh(self) -> bool:
        return self._clock() - self._last_refresh < self._ttl - self._margin

    def _holds(self) -> bool:
        return self._lease is not None and self._won_revision is not None and self._fresh()

    async def _drive(self) -> None:
        """Deliver on_gain/on_loss as the state changes, one at a time, in order."""
        try:
            while not self._closing:
                self._wake.clear()
                holds = self._holds()
                if holds != self._acting:
                    self._acting = holds
                    if holds:
                        log.info("server %s: leadership gained", self.server_id)
                        await self._hook(self._on_gain, "on_gain")
                    else:
                        log.warning("server %s: leadership lost", self.server_id)
                        await self._hook(self._on_loss, "on_loss")
                    continue
                timeout = None
                if self._acting:
                    # Wake at the fencing deadline even if nothing else happens.
                    deadline = self._last_refresh + self._ttl - self._margin
                    timeout = max(0.0, deadline - self._clock())
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
        finally:
            if self._acting:
                self._acting = False
                log.info("server %s: leadership given up", self.server_id)
                await self._hook(self._on_loss, "on_loss")

    async def _hook(self, hook: Callable[[], Awaitable[None]], name: str) -> None:
        try:
            await hook()
        except Exception:
            log.exception("server %s: leadership %s failed", self.server_id, name)

    # -- session: lease, registration, campaign --------------------------------------------

    async def _open_session(self) -> None:
        if self._lease is None:
            sent = self._clock()
            self._lease = await self._client.lease_grant(self._ttl)
            self._last_refresh = sent
            self._registered = False
        if not self._registered:
            # Same key, same value: a put whose outcome was unknown is safe to repeat.
            await self._client.put(self._member_key, self._info, lease=self._lease)
            self._registered = True
            self._vacant.set()

    def _drop_session(self) -> None:
        self._lease = None
        self._registered = False
        self._won_revision = None
        self._wake.set()

    async def _abandon_session(self) -> None:
        lease, self._lease = self._lease, None
        self._registered = False
        self._won_revision = None
        if lease is None:
            return
        try:
            await self._client.lease_revoke(lease)
        except EtcdError as exc:
            # It expires by itself within its TTL.
            log.warning("server %s: could not revoke its lease: %s", self.server_id, exc)

    async def _campaign(self) -> None:
        lease = self._lease
        if lease is None:
            return
        self._vacant.clear()
        try:
            res = await self._client.txn(
                [absent(self._leader_key)],
                [op_put(self._leader_key, self._id, lease)],
                [op_get(self._leader_key)])
        except BaseException:
            # Try again (a win whose answer was lost shows as our key on our lease).
            self._vacant.set()
            raise
        if res.succeeded:
            self._apply_leader(KV(self._leader_key, self._id, res.revision, res.revision, lease),
                               res.revision)
        else:
            self._apply_leader(_exact(res.responses[0], self._leader_key), res.revision)

    async def _session_loop(self) -> None:
        backoff = _BACKOFF_MIN
        failing = False
        while True:
            try:
                await self._open_session()
                if self._vacant.is_set():
                    await self._campaign()
                wait = self._last_refresh + self._refresh_every - self._clock()
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(wait):
                            await self._vacant.wait()
                    continue
                await self._refresh()
                if failing:
                    log.info("server %s: etcd answers again", self.server_id)
                failing = False
                backoff = _BACKOFF_MIN
            except LeaseExpired:
                log.warning("server %s: its lease expired; registering again", self.server_id)
                self._drop_session()
            except EtcdError as exc:
                (log.debug if failing else log.warning)(
                    "server %s: etcd: %s; retrying", self.server_id, exc)
                failing = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX, self._refresh_every)

    async def _refresh(self) -> None:
        lease = self._lease
        if lease is None:
            return
        sent = self._clock()
        await self._client.lease_refresh(lease, timeout=max(1.0, self._refresh_every))
        if self._lease == lease:
            self._last_refresh = sent
            # A leader that stepped down while etcd was out of reach may lead again.
            self._wake.set()

    # -- watches ---------------------------------------------------------------------------

    async def _watch(self, prefix: bytes, revision: int, load: Callable[[], Awaitable[int]],
                     apply: Callable[[int, list[Any]], None]) -> None:
        """Follow ``prefix`` from ``revision`` + 1; reload when etcd compacted past it."""
        backoff = _BACKOFF_MIN
        while True:
            try:
                if revision == 0:
                    revision = await load()
                async with contextlib.aclosing(
                        self._client.watch_prefix(prefix, revision + 1)) as events:
                    async for rev, evs in events:
                        apply(rev, evs)
                        revision = rev
                        backoff = _BACKOFF_MIN
            except Compacted:
                revision = 0
            except EtcdError as exc:
                log.warning("server %s: etcd watch: %s; retrying", self.server_id, exc)
                revision = 0
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)

    async def _load_members(self) -> int:
        rows, rev = await self._client.get_prefix(self._members_prefix)
        self._members = {}
        for kv in rows:
            self._apply_member(kv, deleted=False)
        return rev

    def _member_events(self, revision: int, events: list[Any]) -> None:
        for ev in events:
            self._apply_member(ev.kv, deleted=ev.kind == "delete")

    def _apply_member(self, kv: KV, *, deleted: bool) -> None:
        server_id = kv.key[len(self._members_prefix):].decode(errors="replace")
        if deleted:
            self._members.pop(server_id, None)
            return
        try:
            info = msgpack.unpackb(kv.value, raw=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            info = None
        if not isinstance(info, dict):
            log.warning("server registration %r is not a map; ignored", server_id)
            return
        self._members[server_id] = info

    async def _load_leader(self) -> int:
        rows, rev = await self._client.get_prefix(self._leader_key)
        self._apply_leader(_exact(rows, self._leader_key), rev)
        return rev

    def _leader_events(self, revision: int, events: list[Any]) -> None:
        for ev in events:
            if ev.kv.key == self._leader_key:
                self._apply_leader(None if ev.kind == "delete" else ev.kv, revision)

    def _apply_leader(self, kv: KV | None, revision: int) -> None:
        """The leader key as of ``revision`` (None: absent)."""
        if revision < self._leader_seen:
            return  # older than what a campaign already told
        self._leader_seen = revision
        if kv is None:
            self.leader_id = None
            self._won_revision = None
            self._vacant.set()
        else:
            self.leader_id = kv.value.decode(errors="replace")
            ours = kv.value == self._id and self._lease is not None and kv.lease == self._lease
            self._won_revision = kv.mod_revision if ours else None
        self._wake.set()


def _exact(rows: list[KV], key: bytes) -> KV | None:
    return next((kv for kv in rows if kv.key == key), None)
