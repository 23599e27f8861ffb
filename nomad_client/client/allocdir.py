"""The allocation directory tree and the one place that confines paths to it.

Touches only the filesystem under ``<alloc_dir_root>/<alloc_id>`` (and creates
``alloc_dir_root`` itself). Everything here is synchronous and cheap; async callers run it
in a thread.

Layout (modes are exact; the umask is overridden)::

    <alloc_dir_root>/            0711  others may traverse, not list
      <alloc_id>/                0755  agent-owned
        alloc/                   0777  shared by the alloc's tasks
          data/ logs/            0777
          tmp/                   01777
        <task>/                  0777  the task's working directory
          local/                 0777
          tmp/                   01777
          secrets/               0700  owned by the task's user (else the agent)

When the agent runs as root, every directory it creates for tasks is chowned to ``nobody``
(Nomad's "drop permissions" rule), except ``secrets``, which belongs to the task's user.
"""

from __future__ import annotations

import errno
import os
import posixpath
import pwd
import shutil
import stat
from pathlib import Path

import attrs

__all__ = ["AllocDir", "PathEscapeError", "SecretReadError", "TaskDir"]

SHARED_DIR = "alloc"
# Directories whose contents are never served for reading through the fs API.
_PRIVATE_NAMES = frozenset({"secrets", "private"})


class PathEscapeError(Exception):
    """A path leaves the allocation directory (``..``, a symlink pointing outside, a loop)."""


class SecretReadError(Exception):
    """A read was asked for something under a task's ``secrets`` or ``private`` directory."""


@attrs.frozen
class TaskDir:
    """Where one task's directories live on the host."""

    name: str
    path: Path
    local_dir: Path
    secrets_dir: Path
    tmp_dir: Path


def _check_name(kind: str, name: str) -> None:
    # Alloc IDs and task names become single path components; anything else is an escape.
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} must be a non-empty string, got {name!r}")
    if "/" in name or "\x00" in name or name in (".", ".."):
        raise ValueError(f"{kind} {name!r} is not a valid directory name")


def _is_root() -> bool:
    return os.geteuid() == 0


def _nobody_ids() -> tuple[int, int] | None:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        return None
    return entry.pw_uid, entry.pw_gid


def _ensure_dir(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    """Create ``path`` if needed, then set its exact mode and (optionally) owner.

    The directory is opened with O_NOFOLLOW and changed through the descriptor, so a
    symlink a task planted in its place (task directories are world-writable) makes the
    build fail instead of re-owning whatever the link points at.
    """
    try:
        os.mkdir(path, mode)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise PathEscapeError(
                f"{path} exists but is not a plain directory (symlink or file); refusing to use it"
            ) from exc
        raise
    try:
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
        # chmod after chown: chown clears the setuid/setgid bits but keeping the order
        # also guarantees the final mode is exactly what was asked for.
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


class AllocDir:
    """One allocation's directory tree under ``alloc_dir_root``."""

    def __init__(self, alloc_dir_root: Path, alloc_id: str) -> None:
        _check_name("alloc id", alloc_id)
        self.root = Path(alloc_dir_root)
        self.alloc_id = alloc_id
        self.path = self.root / alloc_id
        self.shared_dir = self.path / SHARED_DIR
        self.logs_dir = self.shared_dir / "logs"

    def __repr__(self) -> str:
        return f"AllocDir({str(self.path)!r})"

    # -- building ---------------------------------------------------------------------------

    def build(self) -> None:
        """Create the alloc dir and the shared ``alloc/`` tree; safe to call again."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        _ensure_dir(self.path, 0o755, None)
        drop = _nobody_ids() if _is_root() else None
        _ensure_dir(self.shared_dir, 0o777, drop)
        for sub, mode in (("data", 0o777), ("logs", 0o777), ("tmp", 0o1777)):
            _ensure_dir(self.shared_dir / sub, mode, drop)

    def task_dir(self, task: str) -> TaskDir:
        """The paths of ``task``'s directories (no filesystem access)."""
        _check_name("task name", task)
        base = self.path / task
        return TaskDir(
            name=task,
            path=base,
            local_dir=base / "local",
            secrets_dir=base / "secrets",
            tmp_dir=base / "tmp",
        )

    def build_task_dir(self, task: str, user: str | None) -> TaskDir:
        """Create ``<alloc>/<task>/{local,secrets,tmp}``; safe to call again.

        ``secrets`` is 0700 and owned by ``user`` (looked up with ``pwd``) when the agent
        is root, else by the agent. Raises ``ValueError`` for an unknown user.
        """
        td = self.task_dir(task)
        secrets_owner: tuple[int, int] | None = None
        if user:
            try:
                entry = pwd.getpwnam(user)
            except KeyError:
                raise ValueError(f"unknown user {user!r}") from None
            secrets_owner = (entry.pw_uid, entry.pw_gid)
        root = _is_root()
        drop = _nobody_ids() if root else None
        if not root:
            # A non-root agent cannot give files away; the secrets stay with the agent
            # (and a driver will refuse to run the task as another user anyway).
            secrets_owner = None
        elif secrets_owner is None:
            secrets_owner = (os.geteuid(), os.getegid())

        _ensure_dir(td.path, 0o777, drop)
        _ensure_dir(td.local_dir, 0o777, drop)
        _ensure_dir(td.tmp_dir, 0o1777, drop)
        _ensure_dir(td.secrets_dir, 0o700, secrets_owner)
        return td

    # -- removal ----------------------------------------------------------------------------

    def destroy(self) -> None:
        """Remove the whole alloc tree; symlinks inside it are removed, never followed."""
        if not os.path.lexists(self.path):
            return
        try:
            shutil.rmtree(self.path)
        except PermissionError:
            # A task may leave directories without write permission (e.g. 0500); make the
            # ones we own writable again, then retry once.
            self._make_owned_dirs_writable()
            shutil.rmtree(self.path)

    def _make_owned_dirs_writable(self) -> None:
        uid = os.geteuid()
        for dirpath, _dirnames, _files in os.walk(self.path, followlinks=False):
            st = os.lstat(dirpath)
            if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
                os.chmod(dirpath, stat.S_IMODE(st.st_mode) | 0o700)

    # -- confinement ------------------------------------------------------------------------

    def resolve(self, rel_path: str, *, for_read: bool = False) -> Path:
        """Map a client-supplied path to a host path inside this alloc dir.

        The path is relative to the alloc dir; a leading ``/`` is accepted and means the
        alloc dir too (so ``"/alloc/logs"`` and ``"alloc/logs"`` are the same place, and
        ``"/etc/passwd"`` can only ever name ``<alloc>/etc/passwd``). ``""`` and ``"/"`` are
        the alloc dir itself. Symlinks are resolved; the result must stay inside the alloc
        dir, else ``PathEscapeError``. With ``for_read``, anything under a
        ``<dir>/secrets`` or ``<dir>/private`` (any letter case) raises ``SecretReadError``.

        ``..`` is applied to the path as written, before symlinks are followed (as a path
        join would). The returned path is fully resolved and is what callers must open
        (never the original string). It may not exist. A task can still swap a directory
        for a symlink between this check and the open; callers that care open with
        ``O_NOFOLLOW`` on the last component.
        """
        if not isinstance(rel_path, str):
            raise PathEscapeError(f"path must be a string, got {type(rel_path).__name__}")
        if "\x00" in rel_path:
            raise PathEscapeError(f"path {rel_path!r} contains a NUL byte")

        rel = rel_path.lstrip("/")
        # Lexical check first: ".." that climbs out is an escape whatever the disk holds.
        lexical = posixpath.normpath(rel) if rel else "."
        if lexical == ".." or lexical.startswith("../"):
            raise PathEscapeError(f"path {rel_path!r} leaves the allocation directory")

        base = os.path.realpath(self.path)
        candidate = os.path.join(base, lexical) if lexical != "." else base
        resolved = self._realpath(candidate, rel_path)
        if resolved != base and not resolved.startswith(base + os.sep):
            raise PathEscapeError(f"path {rel_path!r} leaves the allocation directory")

        if for_read:
            inside = os.path.relpath(resolved, base)
            for parts in (lexical.split("/"), inside.split(os.sep)):
                if len(parts) >= 2 and parts[1].lower() in _PRIVATE_NAMES:
                    raise SecretReadError(
                        f"path {rel_path!r} is inside a task's {parts[1].lower()} directory"
                    )
        return Path(resolved)

    @staticmethod
    def _realpath(candidate: str, shown: str) -> str:
        try:
            return os.path.realpath(candidate, strict=True)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise PathEscapeError(f"path {shown!r} runs into a symlink loop") from exc
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                # Not there (yet): resolve as far as possible; a dangling link that points
                # outside still resolves to its outside target and is refused by the caller.
                return os.path.realpath(candidate)
            raise
