"""Task logs captured and rotated by the supervisor (Nomad's ``logs { max_files,
max_file_size, disabled }``), with real processes, pipes and files: the compiled supervisor
and the executor's Python fallback must behave the same."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from nomad_client.client.drivers import executor
from nomad_client.client.drivers.base import ExitResult
from nomad_client.client.drivers.proctree import create_time
from nomad_client.client.drivers.raw_exec import _is_our_executor
from tests.unit.test_supervise import Run, Runner, _cannot_isolate, handed_off, wait_until
from tests.unit.test_supervise import runner as shared_runner

runner = shared_runner  # the executors' fixture, under the name the tests ask for

pytestmark = [
    pytest.mark.timeout(60),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the supervisor is Linux's"),
]

KIB = 1024
SMALL = {"max_files": 3, "max_file_size": 64 * KIB}


@pytest.fixture(params=["compiled", "python"])
def supervisor(request: pytest.FixtureRequest, workdir: Path) -> str | None:
    """Which supervisor copies the logs: the compiled one, or the executor's fallback (its
    supervisor is missing). None: the install's own."""
    if request.param == "python":
        return str(workdir / "missing")
    if not executor.supervisor_available():
        pytest.skip("the install built no supervisor (no compiler)")
    return None


def logs_dir(workdir: Path) -> Path:
    return workdir / "alloc" / "logs"


def indexes(workdir: Path, prefix: str) -> list[int]:
    """The indexes of ``<prefix>.<N>`` in the logs dir, in order."""
    found = [p.name.removeprefix(prefix + ".") for p in logs_dir(workdir).iterdir()
             if p.name.startswith(prefix + ".")]
    return sorted(int(index) for index in found)


def kept(workdir: Path, prefix: str) -> tuple[int, bytes]:
    """The lowest index left of a stream and the content of all its files, in order."""
    found = indexes(workdir, prefix)
    assert found == list(range(found[0], found[-1] + 1)), found  # no gap
    content = b"".join((logs_dir(workdir) / f"{prefix}.{i}").read_bytes() for i in found)
    return found[0], content


def assert_rotated(workdir: Path, prefix: str, written: bytes, limits: dict[str, int]) -> None:
    """At most ``max_files`` files, each full but the newest, holding exactly the end of
    what was ``written``: only the oldest files' bytes are gone."""
    size, found = limits["max_file_size"], indexes(workdir, prefix)
    assert 1 <= len(found) <= limits["max_files"], found
    for index in found:
        length = (logs_dir(workdir) / f"{prefix}.{index}").stat().st_size
        assert length == size or (index == found[-1] and 0 < length <= size), (index, length)
    first, content = kept(workdir, prefix)
    assert first == (len(written) - 1) // size - len(found) + 1
    assert content == written[first * size:]


def complaints(run: Run) -> list[str]:
    return [line for line in run.log_path.read_text().splitlines() if "dropping" in line]


def start(runner: Runner, supervisor: str | None, script: str, logs: dict[str, Any],
          before: Callable[[], object] = lambda: None, **spec: Any) -> Run:
    """Run ``script`` once its executor has handed off (or fallen back), so that a short one
    is really copied by the supervisor under test."""
    name = f"go{len(runner.runs)}"
    go = runner.base / "alloc" / name
    # An isolated task sees the alloc dir at /alloc.
    seen = f"/alloc/{name}" if "isolation" in spec else str(go)
    run = runner.sh(f"while [ ! -e {seen} ]; do sleep 0.01; done; {script}",
                    supervisor=supervisor, logs=logs, **spec)
    if supervisor is None:
        wait_until(lambda: handed_off(run.proc.pid), "the executor to exec the supervisor")
    else:
        wait_until(lambda: "waiting in Python" in run.log_path.read_text(), "the fallback")
    before()
    go.touch()
    return run


def numbers(first: int, last: int, fmt: str = "%d") -> bytes:
    return b"".join((fmt % n).encode() + b"\n" for n in range(first, last + 1))


# -- rotation ----------------------------------------------------------------------------------


def test_a_chatty_task_keeps_the_newest_files_of_each_stream(
    runner: Runner, workdir: Path, supervisor: str | None
) -> None:
    run = start(runner, supervisor, "seq 1 60000; seq -f e%g 1 40000 >&2; exit 4", SMALL)
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=4)
    assert_rotated(workdir, "t.stdout", numbers(1, 60000), SMALL)
    assert_rotated(workdir, "t.stderr", numbers(1, 40000, "e%d"), SMALL)
    assert indexes(workdir, "t.stdout")[-1] == 5  # 348,894 bytes: six files, three kept
    for path in logs_dir(workdir).iterdir():
        assert path.stat().st_mode & 0o777 == 0o644
    assert complaints(run) == []


def test_an_isolated_tasks_output_is_rotated(runner: Runner, workdir: Path,
                                              supervisor: str | None) -> None:
    reason = _cannot_isolate()
    if reason is not None:
        pytest.skip(f"exec driver unavailable: {reason}")
    isolated = {
        "pid_namespace": True, "shared_alloc_dir": str(workdir / "alloc"),
        "chroot_env": [[p, p] for p in ("/bin", "/lib", "/lib64", "/usr")],
        "capabilities": [], "ambient_capabilities": [],
    }
    run = start(runner, supervisor, "seq 1 60000; seq -f e%g 1 40000 >&2", SMALL,
                isolation=isolated)
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=0)
    assert_rotated(workdir, "t.stdout", numbers(1, 60000), SMALL)
    assert_rotated(workdir, "t.stderr", numbers(1, 40000, "e%d"), SMALL)


def test_a_restarted_task_continues_from_the_highest_index(
    runner: Runner, workdir: Path, supervisor: str | None
) -> None:
    first = start(runner, supervisor, "yes abcdefg | head -c 100000", SMALL)
    assert first.finish() == 0
    assert indexes(workdir, "t.stdout") == [0, 1]
    # The next run appends to .1 (below the limit), then goes on to .2 and .3, deleting .0.
    second = start(runner, supervisor, "yes 1234567 | head -c 100000", SMALL)
    assert second.finish() == 0
    written = b"abcdefg\n" * 12500 + b"1234567\n" * 12500
    assert indexes(workdir, "t.stdout") == [1, 2, 3]
    assert_rotated(workdir, "t.stdout", written, SMALL)
    assert indexes(workdir, "t.stderr") == [0]


def test_a_full_file_is_not_appended_to_after_a_restart(
    runner: Runner, workdir: Path, supervisor: str | None
) -> None:
    logs = logs_dir(workdir)
    logs.mkdir(parents=True)
    (logs / "t.stdout.7").write_bytes(b"x" * SMALL["max_file_size"])
    (logs / "t.stdout.2").write_bytes(b"old")  # too old for the 3 files ending at 7
    run = start(runner, supervisor, "echo hi", SMALL)
    assert run.finish() == 0
    assert indexes(workdir, "t.stdout") == [7, 8]
    assert (logs / "t.stdout.8").read_bytes() == b"hi\n"


def test_disabled_logs_leave_no_files(runner: Runner, workdir: Path,
                                      supervisor: str | None) -> None:
    run = start(runner, supervisor, "echo hi; echo oops >&2; exit 3", {"disabled": True})
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=3)
    assert list(logs_dir(workdir).iterdir()) == []


def test_a_planted_next_file_is_refused_and_the_task_goes_on(
    runner: Runner, workdir: Path, supervisor: str | None
) -> None:
    victim = workdir / "victim"
    victim.write_bytes(b"precious")
    logs = logs_dir(workdir)
    # Planted once the task runs: the file the first rotation opens.
    run = start(runner, supervisor, "yes | head -c 100000; exit 5", SMALL,
                before=lambda: (logs / "t.stdout.1").symlink_to(victim))
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=5)
    assert victim.read_bytes() == b"precious"
    assert (logs / "t.stdout.0").read_bytes() == b"y\n" * (SMALL["max_file_size"] // 2)
    assert len(complaints(run)) == 1, run.log_path.read_text()


# -- a flood and a full disk ---------------------------------------------------------------------


def memory_kib(pid: int) -> int:
    """The process's proportional set size (its share of what it maps)."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise AssertionError("no Pss line")


def test_a_flood_does_not_grow_the_supervisor(runner: Runner, workdir: Path,
                                              supervisor: str | None) -> None:
    limits = {"max_files": 2, "max_file_size": 64 * KIB}
    run = start(runner, supervisor, "exec yes flood", limits)
    if supervisor is None:
        # The agent's recovery still knows it, with the logs' arguments after the old ones.
        argv = Path(f"/proc/{run.proc.pid}/cmdline").read_bytes().split(b"\0")
        assert argv[3] == b"--logs"
        ct = create_time(run.proc.pid)
        assert ct is not None and _is_our_executor(run.proc.pid, ct)

    def newest() -> int:
        return max(indexes(workdir, "t.stdout"), default=0)

    wait_until(lambda: newest() >= 50, "the flood to rotate the log 50 times", limit=30)
    before = memory_kib(run.proc.pid)
    reached = newest() + 1000
    wait_until(lambda: newest() >= reached, "64 MiB more of the flood", limit=30)
    after = memory_kib(run.proc.pid)
    # A leak of a chunk per read would be megabytes; the fallback's interpreter may move a
    # little on its own.
    assert after - before < (64 if supervisor is None else 1024), (before, after)
    if supervisor is None:
        assert after < 1024, after
    assert len(indexes(workdir, "t.stdout")) <= 2
    os.kill(run.proc.pid, signal.SIGTERM)
    assert run.finish() == 0
    assert run.result() == ExitResult(exit_code=128 + signal.SIGTERM, signal=signal.SIGTERM)
    _, content = kept(workdir, "t.stdout")
    assert set(content.split(b"\n")[1:-1]) == {b"flood"}


@pytest.fixture
def tiny_logs_dir(workdir: Path) -> Iterator[Path]:
    """The logs dir on a 256 KiB tmpfs: a disk that fills up."""
    logs = logs_dir(workdir)
    logs.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0755", "tmpfs",
                           str(logs)], capture_output=True, timeout=30)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.decode().strip()}")
    try:
        yield logs
    finally:
        subprocess.run(["umount", "-l", str(logs)], check=True, timeout=30)


def test_a_full_disk_drops_output_but_never_stalls_the_task(
    runner: Runner, workdir: Path, tiny_logs_dir: Path, supervisor: str | None
) -> None:
    limits = {"max_files": 10, "max_file_size": 64 * KIB}
    marker = workdir / "finished"
    run = start(runner, supervisor, f"yes | head -c 4000000; echo done > {marker}; exit 6",
                limits)
    assert run.finish(limit=30) == 0
    assert run.result() == ExitResult(exit_code=6)
    assert marker.read_text() == "done\n"
    dropped = complaints(run)
    assert len(dropped) == 1 and "No space left on device" in dropped[0], dropped
    for path in tiny_logs_dir.iterdir():
        assert path.stat().st_size <= limits["max_file_size"]
