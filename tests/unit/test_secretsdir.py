"""Attacker-minded tests for socket and secret-file creation in a task's secrets dir.

The "task" here is the test itself planting symlinks, files and directories
where a task could; sockets are real and connected to.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import tempfile
import threading
import time
from pathlib import Path

import attrs
import pytest

from nomad_client.client.secretsdir import (
    BoundSocket,
    SecretsDirError,
    SocketOwner,
    create_task_socket,
    remove_task_socket,
    socket_owner_for,
    write_secret_file,
)

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="handing files to another user needs root")
NOBODY = 65534
PRECIOUS = b"do not touch\n"


@attrs.frozen
class Layout:
    alloc: Path
    task_dir: Path
    secrets: Path
    private: Path
    outside: Path  # somewhere the task must never make the agent write
    victim: Path  # a file outside that the task would love to clobber


def _make_layout(root: Path) -> Layout:
    alloc = root / "alloc"
    task_dir = alloc / "web"
    secrets = task_dir / "secrets"
    outside = root / "outside"
    for path, mode in ((alloc, 0o755), (task_dir, 0o777), (secrets, 0o777), (outside, 0o755)):
        path.mkdir()
        os.chmod(path, mode)  # mkdir honours the umask
    victim = outside / "victim"
    victim.write_bytes(PRECIOUS)
    return Layout(alloc, task_dir, secrets, alloc / ".taskapi", outside, victim)


@pytest.fixture
def root(workdir: Path) -> Path:
    os.chmod(workdir, 0o711)  # lets a dropped-privilege child reach the socket
    return workdir


@pytest.fixture
def lay(root: Path) -> Layout:
    return _make_layout(root)


OPEN = SocketOwner(uid=None, mode=0o666)


def create(lay: Layout, owner: SocketOwner = OPEN, **kwargs: object) -> BoundSocket:
    return create_task_socket(lay.task_dir, private_dir=lay.private, owner=owner, **kwargs)  # type: ignore[arg-type]


def roundtrip(bound: BoundSocket, connect_path: str | None = None) -> None:
    """Connect a client, accept it on the (non-blocking) listener, exchange a byte."""
    assert bound.sock.getblocking() is False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(connect_path or str(bound.path))
        ready, _, _ = select.select([bound.sock], [], [], 5)
        assert ready, "listener never became readable"
        conn, _ = bound.sock.accept()
        with conn:
            conn.setblocking(True)
            client.sendall(b"x")
            assert conn.recv(1) == b"x"


def can_connect_as(uid: int, path: Path) -> bool:
    """Try to connect to ``path`` from a forked child running as ``uid``."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 2
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.connect(str(path))
            code = 0
        except PermissionError:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    exit_code = os.waitstatus_to_exitcode(status)
    assert exit_code in (0, 1), f"probe child failed unexpectedly ({exit_code})"
    return exit_code == 0


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---------------------------------------------------------------------- owners


def test_owner_without_user_is_world_usable() -> None:
    assert socket_owner_for(None) == SocketOwner(uid=None, mode=0o666)
    assert socket_owner_for("") == SocketOwner(uid=None, mode=0o666)


@needs_root
def test_owner_for_user_is_private() -> None:
    assert socket_owner_for("nobody") == SocketOwner(uid=NOBODY, mode=0o600)


def test_owner_for_unknown_user_is_an_error() -> None:
    with pytest.raises(SecretsDirError, match="^user 'no-such-user-xyz' does not exist$"):
        socket_owner_for("no-such-user-xyz")


def test_non_root_agent_cannot_hand_out_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    message = "^agent is not root: cannot hand the socket to user 'nobody'$"
    with pytest.raises(SecretsDirError, match=message):
        socket_owner_for("nobody")
    # ...but may serve its own user.
    monkeypatch.setattr(os, "geteuid", lambda: NOBODY)
    assert socket_owner_for("nobody") == SocketOwner(uid=NOBODY, mode=0o600)


def test_socket_owner_mode_is_validated() -> None:
    with pytest.raises(ValueError, match="mode"):
        SocketOwner(uid=None, mode=0o4777)


# ---------------------------------------------------------------------- sockets: basics


def test_socket_world_usable_when_no_user(lay: Layout) -> None:
    old = os.umask(0o077)  # the final mode must not depend on the umask
    try:
        bound = create(lay)
    finally:
        os.umask(old)
    with bound.sock:
        st = os.lstat(lay.secrets / "api.sock")
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o666
        assert st.st_uid == os.geteuid()
        assert (st.st_dev, st.st_ino) == (bound.st_dev, bound.st_ino)
        assert bound.path == lay.secrets / "api.sock"
        roundtrip(bound)
    # The staging area is agent-only and left empty.
    assert stat.S_IMODE(os.lstat(lay.private).st_mode) == 0o700
    assert os.listdir(lay.private) == []
    assert os.listdir(lay.secrets) == ["api.sock"]


@needs_root
def test_socket_private_to_task_user(lay: Layout) -> None:
    bound = create(lay, socket_owner_for("nobody"))
    with bound.sock:
        st = os.lstat(bound.path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == NOBODY
        roundtrip(bound)
        assert can_connect_as(NOBODY, bound.path) is True
        assert can_connect_as(NOBODY - 1, bound.path) is False  # another unprivileged user


def test_custom_name_and_backlog(lay: Layout) -> None:
    bound = create(lay, name="other.sock", backlog=1)
    with bound.sock:
        assert bound.path == lay.secrets / "other.sock"
        roundtrip(bound)


@pytest.mark.parametrize("name", ["", ".", "..", "../api.sock", "a/b", "x\0y"])
def test_bad_socket_names(lay: Layout, name: str) -> None:
    with pytest.raises(SecretsDirError, match="invalid file name"):
        create(lay, name=name)


def test_long_task_dir_path(root: Path) -> None:
    deep = root
    for i in range(3):
        deep = deep / (f"{i}" + "d" * 120)
    deep.mkdir(parents=True)
    lay = _make_layout(deep)
    assert len(str(lay.secrets / "api.sock").encode()) > 300
    bound = create(lay)
    with bound.sock:
        assert stat.S_ISSOCK(os.lstat(bound.path).st_mode)
        # A client can reach such a path the same way: through a dir fd.
        fd = os.open(lay.secrets, os.O_RDONLY | os.O_DIRECTORY)
        try:
            roundtrip(bound, f"/proc/self/fd/{fd}/api.sock")
        finally:
            os.close(fd)


# ---------------------------------------------------------------------- sockets: attacks


def test_symlink_at_socket_path_is_replaced_not_followed(lay: Layout) -> None:
    os.symlink(lay.victim, lay.secrets / "api.sock")
    before = os.lstat(lay.victim)
    bound = create(lay, SocketOwner(uid=NOBODY if IS_ROOT else None, mode=0o600))
    with bound.sock:
        assert stat.S_ISSOCK(os.lstat(bound.path).st_mode)
        roundtrip(bound)
    after = os.lstat(lay.victim)
    assert lay.victim.read_bytes() == PRECIOUS
    # A chmod/chown that followed the link would have changed these.
    assert (after.st_mode, after.st_uid) == (before.st_mode, before.st_uid)


def test_dangling_symlink_at_socket_path(lay: Layout) -> None:
    target = lay.outside / "created-by-agent"
    os.symlink(target, lay.secrets / "api.sock")
    bound = create(lay)
    bound.sock.close()
    assert not os.path.lexists(target)
    assert stat.S_ISSOCK(os.lstat(bound.path).st_mode)


def test_symlinked_secrets_dir_is_refused(lay: Layout) -> None:
    os.rename(lay.secrets, lay.task_dir / "real-secrets")
    os.symlink(lay.outside, lay.secrets)
    with pytest.raises(SecretsDirError, match="^secrets dir is a symlink$"):
        create(lay)
    assert sorted(os.listdir(lay.outside)) == ["victim"]
    assert os.listdir(lay.task_dir / "real-secrets") == []


def test_secrets_not_a_directory(lay: Layout) -> None:
    os.rmdir(lay.secrets)
    lay.secrets.write_bytes(b"")
    with pytest.raises(SecretsDirError, match="^secrets dir is not a directory$"):
        create(lay)
    os.unlink(lay.secrets)
    with pytest.raises(SecretsDirError, match="^secrets dir does not exist$"):
        create(lay)


def test_symlinked_task_dir_is_refused(lay: Layout) -> None:
    link = lay.alloc / "link"
    os.symlink(lay.outside, link)
    (lay.outside / "secrets").mkdir()
    with pytest.raises(SecretsDirError, match="^task dir is a symlink$"):
        create_task_socket(link, private_dir=lay.private, owner=OPEN)
    assert os.listdir(lay.outside / "secrets") == []


def test_symlinked_private_dir_is_refused(lay: Layout) -> None:
    os.symlink(lay.outside, lay.private)
    with pytest.raises(SecretsDirError, match="^private dir is a symlink$"):
        create(lay)
    assert sorted(os.listdir(lay.outside)) == ["victim"]
    assert os.listdir(lay.secrets) == []


@needs_root
def test_private_dir_owned_by_someone_else_is_refused(lay: Layout) -> None:
    lay.private.mkdir()
    os.chown(lay.private, NOBODY, NOBODY)
    with pytest.raises(SecretsDirError, match="^private dir is not owned by the agent$"):
        create(lay)


def test_private_dir_parent_missing(lay: Layout) -> None:
    with pytest.raises(SecretsDirError, match="^cannot create private dir: "):
        create_task_socket(lay.task_dir, private_dir=lay.alloc / "gone" / "p", owner=OPEN)


def test_private_dir_mode_is_tightened(lay: Layout) -> None:
    lay.private.mkdir()
    os.chmod(lay.private, 0o777)
    create(lay).sock.close()
    assert stat.S_IMODE(os.lstat(lay.private).st_mode) == 0o700


@pytest.mark.parametrize("kind", ["socket", "file", "empty dir", "fifo"])
def test_stale_entry_is_replaced(lay: Layout, kind: str) -> None:
    path = lay.secrets / "api.sock"
    if kind == "socket":
        with socket.socket(socket.AF_UNIX) as stale:
            stale.bind(str(path))
    elif kind == "file":
        path.write_bytes(b"stale")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()
    old_ino = os.lstat(path).st_ino
    bound = create(lay)
    with bound.sock:
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and st.st_ino == bound.st_ino != old_ino
        roundtrip(bound)


def test_non_empty_directory_at_socket_path_is_refused(lay: Layout) -> None:
    planted = lay.secrets / "api.sock"
    planted.mkdir()
    os.symlink(lay.victim, planted / "link")
    (planted / "keep").write_bytes(b"task data")
    with pytest.raises(SecretsDirError, match="non-empty directory"):
        create(lay)
    assert sorted(os.listdir(planted)) == ["keep", "link"]
    assert lay.victim.read_bytes() == PRECIOUS
    assert os.listdir(lay.private) == []  # staged socket cleaned up


def test_final_path_never_has_a_wider_mode(lay: Layout) -> None:
    final = lay.secrets / "api.sock"
    owner = SocketOwner(uid=NOBODY if IS_ROOT else None, mode=0o600)
    stop = threading.Event()
    bad: list[str] = []
    seen = 0

    def watch() -> None:
        nonlocal seen
        while not stop.is_set():
            try:
                st = os.lstat(final)
            except FileNotFoundError:
                continue
            if stat.S_ISSOCK(st.st_mode):
                seen += 1
                if stat.S_IMODE(st.st_mode) != 0o600 or (
                    owner.uid is not None and st.st_uid != owner.uid
                ):
                    bad.append(f"mode {stat.S_IMODE(st.st_mode):o} uid {st.st_uid}")

    old = os.umask(0)  # bind would create 0777 sockets: only staging hides that
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        # At least 200 rounds, and more until the watcher has seen a socket at least once:
        # on a loaded machine the watcher thread may not get a turn in the first 200.
        deadline = time.monotonic() + 60
        i = 0
        while i < 200 or (seen == 0 and time.monotonic() < deadline):
            bound = create(lay, owner)
            bound.sock.close()
            if i % 2:
                remove_task_socket(lay.task_dir, bound)
            i += 1
    finally:
        stop.set()
        watcher.join()
        os.umask(old)
    assert bad == []
    assert seen > 0, "watcher never observed the socket; the test proved nothing"


def test_no_fd_leaks(lay: Layout) -> None:
    create(lay).sock.close()  # warm up lazily-opened descriptors
    before = fd_count()
    for _ in range(100):
        bound = create(lay)
        remove_task_socket(lay.task_dir, bound)
        bound.sock.close()
    # Error paths must not leak either.
    (lay.secrets / "api.sock").mkdir()
    (lay.secrets / "api.sock" / "x").write_bytes(b"")
    for _ in range(20):
        with pytest.raises(SecretsDirError):
            create(lay)
    os.rename(lay.secrets, lay.task_dir / "moved")
    os.symlink(lay.outside, lay.secrets)
    for _ in range(20):
        with pytest.raises(SecretsDirError):
            create(lay)
        with pytest.raises(SecretsDirError):
            write_secret_file(lay.task_dir, "secrets/nomad_token", b"t", user=None)
    assert fd_count() == before


def test_cross_filesystem_private_dir_falls_back_to_staging_in_secrets(lay: Layout) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(lay.private.parent).st_dev:
        pytest.skip("needs a second filesystem (tmpfs at /dev/shm)")
    with tempfile.TemporaryDirectory(dir=shm, prefix="secretsdir-test-") as tmp:
        other = _make_layout(Path(tmp))
        os.symlink(other.victim, other.secrets / "api.sock")
        before = fd_count()
        bound = create_task_socket(other.task_dir, private_dir=lay.private, owner=OPEN)
        with bound.sock:
            st = os.lstat(bound.path)
            assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666
            roundtrip(bound)
            assert os.listdir(other.secrets) == ["api.sock"]  # staging dir removed
            assert other.victim.read_bytes() == PRECIOUS
            remove_task_socket(other.task_dir, bound)
        assert fd_count() == before
        assert os.listdir(other.secrets) == []


# ---------------------------------------------------------------------- removal


def test_remove_our_socket(lay: Layout) -> None:
    bound = create(lay)
    bound.sock.close()
    remove_task_socket(lay.task_dir, bound)
    assert not os.path.lexists(bound.path)
    remove_task_socket(lay.task_dir, bound)  # already gone: fine


def test_remove_leaves_what_the_task_put_in_place(lay: Layout) -> None:
    bound = create(lay)
    bound.sock.close()
    os.unlink(bound.path)
    bound.path.write_bytes(b"task's own file")
    remove_task_socket(lay.task_dir, bound)
    assert bound.path.read_bytes() == b"task's own file"


def test_remove_never_follows_a_symlink(lay: Layout) -> None:
    bound = create(lay)
    bound.sock.close()
    # The task moves our socket aside and points the name at it: lstat sees
    # the link, not our inode, so neither the link nor the socket is touched.
    os.rename(bound.path, lay.secrets / "moved.sock")
    os.symlink(lay.secrets / "moved.sock", bound.path)
    remove_task_socket(lay.task_dir, bound)
    assert os.path.islink(bound.path)
    assert stat.S_ISSOCK(os.lstat(lay.secrets / "moved.sock").st_mode)


def test_remove_refuses_symlinked_secrets_dir(lay: Layout) -> None:
    bound = create(lay)
    bound.sock.close()
    os.rename(lay.secrets, lay.task_dir / "elsewhere")
    os.symlink(lay.task_dir / "elsewhere", lay.secrets)
    with pytest.raises(SecretsDirError, match="^secrets dir is a symlink$"):
        remove_task_socket(lay.task_dir, bound)
    assert stat.S_ISSOCK(os.lstat(lay.task_dir / "elsewhere" / "api.sock").st_mode)


def test_remove_when_dirs_are_gone(lay: Layout) -> None:
    bound = create(lay)
    bound.sock.close()
    os.unlink(bound.path)
    os.rmdir(lay.secrets)
    remove_task_socket(lay.task_dir, bound)
    remove_task_socket(lay.alloc / "gone", bound)


# ---------------------------------------------------------------------- secret files


def test_write_secret_file_basic(lay: Layout) -> None:
    old = os.umask(0)
    try:
        path = write_secret_file(lay.task_dir, "secrets/nomad_token", b"jwt-1", user=None)
    finally:
        os.umask(old)
    assert path == lay.secrets / "nomad_token"
    assert path.read_bytes() == b"jwt-1"
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert st.st_uid == os.geteuid()
    # Rewriting replaces content and resets a loosened mode.
    os.chmod(path, 0o666)
    write_secret_file(lay.task_dir, "secrets/nomad_token", b"jwt-2", user="")
    assert path.read_bytes() == b"jwt-2"
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
    assert os.listdir(lay.secrets) == ["nomad_token"]  # no temp leftovers


@needs_root
def test_write_secret_file_for_user(lay: Layout) -> None:
    path = write_secret_file(lay.task_dir, "secrets/nomad_default.jwt", b"tok", user="nobody")
    st = os.lstat(path)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (NOBODY, 0o600)
    assert st.st_gid == os.getegid()  # group unchanged


def test_write_secret_file_no_fallback(lay: Layout, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(SecretsDirError, match="does not exist"):
        write_secret_file(lay.task_dir, "secrets/nomad_token", b"t", user="no-such-user-xyz")
    monkeypatch.setattr(os, "geteuid", lambda: 4242)
    with pytest.raises(SecretsDirError, match="^agent is not root: cannot hand the file to user"):
        write_secret_file(lay.task_dir, "secrets/nomad_token", b"t", user="nobody")
    assert os.listdir(lay.secrets) == []


def test_write_secret_file_replaces_planted_symlink(lay: Layout) -> None:
    os.symlink(lay.victim, lay.secrets / "nomad_token")
    path = write_secret_file(lay.task_dir, "secrets/nomad_token", b"tok", user=None)
    assert not path.is_symlink() and path.read_bytes() == b"tok"
    assert lay.victim.read_bytes() == PRECIOUS


def test_write_secret_file_replaces_planted_hardlink(lay: Layout) -> None:
    os.link(lay.victim, lay.secrets / "nomad_token")
    write_secret_file(lay.task_dir, "secrets/nomad_token", b"tok", user=None)
    assert lay.victim.read_bytes() == PRECIOUS
    assert (lay.secrets / "nomad_token").read_bytes() == b"tok"


def test_write_secret_file_dangling_symlink_creates_nothing_outside(lay: Layout) -> None:
    os.symlink(lay.outside / "new", lay.secrets / "nomad_token")
    write_secret_file(lay.task_dir, "secrets/nomad_token", b"tok", user=None)
    assert not os.path.lexists(lay.outside / "new")


def test_write_secret_file_symlinked_secrets_dir(lay: Layout) -> None:
    os.rmdir(lay.secrets)
    os.symlink(lay.outside, lay.secrets)
    with pytest.raises(SecretsDirError, match="^secrets is a symlink$"):
        write_secret_file(lay.task_dir, "secrets/victim", b"pwned", user=None)
    assert lay.victim.read_bytes() == PRECIOUS
    assert sorted(os.listdir(lay.outside)) == ["victim"]


def test_write_secret_file_symlink_deeper_in_the_path(lay: Layout) -> None:
    (lay.task_dir / "local").mkdir()
    os.symlink(lay.outside, lay.task_dir / "local" / "a")
    with pytest.raises(SecretsDirError, match="^local/a is a symlink$"):
        write_secret_file(lay.task_dir, "local/a/victim", b"pwned", user=None)
    assert lay.victim.read_bytes() == PRECIOUS


def test_write_secret_file_symlinked_task_dir(lay: Layout) -> None:
    link = lay.alloc / "link"
    os.symlink(lay.outside, link)
    with pytest.raises(SecretsDirError, match="^task dir is a symlink$"):
        write_secret_file(link, "victim", b"pwned", user=None)
    assert lay.victim.read_bytes() == PRECIOUS


@pytest.mark.parametrize(
    "rel",
    ["../outside/victim", "/etc/passwd", "secrets/../../outside/victim", "..", "secrets/..",
     "", "secrets//x", "./secrets/x", "secrets/", "secrets/x\0"],
)
def test_write_secret_file_bad_paths(lay: Layout, rel: str) -> None:
    with pytest.raises(SecretsDirError):
        write_secret_file(lay.task_dir, rel, b"pwned", user=None)
    assert lay.victim.read_bytes() == PRECIOUS
    assert os.listdir(lay.secrets) == []


def test_write_secret_file_dotdot_into_a_sibling_task(lay: Layout) -> None:
    sibling = lay.alloc / "db"
    sibling.mkdir()
    for rel in ("../db/nomad_token", "secrets/../../db/nomad_token"):
        with pytest.raises(SecretsDirError, match="escapes the task dir"):
            write_secret_file(lay.task_dir, rel, b"pwned", user=None)
    assert os.listdir(sibling) == []


def test_write_secret_file_onto_directory(lay: Layout) -> None:
    (lay.secrets / "nomad_token").mkdir()
    with pytest.raises(SecretsDirError, match="cannot write secrets/nomad_token"):
        write_secret_file(lay.task_dir, "secrets/nomad_token", b"tok", user=None)
    assert os.listdir(lay.secrets) == ["nomad_token"]  # temp file removed


def test_write_secret_file_missing_dir(lay: Layout) -> None:
    with pytest.raises(SecretsDirError, match="^nope does not exist$"):
        write_secret_file(lay.task_dir, "nope/token", b"tok", user=None)
