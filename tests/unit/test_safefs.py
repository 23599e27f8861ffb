"""The symlink-safe primitives themselves; their callers' policies are tested with them."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from nomad_client import safefs

IS_ROOT = os.geteuid() == 0
NOBODY = 65534


def test_open_dir_refuses_a_symlink_and_a_file_but_not_a_missing_entry(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "file").write_text("x")
    with pytest.raises(safefs.UnsafePathError) as link:
        safefs.open_dir(tmp_path / "link")
    assert (link.value.errno, link.value.strerror) == (errno.ELOOP, "is a symlink")
    assert link.value.filename == str(tmp_path / "link")
    with safefs.closing_fd(os.open(tmp_path, os.O_RDONLY)) as parent, \
            pytest.raises(safefs.UnsafePathError, match="is not a directory"):
        safefs.open_dir("file", dir_fd=parent)
    with pytest.raises(FileNotFoundError) as missing:
        safefs.open_dir(tmp_path / "gone")
    assert not isinstance(missing.value, safefs.UnsafePathError)
    with safefs.closing_fd(safefs.open_dir(tmp_path / "real")) as fd:
        assert stat.S_ISDIR(os.fstat(fd).st_mode)


def test_private_dir_is_created_and_pinned_to_0700(tmp_path: Path) -> None:
    target = tmp_path / "a" / "b" / "ring"
    safefs.ensure_private_dir(target)
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o700
    os.chmod(target, 0o755)
    safefs.ensure_private_dir(target)
    assert stat.S_IMODE(os.lstat(target).st_mode) == 0o700


@pytest.mark.skipif(not IS_ROOT, reason="giving a directory away needs root")
def test_a_directory_someone_else_owns_is_refused_before_its_mode_changes(
        tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(safefs.NotOwnedError, match="is not owned by the agent"):
        safefs.open_private_dir(theirs, must_be_ours=True)
    assert stat.S_IMODE(os.lstat(theirs).st_mode) == 0o755


def test_private_file_round_trip_and_refusals(tmp_path: Path) -> None:
    safefs.write_private_file_in(tmp_path, "key", b"secret")
    assert stat.S_IMODE(os.lstat(tmp_path / "key").st_mode) == 0o600
    assert safefs.read_private_file(tmp_path / "key") == b"secret"
    assert os.listdir(tmp_path) == ["key"]  # no temp file left behind

    os.chmod(tmp_path / "key", 0o640)
    with pytest.raises(safefs.UnsafePathError,
                       match=": mode 0640 is readable by others; expected 0600$") as wide:
        safefs.read_private_file(tmp_path / "key")
    assert wide.value.filename == str(tmp_path / "key")
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(safefs.UnsafePathError, match=r"/dir: not a regular file$"):
        safefs.read_private_file(tmp_path / "dir")


def test_writing_into_a_symlinked_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(safefs.UnsafePathError, match="is a symlink"):
        safefs.write_private_file_in(tmp_path / "link", "key", b"secret")
    assert os.listdir(tmp_path / "real") == []


def test_user_lookup() -> None:
    assert safefs.lookup_user("root") == safefs.UserIds(0, 0)
    assert safefs.lookup_user("no-such-user-xyz") is None
    assert safefs.group_exists(0)
