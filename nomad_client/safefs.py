"""Symlink-safe filesystem primitives and user lookups: the one home of opening a directory
without following a symlink, creating a private directory, writing a private file (0600,
atomically) and reading one back (refusing a mode others can read), and finding a user's or
a group's ids.

Callers keep their own policy (which modes and owners their trees get, what they refuse) and
their own error type: ``secretsdir`` (task sockets and token files), ``allocdir`` (the alloc
dir tree), the server's keyring dir. Everything here raises ``OSError``. A refusal is an
``UnsafePathError`` whose ``strerror`` says why ("is a symlink", "not a regular file"), so a
caller can name the path its own way ("secrets dir is a symlink").

Every function makes blocking system calls (user lookups may reach NSS); async callers run
them in a worker thread.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import os
import pwd
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "DIR_FLAGS",
    "PRIVATE_DIR_MODE",
    "NotOwnedError",
    "UnsafePathError",
    "UserIds",
    "closing_fd",
    "ensure_private_dir",
    "entry_stat",
    "group_exists",
    "is_symlink",
    "lookup_user",
    "make_dir",
    "open_dir",
    "open_private_dir",
    "read_private_file",
    "set_owner_and_mode",
    "write_private_file",
    "write_private_file_in",
]

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PRIVATE_DIR_MODE = 0o700
_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
_READ_CHUNK = 64 * 1024

StrPath = str | Path


class UnsafePathError(OSError):
    """Refused rather than followed or trusted: a symlink or the wrong type of file where a
    directory or a regular file belongs, a directory someone else owns, a private file
    others can read. ``strerror`` says why ("is a symlink"), ``filename`` names the path."""

    def __str__(self) -> str:
        return f"{self.filename}: {self.strerror}"


class NotOwnedError(UnsafePathError):
    """A directory that had to be this process's user's belongs to someone else."""


def _refusal(code: int, why: str, path: StrPath) -> UnsafePathError:
    return UnsafePathError(code, why, os.fspath(path))


# ---------------------------------------------------------------------- descriptors


@contextlib.contextmanager
def closing_fd(fd: int) -> Iterator[int]:
    try:
        yield fd
    finally:
        os.close(fd)


def entry_stat(name: StrPath, *, dir_fd: int | None = None) -> os.stat_result | None:
    """``lstat`` of ``name`` (relative to ``dir_fd`` when given); None if there is none."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return None


def is_symlink(name: StrPath, *, dir_fd: int | None = None) -> bool:
    st = entry_stat(name, dir_fd=dir_fd)
    return st is not None and stat.S_ISLNK(st.st_mode)


# ---------------------------------------------------------------------- directories


def open_dir(path: StrPath, *, dir_fd: int | None = None) -> int:
    """Open a directory for reading without following a symlink at its last component.

    A symlink there is refused (``UnsafePathError``, "is a symlink"), and so is anything
    else that is not a directory ("is not a directory"); other failures (a missing entry,
    permissions) raise as the system reports them.
    """
    try:
        return os.open(path, DIR_FLAGS, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        # Linux reports a symlink under O_NOFOLLOW|O_DIRECTORY as ENOTDIR (or ELOOP); lstat
        # tells the two cases apart for the message.
        if is_symlink(path, dir_fd=dir_fd):
            raise _refusal(errno.ELOOP, "is a symlink", path) from None
        raise _refusal(errno.ENOTDIR, "is not a directory", path) from None


def make_dir(path: StrPath, *, dir_fd: int | None = None) -> None:
    """Create the directory ``path`` unless something is there already (whatever is there is
    checked when it is opened). It starts at 0700, so nobody gets in before the caller has
    given it its final owner and mode through a descriptor."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, PRIVATE_DIR_MODE, dir_fd=dir_fd)


def set_owner_and_mode(fd: int, mode: int, owner: tuple[int, int] | None = None) -> None:
    """Give the file or directory open at ``fd`` its owner (uid, gid) and exact ``mode``.

    Through the descriptor, so a symlink swapped in for the name is never re-owned. chown
    first: it clears the setuid and setgid bits, so the mode set after it is exactly ``mode``.
    """
    if owner is not None:
        os.fchown(fd, owner[0], owner[1])
    os.fchmod(fd, mode)


def open_private_dir(path: StrPath, *, dir_fd: int | None = None,
                     must_be_ours: bool = False) -> int:
    """Open the directory at ``path`` (see ``open_dir``) and pin its mode to 0700.

    With ``must_be_ours``, a directory this process's user does not own is refused
    (``NotOwnedError``, "is not owned by the agent") before its mode is touched. The caller
    owns the descriptor.
    """
    fd = open_dir(path, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if must_be_ours and st.st_uid != os.geteuid():
            raise NotOwnedError(errno.EPERM, "is not owned by the agent", os.fspath(path))
        if stat.S_IMODE(st.st_mode) != PRIVATE_DIR_MODE:
            os.fchmod(fd, PRIVATE_DIR_MODE)  # mkdir honours the umask; an old dir may be wider
    except BaseException:
        os.close(fd)
        raise
    return fd


def ensure_private_dir(path: StrPath) -> None:
    """Create ``path`` 0700 (and its missing parents) if it is not there; refuse a symlink
    or a non-directory; pin its mode to 0700."""
    os.makedirs(Path(path).parent, exist_ok=True)
    make_dir(path)
    os.close(open_private_dir(path))


# ---------------------------------------------------------------------- private files


def write_private_file(dir_fd: int, name: str, data: bytes, *, uid: int | None = None) -> None:
    """Write ``name`` in the directory open at ``dir_fd``: mode 0600, owned by ``uid`` when
    given (group unchanged).

    The file is created under a random name, filled and synced through its own descriptor
    (so a rename race cannot redirect the mode or owner change), then renamed over the final
    name, which replaces — never follows — whatever is there.
    """
    tmpname = f".{name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmpname, _NEW_FILE_FLAGS, 0o600, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, 0o600)  # the umask may have narrowed it; never widened
            if uid is not None:
                os.fchown(fd, uid, -1)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmpname, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)  # make the rename itself durable, not just the file's contents
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmpname, dir_fd=dir_fd)
        raise


def write_private_file_in(directory: StrPath, name: str, data: bytes) -> None:
    """``write_private_file`` into ``directory``, opened without following a symlink."""
    with closing_fd(open_dir(directory)) as dir_fd:
        write_private_file(dir_fd, name, data)


def read_private_file(path: StrPath) -> bytes:
    """The contents of the regular file at ``path``, which must not be a symlink; one that
    anyone but its owner may read or write is refused ("mode 0644 is readable by others")."""
    with closing_fd(os.open(path, _READ_FILE_FLAGS)) as fd:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refusal(errno.EINVAL, "not a regular file", path)
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            raise _refusal(errno.EACCES, f"mode {mode:04o} is readable by others; expected 0600",
                           path)
        chunks = []
        while chunk := os.read(fd, _READ_CHUNK):
            chunks.append(chunk)
        return b"".join(chunks)


# ---------------------------------------------------------------------- users and groups


class UserIds(NamedTuple):
    uid: int
    gid: int  # the user's primary group


def lookup_user(name: str) -> UserIds | None:
    """The uid and primary gid of user ``name``; None if there is no such user."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return UserIds(entry.pw_uid, entry.pw_gid)


def group_exists(gid: int) -> bool:
    try:
        grp.getgrgid(gid)
    except KeyError:
        return False
    return True
