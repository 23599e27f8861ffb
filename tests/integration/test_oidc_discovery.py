"""OIDC discovery on a real agent: the issuer it advertises is its own (configured, or its
HTTP address), whatever Host header a caller sends, and its tasks' tokens carry it.

Touches only the agents the fixtures start and the task one of them runs.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt

from tests.integration.harness import AgentProcess, raw_exec_job
from tests.integration.test_taskapi import FILE_IDENTITY, read_token, start_task

ISSUER = "https://nomad.example.com/region-a"


class IssuerAgent(AgentProcess):
    """An agent whose config sets ``server { oidc_issuer }``."""

    def write_config(self) -> None:
        super().write_config()
        config = json.loads(self.config_path.read_text())
        config["server"]["oidc_issuer"] = ISSUER
        self.config_path.write_text(json.dumps(config))


async def discovery(agent: AgentProcess, host: str) -> dict[str, Any]:
    url = f"{agent.address}/.well-known/openid-configuration"
    async with aiohttp.ClientSession() as s, s.get(url, headers={"Host": host}) as resp:
        assert resp.status == 200, await resp.text()
        doc: dict[str, Any] = await resp.json()
        return doc


async def test_default_issuer_is_the_agents_address_not_the_host_header(
        agent: AgentProcess) -> None:
    doc = await discovery(agent, "evil.example")
    assert doc["issuer"] == agent.address  # http://127.0.0.1:<port>, as bound
    assert doc["jwks_uri"] == f"{agent.address}/.well-known/jwks.json"


async def test_configured_issuer_is_served_verbatim_and_signed_into_tokens(
        agent_factory: Callable[..., AgentProcess], tmp_path: Path) -> None:
    # agent_factory: its teardown ends the task this agent leaves running under tmp_path.
    agent = IssuerAgent(tmp_path / "issuer")
    await agent.start()
    try:
        doc = await discovery(agent, "evil.example")
        assert doc["issuer"] == ISSUER
        assert doc["jwks_uri"] == f"{ISSUER}/.well-known/jwks.json"
        async with agent.api() as api:
            assert (await api.get("/v1/agent/self"))["config"]["Server"]["OIDCIssuer"] == ISSUER
            alloc_id = await start_task(agent, api, raw_exec_job(
                "iss", "sleep 300", identity=FILE_IDENTITY, kill_timeout_s=1))
        claims = jwt.decode(read_token(agent, alloc_id), options={"verify_signature": False})
        assert claims["iss"] == ISSUER
    finally:
        await agent.kill()
