"""Allocations cannot reach each other's directory trees; tasks of one allocation share
``alloc/data`` across users; the fs API does not serve a file a task hard-linked.

Real agents and real task processes running as two existing non-root users (``nobody`` and
``daemon``). Touches only the agents the fixtures start, their data dirs and the processes
their tasks spawn.
"""

from __future__ import annotations

import os
import pwd
import shlex
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from nomad_client.api.client import ApiClient, ApiError
from nomad_client.client.allocdir import AllocDir, alloc_group
from nomad_client.client.drivers import DriverError, TaskConfig
from nomad_client.client.drivers.raw_exec import RawExecDriver
from tests.integration.harness import (
    AgentProcess,
    eventually,
    raw_exec_job,
    run_job,
    task_dir,
    wait_task_state,
)

VICTIM_USER, ATTACKER_USER = "nobody", "daemon"


def _have_users() -> bool:
    try:
        for user in (VICTIM_USER, ATTACKER_USER):
            pwd.getpwnam(user)
    except KeyError:
        return False
    return True


pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="running tasks as other users needs root"),
    pytest.mark.skipif(not _have_users(), reason="needs the users nobody and daemon"),
    pytest.mark.timeout(60),
]

AgentFactory = Callable[..., AgentProcess]
VICTIM_LINE = "the victim's own line"


async def _running(api: ApiClient, job: dict[str, Any], tasks: tuple[str, ...] = ("t",)
                   ) -> str:
    allocs = await run_job(api, job)
    alloc_id: str = allocs[0]["ID"]
    for task in tasks:
        await wait_task_state(api, alloc_id, task, "running")
    return alloc_id


async def _file_text(path: Path, message: str) -> str:
    """Wait for a marker file a task writes and return its content."""
    return await eventually(lambda: path.is_file() and path.read_text(), message=message)


def _attacker_script(victim: Path) -> str:
    """Tries every way into the victim's tree; one report line per attempt."""
    v = shlex.quote(str(victim))
    logs = f"{v}/alloc/logs"
    attempts = [
        f"echo planted > {v}/alloc/planted",
        f"echo planted > {v}/alloc/data/planted",
        f"echo planted > {logs}/planted",
        f"echo planted > {v}/t/local/planted",
        f"echo FORGED >> {logs}/t.stdout.0",
        f'echo FORGED > "$NOMAD_TASK_DIR/forged" && mv -f "$NOMAD_TASK_DIR/forged" '
        f"{logs}/t.stdout.0",
        f"mv {logs} {v}/alloc/logs.gone",
        # Control: the attacker may of course write its own allocation's shared dir.
        'echo mine > "$NOMAD_ALLOC_DIR/data/mine"',
    ]
    lines = ['report="$NOMAD_TASK_DIR/report"', 'echo "uid $(id -u)" > "$report"']
    for attempt in attempts:
        lines.append(f"if ( {attempt} ) 2>/dev/null; then echo {shlex.quote('ok: ' + attempt)}; "
                     f"else echo {shlex.quote('denied: ' + attempt)}; fi >> \"$report\"")
    lines += ['echo done > "$NOMAD_TASK_DIR/done"', "exec sleep 300"]
    return "\n".join(lines)


async def test_another_allocations_task_cannot_write_into_an_allocations_tree(
        short_agent_factory: AgentFactory) -> None:
    agent = short_agent_factory()
    await agent.start()
    victim_script = f'echo "{VICTIM_LINE}"; exec sleep 300'
    async with agent.api() as api:
        victim_id = await _running(api, raw_exec_job("victim", victim_script, user=VICTIM_USER))
        victim = task_dir(agent, victim_id, "t").parent
        log = victim / "alloc" / "logs" / "t.stdout.0"
        await eventually(lambda: log.is_file() and VICTIM_LINE in log.read_text(),
                         message="the victim's log line")

        attacker_id = await _running(api, raw_exec_job(
            "attacker", _attacker_script(victim), user=ATTACKER_USER))
        attacker_local = task_dir(agent, attacker_id, "t") / "local"
        await _file_text(attacker_local / "done", "the attacker to finish")
        report = (attacker_local / "report").read_text()

        lines = report.splitlines()
        assert lines[0] == f"uid {pwd.getpwnam(ATTACKER_USER).pw_uid}", report
        assert lines[-1].startswith("ok: echo mine"), report  # the control attempt worked
        breached = [line for line in lines[1:-1] if not line.startswith("denied: ")]
        assert not breached, report
        assert len(lines) == 9, report

        # On disk: nothing planted, the victim's log untouched and still the agent's.
        planted = [victim / "alloc" / "planted", victim / "alloc" / "data" / "planted",
                   victim / "alloc" / "logs" / "planted", victim / "t" / "local" / "planted",
                   victim / "alloc" / "logs.gone"]
        assert [p for p in planted if os.path.lexists(p)] == []
        assert log.read_text() == f"{VICTIM_LINE}\n"
        assert log.stat().st_uid == 0 and log.stat().st_nlink == 1
        # And through the API, as `alloc logs` prints it.
        assert await api.alloc_logs(victim_id, "t") == f"{VICTIM_LINE}\n".encode()

        # The two allocations hold different groups, recorded in their trees.
        groups = {alloc_group(victim), alloc_group(task_dir(agent, attacker_id, "t").parent)}
        assert None not in groups and len(groups) == 2


def _wait_for(path: str) -> str:
    """Shell: poll for ``path`` (bounded, so a failed test leaves no endless loop)."""
    return f'i=0; while [ ! -s {path} ] && [ $i -lt 2400 ]; do sleep 0.05; i=$((i+1)); done'


def _sharing_script() -> str:
    """Each task writes its own file into alloc/data, then reads its sibling's; once told
    (after the agent restarted), it writes there once more."""
    return "\n".join([
        'data="$NOMAD_ALLOC_DIR/data"',
        'if [ "$NOMAD_TASK_NAME" = t0 ]; then other=t1; else other=t0; fi',
        'id -G > "$NOMAD_TASK_DIR/groups"',
        'echo "from $NOMAD_TASK_NAME as $(id -u)" > "$data/$NOMAD_TASK_NAME"',
        _wait_for('"$data/$other"'),
        'cat "$data/$other" > "$NOMAD_TASK_DIR/seen.tmp" 2>&1',
        'mv "$NOMAD_TASK_DIR/seen.tmp" "$NOMAD_TASK_DIR/seen"',
        _wait_for('"$NOMAD_TASK_DIR/again"'),
        'if echo again > "$data/$NOMAD_TASK_NAME.2" 2>/dev/null; then r=ok; else r=denied; fi',
        'echo $r > "$NOMAD_TASK_DIR/again.done"',
        "exec sleep 300",
    ])


def _read_as(user: str, path: Path) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwnam(user)
    return subprocess.run(["cat", str(path)], user=entry.pw_uid, group=entry.pw_gid,
                          extra_groups=[], capture_output=True, text=True, check=False,
                          timeout=30, cwd="/")


async def test_tasks_of_one_allocation_share_alloc_data_across_users(
        short_agent_factory: AgentFactory) -> None:
    agent = short_agent_factory()
    await agent.start()
    job = raw_exec_job("shared", _sharing_script(), tasks=2, user=VICTIM_USER)
    job["TaskGroups"][0]["Tasks"][1]["User"] = ATTACKER_USER
    users = {"t0": VICTIM_USER, "t1": ATTACKER_USER}
    async with agent.api() as api:
        alloc_id = await _running(api, job, ("t0", "t1"))
        alloc_path = task_dir(agent, alloc_id, "t0").parent
        for task, other in (("t0", "t1"), ("t1", "t0")):
            seen = await _file_text(task_dir(agent, alloc_id, task) / "local" / "seen",
                                    f"{task} to read {other}'s file")
            assert seen == f"from {other} as {pwd.getpwnam(users[other]).pw_uid}\n", seen
        # The same users outside the allocation (no alloc group) read nothing of it.
        data = alloc_path / "alloc" / "data"
        for user in users.values():
            out = _read_as(user, data / "t0")
            assert out.returncode != 0 and "Permission denied" in out.stderr, (user, out)
        gid = alloc_group(alloc_path)
        assert gid is not None
        assert {(data / t).stat().st_gid for t in users} == {gid}
        for task, user in users.items():
            # The user's own group plus the allocation's, and nothing of the agent's.
            groups = (alloc_path / task / "local" / "groups").read_text().split()
            assert sorted(groups) == sorted([str(pwd.getpwnam(user).pw_gid), str(gid)])

    # An agent restart keeps the allocation's group: the tasks kept running with it, and
    # the restored tree must still let them in.
    before = await _modify_time(agent, alloc_id)
    assert await agent.stop() == 0, agent.output
    await agent.start()
    async with agent.api() as api:
        await eventually(lambda: _modify_time(agent, alloc_id, newer_than=before),
                         message="the restarted client to restore the allocation")
        assert alloc_group(alloc_path) == gid
        for task in users:
            (alloc_path / task / "local" / "again").write_text("go")
        for task in users:
            done = await _file_text(alloc_path / task / "local" / "again.done",
                                    f"{task} to write again")
            assert done == "ok\n", task
        assert (await api.allocation_get(alloc_id))["ClientStatus"] == "running"


async def _modify_time(agent: AgentProcess, alloc_id: str, newer_than: int = -1) -> int:
    """The allocation's ModifyTime (every client report stamps a new one); 0 while it is
    not newer than ``newer_than``."""
    async with agent.api() as api:
        stamp = int((await api.allocation_get(alloc_id))["ModifyTime"])
    return stamp if stamp > newer_than else 0


async def test_fs_api_does_not_serve_a_hard_linked_token(
        short_agent_factory: AgentFactory) -> None:
    # A plain secrets dir: from a tmpfs one the token cannot be linked out at all (EXDEV).
    agent = short_agent_factory(task_api={"secrets_tmpfs": False})
    await agent.start()
    script = ('ln "$NOMAD_SECRETS_DIR/nomad_token" "$NOMAD_TASK_DIR/tok" && '
              'echo plain > "$NOMAD_TASK_DIR/plain" && '
              'echo done > "$NOMAD_TASK_DIR/done"; exec sleep 300')
    async with agent.api() as api:
        alloc_id = await _running(api, raw_exec_job(
            "linker", script, user=VICTIM_USER, identity={"File": True}))
        local = task_dir(agent, alloc_id, "t") / "local"
        await _file_text(local / "done", "the task to link its token")
        assert (local / "tok").stat().st_nlink == 2  # the link itself was allowed
        token = (task_dir(agent, alloc_id, "t") / "secrets" / "nomad_token").read_text()
        with pytest.raises(ApiError) as refused:
            await api.fs_cat(alloc_id, "t/local/tok")
        assert refused.value.status == 403
        assert "hard links" in refused.value.body and token not in refused.value.body
        assert await api.fs_cat(alloc_id, "t/local/plain") == b"plain\n"


async def test_executor_refuses_a_log_file_it_did_not_create(tmp_path: Path) -> None:
    # What a task could leave behind in an older layout's world-writable logs dir: a log
    # file of its own, which it could rewrite at will once the agent appends to it.
    adir = AllocDir(tmp_path / "alloc", "0d6a3f2e-5b7c-4e1a-9f00-7a1b2c3d4e5f")
    adir.build()
    td = adir.build_task_dir("t", None)
    planted = adir.logs_dir / "t.stdout.0"
    planted.write_text("")
    nobody = pwd.getpwnam(VICTIM_USER)
    os.chown(planted, nobody.pw_uid, nobody.pw_gid)
    cfg = TaskConfig(
        alloc_id=adir.alloc_id, task="t",
        driver_config={"command": "/bin/sh", "args": ["-c", "echo appended"]},
        env={"PATH": "/usr/bin:/bin"}, task_dir=td.path, user=None,
        stdout_path=planted, stderr_path=adir.logs_dir / "t.stderr.0", kill_timeout=1.0,
        state_dir=tmp_path / "state")
    with pytest.raises(DriverError, match=f"owned by uid {nobody.pw_uid}, not by the agent"):
        await RawExecDriver().start_task(cfg)
    assert planted.read_text() == ""
