"""Safe creation of sockets and secret files inside a task's directory.

A task can write to its task dir and to ``<task>/secrets``, while the agent
usually runs as root. Anything the agent creates there must therefore never
follow a symlink the task planted, nor be visible at its final name with the
wrong owner or mode. This module is the single home of those rules. It may
touch only: the given task dir (walked component by component with
``O_NOFOLLOW``), the agent's private staging dir passed by the caller, and
short-lived root-owned staging dirs inside ``secrets`` (see below).

Every function here makes blocking system calls (including user lookups
that may reach NSS); async callers run them via ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets as _random
import socket
import stat
from pathlib import Path

import attrs

from nomad_client import safefs

__all__ = [
    "DEFAULT_SOCKET_NAME",
    "socket_in_place",
    "DEFAULT_TOKEN_PATH",
    "SECRETS_DIR",
    "BoundSocket",
    "SecretsDirError",
    "SocketOwner",
    "create_task_socket",
    "remove_task_socket",
    "socket_owner_for",
    "write_secret_file",
]

SECRETS_DIR = "secrets"
DEFAULT_SOCKET_NAME = "api.sock"
DEFAULT_TOKEN_PATH = "secrets/nomad_token"


class SecretsDirError(Exception):
    """Something in or around a task's secrets dir could not be done safely."""


class _MissingDir(SecretsDirError):
    """A directory on the way does not exist (fine when removing)."""


@attrs.frozen
class SocketOwner:
    """Final owner and mode of a task socket; ``uid=None`` keeps the agent as owner."""

    uid: int | None
    mode: int = attrs.field()

    @mode.validator
    def _check_mode(self, _attribute: attrs.Attribute[int], value: int) -> None:
        if not 0 <= value <= 0o777:
            raise ValueError(f"socket mode must be within 0..0o777, got {value:#o}")


@attrs.frozen
class BoundSocket:
    """A listening, non-blocking AF_UNIX stream socket at its final path, owner and mode."""

    sock: socket.socket
    path: Path
    st_dev: int
    st_ino: int


# ---------------------------------------------------------------------- owners


def _uid_for(user: str, what: str) -> int:
    """The uid files for ``user`` are handed to; never silently falls back."""
    ids = safefs.lookup_user(user)
    if ids is None:
        raise SecretsDirError(f"user {user!r} does not exist")
    uid = ids.uid
    # Only root can give a file away; a non-root agent can serve its own user.
    if os.geteuid() != 0 and uid != os.geteuid():
        raise SecretsDirError(f"agent is not root: cannot hand the {what} to user {user!r}")
    return uid


def socket_owner_for(user: str | None) -> SocketOwner:
    """Owner and mode for a task's socket.

    A task user gets sole access (0600). Without one (``None`` or ``""``, which
    is how an unset ``task.user`` reads) the socket is world-usable (0666) and
    token checks are the only gate. There is no fallback from the first case
    to the second: a failed lookup is an error.
    """
    if not user:
        return SocketOwner(uid=None, mode=0o666)
    return SocketOwner(uid=_uid_for(user, "socket"), mode=0o600)


# ---------------------------------------------------------------------- directories


def _refusal(exc: OSError, label: str) -> SecretsDirError:
    """A failure to open the directory ``label`` names, as this module reports it."""
    if isinstance(exc, safefs.UnsafePathError):  # a symlink, not a directory, not ours
        return SecretsDirError(f"{label} {exc.strerror}")
    if exc.errno == errno.ENOENT:
        return _MissingDir(f"{label} does not exist")
    return SecretsDirError(f"cannot open {label}: {exc.strerror}")


def _open_dir(name: str | Path, *, dir_fd: int | None, label: str) -> int:
    """Open a directory without following a symlink at its last component."""
    try:
        return safefs.open_dir(name, dir_fd=dir_fd)
    except OSError as exc:
        raise _refusal(exc, label) from None


def _open_secrets_dir(task_dir: Path) -> int:
    # The task dir's parent belongs to the agent, so only its last component
    # (and everything below it) is the task's to tamper with.
    with safefs.closing_fd(_open_dir(task_dir, dir_fd=None, label="task dir")) as task_fd:
        return _open_dir(SECRETS_DIR, dir_fd=task_fd, label="secrets dir")


def _check_name(name: str) -> None:
    if not name or name in (".", "..") or "/" in name or "\0" in name:
        raise SecretsDirError(f"invalid file name {name!r}")


# ---------------------------------------------------------------------- sockets


def _open_private_dir(private_dir: Path) -> int:
    """Open (creating 0700 if missing) the agent's own staging dir."""
    try:
        safefs.make_dir(private_dir)  # what is already there must be our own directory
    except OSError as exc:
        raise SecretsDirError(f"cannot create private dir: {exc.strerror}") from None
    try:
        return safefs.open_private_dir(private_dir, must_be_ours=True)
    except OSError as exc:
        raise _refusal(exc, "private dir") from None


def _make_staging_in(secrets_fd: int) -> tuple[int, str]:
    """A fresh root-owned 0700 dir inside ``secrets``, for when ``private_dir``
    is on another filesystem (e.g. secrets is a tmpfs) and rename cannot cross.

    The task cannot enter or write it. It can rename the entry away, which is
    harmless: we work through the fd, never through the name again (except a
    final best-effort rmdir, which only removes an empty directory).
    """
    name = f".taskapi-{_random.token_hex(8)}"
    try:
        os.mkdir(name, 0o700, dir_fd=secrets_fd)
    except OSError as exc:
        raise SecretsDirError(f"cannot create a staging dir in secrets: {exc.strerror}") from None
    try:
        return safefs.open_private_dir(name, dir_fd=secrets_fd, must_be_ours=True), name
    except safefs.NotOwnedError:
        # A task swapped in its own dir between mkdir and open.
        with contextlib.suppress(OSError):
            os.rmdir(name, dir_fd=secrets_fd)
        raise SecretsDirError("staging dir in secrets was replaced") from None
    except OSError as exc:
        raise _refusal(exc, "staging dir") from None


def _bind_staged(stage_fd: int, owner: SocketOwner, backlog: int) -> tuple[socket.socket, str]:
    """Bind, set owner/mode and listen on a socket in a dir only we can write.

    The bind goes through ``/proc/self/fd/<fd>/``: the kernel resolves that
    link to the directory itself, so ``sun_path`` stays short (108 bytes max)
    however long the real path is. The mode right after bind depends on the
    umask; that is harmless because nobody else can reach this dir.
    """
    tmpname = f".sock-{_random.token_hex(8)}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec by default
    try:
        sock.bind(f"/proc/self/fd/{stage_fd}/{tmpname}")
        try:
            if owner.uid is not None:
                os.chown(tmpname, owner.uid, -1, dir_fd=stage_fd, follow_symlinks=False)
            os.chmod(tmpname, owner.mode, dir_fd=stage_fd)
            sock.listen(backlog)
            sock.setblocking(False)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmpname, dir_fd=stage_fd)
            raise
    except OSError as exc:
        sock.close()
        raise SecretsDirError(f"cannot create the task socket: {exc.strerror or exc}") from None
    except BaseException:
        sock.close()
        raise
    return sock, tmpname


def _move_into_place(stage_fd: int, tmpname: str, secrets_fd: int, name: str) -> None:
    """Atomically put the staged socket at ``secrets/<name>``.

    rename replaces a stale socket, file or symlink at the final name in one
    step and never follows a symlink there. A directory cannot be replaced: an
    empty one is removed (rmdir does not follow symlinks), a non-empty one is
    refused rather than walked and deleted as root inside the task's tree.
    """
    try:
        os.rename(tmpname, name, src_dir_fd=stage_fd, dst_dir_fd=secrets_fd)
        return
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise
    try:
        os.rmdir(name, dir_fd=secrets_fd)
    except OSError:
        raise SecretsDirError(
            f"secrets/{name} is a non-empty directory; refusing to replace it"
        ) from None
    os.rename(tmpname, name, src_dir_fd=stage_fd, dst_dir_fd=secrets_fd)


class _CrossDevice(Exception):
    """rename between the staging dir and secrets crossed a mount."""


def _stage_and_place(
    stage_fd: int, secrets_fd: int, name: str, owner: SocketOwner, backlog: int
) -> tuple[socket.socket, os.stat_result]:
    sock, tmpname = _bind_staged(stage_fd, owner, backlog)
    try:
        # Taken before the rename: rename keeps the inode, while a stat of the
        # final name afterwards could already see something the task put there.
        st = os.stat(tmpname, dir_fd=stage_fd, follow_symlinks=False)
        if not stat.S_ISSOCK(st.st_mode):
            raise SecretsDirError("staged task socket is not a socket")
        try:
            _move_into_place(stage_fd, tmpname, secrets_fd, name)
        except OSError as exc:
            if exc.errno == errno.EXDEV:
                raise _CrossDevice from None
            raise SecretsDirError(
                f"cannot move the task socket into place: {exc.strerror}"
            ) from None
    except BaseException:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(tmpname, dir_fd=stage_fd)
        raise
    return sock, st


def create_task_socket(
    task_dir: Path,
    *,
    private_dir: Path,
    name: str = DEFAULT_SOCKET_NAME,
    owner: SocketOwner,
    backlog: int = 128,
) -> BoundSocket:
    """Create ``<task_dir>/secrets/<name>`` as a listening socket, safely.

    The socket is bound in ``private_dir`` (agent-owned, 0700, created if
    missing, refused if a symlink) under a random name, given its final owner
    and mode there, then renamed into the secrets dir, so the final path never
    holds it with any other owner or mode. rename cannot cross filesystems, so
    when ``private_dir`` is on another one (e.g. secrets is a tmpfs) a fresh
    0700 staging dir inside ``secrets`` is used instead. The returned socket
    is the only file descriptor kept.
    """
    _check_name(name)
    task_dir = Path(task_dir)
    with safefs.closing_fd(_open_secrets_dir(task_dir)) as secrets_fd:
        sock_st: tuple[socket.socket, os.stat_result] | None = None
        with safefs.closing_fd(_open_private_dir(Path(private_dir))) as private_fd:
            if os.fstat(private_fd).st_dev == os.fstat(secrets_fd).st_dev:
                # Same device can still be another mount (bind mounts): EXDEV.
                with contextlib.suppress(_CrossDevice):
                    sock_st = _stage_and_place(private_fd, secrets_fd, name, owner, backlog)
        if sock_st is None:
            stage_fd, staging_name = _make_staging_in(secrets_fd)
            try:
                sock_st = _stage_and_place(stage_fd, secrets_fd, name, owner, backlog)
            except _CrossDevice:
                raise SecretsDirError("cannot rename within the secrets dir (EXDEV)") from None
            finally:
                os.close(stage_fd)
                with contextlib.suppress(OSError):
                    os.rmdir(staging_name, dir_fd=secrets_fd)
    sock, st = sock_st
    return BoundSocket(
        sock=sock, path=task_dir / SECRETS_DIR / name, st_dev=st.st_dev, st_ino=st.st_ino
    )


def remove_task_socket(
    task_dir: Path, bound: BoundSocket, name: str = DEFAULT_SOCKET_NAME
) -> None:
    """Unlink ``secrets/<name>`` if it is still the socket we created.

    Missing is fine. Whatever the task put in its place stays. Does not close
    ``bound.sock``; the listener's owner does that. A task racing a swap
    between the stat and the unlink can at worst make us remove its own entry
    from its own dir; unlink never follows symlinks.
    """
    _check_name(name)
    try:
        secrets_fd = _open_secrets_dir(Path(task_dir))
    except _MissingDir:
        return
    with safefs.closing_fd(secrets_fd):
        if _is_ours(secrets_fd, name, bound):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=secrets_fd)


def socket_in_place(task_dir: Path, bound: BoundSocket, name: str = DEFAULT_SOCKET_NAME
                    ) -> bool:
    """Is ``secrets/<name>`` still the socket we created (not deleted, not replaced)?"""
    _check_name(name)
    try:
        secrets_fd = _open_secrets_dir(Path(task_dir))
    except SecretsDirError:
        return False
    with safefs.closing_fd(secrets_fd):
        return _is_ours(secrets_fd, name, bound)


def _is_ours(secrets_fd: int, name: str, bound: BoundSocket) -> bool:
    try:
        st = os.stat(name, dir_fd=secrets_fd, follow_symlinks=False)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino)


# ---------------------------------------------------------------------- secret files


def _split_rel_path(rel_path: str) -> list[str]:
    if not isinstance(rel_path, str) or not rel_path or "\0" in rel_path:
        raise SecretsDirError(f"invalid secret file path {rel_path!r}")
    if rel_path.startswith("/"):
        raise SecretsDirError(f"secret file path {rel_path!r} escapes the task dir")
    parts = rel_path.split("/")
    if ".." in parts:
        raise SecretsDirError(f"secret file path {rel_path!r} escapes the task dir")
    if any(part in ("", ".") for part in parts):
        raise SecretsDirError(f"secret file path {rel_path!r} is not a plain relative path")
    return parts


def write_secret_file(task_dir: Path, rel_path: str, data: bytes, *, user: str | None) -> Path:
    """Atomically write ``<task_dir>/<rel_path>`` with mode 0600.

    Owned by ``user``'s uid when a user is given (group unchanged; an unknown
    user, or a non-root agent asked for another user, is an error, never a
    wider mode), else by the agent. Each directory below ``task_dir`` is opened
    relative to its parent without following symlinks, and the file is written
    to a random temp name in the target dir and renamed over the final name,
    which replaces (never follows) anything planted there. Directories must
    already exist.
    """
    parts = _split_rel_path(rel_path)
    uid = _uid_for(user, "file") if user else None
    task_dir = Path(task_dir)
    dir_fd = _open_dir(task_dir, dir_fd=None, label="task dir")
    try:
        for depth, part in enumerate(parts[:-1], start=1):
            next_fd = _open_dir(part, dir_fd=dir_fd, label="/".join(parts[:depth]))
            os.close(dir_fd)
            dir_fd = next_fd
        _write_atomically(dir_fd, parts[-1], data, uid, label=rel_path)
    finally:
        os.close(dir_fd)
    return task_dir / rel_path


def _write_atomically(dir_fd: int, name: str, data: bytes, uid: int | None, *, label: str) -> None:
    try:
        safefs.write_private_file(dir_fd, name, data, uid=uid)
    except OSError as exc:
        raise SecretsDirError(f"cannot write {label}: {exc.strerror or exc}") from None
