"""Writing a private file: the one way the agent writes secrets to disk (workload identity
token files in task secrets dirs, the server's signing key).

The file is created 0600 under a random name inside a directory given by descriptor, filled
and synced through its own descriptor (so a rename race cannot redirect the mode or owner
change), then renamed over the final name, which replaces — never follows — whatever is
there. Raises ``OSError``; callers turn it into their own error type.
"""

from __future__ import annotations

import contextlib
import os
import secrets

_NEW_FILE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_private_file(dir_fd: int, name: str, data: bytes, *, uid: int | None = None) -> None:
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
