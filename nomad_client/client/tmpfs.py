"""Mounting and unmounting tmpfs file systems: the one home of ``mount(2)``, ``umount2(2)``
and reading ``/proc/self/mountinfo``.

A task's ``secrets`` dir is mounted as a small tmpfs, so its token and socket never reach a
disk and nothing in it can be executed. The mount goes onto a directory already opened
without following symlinks (through ``/proc/self/fd/N``), never onto a path a task could
redirect. Which directory, with which owner, is ``allocdir``'s business; this module only
mounts, finds and unmounts.

Every function makes blocking system calls; async callers run them in a worker thread.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import re
from pathlib import Path

import attrs

__all__ = [
    "SECRETS_TMPFS_SIZE",
    "Mount",
    "TmpfsError",
    "mount_tmpfs",
    "mounts_under",
    "note_unavailable",
    "parse_mountinfo",
    "unmount",
]

# As Nomad's: a token and a socket need next to nothing.
SECRETS_TMPFS_SIZE = "1m"

# <sys/mount.h>
_MS_NOSUID = 0x2
_MS_NODEV = 0x4
_MS_NOEXEC = 0x8
_MNT_DETACH = 0x2
_UMOUNT_NOFOLLOW = 0x8

_MOUNTINFO = "/proc/self/mountinfo"
# mountinfo escapes space, tab, newline and backslash in paths as \ooo.
_OCTAL_ESCAPE = re.compile(rb"\\([0-7]{3})")

log = logging.getLogger(__name__)
_reported: set[str] = set()


class TmpfsError(Exception):
    """A tmpfs could not be mounted or unmounted; the message says why, for an operator."""


@attrs.frozen
class Mount:
    """One line of ``/proc/self/mountinfo``: where something is mounted and what it is."""

    mount_id: int
    mount_point: Path
    fstype: str


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _why(code: int) -> str:
    if code in (errno.EPERM, errno.EACCES):
        return "the agent may not mount file systems (no CAP_SYS_ADMIN)"
    return os.strerror(code)


def mount_tmpfs(dir_fd: int, *, uid: int, gid: int, mode: int = 0o700,
                size: str = SECRETS_TMPFS_SIZE) -> None:
    """Mount a fresh ``noexec,nosuid,nodev`` tmpfs of ``size`` whose root is ``uid:gid``
    ``mode`` onto the directory open at ``dir_fd``.

    The target is ``/proc/self/fd/<dir_fd>``: the kernel resolves it to the very directory
    the descriptor holds, so a symlink or rename a task makes meanwhile cannot redirect it.
    """
    if os.geteuid() != 0:
        raise TmpfsError("the agent is not root")
    options = f"size={size},mode={mode:o},uid={uid},gid={gid}"
    target = f"/proc/self/fd/{dir_fd}".encode()
    flags = _MS_NOSUID | _MS_NODEV | _MS_NOEXEC
    if _libc().mount(b"tmpfs", target, b"tmpfs", flags, options.encode()) != 0:
        raise TmpfsError(f"mount failed: {_why(ctypes.get_errno())}")


def unmount(mount_point: Path) -> None:
    """Detach the mount at ``mount_point`` (lazily: open files keep it alive until closed).

    ``UMOUNT_NOFOLLOW``: a symlink a task put at the last component is not followed. A
    mount point that is already gone is not an error.
    """
    flags = _MNT_DETACH | _UMOUNT_NOFOLLOW
    if _libc().umount2(os.fsencode(mount_point), flags) != 0:
        code = ctypes.get_errno()
        if code in (errno.EINVAL, errno.ENOENT):
            return  # not (or no longer) a mount point
        raise TmpfsError(f"cannot unmount {mount_point}: {_why(code)}")


def _unescape(field: bytes) -> Path:
    raw = _OCTAL_ESCAPE.sub(lambda m: bytes([int(m.group(1), 8)]), field)
    return Path(os.fsdecode(raw))


def parse_mountinfo(text: bytes) -> list[Mount]:
    """The mounts ``text`` (the contents of a mountinfo file) lists, in its order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(b" ")
        try:
            separator = fields.index(b"-", 6)  # optional fields end at a lone "-"
            mounts.append(Mount(int(fields[0]), _unescape(fields[4]),
                                fields[separator + 1].decode(errors="replace")))
        except (ValueError, IndexError):
            continue  # not a line we understand: never a reason to unmount anything
    return mounts


def mounts_under(root: Path) -> list[Mount]:
    """Every mount strictly below ``root`` (resolved), innermost first: the order to unmount
    them in."""
    base = Path(os.path.realpath(root))
    with open(_MOUNTINFO, "rb") as f:
        mounts = parse_mountinfo(f.read())
    inside = [m for m in mounts if base in m.mount_point.parents]
    # Later mounts may sit on earlier ones; deeper paths before their parents.
    return sorted(inside, key=lambda m: (len(m.mount_point.parts), m.mount_id), reverse=True)


def note_unavailable(reason: str) -> None:
    """Log once per agent (per distinct reason) that secrets dirs stay plain directories."""
    if reason not in _reported:
        _reported.add(reason)
        log.warning("task secrets dirs are plain directories, not tmpfs: %s", reason)
