"""Secrets dirs on tmpfs: the mount itself (options, size, owner), what a task can and cannot
do there, refusing a planted symlink, keeping an existing mount, unmounting on destroy and
after a crash, and carrying on with a plain directory where mounting is impossible.

Mounting needs root (as in CI); those tests are skipped otherwise, saying so."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nomad_client.allocrunner.hooks import TaskContext
from nomad_client.allocrunner.taskrunner.task_dir_hook import TaskDirHook
from nomad_client.client import allocdir, tmpfs
from nomad_client.client.allocdir import AllocDir, PathEscapeError, unmount_orphaned_tmpfs
from nomad_client.client.secretsdir import write_secret_file
from nomad_client.client.taskapi_config import LiveTaskAPIConfig, TaskAPIConfig
from nomad_client.client.taskenv import NodeView
from nomad_client.structs.models import Allocation, TaskEvent
from tests.unit.factories import fresh_dir

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="mounting a tmpfs needs root")
ALLOC_ID = "7d2b0c1e-1111-4c1e-9f56-3a6f0f6c2a11"
OTHER_ALLOC_ID = "7d2b0c1e-2222-4c1e-9f56-3a6f0f6c2a11"
NODE = NodeView(id="n", name="n", datacenter="dc1", region="global", node_class="",
                pool="default", attributes={}, meta={})


@pytest.fixture
def root_dir() -> Iterator[Path]:
    """A fresh alloc dir root; whatever a test left mounted below it is unmounted."""
    with fresh_dir("tmpfs-", 0o711) as path:
        try:
            yield path / "alloc"
        finally:
            for mount in tmpfs.mounts_under(path):
                tmpfs.unmount(mount.mount_point)


def built(root: Path, alloc_id: str = ALLOC_ID, user: str | None = None) -> AllocDir:
    adir = AllocDir(root, alloc_id)
    adir.build()
    adir.build_task_dir("web", user)
    return adir


def mount_at(path: Path) -> str | None:
    """The mountinfo line of the mount at ``path``, if it is a mount point."""
    real = Path(os.path.realpath(path))
    with open("/proc/self/mountinfo") as f:
        lines = [line for line in f if line.split()[4] == str(real)]
    return lines[-1] if lines else None


def mounts_below(path: Path) -> list[Path]:
    return [m.mount_point for m in tmpfs.mounts_under(path)]


# ---- mountinfo --------------------------------------------------------------------------
def test_mountinfo_paths_are_unescaped_and_odd_lines_skipped() -> None:
    text = (b"36 35 98:0 /mnt1 /mnt/my\\040dir\\011tab\\134x rw,noatime master:1 - ext3 "
            b"/dev/root rw,errors=continue\n"
            b"garbage line\n"
            b"40 27 0:40 / /a/b rw,nosuid,nodev,noexec,relatime - tmpfs tmpfs rw,size=1024k\n")
    assert tmpfs.parse_mountinfo(text) == [
        tmpfs.Mount(36, Path("/mnt/my dir\ttab\\x"), "ext3"),
        tmpfs.Mount(40, Path("/a/b"), "tmpfs"),
    ]


# ---- mounting ---------------------------------------------------------------------------
@needs_root
def test_secrets_is_a_small_noexec_tmpfs_owned_by_the_task_user(root_dir: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    adir = built(root_dir, user="nobody")
    secrets = adir.task_dir("web").secrets_dir
    assert adir.mount_secrets_tmpfs("web", "nobody") is None
    line = mount_at(secrets)
    assert line is not None, "secrets is not a mount point"
    options, _, super_options = line.partition(" - ")
    assert super_options.split()[0] == "tmpfs"
    assert {"nosuid", "nodev", "noexec"} <= set(options.split()[5].split(","))
    assert {"size=1024k", "mode=700", f"uid={nobody.pw_uid}", f"gid={nobody.pw_gid}"} <= set(
        super_options.split()[2].split(","))
    st = os.stat(secrets)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (nobody.pw_uid, nobody.pw_gid, 0o700)


@needs_root
def test_the_task_writes_its_token_there_but_cannot_run_anything(root_dir: Path) -> None:
    root_dir.parent.chmod(0o755)
    adir = built(root_dir, user="nobody")
    td = adir.task_dir("web")
    assert adir.mount_secrets_tmpfs("web", "nobody") is None
    write_secret_file(td.path, "secrets/nomad_token", b"a.jwt.token", user="nobody")
    shutil.copy("/bin/true", td.secrets_dir / "tool")
    (td.secrets_dir / "tool").chmod(0o755)
    nobody = pwd.getpwnam("nobody")
    script = (f'cat "{td.secrets_dir}/nomad_token" && echo mine > "{td.secrets_dir}/own" && '
              f'"{td.secrets_dir}/tool"')
    ran = subprocess.run(["/bin/sh", "-c", script], user=nobody.pw_uid, group=nobody.pw_gid,
                         extra_groups=[adir.gid or nobody.pw_gid], capture_output=True,
                         text=True, check=False, timeout=30, cwd="/")
    assert ran.stdout == "a.jwt.token"
    assert (td.secrets_dir / "own").read_text() == "mine\n"
    assert ran.returncode == 126 and "Permission denied" in ran.stderr  # noexec


@needs_root
def test_a_symlink_planted_for_secrets_is_refused(root_dir: Path) -> None:
    adir = built(root_dir)
    td = adir.task_dir("web")
    elsewhere = root_dir.parent / "elsewhere"
    elsewhere.mkdir()
    td.secrets_dir.rmdir()
    td.secrets_dir.symlink_to(elsewhere)
    with pytest.raises(PathEscapeError, match="symlink"):
        adir.mount_secrets_tmpfs("web", None)
    assert mount_at(elsewhere) is None and mounts_below(root_dir.parent) == []


@needs_root
def test_a_secrets_dir_not_built_by_the_agent_is_refused(root_dir: Path) -> None:
    adir = built(root_dir, user="nobody")
    os.chown(adir.task_dir("web").secrets_dir, 0, 0)  # not the task user's any more
    with pytest.raises(PathEscapeError, match="wrong owner"):
        adir.mount_secrets_tmpfs("web", "nobody")
    assert mounts_below(root_dir) == []


@needs_root
def test_mounting_again_keeps_the_mount_and_what_is_in_it(root_dir: Path) -> None:
    adir = built(root_dir)
    td = adir.task_dir("web")
    assert adir.mount_secrets_tmpfs("web", None) is None
    first = mount_at(td.secrets_dir)
    write_secret_file(td.path, "secrets/nomad_token", b"token", user=None)
    adir.build_task_dir("web", None)  # a restart, or an agent restart with the task running
    assert adir.mount_secrets_tmpfs("web", None) is None
    assert mount_at(td.secrets_dir) == first and len(mounts_below(root_dir)) == 1
    assert (td.secrets_dir / "nomad_token").read_text() == "token"


@needs_root
def test_a_plain_secrets_dir_already_in_use_is_not_hidden(root_dir: Path) -> None:
    adir = built(root_dir)
    td = adir.task_dir("web")
    write_secret_file(td.path, "secrets/nomad_token", b"token", user=None)
    reason = adir.mount_secrets_tmpfs("web", None)
    assert reason is not None and "already holds" in reason
    assert mounts_below(root_dir) == []
    assert (td.secrets_dir / "nomad_token").read_text() == "token"


def test_without_root_the_dir_stays_plain(root_dir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    adir = built(root_dir)
    monkeypatch.setattr(allocdir, "_is_root", lambda: False)
    assert adir.mount_secrets_tmpfs("web", None) == "the agent is not root"
    assert mounts_below(root_dir) == []


class RefusingLibc:
    """libc whose mount fails as without CAP_SYS_ADMIN."""

    def mount(self, *args: object) -> int:
        ctypes.set_errno(errno.EPERM)
        return -1


@needs_root
def test_a_refused_mount_leaves_a_plain_dir_and_says_why(root_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    adir = built(root_dir)
    monkeypatch.setattr(tmpfs, "_libc", RefusingLibc)
    reason = adir.mount_secrets_tmpfs("web", None)
    assert reason is not None and "CAP_SYS_ADMIN" in reason
    assert mounts_below(root_dir) == []


@needs_root
async def test_the_task_dir_hook_says_so_once_in_the_log_and_once_to_the_task(
        root_dir: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(tmpfs, "_libc", RefusingLibc)
    monkeypatch.setattr(tmpfs, "_reported", set())
    adir = AllocDir(root_dir, ALLOC_ID)
    adir.build()
    hooks = [TaskDirHook(), TaskDirHook()]
    events: list[list[TaskEvent]] = [[], []]
    contexts = [context(adir, name, events[i].append) for i, name in enumerate(("a", "b"))]
    with caplog.at_level(logging.WARNING):
        for _ in range(2):  # a start and a restart of each task
            for hook, ctx in zip(hooks, contexts, strict=True):
                await hook.prestart(ctx)
    for task_events in events:
        plain = [e.message for e in task_events if "plain directory" in e.message]
        assert len(plain) == 1 and "CAP_SYS_ADMIN" in plain[0]
    assert caplog.text.count("not tmpfs") == 1


@needs_root
async def test_the_task_dir_hook_mounts_only_when_the_config_says_so(root_dir: Path) -> None:
    adir = AllocDir(root_dir, ALLOC_ID)
    adir.build()
    events: list[TaskEvent] = []
    off = context(adir, "off", events.append, secrets_tmpfs=False)
    on = context(adir, "on", events.append)
    for ctx in (off, on):
        await TaskDirHook().prestart(ctx)
    assert mounts_below(root_dir) == [on.task_dir.secrets_dir.resolve()]
    assert [e.message for e in events] == ["Building Task Directory"] * 2


def context(adir: AllocDir, name: str, emit: Callable[[TaskEvent], None], *,
            secrets_tmpfs: bool = True) -> TaskContext:
    alloc = Allocation(id=adir.alloc_id, namespace="default", eval_id="e", name="j.g[0]",
                       node_id="n", node_name="n", job_id="j", job={}, task_group="g")
    return TaskContext(alloc=alloc, task={"Name": name}, alloc_dir=adir,
                       task_dir=adir.task_dir(name), node=NODE, emit=emit,
                       log=logging.getLogger("test"),
                       task_api_config=LiveTaskAPIConfig(
                           TaskAPIConfig(secrets_tmpfs=secrets_tmpfs)))


# ---- unmounting -------------------------------------------------------------------------
@needs_root
def test_destroy_unmounts_before_removing(root_dir: Path) -> None:
    adir = built(root_dir)
    adir.build_task_dir("side", None)
    for task in ("web", "side"):
        assert adir.mount_secrets_tmpfs(task, None) is None
        write_secret_file(adir.task_dir(task).path, "secrets/nomad_token", b"t", user=None)
    assert len(mounts_below(root_dir)) == 2
    adir.destroy()
    assert mounts_below(root_dir) == [] and not adir.path.exists()


@needs_root
def test_orphaned_mounts_of_allocations_not_restored_are_unmounted(root_dir: Path) -> None:
    kept, orphan = built(root_dir, ALLOC_ID), built(root_dir, OTHER_ALLOC_ID)
    for adir in (kept, orphan):
        assert adir.mount_secrets_tmpfs("web", None) is None
    gone = unmount_orphaned_tmpfs(root_dir, {ALLOC_ID})
    assert gone == [orphan.task_dir("web").secrets_dir.resolve()]
    assert mounts_below(root_dir) == [kept.task_dir("web").secrets_dir.resolve()]
    assert orphan.task_dir("web").secrets_dir.is_dir()  # the files are the GC's business
    assert unmount_orphaned_tmpfs(root_dir.parent / "never-made", set()) == []
