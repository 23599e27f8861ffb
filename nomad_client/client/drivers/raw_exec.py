"""The ``raw_exec`` driver: runs a host command, unisolated, through a detached executor.

Touches: the processes it starts (the executor and, through it, the task tree), the
task's ``state_dir`` (``exit.json``, ``executor.log``) and, via the executor, the task's log
files, which must be in ``<alloc dir>/alloc/logs`` (the executor opens them relative to the
alloc dir and refuses symlinks, FIFOs and hard links there). Never blocks the event loop:
user lookups, file reads and process inspection run in worker threads.

A task run as another ``user`` gets that user's primary group plus one supplementary group,
its allocation's own (``allocdir.alloc_group``, read from the alloc dir): that is what lets
it into its alloc dir and lets tasks of one allocation share ``alloc/data`` across users,
while tasks of other allocations stay out.

Each task gets an executor process (``nomad_client.client.drivers.executor``), forked in a
new session by the driver's launcher (``launcher.py``); once the task runs it ``execve``s
the compiled supervisor (same pid, far less memory) when the install built one (the
``driver.raw_exec.supervisor`` attribute says ``compiled`` or ``python``). The handle's
``pid``/``create_time`` name the executor; ``driver_state`` records the task's own pid.
Because the executor, not the agent, is the task's parent and writes the exit status to
``exit.json``, the agent may die and a new agent can reattach with ``recover_task`` and
still learn the exit code. The agent watches each executor through a pidfd
(``pidwatch.py``): no thread and no timer per task.

Exit reporting: a task killed by signal N gives ``ExitResult(128+N, signal=N)``. If the
executor vanished without writing ``exit.json`` (e.g. it was SIGKILLed), the task is never
left running unsupervised: its process tree is killed and the result is
``ExitResult(exit_code=-1, err="task supervisor died ...")``; the same when a restarted
agent finds the executor gone without a record.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from signal import SIGKILL
from typing import Any

import psutil

import nomad_client
from nomad_client.client.allocdir import alloc_group

from . import pidwatch, proctree
from .base import DriverError, DriverInfo, ExecTarget, ExitResult, TaskConfig, TaskHandle
from .executor import FORWARDED_SIGNALS, SUPERVISOR_PATH, supervisor_available
from .launcher import LAUNCHER_MODULE, Launcher, LauncherError

# Besides the driver, what the exec driver (``exec.py``) and ``alloc exec``
# (``client/exec_session.py``) reuse to launch through a helper process of this package:
# the command config, the launcher's environment and spec, the exchange of a spec for its
# reply, and a task process's env.
__all__ = [
    "RawExecDriver",
    "exchange_spec",
    "executor_env",
    "parse_command_config",
    "process_env",
    "task_spec",
]

EXECUTOR_MODULE = "nomad_client.client.drivers.executor"
# What an executor's argv[0] ends with once it has handed the wait to the compiled supervisor
# (wherever the package is installed: an upgraded agent still knows its old tasks).
_SUPERVISOR_SUFFIX = os.sep + os.path.join("nomad_client", "client", "drivers",
                                           os.path.basename(SUPERVISOR_PATH))
EXIT_FILE = "exit.json"
EXECUTOR_LOG = "executor.log"
_CONFIG_KEYS = frozenset({"command", "args"})
_START_TIMEOUT = 30.0
_SUPERVISOR_DIED = "task supervisor died; the task's processes were killed"
_KILL_WAIT = 5.0  # SIGKILL is sure, but not instant
_MIB = 1 << 20
_FORWARDED = frozenset(int(s) for s in FORWARDED_SIGNALS)
_SIGKILL = int(SIGKILL)


def parse_command_config(
    config: Mapping[str, Any], driver: str = "raw_exec", allowed: frozenset[str] = _CONFIG_KEYS
) -> tuple[str, list[str]]:
    """``command`` and ``args`` of a task's config; other keys must be in ``allowed`` (the
    exec driver passes its own keys and name)."""
    if not isinstance(config, Mapping):
        raise DriverError(f"{driver}: config must be a map", recoverable=False)
    unknown = sorted(set(config) - allowed)
    if unknown:
        raise DriverError(
            f"{driver}: unknown config key(s) {', '.join(map(repr, unknown))} "
            f"(allowed: {', '.join(sorted(allowed))})",
            recoverable=False,
        )
    command = config.get("command")
    if not isinstance(command, str) or not command.strip():
        raise DriverError(
            f"{driver}: config key 'command' is required and must be a non-empty string",
            recoverable=False,
        )
    args = config.get("args", [])
    if args is None:
        args = []
    if not isinstance(args, list | tuple) or not all(isinstance(a, str) for a in args):
        raise DriverError(
            f"{driver}: config key 'args' must be a list of strings", recoverable=False
        )
    return command, list(args)


def refuse_network_isolation(cfg: TaskConfig) -> None:
    """A driver without network isolation cannot honour a group network mode other than
    ``host`` (Nomad's "task x does not support "none" networking mode")."""
    if cfg.network_mode != "host":
        raise DriverError(
            f"task {cfg.task} does not support {cfg.network_mode!r} networking mode "
            "(raw_exec runs in the host's network; use the exec driver to isolate it)",
            recoverable=False,
        )


def _resolve_user(user: str | None) -> tuple[int | None, int | None]:
    if not user:
        return None, None
    if os.geteuid() != 0:
        raise DriverError(f"cannot run task as user {user}: agent is not root", recoverable=False)
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise DriverError(
            f"cannot run task as user {user}: no such user", recoverable=False
        ) from None
    return entry.pw_uid, entry.pw_gid


def _task_groups(alloc_dir: Path, uid: int | None) -> list[int]:
    """Supplementary groups for a task run as ``uid``: its allocation's group, if any."""
    if uid is None:
        return []  # runs as the agent's own user, which reaches the whole tree anyway
    gid = alloc_group(alloc_dir)
    return [] if gid is None else [gid]


def _alloc_dir_of(cfg: TaskConfig, driver: str) -> Path:
    """The alloc dir above the log files, which must sit in ``<alloc>/alloc/logs``.

    The executor opens the logs relative to this directory, refusing symlinks below it, so
    it must know exactly which part of the path the task cannot change.
    """
    alloc_dirs: set[Path] = set()
    for path in (cfg.stdout_path, cfg.stderr_path):
        logs = path.parent
        if not path.is_absolute() or logs.name != "logs" or logs.parent.name != "alloc":
            raise DriverError(
                f"{driver}: log path {path} is not inside <alloc dir>/alloc/logs",
                recoverable=False,
            )
        alloc_dirs.add(logs.parent.parent)
    if len(alloc_dirs) != 1:
        raise DriverError(
            f"{driver}: stdout and stderr logs are in different alloc dirs "
            f"({cfg.stdout_path}, {cfg.stderr_path})",
            recoverable=False,
        )
    return alloc_dirs.pop()


def _prepare_state_dir(state_dir: Path) -> Any:
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(state_dir, 0o700)
    # A previous run of the same task must not be mistaken for this one.
    with contextlib.suppress(FileNotFoundError):
        (state_dir / EXIT_FILE).unlink()
    return open(state_dir / EXECUTOR_LOG, "ab")  # noqa: SIM115 - handed to the child


def executor_env() -> dict[str, str]:
    """The environment of a process that runs a module of this package (the executor, the
    exec driver's probe, the ``alloc exec`` helper): it only needs to import it; what the
    task or command gets is passed separately."""
    package_root = str(Path(nomad_client.__file__).resolve().parent.parent)
    existing = os.environ.get("PYTHONPATH")
    return {
        "PATH": os.environ.get("PATH", os.defpath),
        "PYTHONPATH": package_root + (os.pathsep + existing if existing else ""),
    }


def _load_exit(exit_path: Path, executor_pid: int) -> ExitResult | None:
    """The exit recorded by executor ``executor_pid``; None if absent, bad or another run's."""
    try:
        record = json.loads(exit_path.read_text())
        if not isinstance(record, dict) or record.get("executor_pid") != executor_pid:
            return None
        return ExitResult(exit_code=int(record["exit_code"]), signal=int(record.get("signal", 0)))
    except (OSError, ValueError, KeyError, TypeError):
        return None


async def _read_exit(handle: TaskHandle) -> ExitResult:
    result = await asyncio.to_thread(_load_exit, _exit_path(handle), handle.pid)
    if result is not None:
        return result
    await _kill_unsupervised(handle)
    return ExitResult(exit_code=-1, err=_SUPERVISOR_DIED)


def _task_process(handle: TaskHandle) -> tuple[int, float]:
    return (int(handle.driver_state.get("task_pid", 0)),
            float(handle.driver_state.get("task_create_time", 0.0)))


def _task_alive(handle: TaskHandle) -> bool:
    return proctree.same_process(*_task_process(handle))


async def _kill_unsupervised(handle: TaskHandle) -> None:
    """Kill the task tree of an executor that died without a record (SIGKILLed, or crashed):
    nothing would ever reap, signal or account for it again. Returns once the task's main
    process is gone (bounded)."""
    task_pid, task_ct = _task_process(handle)
    if await asyncio.to_thread(proctree.same_process, task_pid, task_ct):
        await asyncio.to_thread(proctree.kill_tree, task_pid, task_ct, include_root=True,
                                extra_pgid=task_pid)
        await pidwatch.wait_gone(task_pid, task_ct, _KILL_WAIT)


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        data = path.read_bytes()[-limit:]
    except OSError:
        return ""
    return data.decode("utf-8", "replace").strip()


async def task_spec(
    cfg: TaskConfig, command: str, args: list[str], user: str | None, driver: str = "raw_exec"
) -> dict[str, Any]:
    """The executor's launch spec for ``cfg`` run as ``user`` (None: the agent's user)."""
    alloc_dir = _alloc_dir_of(cfg, driver)
    # User lookups may go through NSS (LDAP, ...), so they run off the event loop.
    uid, gid = await asyncio.to_thread(_resolve_user, user)
    groups = await asyncio.to_thread(_task_groups, alloc_dir, uid)
    return {
        "command": command,
        "args": args,
        "cwd": str(cfg.task_dir),
        "alloc_dir": str(alloc_dir),
        "env": dict(cfg.env),
        "stdout_path": str(cfg.stdout_path),
        "stderr_path": str(cfg.stderr_path),
        "uid": uid,
        "gid": gid,
        "groups": groups,
        **_log_rotation(cfg.log_config),
    }


def _log_rotation(log_config: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's ``logs``: how the supervisor rotates the task's output (nothing: written
    to the two log files as they are, the way tasks of older agents were)."""
    if not log_config:
        return {}
    if log_config.get("Disabled"):
        return {"logs": {"disabled": True}}
    return {"logs": {"max_files": int(log_config["MaxFiles"]),
                     "max_file_size": int(log_config["MaxFileSizeMB"]) * _MIB}}


async def exchange_spec(proc: asyncio.subprocess.Process, spec: dict[str, Any]
                        ) -> dict[str, Any]:
    """Hand a helper process of this package (the ``alloc exec`` helper) its JSON ``spec``
    on stdin, then EOF, and read its one-line JSON reply (see ``read_reply``)."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(json.dumps(spec).encode())
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        await proc.stdin.drain()
    proc.stdin.close()
    return await read_reply(proc.stdout)


async def read_reply(stream: asyncio.StreamReader) -> dict[str, Any]:
    """A launched helper's one-line JSON reply: ``{"ok": true, ...}``, or ``{"ok": false,
    "error"?: ...}`` when it failed or exited without a proper reply."""
    try:
        line = await stream.readline()
    except (OSError, ValueError):  # reset, or a line beyond the stream's limit
        return {"ok": False}
    if not line:
        return {"ok": False}
    try:
        reply = json.loads(line)
    except ValueError:
        return {"ok": False, "error": f"executor said {line[:200]!r}"}
    return reply if isinstance(reply, dict) else {"ok": False}


class RawExecDriver:
    """Runs tasks as plain host processes (optionally as another user when root)."""

    name = "raw_exec"

    def __init__(self) -> None:
        self._launcher = Launcher(executor_env())

    def fingerprint(self) -> DriverInfo:
        if os.name != "posix" or not sys.executable:
            return DriverInfo(False, False, "raw_exec needs a POSIX host and a Python executable")
        supervisor = "compiled" if supervisor_available() else "python"
        return DriverInfo(True, True, "Healthy", {"driver.raw_exec.supervisor": supervisor})

    # -- start ------------------------------------------------------------------------------

    async def start_task(self, cfg: TaskConfig) -> TaskHandle:
        command, args = parse_command_config(cfg.driver_config)
        refuse_network_isolation(cfg)
        spec = await task_spec(cfg, command, args, cfg.user)
        return await self._start_executor(cfg, spec)

    async def _start_executor(
        self, cfg: TaskConfig, spec: dict[str, Any], driver_state: Mapping[str, Any] | None = None
    ) -> TaskHandle:
        """Start an executor with ``spec`` (plus the exit path) and wait for its report; the
        handle's ``driver_state`` gets ``driver_state`` besides the task's own pid."""
        exit_path = cfg.state_dir / EXIT_FILE
        spec = {**spec, "exit_path": str(exit_path)}
        try:
            log = await asyncio.to_thread(_prepare_state_dir, cfg.state_dir)
        except OSError as exc:
            raise DriverError(
                f"{self.name}: cannot prepare state dir {cfg.state_dir}: {exc}"
            ) from exc
        try:
            reader, writer = await self._launcher.launch(cfg.state_dir, log.fileno())
        except (OSError, LauncherError) as exc:
            raise DriverError(f"{self.name}: cannot start executor: {exc}") from exc
        finally:
            log.close()
        try:
            started = await self._exchange(cfg, reader, writer, spec)
        finally:
            writer.close()
        executor_pid, executor_ct, task_pid, task_ct = started
        return TaskHandle(
            driver=self.name,
            alloc_id=cfg.alloc_id,
            task=cfg.task,
            pid=executor_pid,
            create_time=executor_ct,
            started_at=time.time(),
            driver_state={
                "task_pid": task_pid,
                "task_create_time": task_ct,
                "state_dir": str(cfg.state_dir),
                "exit_path": str(exit_path),
                "task_dir": str(cfg.task_dir),
                **(driver_state or {}),
            },
        )

    async def _exchange(self, cfg: TaskConfig, reader: asyncio.StreamReader,
                        writer: asyncio.StreamWriter, spec: dict[str, Any]
                        ) -> tuple[int, float, int, float]:
        """Give a new executor its spec and take its task over: the executor's pid and
        start time, the task's. Until the executor hears that it was taken over, it kills
        the task if the agent goes away, so a start cut short leaves nothing behind."""
        executor: tuple[int, float] | None = None
        try:
            async with asyncio.timeout(_START_TIMEOUT):  # not wait_for: it can swallow a cancel
                writer.write(json.dumps(spec).encode() + b"\n")
                with contextlib.suppress(ConnectionError):
                    await writer.drain()
                reply = await read_reply(reader)
                if not reply.get("ok"):
                    raise DriverError(f"{self.name}: {await self._failure(cfg, reply)}")
                executor_pid, task_pid = int(reply["executor_pid"]), int(reply["pid"])
                # Both are certainly alive: the executor waits for our word.
                executor_ct = await asyncio.to_thread(proctree.create_time, executor_pid)
                if executor_ct is None:
                    raise DriverError(f"{self.name}: executor vanished during start")
                executor = (executor_pid, executor_ct)
                task_ct = await asyncio.to_thread(proctree.create_time, task_pid)
                writer.write(b"\n")
                await writer.drain()
        except BaseException as exc:
            if executor is not None:
                # Cancelled or timed out mid-start: the task may already run; take it all down.
                await asyncio.shield(asyncio.to_thread(
                    proctree.kill_tree, *executor, include_root=True))
            if isinstance(exc, TimeoutError):
                raise DriverError(
                    f"{self.name}: executor did not report within {_START_TIMEOUT:.0f}s"
                ) from None
            if isinstance(exc, ConnectionError | KeyError | ValueError | TypeError):
                raise DriverError(f"{self.name}: executor failed during start: {exc!r}"
                                  ) from None
            raise
        return executor_pid, executor_ct, task_pid, task_ct or 0.0

    async def _failure(self, cfg: TaskConfig, reply: Mapping[str, Any]) -> str:
        error = str(reply.get("error") or "executor exited without reporting")
        if "error" in reply:
            return error
        log_tail = await asyncio.to_thread(_tail, cfg.state_dir / EXECUTOR_LOG)
        return error + (f": {log_tail}" if log_tail else "")

    async def close(self) -> None:
        """Let the launcher go (the tasks it started keep running)."""
        await self._launcher.close()

    # -- wait / stop ------------------------------------------------------------------------

    @staticmethod
    async def _wait_gone(handle: TaskHandle, limit: float | None) -> bool:
        """Wait until the executor is gone; False if ``limit`` seconds passed first."""
        return await pidwatch.wait_gone(handle.pid, handle.create_time, limit)

    async def wait_task(self, handle: TaskHandle) -> ExitResult:
        await self._wait_gone(handle, None)
        return await _read_exit(handle)

    async def stop_task(
        self,
        handle: TaskHandle,
        timeout: float,  # noqa: ASYNC109 - the task's kill_timeout, by contract
        signal: str = "SIGINT",
    ) -> None:
        signum = _signal_number(signal, self.name)
        if not await asyncio.to_thread(proctree.same_process, handle.pid, handle.create_time):
            await _kill_unsupervised(handle)
            return
        if signum == _SIGKILL:
            await self._kill(handle)
            return
        await self._deliver(handle, signum)
        if not await self._wait_gone(handle, max(0.0, timeout)):
            await self._kill(handle)

    async def signal_task(self, handle: TaskHandle, signal: str) -> None:
        signum = _signal_number(signal, self.name)
        if not await asyncio.to_thread(proctree.same_process, handle.pid, handle.create_time):
            raise DriverError(f"{self.name}: task is not running")
        await self._deliver(handle, signum)

    @staticmethod
    async def _deliver(handle: TaskHandle, signum: int) -> None:
        """Send ``signum`` to the task's process group: through its executor, which owns
        the task, for the signals it relays; straight to the group for the others
        (SIGKILL included: the executor then records the exit as for any other death)."""
        if signum in _FORWARDED:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(handle.pid, signum)
        else:
            await asyncio.to_thread(_signal_task_group, handle, signum)

    async def _kill(self, handle: TaskHandle) -> None:
        # Kill the task tree first so the executor still records the exit; then, if it
        # does not finish promptly, the executor itself.
        task_pid, task_ct = _task_process(handle)
        task_alive = await asyncio.to_thread(proctree.same_process, task_pid, task_ct)
        await asyncio.to_thread(
            proctree.kill_tree,
            handle.pid,
            handle.create_time,
            include_root=False,
            extra_pgid=task_pid if task_alive else None,
        )
        if await self._wait_gone(handle, 5.0):
            return
        await asyncio.to_thread(
            proctree.kill_tree, handle.pid, handle.create_time, include_root=True
        )
        await self._wait_gone(handle, 5.0)

    # -- alloc exec -------------------------------------------------------------------------

    async def exec_target(self, handle: TaskHandle) -> ExecTarget:
        """Where ``alloc exec`` runs a command: on the host (no isolation), in the task
        dir, with the env the task was started with and as the user and groups its process
        runs as."""
        return await asyncio.to_thread(_exec_target, handle)

    # -- restart / cleanup ------------------------------------------------------------------

    async def recover_task(self, handle: TaskHandle) -> bool:
        if handle.driver != self.name:
            return False
        if await asyncio.to_thread(_is_our_executor, handle.pid, handle.create_time):
            return True
        # The task may have finished while no agent was watching: its executor then left
        # an exit record, which wait_task reports. The task must not be run again. If its
        # executor died instead and the task still runs, unsupervised, wait_task kills it
        # and reports the supervisor's death, as when the agent watches.
        return await asyncio.to_thread(_has_exit_record, handle) or await asyncio.to_thread(
            _task_alive, handle)

    async def destroy_task(self, handle: TaskHandle) -> None:
        if await asyncio.to_thread(proctree.same_process, handle.pid, handle.create_time):
            await self._kill(handle)
        state_dir = handle.driver_state.get("state_dir")
        if state_dir:
            await asyncio.to_thread(_clean_state_dir, Path(state_dir))


def _signal_number(name: str, driver: str) -> int:
    try:
        return proctree.parse_signal(name)
    except ValueError as exc:
        raise DriverError(f"{driver}: {exc}", recoverable=False) from None


def _exit_path(handle: TaskHandle) -> Path:
    path = handle.driver_state.get("exit_path")
    if not path:
        raise DriverError(f"{handle.driver}: task handle has no exit_path in its driver state")
    return Path(path)


def _signal_task_group(handle: TaskHandle, signum: int) -> None:
    task_pid, task_ct = _task_process(handle)
    if proctree.same_process(task_pid, task_ct):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(task_pid, signum)


def process_env(pid: int) -> dict[str, str]:
    """The environment ``pid`` was started with (a task's, as its executor gave it: what
    ``alloc exec`` runs a command with when the agent has no record of it)."""
    with open(f"/proc/{pid}/environ", "rb") as fh:
        data = fh.read()
    env: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep and key:
            env[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


def _exec_target(handle: TaskHandle) -> ExecTarget:
    task_pid, task_ct = _task_process(handle)
    if not proctree.same_process(task_pid, task_ct):
        raise DriverError("task is not running")
    try:
        status = Path(f"/proc/{task_pid}/status").read_text()
        # Read from the task's process, not kept per task by the agent: memory a thousand
        # idle tasks would pay for, and secrets the agent would hold for no one.
        env = process_env(task_pid)
        cwd = str(handle.driver_state.get("task_dir") or os.readlink(f"/proc/{task_pid}/cwd"))
    except OSError as exc:
        raise DriverError(f"cannot inspect the task's process: {exc.strerror}") from exc
    ids = {key: value.split() for key, _, value in
           (line.partition(":") for line in status.splitlines())
           if key in ("Uid", "Gid", "Groups")}
    # The effective ids (the second field) are what the task runs as.
    return ExecTarget(env=env, cwd=cwd, uid=int(ids["Uid"][1]), gid=int(ids["Gid"][1]),
                      groups=tuple(int(g) for g in ids.get("Groups", [])))


def _is_our_executor(pid: int, create_time: float) -> bool:
    if not proctree.same_process(pid, create_time):
        return False
    try:
        cmdline = psutil.Process(pid).cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False
    if cmdline and cmdline[0].endswith(_SUPERVISOR_SUFFIX):
        return True
    # Without a compiled supervisor the executor still runs the launcher's command line
    # (it was forked from it), or the executor module's when run by hand.
    joined = " ".join(cmdline)
    return LAUNCHER_MODULE in joined or EXECUTOR_MODULE in joined


def _has_exit_record(handle: TaskHandle) -> bool:
    try:
        exit_path = _exit_path(handle)
    except DriverError:
        return False
    return _load_exit(exit_path, handle.pid) is not None


def _clean_state_dir(state_dir: Path) -> None:
    for name in (EXIT_FILE, EXECUTOR_LOG):
        with contextlib.suppress(FileNotFoundError):
            (state_dir / name).unlink()
    with contextlib.suppress(OSError):
        state_dir.rmdir()  # only if empty: the directory itself belongs to the caller
