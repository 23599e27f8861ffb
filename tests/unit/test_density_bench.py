"""The density benchmark's pure helpers: percentiles, ``/proc`` parsing, and which processes
count as a task's supervision. The benchmark itself runs real agents and is not a test."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "density_bench.py"


def load_bench() -> ModuleType:
    """The script as a module (``bench/`` is no package; the script finds its sibling)."""
    spec = importlib.util.spec_from_file_location("density_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # attrs resolves the classes' annotations through it
    spec.loader.exec_module(module)
    return module


bench = load_bench()

ROLLUP = """\
55d5c0a3e000-7ffd3b9f3000 ---p 00000000 00:00 0                          [rollup]
Rss:               16384 kB
Pss:                9123 kB
Pss_Anon:           8800 kB
Shared_Clean:       7000 kB
Swap:                  0 kB
VmFlags: rd wr mr mw me
"""


def test_rollup_fields_are_bytes_and_header_lines_are_skipped() -> None:
    fields = bench.parse_rollup(ROLLUP)
    assert fields["Rss"] == 16384 * 1024
    assert fields["Pss"] == 9123 * 1024
    assert fields["Swap"] == 0
    assert "VmFlags" not in fields
    assert not any(name.startswith("55d5") for name in fields)


def test_rollup_of_this_process_has_a_pss() -> None:
    with open(f"/proc/{os.getpid()}/smaps_rollup") as fh:
        fields = bench.parse_rollup(fh.read())
    assert 0 < fields["Pss"] <= fields["Rss"]


def test_stat_counts_fields_after_a_name_with_spaces_and_parentheses() -> None:
    # pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime
    text = "42 (a (b) c) S 7 42 42 0 -1 4194560 10 0 0 0 150 25 0 0 20 0 1 0 99\n"
    assert bench.parse_stat(text) == (7, 175)


def test_context_switches_add_voluntary_and_involuntary() -> None:
    status = "Name:\tpython\nvoluntary_ctxt_switches:\t120\nnonvoluntary_ctxt_switches:\t7\n"
    assert bench.context_switches(status) == 127
    assert bench.context_switches("Name:\tx\n") == 0


@pytest.mark.parametrize(("values", "p50", "p99"), [
    ([5.0], 5.0, 5.0),
    ([3.0, 1.0, 2.0], 2.0, 3.0),
    ([float(v) for v in range(1, 201)], 100.0, 198.0),  # nearest rank: ceil(n * p / 100)
])
def test_spread_takes_nearest_rank_percentiles(values: list[float], p50: float,
                                               p99: float) -> None:
    spread = bench.Spread.of(values)
    assert (spread.count, spread.p50, spread.p99, spread.worst) == (
        len(values), p50, p99, max(values))


def test_spread_of_nothing_is_a_bench_error() -> None:
    with pytest.raises(bench.BenchError):
        bench.Spread.of([])


def test_supervision_is_what_stands_between_tasks_and_the_agent() -> None:
    agent, bench_pid = 100, 50
    parents = {
        bench_pid: 1, agent: bench_pid,
        201: 1, 301: 201,  # a per-task shim in its own session (reparented to init)
        202: agent, 302: 202,  # a shim still the agent's child
        203: 202,  # ... and its log collector, a sibling of the task
        210: 1, 211: 210, 311: 211, 312: 211,  # a shared supervisor with a helper per task
        303: 301,  # a process the task forked
        400: agent,  # an agent helper that supervises no task
        500: 1,  # found working in the agent's data dir
    }
    found = bench.supervision_pids(parents, [301, 302, 311, 312], (agent, bench_pid),
                                   also=[500])
    assert found == {201, 202, 203, 210, 211, 500}


def test_a_shared_parent_is_found_above_supervisors_in_the_data_dir() -> None:
    # agent 10 -> launcher 20 -> supervisors 30, 31 -> tasks 40, 41; the supervisors (and
    # the tasks) also work in the data dir, which must not cut the walk up short.
    parents = {10: 1, 20: 10, 30: 20, 31: 20, 40: 30, 41: 31}
    found = bench.supervision_pids(parents, [40, 41], (10,), also=[30, 31, 40, 41])
    assert found == {20, 30, 31}


def test_a_task_process_is_never_its_own_supervision() -> None:
    # A task's main process that forked another task-looking process under it, and a task
    # found in the agent's data dir (raw_exec tasks work in their task dir).
    parents = {10: 1, 20: 10, 30: 20}
    assert bench.supervision_pids(parents, [20, 30], (), also=[20]) == {10}


def test_subtree_holds_the_roots_and_every_descendant() -> None:
    parents = {2: 1, 3: 2, 4: 3, 5: 1, 6: 5}
    assert bench.subtree(parents, [2]) == {2, 3, 4}
    assert bench.subtree(parents, [4, 6]) == {4, 6}
    assert bench.subtree(parents, []) == set()
