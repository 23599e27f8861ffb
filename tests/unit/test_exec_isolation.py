"""``isolation.py`` and the executor's isolated launch: mount points reached without
following symlinks, and (as root, where namespaces work) a task forked into its namespaces,
its root, its user and its capabilities, with failures reported by name."""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nomad_client.client import cgroups
from nomad_client.client.drivers import isolation
from nomad_client.client.drivers.base import DriverError, TaskConfig, TaskHandle
from nomad_client.client.drivers.exec import ExecDriver, ExecDriverConfig
from nomad_client.client.drivers.isolation import IsolationError, open_mount_point
from tests.unit.factories import fresh_dir

pytestmark = pytest.mark.timeout(60)


def test_mount_points_are_created_below_the_root(tmp_path: Path) -> None:
    with open_mount_point(str(tmp_path), "/usr/lib/x") as point:
        assert os.path.samefile(point.path, tmp_path / "usr" / "lib" / "x")
        assert point.shown_as == f"{tmp_path}/usr/lib/x"
    with open_mount_point(str(tmp_path), "etc/resolv.conf", directory=False):
        assert (tmp_path / "etc" / "resolv.conf").is_file()
    assert oct((tmp_path / "usr").stat().st_mode & 0o777) == "0o755"


@pytest.mark.parametrize("planted", ["usr", "usr/lib"])
def test_a_symlink_in_the_way_is_refused(tmp_path: Path, planted: str) -> None:
    (tmp_path / "usr").mkdir()
    target = tmp_path / planted
    if target.exists():
        target.rmdir()
    target.symlink_to("/etc")
    with pytest.raises(IsolationError, match="a symlink or not a directory"):
        open_mount_point(str(tmp_path), "usr/lib/x")
    assert not Path("/etc/x").exists() and not Path("/etc/lib").exists()


def test_dot_dot_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IsolationError, match="contains '..'"):
        open_mount_point(str(tmp_path), "usr/../../etc")


def test_a_failing_call_names_itself_and_the_reason() -> None:
    with pytest.raises(IsolationError) as info:
        isolation.umount2("/definitely/not/mounted")
    assert "umount /definitely/not/mounted" in str(info.value)


# -- the executor, isolating for real ----------------------------------------------------------


@pytest.fixture(scope="module")
def can_isolate() -> None:
    # A parent of its own, as an agent has: without one the driver refuses to run.
    config = ExecDriverConfig(cgroup_parent=cgroups.agent_parent("test-exec-isolation"))
    reason = ExecDriver(config).unavailable_reason()
    if reason is not None:
        pytest.skip(f"exec driver unavailable: {reason}")


@pytest.fixture
def alloc(can_isolate: None) -> Iterator[Path]:
    """An alloc dir of the layout the executor expects, reachable by nobody."""
    with fresh_dir("iso-", 0o755) as root:
        (root / "alloc" / "logs").mkdir(parents=True)
        nobody = pwd.getpwnam("nobody")
        for name in ("local", "secrets", "tmp"):
            (root / "t" / name).mkdir(parents=True)
            os.chown(root / "t" / name, nobody.pw_uid, nobody.pw_gid)
        yield root


# Connecting to 127.0.0.1 needs lo up (ENETUNREACH otherwise).
LOOPBACK = ("import socket; s = socket.create_server(('127.0.0.1', 0)); "
            "socket.create_connection(s.getsockname()); print('loopback=up')")


def launch(alloc: Path, script: str, **isolation_spec: Any) -> tuple[dict[str, Any], str]:
    """Run ``sh -c script`` isolated through the executor; its report and its stdout."""
    nobody = pwd.getpwnam("nobody")
    spec = {
        "command": "/bin/sh", "args": ["-c", script], "cwd": str(alloc / "t"),
        "alloc_dir": str(alloc), "env": {"PATH": "/usr/bin:/bin", "LOOPBACK": LOOPBACK},
        "stdout_path": str(alloc / "alloc" / "logs" / "t.stdout.0"),
        "stderr_path": str(alloc / "alloc" / "logs" / "t.stderr.0"),
        "uid": nobody.pw_uid, "gid": nobody.pw_gid, "groups": [],
        "exit_path": str(alloc / "exit.json"),
        "isolation": {
            "pid_namespace": True, "ipc_namespace": True, "network_namespace": True,
            "shared_alloc_dir": str(alloc / "alloc"),
            "chroot_env": [[p, p] for p in ("/bin", "/etc", "/lib", "/lib64", "/sbin", "/usr")],
            "capabilities": [isolation.CAPABILITIES["KILL"], isolation.CAPABILITIES["CHOWN"]],
            "ambient_capabilities": [], **isolation_spec,
        },
    }
    done = subprocess.run([sys.executable, "-m", "nomad_client.client.drivers.executor"],
                          # the spec's line, then the agent's word that it took the task
                          input=json.dumps(spec).encode() + b"\n\n", capture_output=True,
                          timeout=30,
                          check=False)
    report = json.loads(done.stdout.decode().splitlines()[0])
    out = alloc / "alloc" / "logs" / "t.stdout.0"
    return report, out.read_text() if out.exists() else ""


def status_field(text: str, name: str) -> str:
    return next(line.split(":", 1)[1].strip() for line in text.splitlines()
                if line.startswith(f"{name}:"))


def test_task_is_pid_one_as_nobody_with_a_read_only_chroot(alloc: Path) -> None:
    report, out = launch(alloc, 'echo "pid=$$ uid=$(id -u)"; ls /; cat /proc/self/status; '
                                'touch /usr/x || echo read-only; python3 -c "$LOOPBACK"; '
                                'echo net; cat /proc/net/dev')
    assert report["ok"], report
    assert f"pid=1 uid={pwd.getpwnam('nobody').pw_uid}" in out
    for name in ("alloc", "local", "secrets", "tmp", "usr", "proc", "dev"):
        assert f"\n{name}\n" in f"\n{out}"
    assert "read-only" in out
    # Only KILL and CHOWN can ever be had; nobody holds none of them.
    assert int(status_field(out, "CapBnd"), 16) == (1 << 5) | (1 << 0)
    assert int(status_field(out, "CapEff"), 16) == 0
    assert status_field(out, "NoNewPrivs") == "1"
    # A network namespace of its own: loopback only.
    net_dev = out.split("\nnet\n", 1)[1].splitlines()[2:]
    assert [line.split(":")[0].strip() for line in net_dev] == ["lo"]
    assert "loopback=up" in out


def test_added_capabilities_are_ambient_for_a_non_root_user(alloc: Path) -> None:
    bind = isolation.CAPABILITIES["NET_BIND_SERVICE"]
    report, out = launch(alloc, "cat /proc/self/status", capabilities=[bind],
                         ambient_capabilities=[bind])
    assert report["ok"], report
    assert int(status_field(out, "CapAmb"), 16) == 1 << bind
    assert int(status_field(out, "CapEff"), 16) == 1 << bind


def test_a_planted_symlink_fails_the_start_with_the_reason(alloc: Path) -> None:
    (alloc / "t" / "usr").symlink_to("/")
    report, _ = launch(alloc, "true")
    assert report == {"ok": False, "error": report["error"]}
    assert f"mount point {alloc}/t/usr: a symlink or not a directory" in report["error"]


def test_a_command_missing_from_the_chroot_is_reported(alloc: Path) -> None:
    report, _ = launch(alloc, "true", chroot_env=[["/etc", "/etc"]])
    assert not report["ok"]
    assert "'/bin/sh' not found" in report["error"]


def test_host_pid_mode_and_a_single_file_in_the_chroot(alloc: Path) -> None:
    chroot_env = [[p, p] for p in ("/bin", "/lib", "/lib64", "/usr")] + [
        ["/etc/passwd", "/etc/passwd"]]
    report, out = launch(alloc, 'echo "pid=$$"; ls /etc; test -d /proc/1 && echo host-init',
                         pid_namespace=False, chroot_env=chroot_env)
    assert report["ok"], report
    assert "pid=1\n" not in out and "host-init" in out
    assert out.count("\n") >= 3 and "passwd\n" in out and "shadow" not in out


def test_a_mount_point_inside_a_bound_host_dir_is_never_created_on_the_host(
        alloc: Path) -> None:
    # The driver binds parents first, read-only, so this fails instead of writing to /usr.
    chroot_env = [["/bin", "/bin"], ["/usr", "/usr"], ["/etc", "/usr/planted-by-a-test"]]
    report, _ = launch(alloc, "true", chroot_env=chroot_env)
    assert not report["ok"]
    assert "usr/planted-by-a-test: Read-only file system" in report["error"]
    assert not Path("/usr/planted-by-a-test").exists()


SETNS_ROUND_TRIP = """
import os, socket
from nomad_client.client.drivers import isolation as i
home = os.open("/proc/self/ns/uts", os.O_RDONLY)
before = socket.gethostname()
i.unshare(i.CLONE_NEWUTS)
i.sethostname("isolated-test")
inside = socket.gethostname()
i.setns(home, i.CLONE_NEWUTS)
print(before == socket.gethostname(), inside)
"""


def test_sethostname_in_a_new_uts_namespace_and_setns_back(can_isolate: None) -> None:
    done = subprocess.run([sys.executable, "-c", SETNS_ROUND_TRIP], capture_output=True,
                          timeout=30, check=True, text=True)
    assert done.stdout.split() == ["True", "isolated-test"]


# -- capability sets, and errors that name their driver -----------------------------------------


def test_capability_sets_parse_from_a_status_and_for_a_task() -> None:
    status = (b"Name:\tsleep\nCapInh:\t0000000000000400\nCapPrm:\t0000000000000400\n"
              b"CapEff:\t0000000000000400\nCapBnd:\t0000000000000421\nCapAmb:\t0000000000000400\n")
    parsed = isolation.CapabilitySets.parse_status(status)
    built = isolation.CapabilitySets.for_task([0, 5, 10], [10], root=False)
    fields = ("bounding", "permitted", "effective", "inheritable", "ambient")
    assert [getattr(parsed, f) for f in fields] == [0x421, 0x400, 0x400, 0x400, 0x400]
    assert [getattr(built, f) for f in fields] == [getattr(parsed, f) for f in fields]
    as_root = isolation.CapabilitySets.for_task([0, 5], [5], root=True)
    assert [getattr(as_root, f) for f in fields] == [0x21, 0x21, 0x21, 0x21, 0]
    with pytest.raises(ValueError, match="ambient, bounding"):
        isolation.CapabilitySets.parse_status(b"CapInh:\t0\nCapPrm:\t0\nCapEff:\t0\n")


async def test_errors_of_the_exec_driver_name_it() -> None:
    handle = TaskHandle(driver="exec", alloc_id="a1", task="t", pid=2**22 + 1, create_time=1.0,
                        started_at=1.0, driver_state={})
    driver = ExecDriver()
    with pytest.raises(DriverError, match=r"^exec: task is not running"):
        await driver.signal_task(handle, "SIGHUP")
    for call in (driver.signal_task(handle, "SIGBOGUS"), driver.stop_task(handle, 1, "SIGBOGUS")):
        with pytest.raises(DriverError, match=r"^exec: .*SIGBOGUS"):
            await call
    with pytest.raises(DriverError, match=r"^exec: task handle has no exit_path"):
        await driver.wait_task(handle)


# -- a start that fails once its cgroup exists ----------------------------------------------------


async def test_a_start_failing_after_the_cgroup_is_made_leaves_nothing(alloc: Path) -> None:
    """The command is missing from the chroot, so the executor fails after the driver made
    the task's cgroup: the start error says why, and no cgroup and no mount is left."""
    parent = cgroups.agent_parent(alloc)
    driver = ExecDriver(ExecDriverConfig(cgroup_parent=parent, chroot_env={"/etc": "/etc"}))
    logs = alloc / "alloc" / "logs"
    cfg = TaskConfig(alloc_id="a1", task="t", driver_config={"command": "/bin/true"},
                     env={"PATH": "/usr/bin:/bin"}, task_dir=alloc / "t", user=None,
                     stdout_path=logs / "t.stdout.0", stderr_path=logs / "t.stderr.0",
                     kill_timeout=1.0, state_dir=alloc / "state", resources={"MemoryMB": 32})
    manager = cgroups.CgroupManager.detect(parent=parent)
    try:
        with pytest.raises(DriverError, match="not found"):
            await driver.start_task(cfg)
        assert manager.names() == []
        assert str(alloc) not in Path("/proc/self/mountinfo").read_text()
    finally:
        manager.destroy_parent()
