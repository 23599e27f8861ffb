"""The web UI from a real agent: the page and its files on the TCP listener, public even
with ACLs on (its API calls carry the token), and ``/`` redirecting to it."""

from __future__ import annotations

from collections.abc import Callable

import aiohttp

from nomad_client.ui import SECURITY_HEADERS
from tests.integration.harness import AgentProcess


async def test_the_ui_is_served_with_its_security_headers(
        agent_factory: Callable[..., AgentProcess]) -> None:
    agent = agent_factory(acl=True)
    await agent.start()
    async with aiohttp.ClientSession() as session:
        # No token: the page is public, and the API still refuses what it always refused.
        async with session.get(agent.address + "/ui/") as page:
            assert page.status == 200
            assert page.content_type == "text/html"
            assert "/ui/app.js" in await page.text()
            for name, value in SECURITY_HEADERS.items():
                assert page.headers[name] == value
        async with session.get(agent.address + "/ui/app.js") as script:
            assert script.status == 200
            assert script.content_type == "text/javascript"
            assert script.headers["Content-Security-Policy"].startswith("default-src 'none'")
        async with session.get(agent.address + "/ui/jobs/default/web") as deep_link:
            assert deep_link.status == 200 and deep_link.content_type == "text/html"
        async with session.get(agent.address + "/", allow_redirects=False) as root:
            assert root.status == 307
            assert root.headers["Location"] == "/ui/"
        async with session.get(agent.address + "/v1/jobs") as jobs:
            assert jobs.status == 403
    await agent.stop()
