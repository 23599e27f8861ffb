"""An asyncio etcd v3 client for the servers' cluster mode: KV, transactions, watches and leases,
with failover across the cluster's members.

It speaks etcd's gRPC API through the generated stubs of the ``aetcd`` package, on channels it
manages itself (one per endpoint, TLS when configured), so that it chooses which member answers:
a request goes to the current endpoint and moves on to the next one when that one cannot be
reached or has lost its raft leader. Reads, lease grants, refreshes and revocations are retried
on another member within the request's deadline. A put, delete or transaction is retried only
when it cannot have been sent (or etcd refused it before proposing it): a blind retry of a write
whose first attempt did land would apply it twice, so otherwise it raises EtcdUnavailable and
leaves the decision to the caller.

``aetcd`` (and with it grpc, ~17 MiB per process) is imported only when a client connects:
client-only agents import this module's value types without paying for it.

Error messages name the operation and etcd's reason, never a value.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

import attrs

__all__ = [
    "KV",
    "Compacted",
    "Compare",
    "EtcdClient",
    "EtcdError",
    "EtcdSettings",
    "EtcdTLS",
    "EtcdUnavailable",
    "LeaseExpired",
    "Op",
    "TxnResult",
    "WatchEvent",
    "absent",
    "mod_revision_equals",
    "op_delete",
    "op_get",
    "op_put",
    "value_equals",
]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Every request asks the member to refuse it at once when it has no raft leader (rather than
# time out): the refusal comes before any proposal, so even a write may then go elsewhere.
_REQUIRE_LEADER = (("hasleader", "true"),)
# Rows per page of get_prefix; pages are read at one pinned revision, so they are consistent.
_PAGE = 1000
# A whole-state read can be large; gRPC's default 4 MiB receive limit is not a limit etcd has.
_MAX_RECEIVE = 512 * 1024 * 1024
_DEFAULT_PORT = 2379
# Retry pauses once every endpoint failed in a row, and between watch reconnections.
_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 1.0


class EtcdError(Exception):
    """An etcd request failed. Messages name the operation and reason, never a value."""


class EtcdUnavailable(EtcdError):
    """No endpoint answered in time, or a write's outcome is unknown."""


class LeaseExpired(EtcdError):
    """The lease is gone (expired or revoked); its keys are deleted."""


class Compacted(EtcdError):
    """A watch or read asked for a revision etcd no longer keeps."""

    def __init__(self, message: str, compact_revision: int = 0) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


def _endpoint(value: str) -> str:
    text = value.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    if not text:
        raise ValueError(f"invalid etcd endpoint {value!r}")
    # "host" alone: etcd's client port. "[v6]" and "host:port" keep theirs.
    if text.startswith("["):
        return text if "]:" in text else f"{text}:{_DEFAULT_PORT}"
    return text if ":" in text else f"{text}:{_DEFAULT_PORT}"


def _endpoints(values: Sequence[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        values = [values]
    endpoints = tuple(_endpoint(v) for v in values)
    if not endpoints:
        raise ValueError("etcd needs at least one endpoint")
    return endpoints


def _prefix(value: str) -> str:
    return value if value.endswith("/") else value + "/"


@attrs.frozen
class EtcdTLS:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


@attrs.frozen
class EtcdSettings:
    # "host:port"; an http:// or https:// prefix is tolerated and stripped.
    endpoints: tuple[str, ...] = attrs.field(converter=_endpoints)
    # Every key this agent writes starts with it (several clusters may share one etcd).
    prefix: str = attrs.field(default="/nomad/", converter=_prefix)
    tls: EtcdTLS | None = None
    dial_timeout: float = 5.0
    request_timeout: float = 10.0


@attrs.frozen
class KV:
    key: bytes
    value: bytes = attrs.field(repr=False)
    create_revision: int
    mod_revision: int
    lease: int


@attrs.frozen
class WatchEvent:
    kind: str  # "put" | "delete"
    # For a delete: value b"" and mod_revision the deletion's revision.
    kv: KV


@attrs.frozen
class TxnResult:
    succeeded: bool
    revision: int
    # One list per op of the branch that ran: the rows of a get, [] for a put or delete.
    responses: list[list[KV]]


@attrs.frozen
class Compare:
    key: bytes
    target: str  # "value" | "mod" | "create"
    value: bytes | int = attrs.field(repr=False)


@attrs.frozen
class Op:
    kind: str  # "put" | "delete" | "get"
    key: bytes
    value: bytes = attrs.field(default=b"", repr=False)
    lease: int | None = None


def value_equals(key: bytes, value: bytes) -> Compare:
    return Compare(key, "value", value)


def mod_revision_equals(key: bytes, revision: int) -> Compare:
    return Compare(key, "mod", revision)


def absent(key: bytes) -> Compare:
    # A key that does not exist has create_revision 0.
    return Compare(key, "create", 0)


def op_put(key: bytes, value: bytes, lease: int | None = None) -> Op:
    return Op("put", key, value, lease)


def op_delete(key: bytes) -> Op:
    return Op("delete", key)


def op_get(key: bytes) -> Op:
    return Op("get", key)


def prefix_end(prefix: bytes) -> bytes:
    """The range end that covers every key starting with ``prefix`` (b"\\x00": all keys)."""
    b = bytearray(prefix)
    while b:
        if b[-1] < 0xFF:
            b[-1] += 1
            return bytes(b)
        b.pop()
    return b"\x00"


def _rpc() -> Any:
    import aetcd.rpc

    return aetcd.rpc


def _kv(msg: Any) -> KV:
    return KV(bytes(msg.key), bytes(msg.value), msg.create_revision, msg.mod_revision, msg.lease)


class _Backoff:
    def __init__(self) -> None:
        self.delay = _BACKOFF_MIN

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, _BACKOFF_MAX)
        return delay

    def reset(self) -> None:
        self.delay = _BACKOFF_MIN


class _Endpoint:
    """One member's channel and stubs, made on first use."""

    def __init__(self, target: str, channel: Any) -> None:
        rpc = _rpc()
        self.target = target
        self.channel = channel
        self.kv = rpc.KVStub(channel)
        self.lease = rpc.LeaseStub(channel)
        self.watch = rpc.WatchStub(channel)
        self.maintenance = rpc.MaintenanceStub(channel)


def _error_kind(exc: Any) -> str:
    """How to treat a gRPC error: "unsent" (safe to retry anything elsewhere), "unavailable"
    (retry reads elsewhere; a write's outcome is unknown), "timeout", or "fatal"."""
    import grpc

    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        if "no leader" in details or "failed to connect" in details:
            return "unsent"
        return "unavailable"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout"
    if code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL):
        # A closed or reset connection surfaces as these on some paths.
        return "unavailable"
    return "fatal"


def _translate(name: str, exc: Any) -> EtcdError:
    import grpc

    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseExpired(f"etcd {name}: lease not found (expired or revoked)")
    if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in details:
        return Compacted(f"etcd {name}: {details}")
    return EtcdError(f"etcd {name}: {code.name}: {details}")


class EtcdClient:
    """See the module docstring. Make one with ``await EtcdClient.connect(settings)``."""

    def __init__(self, settings: EtcdSettings, credentials: Any) -> None:
        self.settings = settings
        self._credentials = credentials
        self._endpoints: list[_Endpoint | None] = [None] * len(settings.endpoints)
        self._current = 0
        self._closed = False

    @classmethod
    async def connect(cls, settings: EtcdSettings) -> EtcdClient:
        """A client whose first endpoint that answers within dial_timeout is current.

        Raises EtcdUnavailable when none does, EtcdError when the TLS files cannot be read."""
        credentials = await asyncio.to_thread(_credentials, settings)
        client = cls(settings, credentials)
        try:
            rpc = _rpc()
            await client._call(
                "status",
                lambda ep, t: ep.maintenance.Status(
                    rpc.StatusRequest(), timeout=t, metadata=_REQUIRE_LEADER),
                retry=True,
                timeout=settings.dial_timeout,
            )
        except BaseException:
            await client.close()
            raise
        return client

    @property
    def current_endpoint(self) -> str:
        """The endpoint requests go to now."""
        return self.settings.endpoints[self._current]

    def key(self, *parts: str) -> bytes:
        return (self.settings.prefix + "/".join(parts)).encode()

    # -- KV --------------------------------------------------------------------------------

    async def get(self, key: bytes) -> KV | None:
        rpc = _rpc()
        req = rpc.RangeRequest(key=key)
        resp = await self._call(
            "get", lambda ep, t: ep.kv.Range(req, timeout=t, metadata=_REQUIRE_LEADER),
            retry=True)
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_prefix(self, prefix: bytes) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (in key order) and the revision they were read at: a
        linearizable read, in pages pinned to the first page's revision."""
        for _ in range(3):
            try:
                return await self._get_prefix_once(prefix)
            except Compacted:
                # The pinned revision was compacted between two pages: read again, anew.
                continue
        raise EtcdError("etcd get: the prefix kept being compacted while read")

    async def _get_prefix_once(self, prefix: bytes) -> tuple[list[KV], int]:
        rpc = _rpc()
        end = prefix_end(prefix)
        rows: list[KV] = []
        revision = 0
        start = prefix
        while True:
            req = rpc.RangeRequest(key=start, range_end=end, limit=_PAGE, revision=revision)
            resp = await self._call("get", _range(req), retry=True)
            if revision == 0:
                revision = resp.header.revision
            rows.extend(_kv(m) for m in resp.kvs)
            if not resp.more or not resp.kvs:
                return rows, revision
            start = bytes(resp.kvs[-1].key) + b"\x00"

    async def put(self, key: bytes, value: bytes, *, lease: int | None = None) -> int:
        rpc = _rpc()
        req = rpc.PutRequest(key=key, value=value, lease=lease or 0)
        resp = await self._call(
            "put", lambda ep, t: ep.kv.Put(req, timeout=t, metadata=_REQUIRE_LEADER),
            retry=False)
        return int(resp.header.revision)

    async def delete(self, key: bytes) -> int:
        rpc = _rpc()
        req = rpc.DeleteRangeRequest(key=key)
        resp = await self._call(
            "delete", lambda ep, t: ep.kv.DeleteRange(req, timeout=t, metadata=_REQUIRE_LEADER),
            retry=False)
        return int(resp.header.revision)

    async def txn(self, compares: Sequence[Compare], success: Sequence[Op],
                  failure: Sequence[Op] = ()) -> TxnResult:
        rpc = _rpc()
        req = rpc.TxnRequest(
            compare=[_compare_msg(rpc, c) for c in compares],
            success=[_op_msg(rpc, o) for o in success],
            failure=[_op_msg(rpc, o) for o in failure],
        )
        resp = await self._call(
            "txn", lambda ep, t: ep.kv.Txn(req, timeout=t, metadata=_REQUIRE_LEADER),
            retry=False)
        responses: list[list[KV]] = []
        for r in resp.responses:
            if r.WhichOneof("response") == "response_range":
                responses.append([_kv(m) for m in r.response_range.kvs])
            else:
                responses.append([])
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), responses)

    # -- watch -----------------------------------------------------------------------------

    async def watch_prefix(self, prefix: bytes, start_revision: int
                           ) -> AsyncGenerator[tuple[int, list[WatchEvent]], None]:
        """Yield ``(revision, events)`` for every revision >= start_revision that changed a key
        under ``prefix``, in order, all events of a revision together.

        A lost connection or member is resumed on another endpoint from the revision after the
        last one yielded, so nothing is missed or repeated; it retries until cancelled. Raises
        Compacted when the revision to resume from is no longer kept (the caller re-reads).
        Close it (``contextlib.aclosing``) or cancel the task iterating it to end the stream."""
        rpc = _rpc()
        end = prefix_end(prefix)
        next_rev = start_revision
        backoff = _Backoff()
        while True:
            ep = await self._ready_endpoint()
            call = ep.watch.Watch(metadata=_REQUIRE_LEADER)
            try:
                await call.write(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
                    key=prefix, range_end=end, start_revision=next_rev)))
                while True:
                    resp = await call.read()
                    if resp is _eof():
                        break
                    if resp.compact_revision:
                        raise Compacted(
                            f"etcd watch: revision {next_rev} is compacted "
                            f"(oldest kept: {resp.compact_revision})", resp.compact_revision)
                    if resp.canceled:
                        # E.g. the member lost its leader: resume elsewhere.
                        log.debug("etcd watch cancelled by %s: %s", ep.target,
                                  resp.cancel_reason)
                        break
                    if resp.created:
                        backoff.reset()
                    for revision, events in _by_revision(resp.events):
                        if revision < next_rev:
                            continue  # already yielded before a reconnection
                        next_rev = revision + 1
                        yield revision, events
            except EtcdError:
                raise
            except Exception as exc:
                if not hasattr(exc, "code"):
                    raise
                if _error_kind(exc) == "fatal":
                    raise _translate("watch", exc) from None
                log.debug("etcd watch on %s lost (%s); resuming at revision %d",
                          ep.target, exc.code().name, next_rev)
            finally:
                call.cancel()
            self._rotate(ep)
            await asyncio.sleep(backoff.next())

    # -- leases ----------------------------------------------------------------------------

    async def lease_grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds. Retried like a read: a grant whose answer was lost
        leaves a lease without keys that simply expires."""
        rpc = _rpc()
        req = rpc.LeaseGrantRequest(TTL=ttl)
        resp = await self._call(
            "lease grant", lambda ep, t: ep.lease.LeaseGrant(
                req, timeout=t, metadata=_REQUIRE_LEADER),
            retry=True)
        if resp.error:
            raise EtcdError(f"etcd lease grant: {resp.error}")
        return int(resp.ID)

    async def lease_refresh(self, lease_id: int, *, timeout: float | None = None) -> float:
        """Renew the lease; its remaining TTL in seconds. Raises LeaseExpired when it is gone.
        ``timeout`` bounds this call (default: request_timeout)."""
        rpc = _rpc()

        async def once(ep: _Endpoint, t: float) -> Any:
            call = ep.lease.LeaseKeepAlive(timeout=t, metadata=_REQUIRE_LEADER)
            try:
                await call.write(rpc.LeaseKeepAliveRequest(ID=lease_id))
                resp = await call.read()
            finally:
                call.cancel()
            if resp is _eof():
                raise EtcdUnavailable("etcd lease refresh: the stream ended without an answer")
            return resp

        resp = await self._call("lease refresh", once, retry=True, timeout=timeout)
        if resp.TTL <= 0:
            raise LeaseExpired("etcd lease refresh: lease not found (expired or revoked)")
        return float(resp.TTL)

    async def lease_revoke(self, lease_id: int) -> None:
        """Revoke the lease and delete its keys; a lease already gone is fine."""
        rpc = _rpc()
        req = rpc.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(
                "lease revoke", lambda ep, t: ep.lease.LeaseRevoke(
                    req, timeout=t, metadata=_REQUIRE_LEADER),
                retry=True)
        except LeaseExpired:
            return

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        endpoints = [ep for ep in self._endpoints if ep is not None]
        self._endpoints = [None] * len(self._endpoints)
        for ep in endpoints:
            await ep.channel.close()

    # -- plumbing --------------------------------------------------------------------------

    def _endpoint_at(self, index: int) -> _Endpoint:
        if self._closed:
            raise EtcdError("etcd client is closed")
        ep = self._endpoints[index]
        if ep is None:
            ep = _Endpoint(self.settings.endpoints[index], self._open_channel(index))
            self._endpoints[index] = ep
        return ep

    def _open_channel(self, index: int) -> Any:
        import grpc

        target = self.settings.endpoints[index]
        options = [
            ("grpc.max_receive_message_length", _MAX_RECEIVE),
            # Notice a member that vanished without closing the connection (host down).
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 0),
            # Come back to a restarted member within seconds, not gRPC's default two minutes.
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.min_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2_000),
        ]
        if self._credentials is None:
            return grpc.aio.insecure_channel(target, options=options)
        return grpc.aio.secure_channel(target, self._credentials, options=options)

    def _rotate(self, ep: _Endpoint) -> None:
        """Move on from ``ep`` unless another caller already did."""
        if self._endpoints[self._current] is ep and len(self._endpoints) > 1:
            self._current = (self._current + 1) % len(self._endpoints)
            log.debug("etcd: moving from %s (%s) to %s", ep.target,
                      ep.channel.get_state(try_to_connect=False).name, self.current_endpoint)

    async def _ready(self, ep: _Endpoint, timeout: float) -> bool:
        """Whether ep's channel is connected, waiting at most ``timeout`` while it connects;
        False at once when its last attempt failed (gRPC is backing off)."""
        import grpc

        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            state = ep.channel.get_state(try_to_connect=True)
            if state == grpc.ChannelConnectivity.READY:
                return True
            if state in (grpc.ChannelConnectivity.TRANSIENT_FAILURE,
                         grpc.ChannelConnectivity.SHUTDOWN):
                return False
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation.
                async with asyncio.timeout(remaining):
                    await ep.channel.wait_for_state_change(state)
            except TimeoutError:
                return False

    async def _ready_endpoint(self) -> _Endpoint:
        """A connected endpoint, waiting (with backoff) as long as it takes."""
        backoff = _Backoff()
        failed = 0
        while True:
            ep = self._endpoint_at(self._current)
            if await self._ready(ep, self.settings.dial_timeout):
                return ep
            self._rotate(ep)
            failed += 1
            if failed % len(self._endpoints) == 0:
                await asyncio.sleep(backoff.next())

    async def _call(self, name: str, attempt: Callable[[_Endpoint, float], Awaitable[_T]], *,
                    retry: bool, timeout: float | None = None) -> _T:
        """Run ``attempt`` on a connected endpoint, moving on to the next endpoint when one
        cannot be reached. ``retry``: the request may run twice (reads, leases); otherwise only
        a request that was surely not applied is tried again. Bounded by ``timeout``."""
        loop = asyncio.get_running_loop()
        limit = self.settings.request_timeout if timeout is None else timeout
        deadline = loop.time() + limit
        backoff = _Backoff()
        failed = 0
        reason = "no endpoint could be reached"
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise EtcdUnavailable(f"etcd {name}: no answer within {limit:g}s ({reason})")
            ep = self._endpoint_at(self._current)
            if not await self._ready(ep, min(remaining, self.settings.dial_timeout)):
                self._rotate(ep)
                failed += 1
                if failed % len(self._endpoints) == 0:
                    # Every endpoint failed in a row: let them come back before the next round.
                    await asyncio.sleep(min(backoff.next(), max(0.0, deadline - loop.time())))
                continue
            try:
                return await attempt(ep, remaining)
            except EtcdError:
                raise
            except Exception as failure:
                if not hasattr(failure, "code"):
                    raise
                exc: Any = failure
                kind = _error_kind(exc)
                if kind == "fatal":
                    raise _translate(name, exc) from None
                if kind == "timeout":
                    raise EtcdUnavailable(
                        f"etcd {name}: no answer within {limit:g}s (from {ep.target})") from None
                if kind == "unavailable" and not retry:
                    raise EtcdUnavailable(
                        f"etcd {name}: {ep.target} failed while answering "
                        f"({exc.code().name}: {exc.details()}); the outcome is unknown"
                    ) from None
                reason = f"{ep.target}: {exc.code().name}: {exc.details()}"
                log.debug("etcd %s: %s; trying the next endpoint", name, reason)
                self._rotate(ep)
                failed += 1
                if failed % len(self._endpoints) == 0:
                    await asyncio.sleep(min(backoff.next(), max(0.0, deadline - loop.time())))


def _range(req: Any) -> Callable[[_Endpoint, float], Awaitable[Any]]:
    return lambda ep, t: ep.kv.Range(req, timeout=t, metadata=_REQUIRE_LEADER)


def _eof() -> Any:
    import grpc

    return grpc.aio.EOF


def _by_revision(events: Any) -> list[tuple[int, list[WatchEvent]]]:
    """Group one watch response's events by revision, in order."""
    rpc = _rpc()
    groups: list[tuple[int, list[WatchEvent]]] = []
    for ev in events:
        kind = "delete" if ev.type == rpc.Event.DELETE else "put"
        kv = _kv(ev.kv)
        if groups and groups[-1][0] == kv.mod_revision:
            groups[-1][1].append(WatchEvent(kind, kv))
        else:
            groups.append((kv.mod_revision, [WatchEvent(kind, kv)]))
    return groups


def _compare_msg(rpc: Any, c: Compare) -> Any:
    msg = rpc.Compare(key=c.key, result=rpc.Compare.EQUAL)
    if c.target == "value":
        msg.target = rpc.Compare.VALUE
        msg.value = c.value
    elif c.target == "mod":
        msg.target = rpc.Compare.MOD
        msg.mod_revision = c.value
    elif c.target == "create":
        msg.target = rpc.Compare.CREATE
        msg.create_revision = c.value
    else:
        raise ValueError(f"unknown compare target {c.target!r}")
    return msg


def _op_msg(rpc: Any, op: Op) -> Any:
    if op.kind == "put":
        return rpc.RequestOp(request_put=rpc.PutRequest(
            key=op.key, value=op.value, lease=op.lease or 0))
    if op.kind == "delete":
        return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=op.key))
    if op.kind == "get":
        return rpc.RequestOp(request_range=rpc.RangeRequest(key=op.key))
    raise ValueError(f"unknown op {op.kind!r}")


def _credentials(settings: EtcdSettings) -> Any:
    """gRPC channel credentials from the TLS settings (None: plain text). Runs in a thread: it
    reads files. No CA file: the system's roots."""
    tls = settings.tls
    if tls is None:
        return None
    import grpc

    def read(what: str, path: str | None) -> bytes | None:
        if not path:
            return None
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as exc:
            # The path and the reason only: never the content.
            raise EtcdError(f"etcd TLS {what} {path}: {exc.strerror or exc}") from None

    ca = read("CA file", tls.ca_file)
    cert = read("certificate file", tls.cert_file)
    key = read("key file", tls.key_file)
    if (cert is None) != (key is None):
        raise EtcdError("etcd TLS: cert_file and key_file go together")
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)
