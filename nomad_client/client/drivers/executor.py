"""The task executor (raw_exec, exec): a tiny process that runs one task and records how it
ended.

Run as ``python -m nomad_client.client.drivers.executor`` in its own session, so the agent
can die (even by SIGKILL) without taking the task with it, and a restarted agent can still
learn the exit status. Standard library only, to start fast and stay small.

It is started by the launcher (``launcher.py``), which forks it with this module already
imported; ``python -m nomad_client.client.drivers.executor`` runs one the same way.

Protocol:
  * stdin: one line, the launch spec as a JSON object (see ``_launch``). The spec carries
    the task env, which may hold secrets, so it is never written to disk.
  * stdout: exactly one JSON line, ``{"ok": true, "pid": <task pid>, "executor_pid": <own
    pid>}`` or ``{"ok": false, "error": "..."}``.
  * stdin again, after a good report: ``\n`` once the agent has recorded the task. EOF
    instead (the agent gave up on the start, or died before it knew the task) means nobody
    will ever own the task: it is killed and the executor exits without an exit record.
    Then stdin/stdout are detached (``/dev/null``).
  * stderr: the executor's own diagnostics (the driver points it at a log file).
  * on task exit: ``exit.json`` is written atomically at ``spec["exit_path"]`` with
    ``executor_pid``, ``task_pid``, ``exit_code`` (128+N when killed by signal N),
    ``signal`` and ``finished_at``.

It touches: the task's two log files (or, with rotation, its files of each stream), the
exit file, and the processes it starts. The logs live in ``<alloc_dir>/alloc/logs``, which
only the agent's user may write (the alloc dir's layout), while this process may be root; a
tree of an older layout, or one a task made before it was tightened, must still not trick
it. So they are opened relative to ``spec["alloc_dir"]`` without following a symlink at
``alloc``, ``logs`` or the file itself, and a log file is appended to only when it is a
regular file with a single link, owned by this process's user (no FIFO, device, planted
hard link or file a task created). The task's processes run as
``spec["uid"]``/``spec["gid"]`` with exactly the supplementary groups in ``spec["groups"]``
(the allocation's group), or as this process when ``uid`` is null.

With ``spec["logs"]`` (Nomad's ``logs`` block, ``{"max_files": N, "max_file_size": bytes}``)
the task writes into two pipes instead, and the supervisor copies them into rotated files
``<prefix>.<index>`` of the logs dir (the prefix is the log file name without its index),
by the rules of ``LogLimits``; the executor finds each stream's starting index and opens
its current file (same checks) before the task starts. ``{"disabled": true}`` sends the
task's output to ``/dev/null``. Without ``logs`` (an older agent's spec) the task writes to
the two files itself.

With ``spec["isolation"]`` (the ``exec`` driver) the task is forked instead: the child
joins the task's cgroup (``cgroup_procs``), enters new mount, UTS and (``ipc_namespace``,
``network_namespace``) IPC and network namespaces, and pid 1 of a new PID namespace when
``pid_namespace``; it turns the task dir (``cwd``) into its root (``isolation.build_root``:
``chroot_env`` bound read-only, ``shared_alloc_dir`` at ``/alloc``, a fresh ``/dev`` and
``/proc``), pivots into it, keeps only ``capabilities`` in its bounding set (and
``ambient_capabilities`` for a non-root user), sets no-new-privileges and execs the command
found inside its root, in ``work_dir``. A failure of any step comes back as the ``error``
of the report.

SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1 and SIGUSR2 sent to the executor are forwarded to
the task's process group. It makes itself a child subreaper, so processes the task orphans
stay its descendants; when the task's main process exits, whatever it left behind is killed.

Once the task runs, the executor ``execve``s the compiled supervisor (``supervise.c``, built
by the install into ``SUPERVISOR_PATH``), which does that same wait in well under 1 MiB: the
pid, the task as a child, the subreaper flag and the blocked forwarded signals all survive
``execve``. Without a usable supervisor the wait stays here, in Python.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import selectors
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

from nomad_client.client.drivers import isolation

FORWARDED_SIGNALS = (
    signal.SIGINT,
    signal.SIGTERM,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)


# Built from supervise.c by the project's install (setup.py); absent without a C compiler.
SUPERVISOR_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_supervise")


def supervisor_available() -> bool:
    """Whether the compiled supervisor can take over: it is an executable file, and the
    kernel lists a process's children (how it finds the leftovers to kill)."""
    return (
        os.path.isfile(SUPERVISOR_PATH)
        and os.access(SUPERVISOR_PATH, os.X_OK)
        and os.path.exists(f"/proc/self/task/{os.getpid()}/children")
    )


class LaunchError(Exception):
    """The task could not be started; the message goes back to the agent."""


def find_command(command: str, cwd: str, env: dict[str, str]) -> str:
    """Resolve ``command`` the way raw_exec promises; raise ``LaunchError`` if unusable.

    A name with a ``/`` is taken as is (relative to the task dir); a bare name is looked
    for in ``<task>/local``, ``<task>``, then the task env's ``PATH`` (or the system
    default path when the env has none).
    """
    if not command:
        raise LaunchError("command is empty")
    if "/" in command:
        candidates = [os.path.join(cwd, command)]
    else:
        search = [os.path.join(cwd, "local"), cwd]
        search += [d for d in env.get("PATH", os.defpath).split(os.pathsep) if d]
        candidates = [os.path.join(d, command) for d in search]
    for path in candidates:
        try:
            st = os.stat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            if "/" in command:
                raise LaunchError(f"command {command!r} is not a regular file")
            continue
        if not st.st_mode & 0o111:
            if "/" in command:
                raise LaunchError(f"command {command!r} is not executable")
            continue
        return path
    if "/" in command:
        raise LaunchError(f"command {command!r} not found")
    raise LaunchError(f"command {command!r} not found in the task directory or PATH")


# The parts of a log path below the alloc dir. Tasks may write ``alloc`` (it is sticky, but a
# tree of an older layout was not), so neither part is opened through a symlink.
_LOG_DIR_PARTS = ("alloc", "logs")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted in place of the log must fail (ENXIO) or be caught by the
# fstat below, never block us waiting for a reader. O_NOCTTY: a tty must not become ours.
_LOG_FLAGS = (
    os.O_WRONLY
    | os.O_APPEND
    | os.O_CREAT
    | os.O_NOFOLLOW
    | os.O_NONBLOCK
    | os.O_NOCTTY
    | os.O_CLOEXEC
)


def _log_name(alloc_dir: str, path: str) -> str:
    """The file name of ``path``, which must be exactly ``<alloc_dir>/alloc/logs/<name>``."""
    expected = os.path.join(os.path.normpath(alloc_dir), *_LOG_DIR_PARTS)
    parent, name = os.path.split(os.path.normpath(path))
    if parent != expected or name in ("", ".", ".."):
        raise LaunchError(f"log path {path} is not directly inside {expected}")
    return name


def _refusal(path: str, exc: OSError, is_link: bool = False) -> LaunchError:
    if exc.errno == errno.ELOOP or is_link:
        return LaunchError(f"log path {path} is a symlink; refusing to follow it")
    if exc.errno == errno.ENOTDIR:
        return LaunchError(f"log path {path} is not a directory")
    if exc.errno == errno.ENXIO:  # a FIFO with no reader, a socket, a missing device
        return LaunchError(f"log path {path} is not a regular file")
    return LaunchError(f"cannot open log path {path}: {exc.strerror}")


def _is_symlink(name: str, dir_fd: int) -> bool:
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        return False


def _open_logs_dir(alloc_dir: str) -> int:
    # The alloc dir and everything above it belong to the agent, so following links
    # there is safe; from ``alloc`` down a task may have changed things.
    try:
        fd = os.open(alloc_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise LaunchError(f"cannot open alloc dir {alloc_dir}: {exc.strerror}") from exc
    current = alloc_dir
    for part in _LOG_DIR_PARTS:
        current = os.path.join(current, part)
        try:
            child = os.open(part, _DIR_FLAGS, dir_fd=fd)
        except OSError as exc:
            # With O_DIRECTORY, Linux reports a symlink as ENOTDIR; look, for the message.
            raise _refusal(current, exc, _is_symlink(part, fd)) from exc
        finally:
            os.close(fd)
        fd = child
    return fd


def _open_log(logs_fd: int, name: str, path: str) -> int:
    """Open ``name`` in the logs dir for appending; only a plain, singly linked file."""
    try:
        fd = os.open(name, _LOG_FLAGS, 0o644, dir_fd=logs_fd)
    except OSError as exc:
        raise _refusal(path, exc) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LaunchError(f"log path {path} is not a regular file")
        if st.st_nlink != 1:
            # A hard link planted by the task would have us append to some other file.
            raise LaunchError(
                f"log path {path} has {st.st_nlink} hard links; refusing to append to it"
            )
        if st.st_uid != os.geteuid():
            # Only we create log files; one owned by a task is its to rewrite at will.
            raise LaunchError(f"log path {path} is owned by uid {st.st_uid}, not by the agent")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


class LogLimits:
    """Nomad's ``logs { max_files, max_file_size }`` (the size in bytes here) and its rules,
    which supervise.c mirrors: a stream's files are ``<prefix>.<index>``; writing continues
    at the highest index found; a file never grows past ``max_file_size`` (what does not fit
    goes to index + 1); before index N opens, ``<prefix>.<N - max_files>`` and older go."""

    __slots__ = ("max_files", "max_file_size")

    def __init__(self, max_files: int, max_file_size: int) -> None:
        self.max_files = max_files
        self.max_file_size = max_file_size

    @staticmethod
    def of(spec: dict[str, Any]) -> LogLimits | None:
        """The spec's limits; None for a spec without ``logs`` (no rotation, as before)."""
        logs = spec.get("logs")
        if logs is None:
            return None
        if not isinstance(logs, dict):
            raise LaunchError(f"bad logs settings {logs!r}")
        return LogLimits(_limit(logs, "max_files"), _limit(logs, "max_file_size"))

    @staticmethod
    def prefix(name: str) -> str:
        """``web.stdout.0`` -> ``web.stdout``: the spec names a stream's first file."""
        stem, dot, index = name.rpartition(".")
        return stem if dot and stem and LogLimits.index_of(index) is not None else name

    @staticmethod
    def file_name(prefix: str, index: int) -> str:
        return f"{prefix}.{index}"

    @staticmethod
    def index_of(suffix: str) -> int | None:
        """A decimal index as we write it (no sign, no leading zero, fits in 64 bits as in
        supervise.c), else None."""
        if (not suffix.isascii() or not suffix.isdigit() or len(suffix) > 18
                or (suffix[0] == "0" and suffix != "0")):
            return None
        return int(suffix)

    def expired(self, index: int) -> int:
        """The newest index to delete once ``index`` is open (negative: none)."""
        return index - self.max_files


def _limit(logs: dict[str, Any], key: str) -> int:
    value = logs.get(key)
    if type(value) is not int or value < 1:  # not a bool either
        raise LaunchError(f"bad logs limits {logs!r}: {key} must be an integer >= 1")
    return value


def _logs_disabled(spec: dict[str, Any]) -> bool:
    logs = spec.get("logs")
    return isinstance(logs, dict) and logs.get("disabled") is True


class _Stream:
    """One captured stream: the pipe from the task and the file it is copied into."""

    __slots__ = ("pipe", "prefix", "index", "file", "size", "complained")

    def __init__(self, pipe: int, prefix: str, index: int, file: int) -> None:
        self.pipe, self.prefix, self.index, self.file = pipe, prefix, index, file
        self.size = os.fstat(file).st_size
        self.complained = False


class _Capture:
    """The task's output as the supervisor takes it over: the logs dir, the limits and the
    two streams (stdout, stderr)."""

    __slots__ = ("logs_fd", "limits", "streams")

    def __init__(self, logs_fd: int, limits: LogLimits) -> None:
        self.logs_fd, self.limits = logs_fd, limits
        self.streams: list[_Stream] = []

    def fds(self) -> list[int]:
        return [self.logs_fd, *(fd for s in self.streams for fd in (s.pipe, s.file))]

    def close(self) -> None:
        for fd in self.fds():
            os.close(fd)

    def supervisor_args(self) -> list[str]:
        """``--logs DIR_FD MAX_FILES MAX_FILE_SIZE`` then, per stream, ``PIPE FILE INDEX
        PREFIX``: appended to the supervisor's ``<task pid> <exit path>``."""
        args = ["--logs", str(self.logs_fd), str(self.limits.max_files),
                str(self.limits.max_file_size)]
        for s in self.streams:
            args += [str(s.pipe), str(s.file), str(s.index), s.prefix]
        return args


def _start_index(logs_fd: int, prefix: str, limits: LogLimits) -> int:
    """The highest index of ``prefix`` in the logs dir (0 if none), deleting those that
    are too old for it (a restart with a smaller ``max_files``, say)."""
    found = []
    for name in os.listdir(logs_fd):
        stem, dot, suffix = name.rpartition(".")
        index = LogLimits.index_of(suffix) if dot and stem == prefix else None
        if index is not None:
            found.append(index)
    start = max(found, default=0)
    for index in found:
        problem = None
        if index <= limits.expired(start):
            problem = _unlink_log(logs_fd, LogLimits.file_name(prefix, index))
            if problem:
                print(f"executor: {problem}", file=sys.stderr, flush=True)
    return start


def _unlink_log(logs_fd: int, name: str) -> str | None:
    """Delete an old log file; why it could not be, if it exists and could not."""
    try:
        os.unlink(name, dir_fd=logs_fd)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            return f"cannot delete the old log {name}: {exc.strerror}"
    return None


def _capture_stream(capture: _Capture, path: str, name: str) -> int:
    """Set up one captured stream; the write end of its pipe, for the task."""
    prefix = LogLimits.prefix(name)
    index = _start_index(capture.logs_fd, prefix, capture.limits)
    current = LogLimits.file_name(prefix, index)
    file = _open_log(capture.logs_fd, current, os.path.join(os.path.dirname(path), current))
    try:
        read_end, write_end = os.pipe2(os.O_CLOEXEC)
    except OSError:
        os.close(file)
        raise
    capture.streams.append(_Stream(read_end, prefix, index, file))
    return write_end


def _open_logs(spec: dict[str, Any]) -> tuple[tuple[int, int], _Capture | None]:
    """The task's stdout and stderr, and what the supervisor copies into rotated logs
    (None: the task writes to its log files, or to /dev/null, itself)."""
    if _logs_disabled(spec):
        return (os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC),
                os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)), None
    alloc_dir = str(spec.get("alloc_dir") or "")
    if not alloc_dir:
        raise LaunchError("launch spec has no alloc_dir")
    limits = LogLimits.of(spec)
    paths = (str(spec["stdout_path"]), str(spec["stderr_path"]))
    names = [_log_name(alloc_dir, path) for path in paths]
    logs_fd = _open_logs_dir(alloc_dir)
    capture = None if limits is None else _Capture(logs_fd, limits)
    task_fds: list[int] = []
    try:
        for path, name in zip(paths, names, strict=True):
            if capture is None:
                task_fds.append(_open_log(logs_fd, name, path))
            else:
                task_fds.append(_capture_stream(capture, path, name))
    except BaseException:
        for fd in task_fds:
            os.close(fd)
        if capture is not None:
            capture.close()
        else:
            os.close(logs_fd)
        raise
    if capture is None:
        os.close(logs_fd)
    return (task_fds[0], task_fds[1]), capture


# One read from a task's pipe: its default capacity. Each chunk is written out before the
# next read, so this is all the output the executor ever holds.
_CHUNK = 64 << 10
# After the task and its leftovers are gone, what is still in the pipes is copied for at
# most this long (a leftover that could not be killed may hold a write end open).
_DRAIN_SECONDS = 5.0


def _complain(stream: _Stream, problem: str) -> None:
    """Report a problem with a stream's logs once: the task must go on regardless."""
    if not stream.complained:
        stream.complained = True
        print(f"executor: {problem}; dropping the task's output that does not fit",
              file=sys.stderr, flush=True)


def _rotate(capture: _Capture, stream: _Stream) -> bool:
    """Move ``stream`` to its next file, deleting first the one that falls off the end (so
    that there are never more than ``max_files``)."""
    index = stream.index + 1
    expired = capture.limits.expired(index)
    problem = None
    if expired >= 0:
        problem = _unlink_log(capture.logs_fd, LogLimits.file_name(stream.prefix, expired))
    if problem:
        _complain(stream, problem)
    name = LogLimits.file_name(stream.prefix, index)
    try:
        file = _open_log(capture.logs_fd, name, name)
    except LaunchError as exc:
        _complain(stream, str(exc))
        return False
    os.close(stream.file)
    stream.file, stream.index, stream.size = file, index, os.fstat(file).st_size
    return True


def _store(capture: _Capture, stream: _Stream, data: memoryview) -> None:
    """Append ``data`` to the stream's files, never one past ``max_file_size``; what
    cannot be written (disk full) is dropped so that the task never waits on us."""
    limit = capture.limits.max_file_size
    while data:
        if stream.size >= limit and not _rotate(capture, stream):
            return
        try:
            written = os.write(stream.file, data[: limit - stream.size])
        except OSError as exc:
            _complain(stream, f"cannot write {stream.prefix}.{stream.index}: {exc.strerror}")
            return
        stream.size += written
        data = data[written:]


def _copy_once(capture: _Capture, stream: _Stream) -> bool:
    """Copy one read's worth from the stream's pipe; False at EOF."""
    data = os.read(stream.pipe, _CHUNK)
    if data:
        _store(capture, stream, memoryview(data))
    return bool(data)


def _become_subreaper() -> None:
    try:
        isolation.become_child_subreaper()
    except (OSError, AttributeError):
        pass  # not Linux: leftovers that left the process group are not tracked


@contextlib.contextmanager
def _closed_on_failure(capture: _Capture | None) -> Iterator[None]:
    try:
        yield
    except BaseException:
        if capture is not None:
            capture.close()
        raise


def _launch(spec: dict[str, Any]) -> tuple[int, _Capture | None]:
    """Start the task as a plain child; its pid and the output the supervisor copies."""
    cwd = str(spec["cwd"])
    env = {str(k): str(v) for k, v in dict(spec["env"]).items()}
    command = str(spec["command"])
    if not os.path.isdir(cwd):
        raise LaunchError(f"task directory {cwd} does not exist")
    path = find_command(command, cwd, env)
    task_fds, capture = _open_logs(spec)
    try:
        with _closed_on_failure(capture):
            proc = _spawn(spec, path, env, task_fds)
    finally:
        for fd in task_fds:
            os.close(fd)
    # Popen must not reap the task behind our back; main waits for it itself.
    proc.returncode = 0  # silence Popen's "still running" bookkeeping; we own reaping
    return proc.pid, capture


def _spawn(spec: dict[str, Any], path: str, env: dict[str, str], task_fds: tuple[int, int]
           ) -> subprocess.Popen[bytes]:
    command = str(spec["command"])
    uid = spec.get("uid")
    # Only the allocation's group: never the agent's own supplementary groups.
    groups = [int(g) for g in spec.get("groups") or []]
    try:
        return subprocess.Popen(
            [command, *(str(a) for a in spec.get("args") or [])],
            executable=path,
            cwd=str(spec["cwd"]),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=task_fds[0],
            stderr=task_fds[1],
            close_fds=True,
            process_group=0,  # its own group, so signals reach all of it and not us
            user=uid,
            group=spec.get("gid"),
            extra_groups=groups if uid is not None else None,
        )
    except (OSError, ValueError, subprocess.SubprocessError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise LaunchError(f"cannot run {command!r}: {reason}") from exc


def _launch_isolated(spec: dict[str, Any]) -> tuple[int, _Capture | None]:
    """Fork the task into its namespaces and root (``spec["isolation"]``); its pid and the
    output the supervisor copies.

    The child sets everything up as root and reports a failure through a close-on-exec
    pipe, so the agent gets the reason; a successful ``execve`` closes the pipe unwritten.
    """
    iso = dict(spec["isolation"])
    if not os.path.isdir(str(spec["cwd"])):
        raise LaunchError(f"task directory {spec['cwd']} does not exist")
    (out_fd, err_fd), capture = _open_logs(spec)
    with _closed_on_failure(capture):
        return _fork_isolated(spec, iso, out_fd, err_fd), capture


def _fork_isolated(spec: dict[str, Any], iso: dict[str, Any], out_fd: int, err_fd: int) -> int:
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    try:
        if iso.get("pid_namespace"):
            # Our next child is pid 1 of a new PID namespace; we stay where we are.
            isolation.unshare(isolation.CLONE_NEWPID)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child execs or exits
            os.close(read_end)
            try:
                _become_task(spec, iso, out_fd, err_fd)
            except BaseException as exc:
                os.write(write_end, str(exc).encode()[:4000] or b"setup failed")
            os._exit(127)
    except OSError as exc:
        os.close(read_end)
        raise LaunchError(f"cannot start the isolated task: {exc}") from exc
    finally:
        os.close(write_end)
        os.close(out_fd)
        os.close(err_fd)
    with os.fdopen(read_end, "rb") as failure:
        reason = failure.read().decode("utf-8", "replace")
    if reason:
        os.waitpid(pid, 0)
        raise LaunchError(reason)
    return pid


def _become_task(spec: dict[str, Any], iso: dict[str, Any], out_fd: int, err_fd: int) -> None:
    """In the forked child: join the cgroup, enter new namespaces and the task's root, drop
    to the task's user and capabilities, and exec the command. Returns only by raising."""
    os.setpgid(0, 0)  # its own group, so signals reach all of it and not us
    for signum in (*FORWARDED_SIGNALS, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(signum, signal.SIG_DFL)
    for procs in iso.get("cgroup_procs") or ():
        # "0" is the writer itself, in whatever PID namespace it is.
        with open(procs, "w") as fh:
            fh.write("0")
    flags = isolation.CLONE_NEWNS | isolation.CLONE_NEWUTS
    if iso.get("ipc_namespace"):
        flags |= isolation.CLONE_NEWIPC
    if iso.get("network_namespace"):
        flags |= isolation.CLONE_NEWNET
    isolation.unshare(flags)
    if iso.get("network_namespace"):
        isolation.loopback_up()
    root = str(spec["cwd"])
    isolation.make_private("/")
    isolation.build_root(root, str(iso["shared_alloc_dir"]), iso.get("chroot_env") or ())
    isolation.mount_proc(root)
    isolation.pivot_root(root)
    devnull = os.open("/dev/null", os.O_RDWR)
    for fd, target in ((devnull, 0), (out_fd, 1), (err_fd, 2)):
        os.dup2(fd, target)
    _drop_privileges(spec, iso)
    env = {str(k): str(v) for k, v in dict(spec["env"]).items()}
    path = find_command(str(spec["command"]), "/", env)
    os.chdir(str(iso.get("work_dir") or "/"))
    os.execve(path, [str(spec["command"]), *(str(a) for a in spec.get("args") or [])], env)


def _drop_privileges(spec: dict[str, Any], iso: dict[str, Any]) -> None:
    """Become the task's user with only the allowed capabilities (the bounding set), the
    explicitly added ones ambient for a non-root user, and no way to gain more."""
    uid, gid = spec.get("uid"), spec.get("gid")
    caps = isolation.CapabilitySets.for_task(
        [int(c) for c in iso.get("capabilities") or ()],
        [int(c) for c in iso.get("ambient_capabilities") or ()],
        root=uid is None or int(uid) == 0)
    isolation.become_user(None if uid is None else int(uid), None if gid is None else int(gid),
                          [int(g) for g in spec.get("groups") or []], caps)


def _write_exit(path: str, record: dict[str, Any]) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    try:
        dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def _direct_children() -> list[int]:
    me = os.getpid()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                data = fh.read()
        except OSError:
            continue
        # Field 4 (ppid) follows the parenthesised command name, which may hold spaces.
        fields = data[data.rfind(b")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == me:
            found.append(int(entry))
    return found


def _kill_leftovers(deadline: float) -> None:
    """SIGKILL and reap every remaining descendant (all of them become our children)."""
    while time.monotonic() < deadline:
        for pid in _direct_children():
            try:
                os.kill(pid, signal.SIGKILL)  # unreaped child: the pid cannot be reused
            except ProcessLookupError:
                pass
        try:
            while True:
                pid, _status = os.waitpid(-1, os.WNOHANG)
                if pid == 0:
                    break
        except ChildProcessError:
            return
        time.sleep(0.02)


def _report(line: dict[str, Any]) -> None:
    os.write(1, (json.dumps(line) + "\n").encode())


def _detach_stdio() -> None:
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    os.close(devnull)


def _hand_off(task_pid: int, exit_path: str, mask: set[signal.Signals],
              capture: _Capture | None) -> None:
    """Replace this process by the compiled supervisor; returns only if it cannot run.

    The forwarded signals stay blocked across ``execve``, so one that arrives meanwhile
    waits, pending, for the supervisor's handlers instead of killing the process.
    """
    if not supervisor_available():
        print(f"executor: no usable supervisor at {SUPERVISOR_PATH}; waiting in Python",
              file=sys.stderr, flush=True)
        return
    args = [SUPERVISOR_PATH, str(task_pid), exit_path]
    if capture is not None:
        args += capture.supervisor_args()
        for fd in capture.fds():  # the task runs already: only the supervisor gets these
            os.set_inheritable(fd, True)
    signal.pthread_sigmask(signal.SIG_BLOCK, mask)
    try:
        os.execv(SUPERVISOR_PATH, args)
    except OSError as exc:
        print(f"executor: cannot run the supervisor {SUPERVISOR_PATH}: {exc}; waiting in Python",
              file=sys.stderr, flush=True)
    # Whatever arrived meanwhile is forwarded by our own handlers now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)


class _Stdin:
    """Lines from fd 0, read without a buffer the process could lose on ``execve``."""

    _LIMIT = 64 << 20  # far beyond any spec; a runaway writer must not exhaust memory

    def __init__(self) -> None:
        self._pending = b""

    def line(self) -> bytes | None:
        """The next line without its newline; None at EOF before a newline."""
        while b"\n" not in self._pending:
            chunk = os.read(0, 1 << 16)
            if not chunk or len(self._pending) > self._LIMIT:
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return line


def _read_spec(stdin: _Stdin) -> dict[str, Any]:
    line = stdin.line()
    if line is None:
        raise ValueError("no complete line before EOF")
    spec = json.loads(line)
    if not isinstance(spec, dict):
        raise ValueError("spec is not an object")
    return spec


def _abandon(task_pid: int) -> int:
    """Nobody took the task over (the agent gave up or died mid-start): take it down."""
    try:
        os.killpg(task_pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    _kill_leftovers(time.monotonic() + 5.0)
    return 1


class _Task:
    """The task's main process as the executor's signal handlers see it."""

    __slots__ = ("pid", "reaped", "status", "pending")

    def __init__(self) -> None:
        self.pid: int | None = None
        self.reaped = False
        self.status = 0
        self.pending: list[int] = []  # signals that came before the task ran

    def forward(self, signum: int, _frame: object) -> None:
        if self.pid is None:
            self.pending.append(signum)
        elif not self.reaped:
            # The task is unreaped (maybe a zombie), so its pid still names its group.
            try:
                os.killpg(self.pid, signum)
            except ProcessLookupError:
                pass

    def reap(self, pid: int, mask: set[signal.Signals]) -> None:
        """Reap child ``pid`` with forwarding blocked, so a signal handler never targets a
        pid that has just been released; the task's group is killed before its zombie
        releases the pid."""
        signal.pthread_sigmask(signal.SIG_BLOCK, mask)
        try:
            if pid == self.pid:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            reaped, wstatus = os.waitpid(pid, 0)
            if reaped == self.pid:
                self.status, self.reaped = wstatus, True
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, mask)


class _Supervision:
    """The Python fallback of supervise.c: wait for the task while copying its output into
    rotated logs, then copy what is left in the pipes."""

    def __init__(self, task: _Task, mask: set[signal.Signals], capture: _Capture | None
                 ) -> None:
        self.task, self.mask, self.capture = task, mask, capture
        self.selector = selectors.DefaultSelector()
        wake_read, wake_write = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # A child's exit interrupts the select below through this pipe.
        signal.set_wakeup_fd(wake_write, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, lambda _signum, _frame: None)
        self.selector.register(wake_read, selectors.EVENT_READ)
        for stream in capture.streams if capture is not None else ():
            self.selector.register(stream.pipe, selectors.EVENT_READ, stream)

    def wait_task(self) -> None:
        while not self.task.reaped:
            # Wait without reaping, so the task's zombie still names its group (see reap).
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            if info is not None and info.si_pid:
                self.task.reap(info.si_pid, self.mask)
            else:
                self._copy(None)

    def drain(self) -> None:
        """Copy what the pipes still hold up to EOF, for at most ``_DRAIN_SECONDS``."""
        deadline = time.monotonic() + _DRAIN_SECONDS
        while len(self.selector.get_map()) > 1 and time.monotonic() < deadline:
            self._copy(max(0.0, deadline - time.monotonic()))

    def _copy(self, timeout: float | None) -> None:
        for key, _events in self.selector.select(timeout):
            stream = key.data
            if stream is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(key.fd, 512):
                        pass
            elif self.capture is not None and not _copy_once(self.capture, stream):
                self.selector.unregister(key.fd)


def _start_task(spec: dict[str, Any], task: _Task) -> _Capture | None | int:
    """Launch the task into ``task.pid``; its captured output, or the exit code after a
    failure reported to the agent."""
    try:
        task.pid, capture = (_launch_isolated if spec.get("isolation") else _launch)(spec)
    except LaunchError as exc:
        _report({"ok": False, "error": str(exc)})
        return 1
    except Exception as exc:  # a malformed spec; tell the agent rather than just dying
        _report({"ok": False, "error": f"executor failed: {exc!r}"})
        return 2
    return capture


def main() -> int:
    stdin = _Stdin()
    try:
        spec = _read_spec(stdin)
    except ValueError as exc:
        _report({"ok": False, "error": f"executor received a bad launch spec: {exc}"})
        return 2

    task = _Task()
    for forwarded in FORWARDED_SIGNALS:
        signal.signal(forwarded, task.forward)
    _become_subreaper()
    capture = _start_task(spec, task)
    if isinstance(capture, int):
        return capture
    assert task.pid is not None
    try:
        _report({"ok": True, "pid": task.pid, "executor_pid": os.getpid()})
        taken = stdin.line() == b""
    except OSError:  # the agent's end is gone
        taken = False
    if not taken:
        return _abandon(task.pid)
    _detach_stdio()
    for signum in task.pending:
        task.forward(signum, None)

    mask = set(FORWARDED_SIGNALS)
    _hand_off(task.pid, str(spec["exit_path"]), mask, capture)
    supervision = _Supervision(task, mask, capture)
    supervision.wait_task()
    status = task.status
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        exit_code = 128 + sig
    else:
        sig = 0
        exit_code = os.WEXITSTATUS(status)
    _kill_leftovers(time.monotonic() + 5.0)
    supervision.drain()
    _write_exit(
        str(spec["exit_path"]),
        {
            "executor_pid": os.getpid(),
            "task_pid": task.pid,
            "exit_code": exit_code,
            "signal": sig,
            "finished_at": time.time(),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
