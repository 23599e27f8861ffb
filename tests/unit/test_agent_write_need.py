"""The agent's gossip writes (join, force-leave) need ``agent:write``: a ``Need`` from
``http/auth.py``, the one home of token rules, like every other agent and node need."""

from __future__ import annotations

from nomad_client.acl import compile_acl, parse_policy
from nomad_client.http.auth import Need
from nomad_client.server.keyring import Keyring
from tests.unit.factories import make_server, serve_api


def test_agent_write_is_granted_by_agent_write_only() -> None:
    writer = compile_acl([parse_policy('agent { policy = "write" }')])
    reader = compile_acl([parse_policy('agent { policy = "read" }')])
    assert Need.agent_write.allows(writer, "")
    assert not Need.agent_write.allows(reader, "")
    assert Need.agent_read.allows(reader, "")


async def test_join_and_force_leave_declare_agent_write(keyring: Keyring) -> None:
    api = await serve_api(make_server(keyring))
    try:
        for path in ("/v1/agent/join", "/v1/agent/force-leave"):
            route, _ = api.router.match("POST", path)
            assert route.need is Need.agent_write, path
    finally:
        await api.close()
        await api.server.close()
