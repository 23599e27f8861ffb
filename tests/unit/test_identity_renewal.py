"""Workload-identity renewal on its own: when the client's scheduler renews (about half the
remaining lifetime, jittered), how it backs off and reports failures, what the identity hook
asks of it, and the server's side — identities signed for the calling node's live
allocations only, and never stored. A fake clock and a fake signer: no real waits.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from nomad_client.allocrunner.hooks import TaskContext
from nomad_client.allocrunner.taskrunner.identity_hook import IdentityHook
from nomad_client.client import identities as ids
from nomad_client.client.allocdir import AllocDir
from nomad_client.client.identities import (
    IdentityManager,
    IdentityUnavailable,
    renewal_delay,
    retry_delay,
    token_window,
)
from nomad_client.client.secretsdir import SecretsDirError
from nomad_client.client.servers import ServerRPC
from nomad_client.client.taskenv import NodeView
from nomad_client.server.keyring import Keyring
from nomad_client.server.rpc import InProcessTransport
from nomad_client.server.server import NotFound
from nomad_client.server.state import StateStore
from nomad_client.state_db import StateDB
from nomad_client.structs.codec import to_rpc
from nomad_client.structs.models import TaskEvent
from tests.unit.factories import SEALER, job, make_alloc, make_server, node

T0 = 1_800_000_000.0
ALLOC = "a1"


# ---------------------------------------------------------------------- helpers


def fake_token(issued: float, expires: float | None, jti: str = "x") -> str:
    """A JWT-shaped token with the claims the client reads (it never checks signatures)."""
    def seg(value: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()
    claims: dict[str, Any] = {"iat": int(issued), "nbf": int(issued), "jti": jti}
    if expires is not None:
        claims["exp"] = int(expires)
    return f"{seg({'alg': 'RS256'})}.{seg(claims)}.c2ln"


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Extreme(random.Random):
    """An rng whose ``uniform`` always answers one end of the range."""

    def __init__(self, high: bool) -> None:
        super().__init__(0)
        self.high = high

    def uniform(self, a: float, b: float) -> float:
        return b if self.high else a


class Signer:
    """Signs fresh fake tokens valid for ``ttl`` from the fake clock; can be made to fail."""

    def __init__(self, clock: Clock, ttl: float = 20.0) -> None:
        self.clock, self.ttl = clock, ttl
        self.calls: list[tuple[str, list[str]]] = []
        self.fail_with: BaseException | None = None
        self.gate: asyncio.Event | None = None
        self.called = asyncio.Event()
        self.lasting: set[str] = set()  # tasks whose identity has no ttl

    async def __call__(self, alloc_id: str, tasks: Sequence[str]) -> Mapping[str, str]:
        self.calls.append((alloc_id, list(tasks)))
        self.called.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        now = self.clock()
        return {t: fake_token(now, None if t in self.lasting else now + self.ttl,
                              jti=f"{t}-{len(self.calls)}") for t in tasks}


class Task:
    """What the hook hands the manager for one task: a token sink and an event sink."""

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.events: list[TaskEvent] = []
        self.fail_with: BaseException | None = None

    async def deliver(self, token: str) -> None:
        if self.fail_with is not None:
            raise self.fail_with
        self.delivered.append(token)


def manager(clock: Clock, signer: Signer, rng: random.Random | None = None
            ) -> IdentityManager:
    return IdentityManager(signer, clock=clock, rng=rng or random.Random(7))


def watch(mgr: IdentityManager, task: str, token: str | None) -> Task:
    sink = Task()
    mgr.watch(ALLOC, task, token, deliver=sink.deliver, report=sink.events.append)
    return sink


def due_in(mgr: IdentityManager, clock: Clock) -> float:
    due = mgr.next_due()
    assert due is not None
    return due - clock()


# ---------------------------------------------------------------------- timing rules


def test_renewal_comes_at_about_half_the_remaining_lifetime_with_jitter() -> None:
    assert renewal_delay(20, Extreme(high=False)) == pytest.approx(8.0)
    assert renewal_delay(20, Extreme(high=True)) == pytest.approx(12.0)
    rng = random.Random(1)
    delays = [renewal_delay(20, rng) for _ in range(500)]
    assert all(8.0 <= d <= 12.0 for d in delays)
    assert max(delays) - min(delays) > 3.0  # really jittered, not a fixed point


def test_an_expired_identity_is_renewed_at_once_and_a_tiny_one_not_in_a_busy_loop() -> None:
    rng = random.Random(2)
    assert renewal_delay(0, rng) == 0.0
    assert renewal_delay(-30, rng) == 0.0
    assert all(1.0 <= renewal_delay(1.5, rng) <= 1.5 for _ in range(100))
    assert renewal_delay(0.5, rng) == 0.5  # never past its expiry


def test_failed_renewals_back_off_exponentially_with_jitter_up_to_a_cap() -> None:
    for failures, base in ((1, 1.0), (2, 2.0), (3, 4.0), (6, 32.0), (7, 60.0), (500, 60.0)):
        assert retry_delay(failures, Extreme(high=False)) == pytest.approx(base * 0.8)
        assert retry_delay(failures, Extreme(high=True)) == pytest.approx(base * 1.2)
    rng = random.Random(3)
    assert all(0.8 <= retry_delay(1, rng) <= 1.2 for _ in range(100))


def test_token_window_reads_the_claims_and_never_echoes_the_token() -> None:
    assert token_window(fake_token(T0, T0 + 20)) == (int(T0), int(T0 + 20))
    assert token_window(fake_token(T0, None)) == (int(T0), None)
    garbage = "not-a-jwt-but-a-secret"
    with pytest.raises(IdentityUnavailable) as info:
        token_window(garbage)
    assert garbage not in str(info.value)


# ---------------------------------------------------------------------- the scheduler


async def test_a_watched_identity_is_renewed_when_due_and_rescheduled_from_the_new_one(
) -> None:
    clock = Clock()
    signer = Signer(clock)
    mgr = manager(clock, signer, Extreme(high=False))
    sink = watch(mgr, "t", fake_token(T0, T0 + 20))
    assert due_in(mgr, clock) == pytest.approx(8.0)

    clock.now = T0 + 7.9
    await mgr.renew_due()
    assert signer.calls == [] and sink.delivered == []

    clock.now = T0 + 8.0
    await mgr.renew_due()
    assert signer.calls == [(ALLOC, ["t"])]
    [renewed] = sink.delivered
    assert token_window(renewed) == (int(T0 + 8), int(T0 + 28))
    assert due_in(mgr, clock) == pytest.approx(8.0)  # half of the new one's lifetime
    assert await mgr.token(ALLOC, "t") == renewed  # the next start gets the new one
    assert sink.events == []


async def test_identities_of_one_allocation_due_together_share_one_signing_request() -> None:
    clock = Clock()
    signer = Signer(clock)
    mgr = manager(clock, signer, Extreme(high=True))
    web, side = watch(mgr, "web", fake_token(T0, T0 + 20)), watch(mgr, "side",
                                                                  fake_token(T0, T0 + 20))
    clock.now = T0 + 12
    await mgr.renew_due()
    assert signer.calls == [(ALLOC, ["web", "side"])]
    assert len(web.delivered) == len(side.delivered) == 1


async def test_a_failed_renewal_is_retried_with_backoff_and_reported_once(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    clock = Clock()
    signer = Signer(clock)
    mgr = manager(clock, signer, Extreme(high=False))
    first = fake_token(T0, T0 + 20)
    sink = watch(mgr, "t", first)
    signer.fail_with = PermissionError("node secret ID does not match")

    clock.now = T0 + 8
    retries = []
    for _ in range(4):
        await mgr.renew_due()
        retries.append(due_in(mgr, clock))
        clock.now += due_in(mgr, clock)
    assert retries == pytest.approx([0.8, 1.6, 3.2, 6.4])  # doubling, low end of the jitter
    assert len(signer.calls) == 4 and sink.delivered == []
    [failed] = sink.events  # once per streak of failures, not once per retry
    assert failed.display_message == (
        "Workload identity renewal failed, retrying: node secret ID does not match")

    signer.fail_with = None
    await mgr.renew_due()
    assert len(sink.delivered) == 1
    assert [e.display_message for e in sink.events][-1] == "Workload identity renewed"
    assert due_in(mgr, clock) == pytest.approx(8.0)  # back to the normal cadence
    everything = caplog.text + "".join(e.display_message + e.message for e in sink.events)
    assert first not in everything and sink.delivered[0] not in everything
    assert "eyJ" not in everything


async def test_a_token_file_that_cannot_be_written_is_retried() -> None:
    clock = Clock()
    signer = Signer(clock)
    mgr = manager(clock, signer, Extreme(high=False))
    sink = watch(mgr, "t", fake_token(T0, T0 + 20))
    sink.fail_with = SecretsDirError("secrets dir is a symlink")
    clock.now = T0 + 8
    await mgr.renew_due()
    assert due_in(mgr, clock) == pytest.approx(0.8)
    assert "secrets dir is a symlink" in sink.events[0].display_message

    sink.fail_with = None
    clock.now += 0.8
    await mgr.renew_due()
    assert len(sink.delivered) == 1 and len(signer.calls) == 2


async def test_a_hanging_signing_request_counts_as_a_failure(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ids, "SIGN_TIMEOUT", 0.01)
    clock = Clock()
    signer = Signer(clock)
    signer.gate = asyncio.Event()  # never set: the request hangs
    mgr = manager(clock, signer, Extreme(high=False))
    sink = watch(mgr, "t", fake_token(T0, T0 + 20))
    clock.now = T0 + 8
    await mgr.renew_due()
    assert sink.delivered == [] and due_in(mgr, clock) == pytest.approx(0.8)
    assert "TimeoutError" in sink.events[0].display_message


async def test_a_stopped_task_is_no_longer_renewed_even_mid_request() -> None:
    clock = Clock()
    signer = Signer(clock)
    mgr = manager(clock, signer, Extreme(high=False))
    sink = watch(mgr, "t", fake_token(T0, T0 + 20))
    mgr.forget(ALLOC, "t")
    clock.now = T0 + 30
    await mgr.renew_due()
    assert signer.calls == [] and mgr.next_due() is None

    sink = watch(mgr, "t", fake_token(T0 + 30, T0 + 50))
    signer.gate = asyncio.Event()
    clock.now = T0 + 40
    renewing = asyncio.create_task(mgr.renew_due())
    async with asyncio.timeout(10):
        await signer.called.wait()
    mgr.forget_alloc(ALLOC)  # the allocation was garbage collected meanwhile
    signer.gate.set()
    await renewing
    assert sink.delivered == [] and sink.events == [] and mgr.next_due() is None


async def test_an_identity_without_expiry_is_not_watched() -> None:
    clock = Clock()
    mgr = manager(clock, Signer(clock))
    watch(mgr, "t", fake_token(T0, None))
    assert mgr.next_due() is None


async def test_a_task_left_without_a_token_gets_one_at_once_then_on_the_usual_cadence(
) -> None:
    clock = Clock()
    signer = Signer(clock)
    mgr = manager(clock, signer, Extreme(high=False))
    expiring, lasting = watch(mgr, "t", None), watch(mgr, "forever", None)
    assert due_in(mgr, clock) == 0.0
    signer.lasting = {"forever"}
    await mgr.renew_due()
    assert len(expiring.delivered) == len(lasting.delivered) == 1
    assert due_in(mgr, clock) == pytest.approx(8.0)
    # Only the expiring one stays watched.
    clock.now += 8
    await mgr.renew_due()
    assert signer.calls[-1] == (ALLOC, ["t"])


async def test_a_start_reuses_a_fresh_identity_and_gets_a_new_one_past_half_its_life(
) -> None:
    clock = Clock()
    signer = Signer(clock)
    mgr = manager(clock, signer)
    seeded, lasting = fake_token(T0, T0 + 20), fake_token(T0, None)
    mgr.seed(ALLOC, {"t": seeded, "forever": lasting})
    clock.now = T0 + 9.9
    assert await mgr.token(ALLOC, "t") == seeded
    clock.now = T0 + 10
    fresh = await mgr.token(ALLOC, "t")
    assert fresh != seeded and signer.calls == [(ALLOC, ["t"])]
    clock.now = T0 + 10_000
    assert await mgr.token(ALLOC, "forever") == lasting
    # Restored after an agent restart: nothing in memory, so the servers sign one.
    assert token_window(await mgr.token("restored", "t"))[0] == int(clock.now)
    assert signer.calls[-1] == ("restored", ["t"])


async def test_the_scheduler_sleeps_until_woken_by_an_earlier_renewal_and_is_cancellable(
) -> None:
    clock = Clock()
    signer = Signer(clock)
    mgr = manager(clock, signer)
    runner = asyncio.create_task(mgr.run())
    try:
        # Nothing is due for a long while (the fake clock stands still): it sleeps...
        watch(mgr, "later", fake_token(T0, T0 + 3600))
        for _ in range(20):
            await asyncio.sleep(0)
        assert signer.calls == []
        # ...until an identity that has already expired (say, across a restart) arrives.
        delivered = asyncio.Event()
        sink = Task()

        async def deliver(token: str) -> None:
            await sink.deliver(token)
            delivered.set()

        mgr.watch(ALLOC, "expired", fake_token(T0 - 60, T0 - 30), deliver=deliver,
                  report=sink.events.append)
        async with asyncio.timeout(10):
            await delivered.wait()
        assert signer.calls == [(ALLOC, ["expired"])]
    finally:
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
    assert runner.cancelled()


# ---------------------------------------------------------------------- the identity hook


class FakeIdentities:
    def __init__(self) -> None:
        self.watched: list[tuple[str, str | None]] = []
        self.forgotten: list[str] = []
        self.fail_with: BaseException | None = None

    async def token(self, alloc_id: str, task: str) -> str:
        if self.fail_with is not None:
            raise self.fail_with
        return fake_token(T0, T0 + 20, jti=task)

    def watch(self, alloc_id: str, task: str, token: str | None, *, deliver: Any,
              report: Any) -> None:
        self.watched.append((task, token))

    def forget(self, alloc_id: str, task: str) -> None:
        self.forgotten.append(task)


def hook_context(tmp_path: Path, identity: dict[str, Any], identities: FakeIdentities
                 ) -> TaskContext:
    alloc = make_alloc(id=ALLOC, job={})
    adir = AllocDir(tmp_path / "alloc", alloc.id)
    adir.build()
    task_dir = adir.build_task_dir("t", None)
    node = NodeView(id="n", name="n", datacenter="dc1", region="global", node_class="",
                    pool="default", attributes={}, meta={})
    return TaskContext(alloc=alloc, task={"Name": "t", "Identity": identity}, alloc_dir=adir,
                       task_dir=task_dir, node=node, emit=lambda e: None,
                       log=logging.getLogger("test"), identities=identities)


@pytest.mark.parametrize(("identity", "watched"), [
    ({"File": True, "TTL": 20_000_000_000}, ["t"]),
    ({"File": True, "Env": True, "TTL": 20_000_000_000}, ["t"]),
    ({"Env": True, "TTL": 20_000_000_000}, []),  # a process's env cannot be renewed
    ({"File": True}, []),
])
async def test_the_hook_watches_only_token_files_of_identities_with_a_ttl(
        tmp_path: Path, identity: dict[str, Any], watched: list[str]) -> None:
    identities = FakeIdentities()
    ctx = hook_context(tmp_path, identity, identities)
    hook = IdentityHook()
    env = await hook.prestart(ctx)
    assert [task for task, _ in identities.watched] == watched
    if identity.get("File"):
        assert (ctx.task_dir.secrets_dir / "nomad_token").read_text() == fake_token(
            T0, T0 + 20, jti="t")
    assert ("NOMAD_TOKEN" in env) == bool(identity.get("Env"))
    await hook.stop(ctx)
    assert identities.forgotten == ["t"]


# ---------------------------------------------------------------------- the server's side


def identity_job(**identity: Any) -> dict[str, Any]:
    """Job "web" whose task "t" has a default identity written to a file."""
    return job(task={"Identity": {"File": True, **identity}})


@pytest.fixture
async def cluster(tmp_path: Path, keyring: Keyring) -> Any:
    """A server writing through to a real state DB, its RPC facade, and one node (n1)."""
    db = await StateDB.open(tmp_path / "server" / "state.db")
    server = make_server(keyring, store=StateStore(db, SEALER))
    await server.register_node(node("n1", secret_id="secret-1"))
    yield server, ServerRPC(InProcessTransport(server)), db
    await db.close()


async def test_sign_identities_for_a_live_allocation_on_the_calling_node(cluster: Any) -> None:
    server, rpc, _ = cluster
    await server.register_job(identity_job(TTL=20_000_000_000))
    [alloc] = server.job_allocs("web")
    signed = await rpc.alloc_sign_identities("n1", "secret-1", alloc.id, ["t"])
    claims = server.keyring.verify(signed["t"])
    assert (claims.alloc_id, claims.task, claims.job_id) == (alloc.id, "t", "web")
    assert claims.expires_at is not None and claims.expires_at - claims.issued_at <= 21


async def test_sign_identities_refuses_anyone_but_the_node_running_the_live_allocation(
        cluster: Any) -> None:
    server, rpc, _ = cluster
    await server.register_node(node("n2", secret_id="secret-2"))
    await server.register_job(identity_job())
    [alloc] = server.job_allocs("web")
    mine, other = (("n1", "secret-1"), ("n2", "secret-2"))
    if alloc.node_id == "n2":
        mine, other = other, mine
    with pytest.raises(PermissionError, match="secret"):
        await rpc.alloc_sign_identities(mine[0], "not-the-secret", alloc.id, ["t"])
    with pytest.raises(PermissionError, match="secret"):
        await rpc.alloc_sign_identities("no-such-node", mine[1], alloc.id, ["t"])
    with pytest.raises(PermissionError, match="not placed on this node"):
        await rpc.alloc_sign_identities(*other, alloc.id, ["t"])
    with pytest.raises(NotFound):
        await rpc.alloc_sign_identities(*mine, "no-such-alloc", ["t"])
    with pytest.raises(NotFound, match="no task 'nope'"):
        await rpc.alloc_sign_identities(*mine, alloc.id, ["t", "nope"])
    assert await rpc.alloc_sign_identities(*mine, alloc.id, ["t"])

    await server.deregister_job("web", purge=False)
    with pytest.raises(PermissionError, match="terminal"):
        await rpc.alloc_sign_identities(*mine, alloc.id, ["t"])


async def test_get_allocs_signs_for_the_calling_node_and_nothing_is_stored(
        cluster: Any, tmp_path: Path) -> None:
    server, rpc, db = cluster
    await server.register_job(identity_job())
    [alloc] = server.job_allocs("web")

    fetched, signed = await rpc.alloc_get_allocs("n1", "secret-1", [alloc.id])
    assert [a.id for a in fetched] == [alloc.id]
    token = signed[alloc.id]["t"]
    assert server.keyring.verify(token).alloc_id == alloc.id
    with pytest.raises(PermissionError):
        await rpc.alloc_get_allocs("n1", "secret-2", [alloc.id])

    # Neither the allocation as stored nor the server's state file holds an identity.
    assert "eyJ" not in json.dumps(to_rpc(server.store.get("allocs", alloc.id)))
    raw = b"".join(p.read_bytes() for p in (tmp_path / "server").glob("state.db*"))
    assert b"eyJ" not in raw and token.encode() not in raw

    await server.deregister_job("web", purge=False)
    fetched, signed = await rpc.alloc_get_allocs("n1", "secret-1", [alloc.id])
    assert fetched[0].desired_status == "stop" and signed == {}


@pytest.mark.parametrize(("identity", "file_there", "kept"), [
    ({"File": True}, True, True),
    ({"File": True, "TTL": 20_000_000_000}, True, True),
    ({"File": True}, False, False),  # nothing to keep: this start fails
    ({"File": True, "Env": True}, True, False),  # the env needs a token: this start fails
])
async def test_a_reattached_task_keeps_its_token_file_when_no_new_identity_can_be_had(
        tmp_path: Path, identity: dict[str, Any], file_there: bool, kept: bool) -> None:
    identities = FakeIdentities()
    ctx = hook_context(tmp_path, identity, identities)
    token_file = ctx.task_dir.secrets_dir / "nomad_token"
    if file_there:
        token_file.write_text("the token from before the restart")
    identities.fail_with = ConnectionError("no server")
    if not kept:
        with pytest.raises(ConnectionError):
            await IdentityHook().prestart(ctx)
        assert identities.watched == []
        return
    assert await IdentityHook().prestart(ctx) == {}
    assert identities.watched == [("t", None)]  # a token is fetched as soon as possible
    assert token_file.read_text() == "the token from before the restart"
