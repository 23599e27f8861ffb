"""What a drain records about who asked and why: ``LastDrain.AccessorID`` (the caller's ACL
token; empty without one) and ``LastDrain.Meta`` (the request's ``Meta``), as Nomad's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import attrs
import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.structs.models import ACLPolicy, ACLToken
from tests.unit.factories import (
    HttpAnswer,
    ServedAPI,
    acl_token,
    call_http,
    make_server,
    node,
    seed,
    serve_api,
    wait_until,
)

pytestmark = pytest.mark.timeout(60)
HOUR_NS = 3600 * 1_000_000_000


async def served(keyring: Keyring, *, acl: bool) -> ServedAPI:
    server = make_server(keyring, acl=acl)
    await server.register_node(node("n1"))
    return await serve_api(server)


@pytest.fixture
async def api(keyring: Keyring) -> AsyncIterator[ServedAPI]:
    api = await served(keyring, acl=True)
    yield api
    await api.close()
    await api.server.close()


async def call(api: ServedAPI, method: str, path: str, body: object = None, token: str = ""
               ) -> HttpAnswer:
    async with aiohttp.ClientSession() as session:
        return await call_http(session, api.url, method, path, body, token=token)


async def node_writer(api: ServedAPI) -> ACLToken:
    await api.server.acls.upsert_policy(ACLPolicy(name="w", rules='node { policy = "write" }'))
    token = attrs.evolve(acl_token("client"), policies=("w",))
    await seed(api.server, tokens=(token,))
    return token


async def last_drain(api: ServedAPI, token: str) -> dict[str, object]:
    shown = await call(api, "GET", "/v1/node/n1", token=token)
    assert shown.status == 200, shown
    drain: dict[str, object] = shown.body["LastDrain"]
    return drain


async def test_a_drain_records_its_callers_accessor_and_meta(api: ServedAPI) -> None:
    token = await node_writer(api)
    started = await call(api, "POST", "/v1/node/n1/drain", {
        "DrainSpec": {"Deadline": HOUR_NS}, "Meta": {"message": "kernel upgrade"}},
        token.secret_id)
    assert started.status == 200, started
    await wait_until(lambda: not api.server.drainer.draining("n1"), "the empty node's drain")
    drained = await last_drain(api, token.secret_id)
    assert drained["AccessorID"] == token.accessor_id
    assert drained["Meta"] == {"message": "kernel upgrade"}
    assert drained["Status"] == "complete"
    assert token.secret_id not in str(api.server.node("n1"))



async def test_bad_meta_is_refused(api: ServedAPI) -> None:
    token = await node_writer(api)
    for meta in ([], {"k": 1}, "x"):
        refused = await call(api, "POST", "/v1/node/n1/drain",
                             {"DrainSpec": {"Deadline": HOUR_NS}, "Meta": meta},
                             token.secret_id)
        assert refused.status == 400 and "Meta" in refused.body, meta
    n1 = api.server.node("n1")
    assert n1 is not None and n1.drain_strategy is None


async def test_without_a_token_the_accessor_is_empty(keyring: Keyring) -> None:
    api = await served(keyring, acl=False)
    try:
        started = await call(api, "POST", "/v1/node/n1/drain", {
            "DrainSpec": {"Deadline": HOUR_NS}, "Meta": {"why": "test"}})
        assert started.status == 200, started
        drained = await last_drain(api, "")
        assert drained["AccessorID"] == "" and drained["Meta"] == {"why": "test"}
    finally:
        await api.close()
        await api.server.close()
