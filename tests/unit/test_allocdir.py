"""The allocation directory: layout, modes, ownership, destroy and path confinement."""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nomad_client.client.allocdir import AllocDir, PathEscapeError, SecretReadError, TaskDir

IS_ROOT = os.geteuid() == 0
ALLOC_ID = "5fc3c8bb-0b1a-4c1e-9f56-3a6f0f6c2a11"


@pytest.fixture
def base() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="allocdir-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def built(base: Path) -> AllocDir:
    ad = AllocDir(base / "alloc", ALLOC_ID)
    ad.build()
    ad.build_task_dir("web", None)
    return ad


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# -- building -------------------------------------------------------------------------------


def test_build_layout_and_modes(base: Path) -> None:
    old_umask = os.umask(0o077)  # modes must not depend on the agent's umask
    try:
        ad = AllocDir(base / "alloc", ALLOC_ID)
        ad.build()
        ad.build()  # idempotent
    finally:
        os.umask(old_umask)
    assert ad.path == base / "alloc" / ALLOC_ID
    assert ad.shared_dir == ad.path / "alloc"
    assert ad.logs_dir == ad.path / "alloc" / "logs"
    assert mode(base / "alloc") == 0o711
    assert mode(ad.path) == 0o755
    assert mode(ad.shared_dir) == 0o777
    assert mode(ad.shared_dir / "data") == 0o777
    assert mode(ad.logs_dir) == 0o777
    assert mode(ad.shared_dir / "tmp") == 0o1777


@pytest.mark.skipif(not IS_ROOT, reason="ownership changes need root")
def test_build_drops_ownership_to_nobody_when_root(built: AllocDir) -> None:
    nobody = pwd.getpwnam("nobody").pw_uid
    assert os.lstat(built.path).st_uid == 0
    for path in (built.shared_dir, built.logs_dir, built.path / "web", built.path / "web/local"):
        assert os.lstat(path).st_uid == nobody


def test_task_dir_layout_and_modes(built: AllocDir) -> None:
    td = built.build_task_dir("web", None)  # again: idempotent
    assert td == TaskDir(
        name="web",
        path=built.path / "web",
        local_dir=built.path / "web" / "local",
        secrets_dir=built.path / "web" / "secrets",
        tmp_dir=built.path / "web" / "tmp",
    )
    assert mode(td.path) == 0o777
    assert mode(td.local_dir) == 0o777
    assert mode(td.tmp_dir) == 0o1777
    assert mode(td.secrets_dir) == 0o700
    assert os.lstat(td.secrets_dir).st_uid == os.geteuid()


@pytest.mark.skipif(not IS_ROOT, reason="giving the secrets dir to a user needs root")
def test_secrets_dir_belongs_to_the_task_user(built: AllocDir) -> None:
    nobody = pwd.getpwnam("nobody")
    td = built.build_task_dir("api", "nobody")
    st_ = os.lstat(td.secrets_dir)
    assert (st_.st_uid, st_.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert mode(td.secrets_dir) == 0o700


def test_unknown_user_is_rejected(built: AllocDir) -> None:
    with pytest.raises(ValueError, match="unknown user 'no-such-user-xyz'"):
        built.build_task_dir("api", "no-such-user-xyz")


def test_planted_symlink_in_task_dir_is_not_followed(built: AllocDir, base: Path) -> None:
    victim = base / "victim"
    victim.mkdir(mode=0o755)
    victim.chmod(0o755)
    secrets = built.path / "web" / "secrets"
    secrets.rmdir()
    secrets.symlink_to(victim)  # what a task could do between restarts
    with pytest.raises(PathEscapeError, match="not a plain directory"):
        built.build_task_dir("web", None)
    assert mode(victim) == 0o755


def test_task_dir_is_paths_only(base: Path) -> None:
    ad = AllocDir(base / "nowhere", ALLOC_ID)
    td = ad.task_dir("web")
    assert td.secrets_dir == base / "nowhere" / ALLOC_ID / "web" / "secrets"
    assert not (base / "nowhere").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "../x", "a\x00b"])
def test_bad_names_are_rejected(base: Path, name: str) -> None:
    with pytest.raises(ValueError, match="alloc id"):
        AllocDir(base, name)
    with pytest.raises(ValueError, match="task name"):
        AllocDir(base, ALLOC_ID).task_dir(name)


# -- destroy --------------------------------------------------------------------------------


def test_destroy_removes_tree_without_following_symlinks(built: AllocDir, base: Path) -> None:
    outside = base / "outside"
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


def test_resolve_root_and_plain_paths(built: AllocDir) -> None:
    root = Path(os.path.realpath(built.path))
    assert built.resolve("") == root
    assert built.resolve("/") == root
    assert built.resolve("alloc/logs") == root / "alloc" / "logs"
    assert built.resolve("/alloc/logs/") == root / "alloc" / "logs"
    assert built.resolve("alloc/../web/./local") == root / "web" / "local"
    assert built.resolve("alloc/logs/not-yet.txt") == root / "alloc" / "logs" / "not-yet.txt"


def test_absolute_paths_stay_inside(built: AllocDir) -> None:
    # A leading "/" names the alloc dir, never the host root.
    assert built.resolve("/etc/passwd") == Path(os.path.realpath(built.path)) / "etc" / "passwd"


@pytest.mark.parametrize(
    "path",
    ["..", "../", "../x", "alloc/../../x", "web/local/../../../etc", "/../..", "a/../../"],
)
def test_dotdot_escapes_are_refused(built: AllocDir, path: str) -> None:
    with pytest.raises(PathEscapeError, match="leaves the allocation directory"):
        built.resolve(path)


def test_nul_byte_is_refused(built: AllocDir) -> None:
    with pytest.raises(PathEscapeError, match="NUL"):
        built.resolve("alloc/logs\x00/../../etc")


def test_non_string_is_refused(built: AllocDir) -> None:
    with pytest.raises(PathEscapeError, match="must be a string"):
        built.resolve(b"alloc")  # type: ignore[arg-type]


def test_symlink_to_outside_is_refused(built: AllocDir) -> None:
    link = built.path / "web" / "local" / "etc"
    link.symlink_to("/etc")
    for path in ("web/local/etc", "web/local/etc/passwd", "/web/local/etc/"):
        with pytest.raises(PathEscapeError):
            built.resolve(path)
    # ".." is applied to the path as written, before links are followed; the returned path
    # (which is what callers open) therefore stays inside.
    resolved = built.resolve("web/local/etc/../../alloc")
    assert resolved == Path(os.path.realpath(built.path)) / "web" / "alloc"


def test_dangling_symlink_to_outside_is_refused(built: AllocDir) -> None:
    (built.shared_dir / "data" / "d").symlink_to("/nonexistent-dir-xyz/file")
    with pytest.raises(PathEscapeError):
        built.resolve("alloc/data/d")


def test_relative_symlink_inside_is_allowed(built: AllocDir) -> None:
    (built.shared_dir / "data" / "logs").symlink_to("../logs")
    assert built.resolve("alloc/data/logs") == Path(os.path.realpath(built.logs_dir))


def test_symlink_loop_is_refused(built: AllocDir) -> None:
    a = built.shared_dir / "data" / "a"
    b = built.shared_dir / "data" / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(PathEscapeError, match="loop"):
        built.resolve("alloc/data/a/x")


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
        "web/local/../secrets/x",
    ],
)
def test_reads_under_secrets_are_refused(built: AllocDir, path: str) -> None:
    with pytest.raises(SecretReadError):
        built.resolve(path, for_read=True)


def test_listing_secrets_is_allowed_but_reading_is_not(built: AllocDir) -> None:
    assert built.resolve("web/secrets") == Path(os.path.realpath(built.path / "web" / "secrets"))
    assert built.resolve("web/local/x", for_read=True).name == "x"


def test_symlink_into_secrets_is_refused_for_read(built: AllocDir) -> None:
    (built.shared_dir / "data" / "s").symlink_to("../../web/secrets")
    assert built.resolve("alloc/data/s")  # listing is fine
    with pytest.raises(SecretReadError):
        built.resolve("alloc/data/s/nomad_token", for_read=True)


_SEGMENTS = st.sampled_from(["..", ".", "", "alloc", "logs", "web", "secrets", "x", "/"])


@settings(max_examples=200, deadline=None)
@given(st.lists(_SEGMENTS, max_size=8), st.booleans())
def test_resolve_never_leaves_the_alloc_dir(parts: list[str], for_read: bool) -> None:
    with tempfile.TemporaryDirectory(prefix="allocdir-h-") as tmp:
        ad = AllocDir(Path(tmp) / "alloc", ALLOC_ID)
        ad.build()
        ad.build_task_dir("web", None)
        (ad.path / "web" / "local" / "out").symlink_to("/")
        path = "/".join(parts + ["out"] if len(parts) % 3 == 0 else parts)
        root = os.path.realpath(ad.path)
        try:
            resolved = str(ad.resolve(path, for_read=for_read))
        except (PathEscapeError, SecretReadError):
            return
        assert resolved == root or resolved.startswith(root + os.sep)
        if for_read:
            rel = os.path.relpath(resolved, root).split(os.sep)
            assert not (len(rel) >= 2 and rel[1].lower() in ("secrets", "private"))
