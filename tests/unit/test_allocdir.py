"""The allocation directory: layout, modes, ownership, destroy and confined opening of
client paths (as a task trying to make the agent read host files would try it)."""

from __future__ import annotations

import concurrent.futures
import os
import pwd
import socket
import stat
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nomad_client.client import allocdir
from nomad_client.client.allocdir import (
    ALLOC_GID_BASE,
    ALLOC_GID_COUNT,
    AllocDir,
    BadPathError,
    HardLinkError,
    OpenedPath,
    PathEscapeError,
    PathNotFoundError,
    SecretReadError,
    SymlinkError,
    TaskDir,
    alloc_group,
)
from nomad_client.server.keyring import Keyring
from tests.unit.factories import OneAllocClient, make_server, serve_api

IS_ROOT = os.geteuid() == 0
ALLOC_ID = "5fc3c8bb-0b1a-4c1e-9f56-3a6f0f6c2a11"


@pytest.fixture
def built(workdir: Path) -> AllocDir:
    ad = AllocDir(workdir / "alloc", ALLOC_ID)
    ad.build()
    ad.build_task_dir("web", None)
    return ad


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- building -------------------------------------------------------------------------------


SHARED_MODES = {"alloc": 0o3770, "alloc/data": 0o2770, "alloc/logs": 0o2750,
                "alloc/tmp": 0o3770}


@pytest.mark.parametrize("as_root", [True, False])
def test_build_layout_and_modes(workdir: Path, as_root: bool,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    if as_root and not IS_ROOT:
        pytest.skip("the root layout needs root")
    monkeypatch.setattr(allocdir, "_is_root", lambda: as_root)
    old_umask = os.umask(0o077)  # modes must not depend on the agent's umask
    try:
        ad = AllocDir(workdir / "alloc", ALLOC_ID)
        ad.build()
        ad.build()  # idempotent
    finally:
        os.umask(old_umask)
    assert ad.path == workdir / "alloc" / ALLOC_ID
    assert ad.shared_dir == ad.path / "alloc"
    assert ad.logs_dir == ad.path / "alloc" / "logs"
    assert mode(workdir / "alloc") == 0o711
    # Only the alloc's own group may enter (a non-root agent has no group to hand out).
    assert mode(ad.path) == (0o710 if as_root else 0o700)
    for rel, want in SHARED_MODES.items():
        assert mode(ad.path / rel) == want, rel


@pytest.mark.skipif(not IS_ROOT, reason="ownership changes need root")
def test_tree_belongs_to_the_agent_and_the_alloc_group(workdir: Path) -> None:
    ad = AllocDir(workdir / "alloc", ALLOC_ID)
    ad.build()
    ad.build_task_dir("web", None)
    td = ad.build_task_dir("api", "nobody")
    gid = ad.gid
    assert gid is not None and ALLOC_GID_BASE <= gid < ALLOC_GID_BASE + ALLOC_GID_COUNT
    assert alloc_group(ad.path) == gid
    for rel in ("", *SHARED_MODES):
        assert owner(ad.path / rel) == (0, gid), rel
    nobody = pwd.getpwnam("nobody")
    # A task's own dirs are its user's; local and tmp are shared with the alloc only.
    assert owner(td.path) == (nobody.pw_uid, nobody.pw_gid)
    assert owner(td.secrets_dir) == (nobody.pw_uid, nobody.pw_gid)
    for private in (td.local_dir, td.tmp_dir):
        assert owner(private) == (nobody.pw_uid, gid)
        assert mode(private) == 0o750
    assert owner(ad.path / "web" / "local") == (0, gid)
    assert not world_accessible(ad.path), "others must not even enter the alloc dir"
    for dirpath, _dirs, _files in os.walk(ad.path):
        assert not os.lstat(dirpath).st_mode & stat.S_IWOTH, dirpath


def owner(path: Path) -> tuple[int, int]:
    st_ = os.lstat(path)
    return st_.st_uid, st_.st_gid


def world_accessible(path: Path) -> bool:
    return bool(os.lstat(path).st_mode & (stat.S_IROTH | stat.S_IWOTH | stat.S_IXOTH))


@pytest.mark.skipif(not IS_ROOT, reason="alloc groups need root")
def test_alloc_group_survives_a_rebuild_and_differs_between_allocs(workdir: Path) -> None:
    first = AllocDir(workdir / "alloc", ALLOC_ID)
    first.build()
    gid = first.gid
    # A restarted agent builds the same tree again from a new object: same group.
    again = AllocDir(workdir / "alloc", ALLOC_ID)
    again.build()
    assert again.gid == gid
    others = [AllocDir(workdir / "alloc", str(uuid.uuid4())) for _ in range(8)]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda ad: ad.build(), others))
    gids = {ad.gid for ad in others} | {gid}
    assert None not in gids and len(gids) == 9


@pytest.mark.skipif(not IS_ROOT, reason="alloc groups need root")
def test_alloc_group_in_use_is_not_given_twice(workdir: Path) -> None:
    # Learn which gid the alloc id leads to, then have another alloc hold it already.
    probe = AllocDir(workdir / "probe", ALLOC_ID)
    probe.build()
    wanted = probe.gid
    assert wanted is not None
    holder = AllocDir(workdir / "alloc", "holder")
    holder.build()
    os.chown(holder.path, 0, wanted)
    ad = AllocDir(workdir / "alloc", ALLOC_ID)
    ad.build()
    given = ad.gid
    assert given is not None and given != wanted
    # The gid it got is the one recorded: with the first choice free again, a rebuild (an
    # agent restart) keeps it, as the tasks already running hold it.
    holder.destroy()
    AllocDir(workdir / "alloc", ALLOC_ID).build()
    assert ad.gid == given


@pytest.mark.skipif(not IS_ROOT, reason="ownership changes need root")
def test_older_layout_is_tightened_and_gets_a_group(workdir: Path) -> None:
    ad = AllocDir(workdir / "alloc", ALLOC_ID)
    ad.path.mkdir(parents=True)
    for rel in ("", "alloc", "alloc/data", "alloc/logs"):
        (ad.path / rel).mkdir(exist_ok=True)
        (ad.path / rel).chmod(0o777)
    assert alloc_group(ad.path) is None  # gid 0 is no alloc group: never handed to a task
    ad.build()
    assert ad.gid is not None
    assert mode(ad.path) == 0o710 and mode(ad.logs_dir) == 0o2750


def test_alloc_group_of_a_dir_not_owned_by_the_agent_is_none(workdir: Path) -> None:
    assert alloc_group(workdir / "missing") is None
    if IS_ROOT:
        path = workdir / "planted"
        path.mkdir()
        os.chown(path, 65534, ALLOC_GID_BASE)
        assert alloc_group(path) is None


def _run_as(user: str, script: str, groups: list[int]) -> subprocess.CompletedProcess[str]:
    entry = pwd.getpwnam(user)
    return subprocess.run(["/bin/sh", "-c", script], user=entry.pw_uid, group=entry.pw_gid,
                          extra_groups=groups, capture_output=True, text=True, check=False,
                          timeout=30, cwd="/")


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@pytest.mark.skipif(not IS_ROOT, reason="running as other users needs root")
@pytest.mark.skipif(not _user_exists("daemon"), reason="needs the user daemon")
def test_only_members_of_the_alloc_group_get_in(workdir: Path) -> None:
    workdir.chmod(0o711)  # let other users reach the alloc dir, as a real data dir does
    ad = AllocDir(workdir / "alloc", ALLOC_ID)
    ad.build()
    ad.build_task_dir("web", "nobody")
    gid = ad.gid
    assert gid is not None
    data, logs, local = ad.shared_dir / "data", ad.logs_dir, ad.path / "web" / "local"
    (logs / "web.stdout.0").write_text("real\n")

    # Another allocation's task (same user even) without the group: not even a listing.
    for target in (ad.shared_dir, data, logs, local):
        out = _run_as("daemon", f"touch {target}/planted", [])
        assert out.returncode != 0 and "Permission denied" in out.stderr, target
        assert not (target / "planted").exists()
    assert _run_as("nobody", f"ls {data}", []).returncode != 0

    # Tasks of this allocation: shared data across users, read-only logs, private local.
    assert _run_as("daemon", f"echo d > {data}/from-daemon", [gid]).returncode == 0
    assert _run_as("nobody", f"cat {data}/from-daemon", [gid]).stdout == "d\n"
    assert owner(data / "from-daemon")[1] == gid  # setgid dir: new files stay in the group
    for attempt in (f"echo forged >> {logs}/web.stdout.0", f"touch {logs}/x",
                    f"mv {logs} {ad.shared_dir}/old", f"touch {local}/x"):
        out = _run_as("daemon", attempt, [gid])
        assert out.returncode != 0, attempt
    assert (logs / "web.stdout.0").read_text() == "real\n"
    assert logs.is_dir() and not (local / "x").exists()
    assert _run_as("nobody", f"touch {local}/mine", [gid]).returncode == 0


def test_task_dir_layout_and_modes(built: AllocDir) -> None:
    td = built.build_task_dir("web", None)  # again: idempotent
    assert td == TaskDir(
        name="web",
        path=built.path / "web",
        local_dir=built.path / "web" / "local",
        secrets_dir=built.path / "web" / "secrets",
        tmp_dir=built.path / "web" / "tmp",
    )
    assert mode(td.path) == 0o755
    assert os.lstat(td.path).st_uid == os.geteuid()
    assert mode(td.local_dir) == 0o750
    assert mode(td.tmp_dir) == 0o750
    assert mode(td.secrets_dir) == 0o700
    assert os.lstat(td.secrets_dir).st_uid == os.geteuid()


@pytest.mark.skipif(not IS_ROOT, reason="giving the secrets dir to a user needs root")
def test_task_and_secrets_dirs_belong_to_the_task_user(built: AllocDir) -> None:
    nobody = pwd.getpwnam("nobody")
    td = built.build_task_dir("api", "nobody")
    for path, want in ((td.path, 0o755), (td.secrets_dir, 0o700)):
        st_ = os.lstat(path)
        assert (st_.st_uid, st_.st_gid) == (nobody.pw_uid, nobody.pw_gid), path
        assert mode(path) == want, path


@pytest.mark.skipif(not IS_ROOT, reason="running as another user needs root")
def test_sibling_user_cannot_swap_a_tasks_secrets_dir(built: AllocDir, workdir: Path) -> None:
    # A task dir built by an older layout (0777) is tightened again on the next build.
    (built.path / "api").mkdir(mode=0o777)
    (built.path / "api").chmod(0o777)
    td = built.build_task_dir("api", "nobody")
    workdir.chmod(0o711)  # let other users reach the alloc dir, as a real data dir does
    # A sibling task running as yet another user tries to move the secrets dir away and
    # plant its own (where it would bind an api.sock to collect the task's token).
    sibling = 54321
    moved = subprocess.run(["mv", str(td.secrets_dir), str(td.path / "gone")],
                           user=sibling, group=sibling, capture_output=True, check=False)
    assert moved.returncode != 0
    assert b"Permission denied" in moved.stderr
    planted = subprocess.run(["mkdir", str(td.path / "planted")],
                             user=sibling, group=sibling, capture_output=True, check=False)
    assert planted.returncode != 0
    assert os.lstat(td.secrets_dir).st_uid == pwd.getpwnam("nobody").pw_uid
    assert not (td.path / "gone").exists() and not (td.path / "planted").exists()


def test_unknown_user_is_rejected(built: AllocDir) -> None:
    with pytest.raises(ValueError, match="unknown user 'no-such-user-xyz'"):
        built.build_task_dir("api", "no-such-user-xyz")


def test_planted_symlink_in_task_dir_is_not_followed(built: AllocDir, workdir: Path) -> None:
    victim = workdir / "victim"
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    secrets = built.path / "web" / "secrets"
    secrets.rmdir()
    secrets.symlink_to(victim)  # what a task could do between restarts
    with pytest.raises(PathEscapeError, match="not a plain directory"):
        built.build_task_dir("web", None)
    assert mode(victim) == 0o755


def test_task_dir_is_paths_only(workdir: Path) -> None:
    ad = AllocDir(workdir / "nowhere", ALLOC_ID)
    td = ad.task_dir("web")
    assert td.secrets_dir == workdir / "nowhere" / ALLOC_ID / "web" / "secrets"
    assert not (workdir / "nowhere").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\x00b", ".taskapi", ".x"])
def test_bad_names_are_rejected(workdir: Path, name: str) -> None:
    with pytest.raises(ValueError, match="alloc id"):
        AllocDir(workdir, name)
    with pytest.raises(ValueError, match="task name"):
        AllocDir(workdir, ALLOC_ID).task_dir(name)


def test_task_names_of_the_agents_own_entries_are_rejected(built: AllocDir) -> None:
    with pytest.raises(ValueError, match="task name 'alloc' is reserved"):
        built.task_dir("alloc")
    with pytest.raises(ValueError, match="task name 'alloc' is reserved"):
        built.build_task_dir("alloc", None)
    with pytest.raises(ValueError, match=r"task name '\.taskapi' must not start with '\.'"):
        built.build_task_dir(".taskapi", None)
    assert mode(built.shared_dir) == 0o3770  # untouched
    assert not (built.path / ".taskapi").exists()
    assert built.task_dir("alloc2").name == "alloc2"  # only the exact name is reserved


# -- destroy --------------------------------------------------------------------------------


def test_destroy_removes_tree_without_following_symlinks(built: AllocDir, workdir: Path) -> None:
    outside = workdir / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep")
    (built.path / "web" / "local" / "link").symlink_to(outside)
    (built.shared_dir / "data" / "file").write_text("x")
    locked = built.path / "web" / "tmp" / "locked"
    locked.mkdir()
    (locked / "f").write_text("x")
    locked.chmod(0o500)
    built.destroy()
    assert not built.path.exists()
    assert (outside / "keep.txt").read_text() == "keep"
    built.destroy()  # nothing left: no error


# -- confinement ----------------------------------------------------------------------------


def target(opened: OpenedPath) -> str:
    """Where a descriptor really points, as the kernel sees it."""
    return os.readlink(f"/proc/self/fd/{opened.fd}")


def real(path: Path) -> str:
    return os.path.realpath(path)


@pytest.mark.parametrize(
    ("path", "where"),
    [("", "."), ("/", "."), ("alloc/logs", "alloc/logs"), ("/alloc/logs/", "alloc/logs"),
     ("alloc/../web/./local", "web/local"), ("alloc//data", "alloc/data")],
)
def test_open_path_walks_plain_paths(built: AllocDir, path: str, where: str) -> None:
    with built.open_path(path, want="dir") as opened:
        assert target(opened) == real(built.path / where)
        assert stat.S_ISDIR(opened.st.st_mode)
        assert opened.rel == ("" if where == "." else where)
        assert opened.name == (ALLOC_ID if where == "." else where.rsplit("/", 1)[-1])
        assert sorted(os.listdir(opened.fd)) == sorted(os.listdir(built.path / where))


def test_open_path_reads_a_file_and_closes(built: AllocDir) -> None:
    (built.path / "web" / "local" / "hello.txt").write_bytes(b"hi there")
    with built.open_path("web/local/hello.txt", want="file", for_read=True) as opened:
        fd = opened.fd
        assert os.read(fd, 100) == b"hi there"
        assert opened.st.st_size == 8 and opened.name == "hello.txt"
    with pytest.raises(OSError):
        os.fstat(fd)  # closed by the context manager


def test_missing_path_is_not_found(built: AllocDir) -> None:
    with pytest.raises(PathNotFoundError, match="no such file or directory"):
        built.open_path("alloc/logs/not-yet.txt")
    with pytest.raises(PathNotFoundError):
        built.open_path("nope/deeper/still", want="dir")


def test_absolute_paths_stay_inside(built: AllocDir) -> None:
    # A leading "/" names the alloc dir, never the host root.
    with pytest.raises(PathNotFoundError):
        built.open_path("/etc/passwd", want="file", for_read=True)
    (built.path / "etc").mkdir()
    (built.path / "etc" / "passwd").write_text("inside")
    with built.open_path("/etc/passwd", want="file", for_read=True) as opened:
        assert target(opened) == real(built.path / "etc" / "passwd")


@pytest.mark.parametrize(
    "path",
    ["..", "../", "../x", "alloc/../../x", "web/local/../../../etc", "/../..", "a/../../"],
)
def test_dotdot_escapes_are_refused(built: AllocDir, path: str) -> None:
    with pytest.raises(PathEscapeError, match="leaves the allocation directory"):
        built.open_path(path, want="dir")


@pytest.mark.parametrize(
    ("path", "message"),
    [("alloc/logs\x00/../../etc", "NUL"), ("a" * 300, "too long"),
     ("alloc/" + "b" * 256 + "/x", "too long"), ("x/" * 2100, "path is too long"),
     ("alloc/\ud800", "not valid text")],
)
def test_malformed_paths_are_bad_requests(built: AllocDir, path: str, message: str) -> None:
    with pytest.raises(BadPathError, match=message):
        built.open_path(path)


def test_non_string_is_refused(built: AllocDir) -> None:
    with pytest.raises(BadPathError, match="must be a string"):
        built.open_path(b"alloc")  # type: ignore[arg-type]


@pytest.mark.parametrize("want", ["any", "dir", "file"])
@pytest.mark.parametrize(
    "path", ["web/local/etc", "web/local/etc/passwd", "/web/local/etc/", "web/local/etc/."]
)
def test_symlink_to_outside_is_refused(built: AllocDir, path: str, want: str) -> None:
    (built.path / "web" / "local" / "etc").symlink_to("/etc")
    with pytest.raises(SymlinkError, match="goes through a symlink.*symlinks are not followed"):
        built.open_path(path, want=want)  # type: ignore[arg-type]


def test_dotdot_is_applied_as_written_not_through_links(built: AllocDir) -> None:
    (built.path / "web" / "local" / "etc").symlink_to("/etc")
    with built.open_path("web/local/etc/../../tmp", want="dir") as opened:
        assert target(opened) == real(built.path / "web" / "tmp")


def test_symlinked_alloc_logs_is_refused(built: AllocDir, workdir: Path) -> None:
    # A task replaces the shared logs dir with a link to a host directory.
    outside = workdir / "host-logs"
    outside.mkdir()
    (outside / "web.stdout.0").write_text("host secret")
    built.logs_dir.rmdir()
    built.logs_dir.symlink_to(outside)
    for want, path in (("dir", "alloc/logs"), ("file", "alloc/logs/web.stdout.0")):
        with pytest.raises(SymlinkError):
            built.open_path(path, want=want, for_read=True)  # type: ignore[arg-type]


def test_symlink_inside_is_refused_too(built: AllocDir) -> None:
    # Deliberately stricter than Nomad: no link is followed, wherever it points.
    (built.shared_dir / "data" / "logs").symlink_to("../logs")
    with pytest.raises(SymlinkError):
        built.open_path("alloc/data/logs", want="dir")


def test_dangling_symlink_and_loop_are_refused(built: AllocDir) -> None:
    data = built.shared_dir / "data"
    (data / "d").symlink_to("/nonexistent-dir-xyz/file")
    (data / "a").symlink_to(data / "b")
    (data / "b").symlink_to(data / "a")
    for path in ("alloc/data/d", "alloc/data/a/x", "alloc/data/b"):
        with pytest.raises(SymlinkError):
            built.open_path(path)


def test_file_in_the_middle_is_not_a_directory(built: AllocDir) -> None:
    (built.path / "web" / "local" / "f").write_text("x")
    with pytest.raises(BadPathError, match="'web/local/f' is not a directory"):
        built.open_path("web/local/f/x")
    with pytest.raises(BadPathError, match="not a directory"):
        built.open_path("web/local/f", want="dir")


@pytest.mark.timeout(10)
def test_only_regular_files_open_for_reading(built: AllocDir) -> None:
    local = built.path / "web" / "local"
    os.mkfifo(local / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(local / "sock"))
        cases = {"fifo": "a FIFO", "sock": "a socket", "": "is a directory"}
        if IS_ROOT:
            os.mknod(local / "zero", 0o666 | stat.S_IFCHR, os.makedev(1, 5))
            cases["zero"] = "a character device"
        for name, message in cases.items():
            with pytest.raises(BadPathError, match=message):
                built.open_path(f"web/local/{name}", want="file", for_read=True)
            # stat-style access is fine: O_PATH opens nothing (no FIFO wait).
            with built.open_path(f"web/local/{name}") as opened:
                assert not stat.S_ISREG(opened.st.st_mode)
    finally:
        sock.close()


def test_swap_during_the_walk_is_refused(built: AllocDir, workdir: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A task swaps a checked directory for a link at the worst moment: just before the
    agent opens it. The open itself refuses the link."""
    outside = workdir / "host"
    outside.mkdir()
    (outside / "secret").write_text("host secret")
    local = built.path / "web" / "local"
    (local / "d").mkdir()
    (local / "d" / "secret").write_text("task file")
    real_open = os.open

    def swapping_open(path: object, flags: int, *args: object, **kw: object) -> int:
        if path == "d" and not (local / "d").is_symlink():
            (local / "d").rename(local / "d.real")
            (local / "d").symlink_to(outside)
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(SymlinkError):
        built.open_path("web/local/d/secret", want="file", for_read=True)


def test_file_swapped_for_a_fifo_after_the_check_is_refused(
        built: AllocDir, monkeypatch: pytest.MonkeyPatch) -> None:
    local = built.path / "web" / "local"
    (local / "f").write_text("x")
    real_open = os.open

    def swapping_open(path: object, flags: int, *args: object, **kw: object) -> int:
        if path == "f" and flags & os.O_NONBLOCK:
            (local / "f").unlink()
            os.mkfifo(local / "f")
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(BadPathError, match="changed while being opened"):
        built.open_path("web/local/f", want="file", for_read=True)


@pytest.mark.parametrize(
    "path",
    [
        "web/secrets",
        "web/secrets/nomad_token",
        "/web/secrets/api.sock",
        "WEB/SECRETS/nomad_token",
        "web/Secrets/x",
        "web/private/x",
        "web/PRIVATE",
        "web/local/../secrets/nomad_token",
        ".taskapi/x",
    ],
)
def test_reads_under_secrets_are_refused(built: AllocDir, path: str) -> None:
    (built.path / "web" / "secrets" / "nomad_token").write_text("token")
    with pytest.raises(SecretReadError):
        built.open_path(path, want="file", for_read=True)


def test_listing_secrets_is_allowed_but_reading_is_not(built: AllocDir) -> None:
    with built.open_path("web/secrets", want="dir") as opened:
        assert target(opened) == real(built.path / "web" / "secrets")
    with pytest.raises(SecretReadError):
        built.open_path("web/secrets", want="dir", for_read=True)


def test_symlink_into_secrets_is_refused(built: AllocDir) -> None:
    (built.shared_dir / "data" / "s").symlink_to("../../web/secrets")
    with pytest.raises(SymlinkError):
        built.open_path("alloc/data/s/nomad_token", want="file", for_read=True)


def test_hard_linked_file_is_not_read(built: AllocDir) -> None:
    # A task links its own token (which the fs API never serves) into its local dir.
    token = built.path / "web" / "secrets" / "nomad_token"
    token.write_text("task-token")
    os.link(token, built.path / "web" / "local" / "tok")
    with pytest.raises(HardLinkError, match="'web/local/tok' has 2 hard links"):
        built.open_path("web/local/tok", want="file", for_read=True)
    with pytest.raises(HardLinkError):
        built.open_path("/web/local/../local/tok", want="file", for_read=True)
    # Looking at it is fine: stat and listings read no content.
    with built.open_path("web/local/tok") as opened:
        assert opened.st.st_nlink == 2
    (built.path / "web" / "local" / "plain").write_text("plain")
    with built.open_path("web/local/plain", want="file", for_read=True) as opened:
        assert os.read(opened.fd, 100) == b"plain"


def test_missing_alloc_dir_is_not_found(workdir: Path) -> None:
    with pytest.raises(PathNotFoundError, match="allocation directory does not exist"):
        AllocDir(workdir / "alloc", ALLOC_ID).open_path("/", want="dir")


_SEGMENTS = st.sampled_from(
    ["..", ".", "", "alloc", "logs", "web", "secrets", "x", "/", "out", "loop", "f"])


@settings(max_examples=300, deadline=None)
@given(st.lists(_SEGMENTS, max_size=8), st.sampled_from(["any", "dir", "file"]), st.booleans())
def test_open_path_never_leaves_the_alloc_dir(parts: list[str], want: str,
                                              for_read: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="allocdir-h-") as tmp:
        ad = AllocDir(Path(tmp) / "alloc", ALLOC_ID)
        ad.build()
        ad.build_task_dir("web", None)
        for parent in (ad.path / "web" / "local", ad.shared_dir, ad.path / "web"):
            (parent / "out").symlink_to("/")
            (parent / "loop").symlink_to("loop")
            (parent / "f").write_text("x")
        root = real(ad.path)
        try:
            opened = ad.open_path("/".join(parts), want=want,  # type: ignore[arg-type]
                                  for_read=for_read)
        except (PathEscapeError, SecretReadError, PathNotFoundError, BadPathError):
            return
        with opened:
            where = target(opened)
        assert where == root or where.startswith(root + os.sep)
        if for_read:
            rel = os.path.relpath(where, root).split(os.sep)
            assert not (len(rel) >= 2 and rel[1].lower() in ("secrets", "private"))


# -- the fs API over a real listener --------------------------------------------------------


@pytest.fixture
async def fs_url(built: AllocDir, keyring: Keyring) -> AsyncIterator[str]:
    api = await serve_api(make_server(keyring), client=OneAllocClient(built))
    try:
        yield f"{api.url}/v1/client/fs"
    finally:
        await api.close()


async def fs_get(url: str, kind: str, **params: str) -> tuple[int, str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, \
            session.get(f"{url}/{kind}/{ALLOC_ID}", params=params) as resp:
        return resp.status, (await resp.read()).decode()


async def test_fs_api_refuses_hard_linked_files_with_403(built: AllocDir, fs_url: str) -> None:
    token = built.path / "web" / "secrets" / "nomad_token"
    token.write_text("task-token")
    local = built.path / "web" / "local"
    os.link(token, local / "tok")
    (local / "plain.txt").write_text("served")
    status, body = await fs_get(fs_url, "cat", path="web/local/tok")
    assert status == 403, body
    assert "hard links" in body and "task-token" not in body
    assert await fs_get(fs_url, "cat", path="web/local/plain.txt") == (200, "served")

    # A log file linked to the token: the logs endpoint refuses it the same way.
    os.link(token, built.logs_dir / "web.stdout.0")
    status, body = await fs_get(fs_url, "logs", task="web", type="stdout", plain="true")
    assert status == 403 and "task-token" not in body, body
    (built.logs_dir / "web.stdout.0").unlink()
    (built.logs_dir / "web.stdout.0").write_text("a log line\n")
    assert await fs_get(fs_url, "logs", task="web", type="stdout", plain="true") == (
        200, "a log line\n")
