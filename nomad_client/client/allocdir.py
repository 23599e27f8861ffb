"""The allocation directory tree and the one place that confines client paths to it.

Touches only the filesystem under ``<alloc_dir_root>/<alloc_id>`` (and creates
``alloc_dir_root`` itself). Everything here is synchronous and cheap; async callers run it
in a thread.

Layout when the agent is root (modes are exact; the umask is overridden). ``G`` is the
allocation's own group, a numeric gid from a reserved range (see ``alloc_group``)::

    <alloc_dir_root>/            0711  others may traverse, not list
      <alloc_id>/                0710  root:G   only the alloc's own tasks may enter
        alloc/                   3770  root:G   setgid + sticky: tasks add entries, but
                                                cannot move or replace the agent's own
          data/                  2770  root:G   shared by the alloc's tasks, whatever user
          tmp/                   3770  root:G
          logs/                  2750  root:G   tasks read; only the executor creates files
        <task>/                  0755  owned by the task's user (else the agent)
          local/ tmp/            0750  task user:G
          secrets/               0700  owned by the task's user (else the agent)

The drivers add ``G`` to the supplementary groups of every task process of the allocation,
so tasks of one allocation running as different users share ``alloc/data`` (the setgid bit
keeps new files in ``G``), while processes of other allocations cannot even enter the alloc
dir. Tasks without a ``user`` run as root and reach everything anyway; the tree is still
never world-writable. A non-root agent cannot hand out groups: the alloc dir is then 0700
and everything belongs to the agent's user, as its tasks do.

A task dir itself is not world-writable (unlike Nomad's): a sibling task running as another
user must not be able to rename a task's ``secrets`` away and plant its own.

Client paths (the fs API) are opened with ``AllocDir.open_path``, which never follows a
symlink and refuses to read a file with more than one hard link; nothing else should open a
client-supplied path.

A task's ``secrets`` may be a tmpfs (``mount_secrets_tmpfs``): its root then has the mode
and owner above. Nothing mounted inside an alloc dir outlives it (``destroy`` unmounts first),
and mounts an agent crash left behind are found again at the next start
(``unmount_orphaned_tmpfs``).
"""

from __future__ import annotations

import errno
import hashlib
import os
import posixpath
import shutil
import stat
import threading
from collections.abc import Collection
from pathlib import Path
from typing import Literal

import attrs

from nomad_client import safefs
from nomad_client.client import tmpfs

__all__ = [
    "ALLOC_GID_BASE",
    "ALLOC_GID_COUNT",
    "MAX_CLIENT_PATH",
    "AllocDir",
    "AllocPathError",
    "BadPathError",
    "HardLinkError",
    "OpenKind",
    "OpenedPath",
    "PathEscapeError",
    "PathNotFoundError",
    "SecretReadError",
    "SymlinkError",
    "TaskDir",
    "alloc_group",
    "unmount_orphaned_tmpfs",
]

SHARED_DIR = "alloc"
# Directories whose contents are never served for reading through the fs API.
_PRIVATE_NAMES = frozenset({"secrets", "private"})

# Each allocation gets a gid of its own from this range (inside the block systemd leaves
# unallocated, below 2**31 so no tool sees it as negative). Nothing else on a host uses it.
ALLOC_GID_BASE = 0x7A00_0000
ALLOC_GID_COUNT = 1 << 20
# Tries before giving up on finding a free gid; only a node with a huge number of live
# allocations, or a range squatted by /etc/group, comes close.
_GID_PROBES = 4096
# Picking a gid and recording it (the alloc dir's group) must not interleave between two
# allocations being built at once in worker threads.
_GID_LOCK = threading.Lock()

_ALLOC_MODE = 0o710
_SHARED_MODES = (("data", 0o2770), ("logs", 0o2750), ("tmp", 0o3770))
_SHARED_MODE = 0o3770
_TASK_DIR_MODE = 0o755
_TASK_PRIVATE_MODE = 0o750


class AllocPathError(Exception):
    """A path inside the alloc dir could not be used; the subclass says why."""


class PathEscapeError(AllocPathError):
    """A path leaves the allocation directory (``..``), or a directory to build is not one."""


class SymlinkError(PathEscapeError):
    """A client path goes through a symlink; the fs API never follows one."""


class SecretReadError(AllocPathError):
    """A read was asked for something under a task's ``secrets`` or ``private`` directory."""


class HardLinkError(AllocPathError):
    """A file to read has more than one link (a task may have linked a file it must not
    hand out, such as its token, into a readable place)."""


class PathNotFoundError(AllocPathError):
    """A component of a client path does not exist."""


class BadPathError(AllocPathError):
    """A client path is malformed, too long, or names the wrong type of file."""


@attrs.frozen
class TaskDir:
    """Where one task's directories live on the host."""

    name: str
    path: Path
    local_dir: Path
    secrets_dir: Path
    tmp_dir: Path


OpenKind = Literal["any", "dir", "file"]

# Longest client path accepted; far beyond any real layout, short enough for error messages.
MAX_CLIENT_PATH = 4096
_WALK_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_LAST_FLAGS: dict[str, int] = {
    "any": os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
    "dir": safefs.DIR_FLAGS,
    # O_NONBLOCK: should a FIFO be swapped in after the type check, opening it must not
    # wait for a writer (and reading it returns at once). O_NOCTTY: never adopt a tty.
    "file": os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
}
_FILE_KINDS = {
    stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
}


@attrs.frozen
class OpenedPath:
    """A descriptor opened by ``AllocDir.open_path``; close it (or use ``with``)."""

    fd: int
    st: os.stat_result  # fstat of ``fd``, taken right after the open
    rel: str  # the normalised path inside the alloc dir ("" for the alloc dir itself)
    name: str  # its last component (the alloc id for the alloc dir itself)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> OpenedPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_name(kind: str, name: str) -> None:
    # Alloc IDs and task names become single path components; anything else is an escape.
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} must be a non-empty string, got {name!r}")
    if "/" in name or "\x00" in name or name in (".", ".."):
        raise ValueError(f"{kind} {name!r} is not a valid directory name")
    if name.startswith("."):
        # Dot-entries in the alloc dir belong to the agent (e.g. its private staging dir).
        raise ValueError(f"{kind} {name!r} must not start with '.'")


def _is_root() -> bool:
    return os.geteuid() == 0


def _is_alloc_gid(gid: int) -> bool:
    return ALLOC_GID_BASE <= gid < ALLOC_GID_BASE + ALLOC_GID_COUNT


def alloc_group(alloc_path: Path) -> int | None:
    """The group recorded for the allocation at ``alloc_path``, or None if there is none.

    The record is the alloc dir's group owner: only the agent can set it, it survives agent
    restarts with the tree, and it goes when the tree goes. A dir not owned by this process,
    or whose group is outside the reserved range (an older layout, a non-root agent), has
    none, so a driver never hands a task some unrelated group such as root's.
    """
    try:
        st = os.lstat(alloc_path)
    except FileNotFoundError:
        return None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or not _is_alloc_gid(
            st.st_gid):
        return None
    return st.st_gid


def _gids_in_use(root: Path, alloc_id: str) -> set[int]:
    """The groups of the other alloc dirs under ``root``."""
    used: set[int] = set()
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name == alloc_id:
                continue
            try:
                used.add(entry.stat(follow_symlinks=False).st_gid)
            except FileNotFoundError:
                continue  # destroyed while we looked
    return used


def _pick_alloc_gid(root: Path, alloc_id: str) -> int:
    """A gid of the reserved range that no other allocation here uses and no group names.

    The first candidate is derived from the alloc id, so gids are spread over the range
    rather than reused lowest-first: a process left holding an old allocation's group
    (e.g. through a setgid file it made elsewhere) is unlikely ever to meet that gid again.
    """
    used = _gids_in_use(root, alloc_id)
    digest = hashlib.sha256(alloc_id.encode()).digest()
    start = int.from_bytes(digest[:8], "big") % ALLOC_GID_COUNT
    for step in range(_GID_PROBES):
        gid = ALLOC_GID_BASE + (start + step) % ALLOC_GID_COUNT
        if gid not in used and not safefs.group_exists(gid):
            return gid
    raise RuntimeError(f"no free allocation group id after {_GID_PROBES} tries")


def _ensure_dir(path: Path, mode: int, owner: tuple[int, int] | None) -> None:
    """Create ``path`` if needed, then set its exact mode and (optionally) owner.

    The directory is opened with O_NOFOLLOW and changed through the descriptor, so a
    symlink a task planted in its place (tasks can write their own directories) makes the
    build fail instead of re-owning whatever the link points at. A new directory starts at
    0700, so no one gets in before its owner and mode are final.
    """
    safefs.make_dir(path)
    with safefs.closing_fd(_open_built_dir(path)) as fd:
        safefs.set_owner_and_mode(fd, mode, owner)


def _open_built_dir(path: Path, *, dir_fd: int | None = None) -> int:
    """Open the directory ``path`` of the tree (by its last component when ``dir_fd`` is
    given) without following a symlink; anything but a directory is an escape."""
    try:
        return safefs.open_dir(path.name if dir_fd is not None else path, dir_fd=dir_fd)
    except safefs.UnsafePathError as exc:
        raise PathEscapeError(
            f"{path} exists but is not a plain directory (symlink or file); refusing to use it"
        ) from exc


def _task_owner(user: str | None) -> tuple[int, int] | None:
    """(uid, gid) a task's own directories get: ``user``'s (looked up with ``pwd``), the
    agent's when unset; None when the agent is not root (it cannot give files away, and a
    driver will refuse to run the task as another user anyway)."""
    owner: tuple[int, int] | None = None
    if user:
        ids = safefs.lookup_user(user)
        if ids is None:
            raise ValueError(f"unknown user {user!r}")
        owner = (ids.uid, ids.gid)
    if not _is_root():
        return None
    return owner or (os.geteuid(), os.getegid())


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
        """Create the alloc dir and the shared ``alloc/`` tree; safe to call again.

        As root, the allocation's group is picked on the first build and kept (it is the
        alloc dir's group) on every later one, including after an agent restart. A tree
        of an older layout gets a group and its modes tightened.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o711)
        owner: tuple[int, int] | None = None
        if _is_root():
            with _GID_LOCK:
                gid = alloc_group(self.path) or _pick_alloc_gid(self.root, self.alloc_id)
                owner = (os.geteuid(), gid)
                _ensure_dir(self.path, _ALLOC_MODE, owner)
        else:
            _ensure_dir(self.path, 0o700, None)
        _ensure_dir(self.shared_dir, _SHARED_MODE, owner)
        for sub, mode in _SHARED_MODES:
            _ensure_dir(self.shared_dir / sub, mode, owner)

    @property
    def gid(self) -> int | None:
        """This allocation's group (read from disk), None before ``build`` or if not root."""
        return alloc_group(self.path)

    def task_dir(self, task: str) -> TaskDir:
        """The paths of ``task``'s directories (no filesystem access)."""
        _check_name("task name", task)
        if task == SHARED_DIR:
            raise ValueError(f"task name {task!r} is reserved for the shared alloc directory")
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

        When the agent is root, the task dir (0755) and ``secrets`` (0700) are owned by
        ``user`` (looked up with ``pwd``; the agent when unset), and ``local`` and ``tmp``
        (0750) by that user and the allocation's group. A non-root agent keeps them all.
        Raises ``ValueError`` for an unknown user or a reserved task name.
        """
        td = self.task_dir(task)
        owner = _task_owner(user)
        private = None
        if owner is not None:
            # Siblings in the allocation may look, others may not even get this far.
            gid = self.gid
            private = (owner[0], gid if gid is not None else owner[1])

        # Not world-writable: whoever can write the task dir can rename ``secrets`` away and
        # plant a directory (and an ``api.sock``) of their own in its place.
        _ensure_dir(td.path, _TASK_DIR_MODE, owner)
        _ensure_dir(td.local_dir, _TASK_PRIVATE_MODE, private)
        _ensure_dir(td.tmp_dir, _TASK_PRIVATE_MODE, private)
        _ensure_dir(td.secrets_dir, 0o700, owner)
        return td

    def mount_secrets_tmpfs(self, task: str, user: str | None) -> str | None:
        """Make ``task``'s ``secrets`` (built by ``build_task_dir``) a tmpfs owned by the task's
        user, 0700, before anything is written into it. Returns None once it is one, else
        why it stays a plain directory (the task can still run).

        A secrets dir that is a mount already (a restarted task, or one reattached after an
        agent restart) is kept with what is in it; so is a plain one that already holds
        files (a task started before tmpfs was turned on): mounting over it would hide its
        token and socket. ``secrets`` is opened without following a symlink and the mount
        goes onto that descriptor; a symlink or non-directory there, or one swapped in while
        mounting, raises ``PathEscapeError``.
        """
        td = self.task_dir(task)
        owner = _task_owner(user)
        if owner is None:
            return "the agent is not root"
        with safefs.closing_fd(_open_built_dir(td.path)) as task_fd:
            parent_dev = os.fstat(task_fd).st_dev
            with safefs.closing_fd(_open_built_dir(td.secrets_dir, dir_fd=task_fd)
                                   ) as secrets_fd:
                st = os.fstat(secrets_fd)
                if st.st_dev != parent_dev:
                    return None  # mounted on an earlier start: keep it and its contents
                if st.st_uid != owner[0]:
                    raise PathEscapeError(f"{td.secrets_dir} is not the directory the agent "
                                          "built (wrong owner); refusing to mount on it")
                if os.listdir(secrets_fd):
                    return "the secrets dir already holds the task's files; kept as it is"
                try:
                    tmpfs.mount_tmpfs(secrets_fd, uid=owner[0], gid=owner[1])
                except tmpfs.TmpfsError as err:
                    return str(err)
            # The name must lead into the new mount: a task renaming its secrets dir away
            # meanwhile would otherwise get its token written to a plain directory.
            after = safefs.entry_stat(td.secrets_dir.name, dir_fd=task_fd)
            if after is None or not stat.S_ISDIR(after.st_mode) or after.st_dev == parent_dev:
                raise PathEscapeError(f"{td.secrets_dir} was replaced while being mounted")
        return None

    # -- removal ----------------------------------------------------------------------------

    def destroy(self) -> None:
        """Remove the whole alloc tree; symlinks inside it are removed, never followed.

        Every mount inside it (the tasks' secrets tmpfs) is detached first: nothing may
        outlive the tree, and removing files must never reach into a mounted file system.
        """
        if not os.path.lexists(self.path):
            return
        for mount in tmpfs.mounts_under(self.path):
            tmpfs.unmount(mount.mount_point)
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

    def open_path(self, rel_path: str, *, want: OpenKind = "any",
                  for_read: bool = False) -> OpenedPath:
        """Open a client-supplied path inside this alloc dir without ever leaving it.

        The path is relative to the alloc dir; a leading ``/`` is accepted and means the
        alloc dir too (``"/etc/passwd"`` can only ever name ``<alloc>/etc/passwd``); ``""``
        and ``"/"`` are the alloc dir itself. ``..`` is applied to the path as written; a
        path that climbs out raises ``PathEscapeError``.

        The path is walked one component at a time from a descriptor on the alloc dir,
        each step opened relative to the previous one with ``O_NOFOLLOW``: a symlink
        anywhere on the path (the last component included) raises ``SymlinkError``, even
        one pointing inside. Tasks can write most of this tree, so checking a path and
        opening it later by name would let them swap in a link in between; here the check
        *is* the open.

        ``want``: ``"any"`` gives an ``O_PATH`` descriptor (good for ``fstat`` only, opens
        nothing); ``"dir"`` a readable directory (for ``os.scandir``); ``"file"`` a
        readable regular file (FIFOs, devices and sockets are refused before they are
        opened, and the open itself is non-blocking). With ``for_read``, anything under a
        task's ``secrets`` or ``private`` directory (any letter case) and the agent's own
        dot-entries at the top raise ``SecretReadError``, and a ``"file"`` with more than one
        hard link raises ``HardLinkError``: a task could link a file it must not hand out
        (its token) into a readable place; the link count is taken from the opened file.

        Other refusals: ``PathNotFoundError`` (a component is missing), ``BadPathError``
        (not a string, NUL byte, too long, wrong type of file, any other ``OSError``).
        The caller owns the returned descriptor (``OpenedPath`` is a context manager).
        """
        parts = _split_client_path(rel_path, for_read=for_read)
        walker = _Walker(rel_path)
        fd = walker.open_root(self.path)
        try:
            for depth, part in enumerate(parts[:-1]):
                next_fd = walker.open_at(fd, part, _WALK_FLAGS, "/".join(parts[:depth + 1]))
                os.close(fd)
                fd = next_fd
            last = parts[-1] if parts else "."
            shown = "/".join(parts)
            opened = walker.open_last(fd, last, want, shown, for_read=for_read)
        finally:
            os.close(fd)
        name = parts[-1] if parts else self.alloc_id
        return OpenedPath(fd=opened[0], st=opened[1], rel=shown, name=name)


def unmount_orphaned_tmpfs(alloc_dir_root: Path, keep: Collection[str]) -> list[Path]:
    """Detach the tmpfs mounts inside alloc dirs under ``alloc_dir_root`` whose allocation is
    not in ``keep``, and return where they were.

    For the client's start: an agent that crashed (or was killed) left its tasks' secrets
    mounted; the allocations it restores keep theirs (their running tasks hold tokens and
    sockets there), and nothing else would ever unmount the rest.
    """
    root = Path(os.path.realpath(alloc_dir_root))
    if not root.is_dir():
        return []
    detached = []
    for mount in tmpfs.mounts_under(root):
        inside = mount.mount_point.relative_to(root).parts
        if mount.fstype != "tmpfs" or len(inside) < 2 or inside[0] in keep:
            continue
        tmpfs.unmount(mount.mount_point)
        detached.append(mount.mount_point)
    return detached


def _split_client_path(rel_path: str, *, for_read: bool) -> list[str]:
    """The components of a client path inside the alloc dir (``[]`` for the dir itself)."""
    if not isinstance(rel_path, str):
        raise BadPathError(f"path must be a string, got {type(rel_path).__name__}")
    if "\x00" in rel_path:
        raise BadPathError(f"path {rel_path!r} contains a NUL byte")
    if len(rel_path) > MAX_CLIENT_PATH:
        raise BadPathError(
            f"path is too long ({len(rel_path)} characters, at most {MAX_CLIENT_PATH})")
    try:
        os.fsencode(rel_path)
    except UnicodeEncodeError:
        raise BadPathError(f"path {rel_path!r} is not valid text") from None
    rel = rel_path.lstrip("/")
    lexical = posixpath.normpath(rel) if rel else "."
    if lexical == ".." or lexical.startswith("../"):
        raise PathEscapeError(f"path {rel_path!r} leaves the allocation directory")
    parts = [] if lexical == "." else lexical.split("/")
    if for_read and parts:
        # No link is ever followed, so the path as written is where the walk goes.
        if parts[0].startswith("."):
            raise SecretReadError(f"path {rel_path!r} is inside the agent's private state")
        if len(parts) >= 2 and parts[1].lower() in _PRIVATE_NAMES:
            raise SecretReadError(
                f"path {rel_path!r} is inside a task's {parts[1].lower()} directory")
    return parts


@attrs.frozen
class _Walker:
    """One walk down a client path; turns every failed open into a refusal that says why."""

    client_path: str

    def open_root(self, alloc_path: Path) -> int:
        # The alloc dir's own location is the operator's and the agent's (tasks cannot write
        # its parent), so only its last component is opened without following.
        try:
            return os.open(alloc_path, _WALK_FLAGS)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                raise PathNotFoundError("the allocation directory does not exist") from None
            raise BadPathError(f"cannot open the allocation directory: {exc.strerror}") from None

    def open_at(self, dir_fd: int, name: str, flags: int, shown: str) -> int:
        try:
            return os.open(name, flags, dir_fd=dir_fd)
        except OSError as exc:
            raise self._refusal(exc, dir_fd, name, shown) from None

    def open_last(self, dir_fd: int, name: str, want: OpenKind, shown: str, *,
                  for_read: bool = False) -> tuple[int, os.stat_result]:
        if want == "dir":
            fd = self.open_at(dir_fd, name, _LAST_FLAGS["dir"], shown)
            return fd, os.fstat(fd)
        # O_PATH opens nothing (no FIFO wait, no device side effect) and, with O_NOFOLLOW,
        # gives the link itself when the last component is one: fstat tells what it is.
        path_fd = self.open_at(dir_fd, name, _LAST_FLAGS["any"], shown)
        try:
            st = os.fstat(path_fd)
            if stat.S_ISLNK(st.st_mode):
                raise self._symlink(shown)
            if want == "any":
                fd, path_fd = path_fd, -1
                return fd, st
            if not stat.S_ISREG(st.st_mode):
                raise self._not_regular(st, shown)
            fd = self.open_at(dir_fd, name, _LAST_FLAGS["file"], shown)
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino) \
                    or not stat.S_ISREG(opened.st_mode):
                os.close(fd)
                raise BadPathError(f"path {self.client_path!r} changed while being opened")
            if for_read and opened.st_nlink > 1:
                os.close(fd)
                raise HardLinkError(f"file {shown!r} has {opened.st_nlink} hard links; "
                                    "files with more than one link are not served")
            return fd, opened
        finally:
            if path_fd >= 0:
                os.close(path_fd)

    def _symlink(self, shown: str) -> SymlinkError:
        return SymlinkError(f"path {self.client_path!r} goes through a symlink ({shown!r}); "
                            "symlinks are not followed")

    def _not_regular(self, st: os.stat_result, shown: str) -> BadPathError:
        if stat.S_ISDIR(st.st_mode):
            return BadPathError(f"file {shown or '/'!r} is a directory")
        kind = _FILE_KINDS.get(stat.S_IFMT(st.st_mode), "of an unknown type")
        return BadPathError(f"{shown!r} is {kind}, not a regular file")

    def _refusal(self, exc: OSError, dir_fd: int, name: str, shown: str) -> AllocPathError:
        code = exc.errno
        if code == errno.ELOOP:
            return self._symlink(shown)
        if code == errno.ENOTDIR:
            # Linux reports a symlink under O_DIRECTORY|O_NOFOLLOW as ENOTDIR; lstat tells.
            st = safefs.entry_stat(name, dir_fd=dir_fd)
            if st is not None and stat.S_ISLNK(st.st_mode):
                return self._symlink(shown)
            if st is None or stat.S_ISDIR(st.st_mode):
                # A directory (or nothing) now: it was swapped while being opened.
                return BadPathError(f"path {self.client_path!r} changed while being opened")
            return BadPathError(f"path {self.client_path!r}: {shown!r} is not a directory")
        if code == errno.ENOENT:
            return PathNotFoundError(f"no such file or directory: {self.client_path!r}")
        if code == errno.ENAMETOOLONG:
            return BadPathError(f"path {self.client_path!r}: a name in it is too long")
        if code == errno.ENXIO:
            return BadPathError(f"{shown!r} is not a regular file")
        return BadPathError(f"cannot open {self.client_path!r}: {exc.strerror or code}")
