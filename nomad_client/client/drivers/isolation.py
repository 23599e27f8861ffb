"""The Linux system calls the ``exec`` driver isolates a task with, one small function each.

Standard library only (``ctypes``), because the executor imports it. Every call raises
``IsolationError`` naming the call, its target and the kernel's reason, so a task that cannot
be isolated fails with a message an operator can act on.

What it touches: only the calling process (namespaces, mounts in its own mount namespace,
capabilities, hostname, its network namespace's loopback). Run in the executor's child,
between fork and exec, as root.

Also the capability names and numbers (``CAPABILITIES``) and Nomad's default set for
``exec`` (``DEFAULT_CAPS``), which the driver parses task configuration with.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = [
    "CAPABILITIES",
    "CLONE_NEWIPC",
    "CLONE_NEWNET",
    "CLONE_NEWNS",
    "CLONE_NEWPID",
    "CLONE_NEWUTS",
    "DEFAULT_CAPS",
    "JOIN_ORDER",
    "CapabilitySets",
    "IsolationError",
    "MountPoint",
    "bind_mount",
    "become_child_subreaper",
    "become_user",
    "bounding_set_keep",
    "cap_last_cap",
    "loopback_up",
    "make_private",
    "mount",
    "no_new_privs",
    "open_mount_point",
    "owning_user_namespace",
    "pivot_root",
    "raise_ambient",
    "remount_read_only",
    "set_capabilities",
    "set_keep_caps",
    "sethostname",
    "setns",
    "umount2",
    "unshare",
]

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWUTS: Final = 0x04000000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

# The namespaces a process joining a task enters, in order: the mount namespace last (it
# hides the host's /proc and cgroup fs). Never a user namespace: ours never make one, so a
# task in another has made it itself (see ``owning_user_namespace``).
JOIN_ORDER: Final = (("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS), ("net", CLONE_NEWNET),
                     ("pid", CLONE_NEWPID), ("mnt", CLONE_NEWNS))
_NS_GET_USERNS: Final = 0xB701  # _IO(0xb7, 0x1), linux/nsfs.h

MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REMOUNT: Final = 0x20
MS_BIND: Final = 0x1000
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
MNT_DETACH: Final = 0x2

_PR_SET_KEEPCAPS: Final = 8
_PR_SET_CHILD_SUBREAPER: Final = 36
_PR_CAPBSET_DROP: Final = 24
_PR_SET_NO_NEW_PRIVS: Final = 38
_PR_CAP_AMBIENT: Final = 47
_PR_CAP_AMBIENT_RAISE: Final = 2
_PR_CAP_AMBIENT_CLEAR_ALL: Final = 4
_CAP_VERSION_3: Final = 0x20080522

_SIOCGIFFLAGS: Final = 0x8913
_SIOCSIFFLAGS: Final = 0x8914
_IFF_UP: Final = 0x1

# pivot_root has no glibc wrapper on older systems; its syscall number per architecture.
_SYS_PIVOT_ROOT: Final = {"x86_64": 155, "aarch64": 41, "i686": 217, "armv7l": 218}

# Linux capability numbers (linux/capability.h), by Nomad's names without ``CAP_``.
CAPABILITIES: Final[dict[str, int]] = {
    name: number
    for number, name in enumerate(
        (
            "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
            "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
            "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
            "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
            "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
            "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
            "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE",
        )
    )
}

# Nomad's exec default (``allow_caps``): Docker's defaults without NET_RAW.
DEFAULT_CAPS: Final = frozenset(
    {
        "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
        "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
    }
)


class IsolationError(OSError):
    """A system call the isolation needs failed; the message names it and why."""


_libc: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise IsolationError(err, f"{what}: {os.strerror(err)}")
    return result


def _path(value: str | None) -> bytes | None:
    return None if value is None else os.fsencode(value)


def unshare(flags: int) -> None:
    """Move the calling process into new namespaces (``CLONE_NEW*`` flags)."""
    _check(_lib().unshare(ctypes.c_int(flags)), f"unshare({flags:#x})")


def setns(fd: int, nstype: int = 0) -> None:
    """Join the namespace open at ``fd`` (a ``/proc/<pid>/ns/*`` file)."""
    _check(_lib().setns(ctypes.c_int(fd), ctypes.c_int(nstype)), f"setns({nstype:#x})")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    lib = _lib()
    lib.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                          ctypes.c_char_p]
    _check(lib.mount(_path(source), _path(target), _path(fstype), flags, _path(data)),
           f"mount {fstype or 'bind'} {source or ''} on {target}")


def umount2(target: str, flags: int = 0) -> None:
    _check(_lib().umount2(_path(target), ctypes.c_int(flags)), f"umount {target}")


def make_private(target: str = "/") -> None:
    """Stop mount events propagating between this mount namespace and the host's."""
    mount(None, target, None, MS_REC | MS_PRIVATE)


def bind_mount(source: str, target: str) -> None:
    """Bind ``source`` (recursively) on ``target``."""
    mount(source, target, None, MS_BIND | MS_REC)


def remount_read_only(target: str) -> None:
    """Make the bind mount at ``target`` read-only, nosuid and nodev (a bind mount takes
    its flags from this second call)."""
    mount(None, target, None, MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV)


def pivot_root(new_root: str) -> None:
    """Make ``new_root`` (a mount point) this mount namespace's ``/`` and drop the old one.

    Uses ``pivot_root(".", ".")``: the old root ends up stacked under the new one and is
    detached at once, so nothing of the host's tree stays reachable.
    """
    os.chdir(new_root)
    lib = _lib()
    if hasattr(lib, "pivot_root"):
        result = lib.pivot_root(b".", b".")
    else:
        number = _SYS_PIVOT_ROOT.get(os.uname().machine)
        if number is None:
            raise IsolationError(errno.ENOSYS, f"pivot_root: unknown on {os.uname().machine}")
        result = lib.syscall(ctypes.c_long(number), b".", b".")
    _check(result, f"pivot_root {new_root}")
    umount2(".", MNT_DETACH)
    os.chdir("/")


def sethostname(name: str) -> None:
    data = name.encode()
    _check(_lib().sethostname(data, ctypes.c_size_t(len(data))), f"sethostname {name!r}")


def loopback_up() -> None:
    """Bring up ``lo`` in this network namespace (a new one has it down), by ioctl."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))
    except OSError as exc:
        raise IsolationError(exc.errno or errno.EIO, f"bringing up lo: {exc.strerror}") from exc
    finally:
        sock.close()


# -- mount points, reached without following a symlink ---------------------------------------

_DIR_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class MountPoint:
    """An open directory or file to mount on, named by its ``/proc/self/fd`` path, so a
    symlink a task planted in its own task dir can never redirect a mount."""

    def __init__(self, fd: int, shown_as: str) -> None:
        self.fd = fd
        self.shown_as = shown_as

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> MountPoint:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def _relative_parts(path: str) -> list[str]:
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise IsolationError(errno.EINVAL, f"mount point {path!r} contains '..'")
    return parts


def open_mount_point(root: str, path: str, *, directory: bool = True) -> MountPoint:
    """Open (creating it, root-owned, if missing) ``path`` below ``root``, component by
    component without following symlinks: a directory, or an empty file to bind a file on."""
    parts = _relative_parts(path)
    fd = os.open(root, _DIR_FLAGS)
    shown = root.rstrip("/")
    try:
        for index, part in enumerate(parts):
            last = index == len(parts) - 1
            shown = f"{shown}/{part}"
            if last and not directory:
                # O_PATH ignores O_CREAT, so create the file with a normal open first.
                try:
                    os.close(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                     | os.O_CLOEXEC, 0o644, dir_fd=fd))
                except FileExistsError:
                    pass
                child = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            else:
                try:
                    os.mkdir(part, 0o755, dir_fd=fd)
                except FileExistsError:
                    pass
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as exc:
        os.close(fd)
        reason = "a symlink or not a directory" if exc.errno in (errno.ELOOP, errno.ENOTDIR) \
            else exc.strerror
        raise IsolationError(exc.errno or errno.EIO, f"mount point {shown}: {reason}") from exc
    return MountPoint(fd, shown)


# -- capabilities -------------------------------------------------------------------------------


def cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as fh:
            return int(fh.read())
    except (OSError, ValueError):
        return max(CAPABILITIES.values())


def _prctl(option: int, arg2: int, what: str, arg3: int = 0) -> None:
    _check(_lib().prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3),
                        ctypes.c_ulong(0), ctypes.c_ulong(0)), what)


def bounding_set_keep(keep: Iterable[int]) -> None:
    """Drop every capability but ``keep`` from the bounding set: no setuid or
    file-capability binary run later can gain one that is not in it."""
    kept = set(keep)
    for number in range(cap_last_cap() + 1):
        if number not in kept:
            _prctl(_PR_CAPBSET_DROP, number, f"dropping capability {number} from bounding set")


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _mask(caps: Iterable[int]) -> int:
    mask = 0
    for number in caps:
        mask |= 1 << number
    return mask


def _numbers(mask: int) -> list[int]:
    return [number for number in range(mask.bit_length()) if mask >> number & 1]


def _capset(effective: int, permitted: int, inheritable: int) -> None:
    data = (_CapData * 2)()
    for word in range(2):
        data[word].effective = (effective >> (32 * word)) & 0xFFFFFFFF
        data[word].permitted = (permitted >> (32 * word)) & 0xFFFFFFFF
        data[word].inheritable = (inheritable >> (32 * word)) & 0xFFFFFFFF
    header = _CapHeader(_CAP_VERSION_3, 0)
    _check(_lib().capset(ctypes.byref(header), data), "capset")


def set_capabilities(caps: Iterable[int]) -> None:
    """Set this process's effective, permitted and inheritable sets to exactly ``caps``."""
    mask = _mask(caps)
    _capset(mask, mask, mask)


class CapabilitySets:
    """A process's five capability sets as bit masks (``/proc/<pid>/status`` ``Cap*``)."""

    __slots__ = ("ambient", "bounding", "effective", "inheritable", "permitted")
    _FIELDS: Final = {b"CapInh": "inheritable", b"CapPrm": "permitted", b"CapEff": "effective",
                      b"CapBnd": "bounding", b"CapAmb": "ambient"}

    def __init__(self, *, bounding: int, permitted: int, effective: int, inheritable: int,
                 ambient: int) -> None:
        self.bounding, self.permitted, self.effective = bounding, permitted, effective
        self.inheritable, self.ambient = inheritable, ambient

    @classmethod
    def for_task(cls, caps: Iterable[int], ambient: Iterable[int], *,
                 root: bool) -> CapabilitySets:
        """What the executor gives a task: ``caps`` bound it; root holds them all, another
        user only the ``ambient`` ones (kept across ``execve``)."""
        bounding = _mask(caps)
        held = bounding if root else _mask(ambient)
        return cls(bounding=bounding, permitted=held, effective=held, inheritable=held,
                   ambient=0 if root else held)

    @classmethod
    def parse_status(cls, status: bytes) -> CapabilitySets:
        """From the text of ``/proc/<pid>/status``; ``ValueError`` if a set is missing."""
        found: dict[str, int] = {}
        for line in status.splitlines():
            key, _, value = line.partition(b":")
            if key in cls._FIELDS:
                found[cls._FIELDS[key]] = int(value.strip(), 16)
        missing = set(cls._FIELDS.values()) - found.keys()
        if missing:
            raise ValueError(f"no {', '.join(sorted(missing))} capabilities in the status")
        return cls(**found)


def become_user(uid: int | None, gid: int | None, groups: Sequence[int],
                caps: CapabilitySets) -> None:
    """Drop this root process to ``uid``/``gid``/``groups`` holding exactly ``caps`` (the
    bounding set too), with no way to gain more (no-new-privileges). ``uid`` None or 0
    stays root."""
    bounding_set_keep(_numbers(caps.bounding))
    os.setgroups(list(groups))
    if gid is not None:
        os.setgid(gid)
    if uid is not None and uid != 0:
        set_keep_caps(True)  # the permitted set survives the setuid, to be cut down below
        os.setuid(uid)
        set_keep_caps(False)
    _capset(caps.effective, caps.permitted, caps.inheritable)
    raise_ambient(_numbers(caps.ambient))
    no_new_privs()


def owning_user_namespace(ns_fd: int) -> int:
    """The inode of the user namespace that owns the namespace open at ``ns_fd``."""
    try:
        owner = fcntl.ioctl(ns_fd, _NS_GET_USERNS)
    except OSError as exc:
        raise IsolationError(exc.errno or errno.EIO,
                             f"ioctl(NS_GET_USERNS): {exc.strerror}") from exc
    try:
        return os.fstat(owner).st_ino
    finally:
        os.close(owner)


def set_keep_caps(keep: bool) -> None:
    """Keep the permitted set across the next ``setuid`` away from root."""
    _prctl(_PR_SET_KEEPCAPS, 1 if keep else 0, "prctl(PR_SET_KEEPCAPS)")


def raise_ambient(caps: Sequence[int]) -> None:
    """Clear the ambient set, then raise ``caps`` in it (they must be permitted and
    inheritable): a non-root user keeps them across ``execve``."""
    _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clearing the ambient capabilities")
    for number in caps:
        _prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, f"raising ambient capability {number}",
               number)


def become_child_subreaper() -> None:
    """Orphans of this process's descendants become its children, not init's."""
    _prctl(_PR_SET_CHILD_SUBREAPER, 1, "prctl(PR_SET_CHILD_SUBREAPER)")


def no_new_privs() -> None:
    """Nothing this process executes can gain privileges (setuid bits, file capabilities)."""
    _prctl(_PR_SET_NO_NEW_PRIVS, 1, "prctl(PR_SET_NO_NEW_PRIVS)")


# -- the task's root ----------------------------------------------------------------------------

# Device nodes a task gets in its /dev, bound from the host's (nothing else is reachable).
DEVICES: Final = ("null", "zero", "full", "random", "urandom", "tty")
_DEV_LINKS: Final = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                     ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2"),
                     ("ptmx", "pts/ptmx"))


def _mount_on(root: str, path: str, source: str | None, fstype: str | None, flags: int,
              data: str | None = None, *, directory: bool = True,
              read_only: bool = False) -> None:
    with open_mount_point(root, path, directory=directory) as point:
        if fstype is None:
            assert source is not None
            bind_mount(source, point.path)
        else:
            mount(source, point.path, fstype, flags, data)
    if read_only:
        # The descriptor above names the directory under the new mount; a fresh lookup
        # lands on the mount itself.
        with open_mount_point(root, path, directory=directory) as point:
            remount_read_only(point.path)


def mount_dev(root: str) -> None:
    """A fresh ``/dev``: a small tmpfs with the usual nodes, its own ``pts`` and ``shm``."""
    _mount_on(root, "dev", "tmpfs", "tmpfs", MS_NOSUID, "mode=755,size=65536k")
    dev = os.path.join(root, "dev")  # just mounted by us; nothing of the task's is below
    for name in DEVICES:
        if os.path.exists(f"/dev/{name}"):
            _mount_on(dev, name, f"/dev/{name}", None, 0, directory=False)
    _mount_on(dev, "pts", "devpts", "devpts", MS_NOSUID | MS_NOEXEC,
              "newinstance,ptmxmode=0666,mode=0620")
    _mount_on(dev, "shm", "shm", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC,
              "mode=1777,size=65536k")
    for name, target in _DEV_LINKS:
        os.symlink(target, os.path.join(dev, name))


def build_root(root: str, shared_alloc_dir: str, chroot_env: Sequence[Sequence[str]]) -> None:
    """Turn the task dir ``root`` into a root file system, in this mount namespace only.

    ``chroot_env`` pairs (host path, path inside) are bound read-only (a missing host path
    is skipped); the allocation's shared dir is bound at ``/alloc``; ``local``, ``secrets``
    (with its tmpfs and ``api.sock``) and ``tmp`` are already there. ``/proc`` is mounted
    by the caller once it is in its PID namespace.
    """
    mount(root, root, None, MS_BIND | MS_REC)  # pivot_root needs a mount point
    for source, inside in chroot_env:
        if not os.path.exists(source):
            continue
        _mount_on(root, inside, source, None, 0, directory=os.path.isdir(source),
                  read_only=True)
    _mount_on(root, "alloc", shared_alloc_dir, None, 0)
    mount_dev(root)


def mount_proc(root: str) -> None:
    """A ``/proc`` of this process's PID namespace (its own processes only, when private)."""
    _mount_on(root, "proc", "proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
