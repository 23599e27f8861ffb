"""Who is on the other end of a Task API connection, and whether it is the task.

``SO_PEERCRED`` gives the pid, uid and gid of the process that connected, read once per
connection. The process belongs to the task when it is the task's root process (for
raw_exec: its executor) or a descendant of it: we walk its parent chain through
``/proc/<pid>/stat``, and a pid on the chain counts as the root only if its start time is
the root's too, so a recycled pid never does. uid 0 is always let through (the agent's own
checks and the operator). A task process that has escaped its tree (double-forked and been
reparented) no longer counts as the task's.

The reads are a few small procfs files per connection and run inline on the event loop:
they take microseconds (measured: see ``bench/README.md``), less than a worker thread's
hand-off would.
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

from nomad_client.client.drivers.proctree import same_process

_UCRED = struct.Struct("3i")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
# Parent chains are short (task -> shell -> executor -> agent or init); a longer walk is
# given up on rather than followed.
MAX_DEPTH = 64


class PeerCred(NamedTuple):
    pid: int
    uid: int
    gid: int


def read_peer_credentials(sock: socket.socket | None) -> PeerCred | None:
    """The connected peer's credentials, or None where the socket cannot tell."""
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except (OSError, AttributeError):
        return None
    cred = PeerCred(*_UCRED.unpack(raw))
    # An unconnected or non-Unix socket reads as pid 0, uid and gid -1: nobody known.
    return cred if cred.pid > 0 else None


def parent_pid(pid: int) -> int | None:
    """``pid``'s parent, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses; the last ")" ends it.
    fields = stat[stat.rfind(b")") + 2:].split(None, 2)
    try:
        return int(fields[1])
    except (IndexError, ValueError):
        return None


def belongs_to(pid: int, root: tuple[int, float] | None) -> bool:
    """Whether ``pid`` is the process ``root`` names (pid, create time) or a descendant."""
    if root is None or pid <= 0:
        return False
    root_pid, root_created = root
    current: int | None = pid
    for _ in range(MAX_DEPTH):
        if current is None or current <= 1:
            return False
        if current == root_pid:
            return same_process(root_pid, root_created)
        current = parent_pid(current)
    return False


def peer_is_task(peer: PeerCred | None, root: tuple[int, float] | None) -> bool:
    """The check ``peer_credentials = "log" | "enforce"`` applies: root, or the task."""
    if peer is None:
        return False
    return peer.uid == 0 or belongs_to(peer.pid, root)
