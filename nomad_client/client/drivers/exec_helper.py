"""The ``alloc exec`` helper: a tiny process that starts one command inside a running task.

Run as ``python -m nomad_client.client.drivers.exec_helper`` by ``client/exec_session.py``.
Standard library only, like ``executor.py``, so it starts fast and can enter namespaces
without importing the agent.

Protocol:
  * stdin: one JSON object (the spec, below), then EOF. It carries the task's env, which may
    hold secrets, so it is never written anywhere.
  * the command's stdin, stdout and stderr are inherited descriptors named by
    ``spec["stdio"]`` (three pipes, or one pty slave three times);
  * stdout: exactly one JSON line, ``{"ok": true, "pid": <command pid>}`` or
    ``{"ok": false, "error": "..."}``;
  * exit status: the command's (``128+N`` when a signal N ended it).

Spec: ``command`` (argv list), ``cwd``, ``env``, ``uid``/``gid``/``groups`` (null: keep
ours), ``tty`` (make the slave the command's controlling terminal), ``stdio``, and, to join a
task's isolation, ``pid`` with ``pid_create_time`` and ``cgroup_procs``.

Joining a task (``pid`` set): ``/proc/<pid>`` is opened first, and everything else below
it (each ``ns/*`` that differs from ours, ``root``, ``status``, ``stat``) through that
descriptor, which stays bound to the process it named: if the pid is reused meanwhile the
opens fail rather than reach another process. The start time read from it must then be the
task's. A namespace must be owned by our user namespace (one the executor made): a task that
made its own user namespace, and namespaces under it, is refused, never joined. Our pid is
written to the task's ``cgroup_procs`` (host paths: before the chroot). Then ``setns`` into
each namespace, the mount namespace last (after it, host paths are gone), then ``chroot``
into the task's root (taken from the task, since joining a mount namespace does not enter a
chroot), ``chdir(cwd)`` (which may follow the task's symlinks, but only inside its root).
Joining a PID namespace only affects children, so the command is a child of this process
(forked after ``setns``), which waits for it and exits with its status. The child, for a
tty, calls ``setsid`` + ``TIOCSCTTY``, then takes the task's groups, gid and uid and exactly
the task process's capability sets (bounding, permitted, effective, inheritable, ambient, as
read from its ``status``) with ``PR_SET_NO_NEW_PRIVS``: never more than the task holds. It
inherits no descriptor but its three stdio ones. The system calls are ``isolation.py``'s.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import signal
import subprocess
import sys
import termios
from typing import Any

from nomad_client.client.drivers import isolation

# psutil derives create times from clock ticks (10 ms): equal processes give equal values.
_CREATE_TIME_TOLERANCE = 0.01


class ExecError(Exception):
    """The command could not be started; the message goes back to the agent."""


def create_time(pid: int) -> float | None:
    """``pid``'s start time as psutil computes it (boot time + start ticks), or None."""
    try:
        proc_fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return _start_time(proc_fd)
    finally:
        os.close(proc_fd)


def _start_time(proc_fd: int) -> float | None:
    """The start time of the process whose ``/proc/<pid>`` is open at ``proc_fd``."""
    try:
        data = _read_at(proc_fd, "stat")
        with open("/proc/stat", "rb") as fh:
            boot = next(int(line.split()[1]) for line in fh if line.startswith(b"btime "))
    except (OSError, StopIteration, ValueError):
        return None
    # Field 22 (starttime) counts from after the parenthesised name, which may hold spaces.
    fields = data[data.rfind(b")") + 2:].split()
    return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    with os.fdopen(fd, "rb") as fh:
        return fh.read()


class Target:
    """What joining a task takes, all of it from the one process checked: descriptors of
    its namespaces (those that differ from ours) and root, and its capability sets."""

    def __init__(self) -> None:
        self.namespaces: list[tuple[int, int]] = []
        self.root_fd = -1
        self.caps: isolation.CapabilitySets | None = None

    def close(self) -> None:
        _close_all([fd for fd, _ in self.namespaces] + [self.root_fd])
        self.namespaces, self.root_fd = [], -1


def _open_target(pid: int, expected_create_time: float) -> Target:
    target = Target()
    try:
        proc_fd = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise ExecError("task process is gone") from exc
    try:
        _open_namespaces(proc_fd, target)
        target.root_fd = os.open("root", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC,
                                 dir_fd=proc_fd)
        status = _read_at(proc_fd, "status")
        started = _start_time(proc_fd)
        if started is None or abs(started - expected_create_time) > _CREATE_TIME_TOLERANCE:
            raise ExecError("task process is gone (its pid now names another process)")
        target.caps = isolation.CapabilitySets.parse_status(status)
    except (OSError, ValueError) as exc:
        target.close()
        reason = getattr(exc, "strerror", None) or str(exc)
        raise ExecError(f"cannot open the task's namespaces: {reason}") from exc
    except BaseException:
        target.close()
        raise
    finally:
        os.close(proc_fd)
    return target


def _open_namespaces(proc_fd: int, target: Target) -> None:
    """Open the task's namespaces into ``target``, refusing any its user could have made."""
    ours = os.stat("/proc/self/ns/user").st_ino
    try:
        theirs = os.stat("ns/user", dir_fd=proc_fd).st_ino
    except FileNotFoundError:
        theirs = ours  # a kernel without user namespaces
    if theirs != ours:
        raise ExecError("the task's process is in a user namespace of its own; "
                        "refusing to join it")
    for name, flag in isolation.JOIN_ORDER:
        fd = os.open(f"ns/{name}", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
        if os.fstat(fd).st_ino == os.stat(f"/proc/self/ns/{name}").st_ino:
            os.close(fd)  # already ours (e.g. the host's network for network "host")
            continue
        target.namespaces.append((fd, flag))
        if isolation.owning_user_namespace(fd) != ours:
            raise ExecError(f"the task's {name} namespace belongs to a user namespace of its "
                            "own; refusing to join it")


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        if fd >= 0:
            os.close(fd)


def _join_cgroups(paths: list[str]) -> None:
    me = str(os.getpid()).encode()
    for path in paths:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, me)
            finally:
                os.close(fd)
        except OSError as exc:
            raise ExecError(f"cannot join the task's cgroup {path}: {exc.strerror}") from exc


def _enter(target: Target) -> None:
    try:
        for fd, flag in target.namespaces:
            isolation.setns(fd, flag)
    except isolation.IsolationError as exc:
        raise ExecError(str(exc)) from exc
    os.fchdir(target.root_fd)
    os.chroot(".")


def _child_setup(tty: bool, user: tuple[int | None, int | None, list[int]],
                 caps: isolation.CapabilitySets | None) -> None:
    """In the forked command: a tty session of its own with the slave as controlling
    terminal; in a task, its user with exactly its process's capabilities; never a way to
    gain privileges."""
    if tty:
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)
    if caps is None:
        isolation.no_new_privs()  # Popen has already switched the user
    else:
        uid, gid, groups = user
        isolation.become_user(uid, gid, groups if uid is not None else os.getgroups(), caps)


def _popen_user(uid: int | None, gid: int | None, groups: list[int], *,
                in_task: bool) -> dict[str, Any]:
    """Popen's own user switch, outside a task; in one, ``_child_setup`` switches with the
    task's capabilities (Popen's would come first and leave it none to set them with)."""
    if in_task:
        return {}
    return {"user": uid, "group": gid, "extra_groups": groups if uid is not None else None}


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def start(spec: dict[str, Any]) -> subprocess.Popen[bytes]:
    argv = [str(a) for a in spec.get("command") or []]
    if not argv:
        raise ExecError("command is not present")
    stdio = [int(fd) for fd in spec["stdio"]]
    for fd in stdio:
        # Only the copies at 0, 1 and 2 reach the command, whatever close_fds can see.
        os.set_inheritable(fd, False)
    pid = _optional_int(spec.get("pid"))
    caps = None
    if pid is not None:
        target = _open_target(pid, float(spec.get("pid_create_time") or 0.0))
        try:
            _join_cgroups([str(p) for p in spec.get("cgroup_procs") or []])
            _enter(target)
            caps = target.caps
        finally:
            target.close()
    else:
        _join_cgroups([str(p) for p in spec.get("cgroup_procs") or []])
    cwd = str(spec.get("cwd") or "/")
    env = {str(k): str(v) for k, v in dict(spec.get("env") or {}).items()}
    uid, gid = _optional_int(spec.get("uid")), _optional_int(spec.get("gid"))
    groups = [int(g) for g in spec.get("groups") or []]
    tty = bool(spec.get("tty"))
    try:
        os.chdir(cwd)
    except OSError as exc:
        raise ExecError(f"cannot enter {cwd}: {exc.strerror}") from exc
    try:
        return subprocess.Popen(  # noqa: PLW1509 - single-threaded helper; needed for the tty
            argv, stdin=stdio[0], stdout=stdio[1], stderr=stdio[2], env=env, close_fds=True,
            **_popen_user(uid, gid, groups, in_task=caps is not None),
            preexec_fn=lambda: _child_setup(tty, (uid, gid, groups), caps))
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        if isinstance(exc, FileNotFoundError):
            reason = "no such file or directory"
        raise ExecError(f"failed to exec {argv[0]!r}: {reason}") from exc
    finally:
        # The command holds them now; ours would keep its output open after it exits.
        _close_all(sorted(set(stdio)))


def _report(line: dict[str, Any]) -> None:
    os.write(1, (json.dumps(line) + "\n").encode())


def main() -> int:
    try:
        spec = json.loads(sys.stdin.buffer.read())
        if not isinstance(spec, dict):
            raise ValueError("spec is not an object")
        proc = start(spec)
    except ExecError as exc:
        _report({"ok": False, "error": str(exc)})
        return 127
    except Exception as exc:  # a malformed spec: tell the agent rather than just dying
        _report({"ok": False, "error": f"exec helper failed: {exc!r}"})
        return 127
    _report({"ok": True, "pid": proc.pid})
    # What ends us ends the command too: the agent kills our group and the command's.
    for forwarded in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(forwarded, lambda signum, _frame: _forward(proc.pid, signum))
    while True:
        try:
            _, status = os.waitpid(proc.pid, 0)
            break
        except ChildProcessError:
            return 255
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
            continue
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


def _forward(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError as exc:
        if exc.errno != errno.ESRCH:
            raise


if __name__ == "__main__":
    sys.exit(main())
