"""Workload identities with a ttl, against real agents and real tasks: a task that keeps
calling its socket with the token from its file is never locked out, also across an agent
restart during which its identity expired; and no signed identity ever lands in a state file
or the agent's log.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest

from tests.integration.harness import AgentProcess, eventually, raw_exec_job
from tests.integration.test_taskapi import NS, local_dir, read_token, start_task

TTL_S = 2
TTL_IDENTITY = {"File": True, "TTL": TTL_S * NS}
# Calls the task's socket with whatever token its file holds right now, and logs
# "<unix time> <status>". The token goes to curl on stdin (printf is a shell builtin), so it
# never shows on a command line.
CALL_LOOP = r"""
while :; do
  t=$(cat "$NOMAD_SECRETS_DIR/nomad_token")
  code=$(printf 'header = "Authorization: Bearer %s"\n' "$t" |
         curl -s -o /dev/null -w '%{http_code}' -K - \
              --unix-socket "$NOMAD_SECRETS_DIR/api.sock" http://localhost/v1/agent/health)
  echo "$(date +%s) $code" >> "$NOMAD_TASK_DIR/calls"
  sleep 0.2
done
"""


def _need_curl() -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed: the task cannot call its socket")


def _claims(token: str) -> dict[str, Any]:
    return jwt.decode(token, options={"verify_signature": False})


def _calls_since(agent: AgentProcess, alloc_id: str, since: float) -> list[tuple[int, str]]:
    """The task's logged calls made at or after ``since`` (unix seconds), oldest first."""
    path = local_dir(agent, alloc_id) / "calls"
    if not path.exists():
        return []
    calls = []
    for line in path.read_text().splitlines():
        stamp, _, code = line.partition(" ")
        if stamp.isdigit() and code and int(stamp) >= since:
            calls.append((int(stamp), code))
    return calls


def _call_log(agent: AgentProcess, alloc_id: str) -> str:
    return (local_dir(agent, alloc_id) / "calls").read_text()


async def _start_calling_task(agent_factory: Callable[..., AgentProcess], job_id: str
                              ) -> tuple[AgentProcess, str]:
    """A started agent and the allocation of its task that runs ``CALL_LOOP``."""
    _need_curl()
    agent = agent_factory()
    await agent.start()
    async with agent.api() as api:
        alloc_id = await start_task(agent, api, raw_exec_job(job_id, CALL_LOOP,
                                                             identity=TTL_IDENTITY))
    return agent, alloc_id


async def test_a_file_identity_with_a_ttl_is_renewed_before_it_expires(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    agent, alloc_id = await _start_calling_task(short_agent_factory, "renew")
    first = read_token(agent, alloc_id)
    first_claims = _claims(first)
    assert first_claims["exp"] - first_claims["iat"] <= TTL_S + 1

    # Well past three lifetimes of the first identity, the task's latest call still works.
    late = first_claims["iat"] + 3 * TTL_S + 1
    calls = await eventually(lambda: _calls_since(agent, alloc_id, late), timeout=30,
                             interval=0.2, message="a call three ttls later")
    assert calls[-1][1] == "200", _call_log(agent, alloc_id)
    renewed = read_token(agent, alloc_id)
    assert renewed != first
    assert _claims(renewed)["exp"] > first_claims["exp"] + TTL_S


async def test_renewal_resumes_after_an_agent_restart_even_if_the_identity_expired(
        short_agent_factory: Callable[..., AgentProcess]) -> None:
    agent, alloc_id = await _start_calling_task(short_agent_factory, "resume")
    assert await agent.stop() == 0, agent.output  # the task keeps running
    stale = read_token(agent, alloc_id)
    expired_at = _claims(stale)["exp"] + 1  # the verifier's one-second leeway
    await eventually(lambda: time.time() > expired_at + 0.5, timeout=10,
                     message="the identity to expire while no agent runs")

    await agent.start()
    restarted = time.time()
    # Calls made after the restarted agent had time for one full renewal cycle.
    calls = await eventually(lambda: _calls_since(agent, alloc_id, restarted + 2 * TTL_S),
                             timeout=30, interval=0.2, message="calls after the restart")
    assert calls[-1][1] == "200", _call_log(agent, alloc_id)
    assert read_token(agent, alloc_id) != stale


def _state_files(data_dir: Path) -> list[Path]:
    """Both state databases with their sqlite side files (the WAL holds recent writes)."""
    found = [p for part in ("server", "client") for p in (data_dir / part).glob("state.db*")]
    assert {p.name for p in found} >= {"state.db"}, found
    return found


async def test_no_state_file_holds_a_signed_identity(agent: AgentProcess) -> None:
    async with agent.api() as api:
        renewing = await start_task(agent, api, raw_exec_job(
            "ttl", "exec sleep 300", identity={"File": True, "Env": True,
                                                "TTL": TTL_S * NS}))
        lasting = await start_task(agent, api, raw_exec_job(
            "plain", "exec sleep 300", identity={"File": True, "Env": True}))
    tokens = [read_token(agent, renewing), read_token(agent, lasting)]

    def leaks() -> list[str]:
        found = []
        for path in _state_files(agent.data_dir):
            raw = path.read_bytes()
            found += [f"{path.name} in {path.parent.name}: {what}"
                      for what, needle in (("a JWT", b"eyJ"),
                                           *(("a task's token", t.encode()) for t in tokens))
                      if needle in raw]
        return found

    assert leaks() == []
    # A renewal goes through the whole path too, and leaves nothing behind either.
    await eventually(lambda: read_token(agent, renewing) != tokens[0], timeout=15,
                     message="the identity to be renewed")
    tokens.append(read_token(agent, renewing))
    assert leaks() == []
    assert await agent.stop() == 0, agent.output  # closing checkpoints the WAL into the db
    assert leaks() == []
    assert "eyJ" not in agent.output  # nor in its (debug level) log
