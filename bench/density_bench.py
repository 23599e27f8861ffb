"""Density benchmark: what N idle tasks cost a node, and how fast they start and come back.

Not a test: it prints figures beside their targets and exits 0 whether the targets
are met or not (non-zero only when the benchmark itself could not run).

One real agent (server + client, root, ``raw_exec`` or ``--driver exec``) in a temp dir on a
random 127.0.0.1 port. Every bench task runs ``/bin/sh -c`` that asks its own
``secrets/api.sock`` for ``GET /v1/agent/health`` with its workload identity (``curl``, retried
every 10 ms, bounded), writes the wall-clock times of its own start and of the first answer to
``local/ready``, then ``exec sleep 86399``: an idle task whose main process is ``sleep``.

In order:
  1. Single-task jobs, one after the other (``--singles``, 20): registration -> running
     (from just before the register call to the task's ``StartedAt``, once blocking queries
     on the job's summary see it running), and socket-ready (the task's own start -> its
     socket's first answer). Each is stopped before the next, so the agent is warm but runs
     nothing.
  2. Idle agent, 0 tasks: memory, CPU and context switches over ``--idle`` seconds.
  3. One job of count N (``--tasks``, 200): registration -> running of each task (as
     above) and socket-ready of each task; then, with the N tasks idle: supervision PSS (the
     sum of ``Pss:`` over the processes that supervise the tasks, whatever the driver runs:
     every process between a task's ``sleep`` and the agent, e.g. per-task executors or
     shims or one shared supervisor, plus any process working in the agent's data dir, with
     their descendants, less the tasks' own process trees), the agent's memory, and CPU and
     context switches over ``--idle`` seconds (agent and supervision).
  4. Restart: SIGKILL the agent, start it on the same data dir, and time (from the new
     agent's spawn) until every alloc is running per the API and every task's socket answers
     ``GET /v1/agent/health`` with the task's (re-read) identity; then check that the very
     task processes of before the SIGKILL still run and no task was restarted.

Memory is read from ``/proc/<pid>/smaps_rollup``. Agent growth per task is held against its
target by RSS; PSS and private (USS) growth are printed beside it: the agent's PSS moves
when other Python processes on the machine start or stop (they share the interpreter's
pages), and its private figure when shared pages become private. Socket-ready includes the
task's ``curl`` start-up (a few ms).

Context switches (voluntary + involuntary, all threads, from ``/proc/<pid>/task/*/status``)
stand in for event-loop wakeups: tracing them would cost more than what is measured. The
"no per-task timers" target is held as: idle wakeups per second with N tasks no more than
with 0 tasks plus N/60 (one wakeup per task a minute).

May touch: a temp dir it creates (the agent's data dir and config), the processes it starts
(the agent and, through it, the tasks and their supervision), 127.0.0.1 and Unix sockets
under that temp dir, and the agent's cgroups and secrets tmpfs mounts. It removes all of them
before it exits, also on failure, Ctrl-C or SIGTERM.

Usage: python bench/density_bench.py [--tasks 200] [--driver raw_exec|exec] [--singles 20]
                                      [--idle 30]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import attrs

SCRIPT = Path(__file__).resolve()
if str(SCRIPT.parent) not in sys.path:  # imported by the unit tests, not run as a script
    sys.path.insert(0, str(SCRIPT.parent))

from taskapi_bench import (  # noqa: E402 - the sibling script, found through the line above
    AgentUnderTest,
    BenchError,
    kill_leftovers,
    percentile,
    poll,
    request_status,
)

TASK = "t"
SINGLE_JOB = "density-one"
COUNT_JOB = "density-many"
SLEEP_MARKER = "86399"  # the idle task's ``sleep`` argument: how its process is recognised
READY_FILE = "ready"
HEALTH_URL = "http://localhost/v1/agent/health"
KIB = 1024
MIB = 1024 * KIB
# Each task asks for the least Nomad allows, so placement never limits N on a small node.
TASK_RESOURCES = {"CPU": 1, "MemoryMB": 10}
NO_RESTARTS = {"Attempts": 0, "Interval": int(60e9), "Delay": int(1e9), "Mode": "fail"}
CURL_ATTEMPTS = 1000  # x 10 ms: a task gives up on its socket after about 10 s plus curls
# A bounded wait for the task's socket, the ready time written atomically, then idle.
TASK_SCRIPT = f"""started=$(date +%s.%N); i=0
until curl -sf -o /dev/null --max-time 5 --unix-socket "$NOMAD_SECRETS_DIR/api.sock" \\
    -H "X-Nomad-Token: $NOMAD_TOKEN" {HEALTH_URL}; do
  i=$((i+1)); [ "$i" -ge {CURL_ATTEMPTS} ] && break; sleep 0.01
done
if [ "$i" -lt {CURL_ATTEMPTS} ]; then echo "$started $(date +%s.%N)"; else echo fail; fi \\
  > "$NOMAD_TASK_DIR/{READY_FILE}.tmp"
mv "$NOMAD_TASK_DIR/{READY_FILE}.tmp" "$NOMAD_TASK_DIR/{READY_FILE}"
exec sleep {SLEEP_MARKER}
"""

# The targets the figures are held against.
TARGET_SUPERVISION_PSS = 1 * MIB
TARGET_AGENT_RSS = 64 * KIB
TARGET_RESTART_S = 5.0


# ------------------------------------------------------------------------------ pure helpers


def parse_rollup(text: str) -> dict[str, int]:
    """The ``Name:  <n> kB`` lines of ``/proc/<pid>/smaps_rollup`` (or ``status``), in bytes.
    Lines without a kB figure (the address header, ``VmFlags``) are left out."""
    fields: dict[str, int] = {}
    for line in text.splitlines():
        name, sep, rest = line.partition(":")
        parts = rest.split()
        if sep and len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            fields[name.strip()] = int(parts[0]) * KIB
    return fields


def parse_stat(text: str) -> tuple[int, int]:
    """(ppid, utime + stime in clock ticks) from ``/proc/<pid>/stat``; the command name may
    hold spaces and parentheses, so fields are counted from its last ``)``."""
    fields = text[text.rindex(")") + 2:].split()
    # After the name: state(0) ppid(1) ... utime(11) stime(12).
    return int(fields[1]), int(fields[11]) + int(fields[12])


def context_switches(status_text: str) -> int:
    """Voluntary plus involuntary context switches from one ``/proc/.../status``."""
    total = 0
    for line in status_text.splitlines():
        name, _, value = line.partition(":")
        if name in ("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches"):
            total += int(value)
    return total


def subtree(parents: Mapping[int, int], roots: Iterable[int]) -> set[int]:
    """``roots`` and all their descendants."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for pid, parent in parents.items():
        children[parent].append(pid)
    found: set[int] = set()
    pending = list(roots)
    while pending:
        pid = pending.pop()
        if pid not in found:
            found.add(pid)
            pending += children.get(pid, ())
    return found


def supervision_pids(parents: Mapping[int, int], task_pids: Iterable[int],
                     stop_at: Iterable[int], also: Iterable[int] = ()) -> set[int]:
    """What supervises the tasks, whatever its shape (one process per task, or one for all,
    with or without helpers such as a log collector): every process between a task process
    and the agent (or init, or ``stop_at``), and ``also`` (e.g. processes working in the
    agent's data dir), with their descendants, less the tasks' own process trees."""
    stops = {0, 1, *stop_at}
    tasks = subtree(parents, task_pids)
    ancestors: set[int] = set()
    for pid in task_pids:
        parent = parents.get(pid, 0)
        while parent not in stops and parent not in ancestors and parent in parents:
            ancestors.add(parent)
            parent = parents[parent]
    return subtree(parents, (ancestors | set(also)) - stops) - tasks - stops


@attrs.frozen
class Spread:
    """p50/p99 of a set of durations, in seconds."""

    count: int
    p50: float
    p99: float
    worst: float

    @classmethod
    def of(cls, values: Iterable[float]) -> Spread:
        ordered = sorted(values)
        if not ordered:
            raise BenchError("no samples to summarise")
        return cls(len(ordered), percentile(ordered, 50), percentile(ordered, 99), ordered[-1])

    def text(self) -> str:
        return (f"p50 {self.p50 * 1000:.0f} ms, p99 {self.p99 * 1000:.0f} ms "
                f"(n={self.count}, max {self.worst * 1000:.0f} ms)")


# ------------------------------------------------------------------------------ /proc


def read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read()
    except OSError:  # the process is gone, or the file is not there
        return None


def process_table() -> dict[int, int]:
    """pid -> ppid of every process."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            text = read_text(f"/proc/{entry}/stat")
            if text is not None:
                parents[int(entry)] = parse_stat(text)[0]
    return parents


def working_under(pids: Iterable[int], directory: Path) -> list[int]:
    """Processes whose working directory is inside ``directory``."""
    inside = str(directory) + os.sep
    found = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if (os.readlink(f"/proc/{pid}/cwd") + os.sep).startswith(inside):
                found.append(pid)
    return found


def task_processes(pids: Iterable[int], alloc_ids: set[str]) -> list[int]:
    """The bench tasks' ``sleep`` processes of ``alloc_ids`` (by command line and env)."""
    wanted = f"sleep\0{SLEEP_MARKER}\0".encode()
    found = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                if not fh.read().endswith(wanted):
                    continue
            with open(f"/proc/{pid}/environ", "rb") as fh:
                env = fh.read().split(b"\0")
        except OSError:
            continue
        if any(v.startswith(b"NOMAD_ALLOC_ID=") and v[15:].decode() in alloc_ids for v in env):
            found.append(pid)
    return found


@attrs.frozen
class Memory:
    rss: int
    pss: int
    # Private pages (USS): unlike PSS, not moved by other processes mapping the same files
    # (every Python process on the machine shares the interpreter's pages with the agent).
    private: int


def command_names(pids: Iterable[int]) -> str:
    """``name xCOUNT`` of each distinct process name (``/proc/<pid>/comm``) among ``pids``."""
    names = collections.Counter((read_text(f"/proc/{pid}/comm") or "?").strip() for pid in pids)
    return ", ".join(f"{name} x{count}" for name, count in names.most_common())


def memory_of(pids: Iterable[int]) -> Memory:
    rss = pss = private = 0
    for pid in pids:
        fields = parse_rollup(read_text(f"/proc/{pid}/smaps_rollup") or "")
        rss += fields.get("Rss", 0)
        pss += fields.get("Pss", 0)
        private += fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return Memory(rss, pss, private)


@attrs.frozen
class Activity:
    """Cumulative CPU seconds and context switches of a set of processes."""

    cpu_s: float
    switches: int


def activity_of(pids: Iterable[int]) -> Activity:
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = 0.0
    switches = 0
    for pid in pids:
        stat_text = read_text(f"/proc/{pid}/stat")
        if stat_text is None:
            continue
        cpu += parse_stat(stat_text)[1] / ticks
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{pid}/task"):
                switches += context_switches(read_text(f"/proc/{pid}/task/{tid}/status") or "")
    return Activity(cpu, switches)


@attrs.frozen
class Idle:
    """What a set of processes did over an idle window."""

    seconds: float
    cpu_s: float
    switches: int

    @property
    def cpu_pct(self) -> float:
        return 100.0 * self.cpu_s / self.seconds

    @property
    def wakeups_per_s(self) -> float:
        return self.switches / self.seconds


async def idle_window(groups: Sequence[Sequence[int]], seconds: float) -> list[Idle]:
    """CPU and context switches of each group of processes over ``seconds`` of quiet."""
    before = [await asyncio.to_thread(activity_of, g) for g in groups]
    start = time.monotonic()
    await asyncio.sleep(seconds)  # the measurement itself: the bench must not wake anyone
    elapsed = time.monotonic() - start
    after = [await asyncio.to_thread(activity_of, g) for g in groups]
    return [Idle(elapsed, a.cpu_s - b.cpu_s, a.switches - b.switches)
            for a, b in zip(after, before, strict=True)]


# ------------------------------------------------------------------------------ the agent


class DensityAgent(AgentUnderTest):
    """The Task API bench's agent, which can also be SIGKILLed (its tasks run on)."""

    async def kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        if self._reader is not None:
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None

    def task_dir(self, alloc_id: str) -> Path:
        return self.data_dir / "alloc" / alloc_id / TASK


def bench_job(job_id: str, driver: str, count: int) -> dict[str, Any]:
    from nomad_client.jobspec import canonicalize_job

    return canonicalize_job({"ID": job_id, "Type": "service", "TaskGroups": [{
        # Nomad's default ephemeral disk (300 MB) would cap a node at its free disk / 300 MB.
        "Name": "g", "Count": count, "RestartPolicy": NO_RESTARTS,
        "EphemeralDisk": {"SizeMB": 10}, "Tasks": [{
            "Name": TASK, "Driver": driver,
            "Config": {"command": "/bin/sh", "args": ["-c", TASK_SCRIPT]},
            "Resources": TASK_RESOURCES, "KillTimeout": int(2e9),
            # Within that disk, as Nomad requires: two 2 MB files per stream.
            "LogConfig": {"MaxFiles": 2, "MaxFileSizeMB": 2},
            "Identity": {"Env": True, "File": True}}]}]})


def task_state(stub: Mapping[str, Any]) -> Mapping[str, Any]:
    return (stub.get("TaskStates") or {}).get(TASK) or {}


async def check_driver(agent: DensityAgent, driver: str) -> None:
    async with agent.api() as api:
        async def node() -> Any:
            nodes = await api.nodes_list()
            return await api.node_get(nodes[0]["ID"]) if nodes else None

        found = await poll(node, 30.0, "the agent's node")
    entry = (found.get("Drivers") or {}).get(driver) or {}
    if not entry.get("Healthy"):
        raise BenchError(f"driver {driver} is not healthy on this node: "
                         f"{entry.get('HealthDescription', 'not detected')}")


async def register_and_wait(agent: DensityAgent, job_id: str, driver: str, count: int,
                            timeout: float) -> dict[str, float]:
    """Register the job; seconds from registration to each task's ``StartedAt``. Waits on
    blocking queries of the job's summary (small, whatever N), then reads the allocations
    once: watching the full allocation list through a start storm would make the agent
    serialise N allocations per change, O(N^2) work of the bench's own making."""
    from nomad_client.structs.models import parse_rfc3339_ns

    async with agent.api(timeout=timeout) as api:
        registered = time.time()
        await api.job_register(bench_job(job_id, driver, count))
        agent.jobs.append(job_id)
        deadline = time.monotonic() + timeout
        index = 0
        while True:
            summary, index = await api.get_blocking(f"/v1/job/{job_id}/summary", index,
                                                    wait="5s")
            group = (summary.get("Summary") or {}).get("g") or {}
            if group.get("Failed") or group.get("Lost"):
                raise BenchError(f"{job_id}: tasks failed or were lost: {group}")
            if group.get("Running", 0) >= count:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"{job_id}: {group.get('Running', 0)} of {count} tasks "
                                 f"running after {timeout:.0f}s")
        stubs = await api.job_allocations(job_id)
    return {stub["ID"]: parse_rfc3339_ns(task_state(stub)["StartedAt"]) / 1e9 - registered
            for stub in stubs if task_state(stub).get("State") == "running"}


async def socket_ready(agent: DensityAgent, alloc_ids: Iterable[str], timeout: float
                       ) -> list[float]:
    """Seconds from each task's start (the first thing its script does is read the clock)
    to its first answer over its own socket (both written in ``local/ready``)."""
    pending = set(alloc_ids)
    latencies: list[float] = []

    def collect() -> bool:
        for alloc_id in list(pending):
            text = read_text(str(agent.task_dir(alloc_id) / "local" / READY_FILE))
            if text is None:
                continue
            if text.strip() == "fail":
                raise BenchError(f"task of alloc {alloc_id} never got an answer from its "
                                 "socket")
            started, answered = (float(word) for word in text.split())
            latencies.append(answered - started)
            pending.discard(alloc_id)
        return not pending

    await poll(lambda: asyncio.to_thread(collect), timeout, "every task's socket answer")
    return latencies


async def stop_job(agent: DensityAgent, job_id: str, timeout: float) -> None:
    """Deregister the job and wait until its tasks are gone."""
    async with agent.api(timeout=timeout) as api:
        allocs = [stub["ID"] for stub in await api.job_allocations(job_id)]
        await api.job_deregister(job_id)

        async def stopped() -> bool:
            for alloc_id in allocs:
                alloc = await api.allocation_get(alloc_id)
                if alloc.get("ClientStatus") not in ("complete", "failed", "lost"):
                    return False
            return True

        await poll(stopped, timeout, f"the tasks of {job_id} to stop")
    with contextlib.suppress(ValueError):
        agent.jobs.remove(job_id)


# ------------------------------------------------------------------------------ parts


@attrs.frozen
class Singles:
    to_running: Spread
    to_socket: Spread


async def single_tasks(agent: DensityAgent, driver: str, reps: int) -> Singles:
    to_running: list[float] = []
    to_socket: list[float] = []
    for rep in range(reps):
        job_id = f"{SINGLE_JOB}-{rep}"
        seen = await register_and_wait(agent, job_id, driver, 1, 60.0)
        to_running += seen.values()
        to_socket += await socket_ready(agent, seen, 30.0)
        await stop_job(agent, job_id, 60.0)
    return Singles(Spread.of(to_running), Spread.of(to_socket))


@attrs.frozen
class Loaded:
    """The count-N job: its start, and what its N idle tasks cost."""

    tasks: int
    to_running: Spread
    to_socket: Spread
    supervisors: int
    supervisor_names: str
    supervision: Memory
    agent: Memory
    agent_idle: Idle
    supervision_idle: Idle


async def count_job(agent: DensityAgent, driver: str, count: int, idle: float) -> Loaded:
    timeout = 60.0 + count * 1.0
    seen = await register_and_wait(agent, COUNT_JOB, driver, count, timeout)
    to_socket = await socket_ready(agent, seen, timeout)
    alloc_ids = set(seen)

    def supervision() -> tuple[set[int]] | None:  # in a tuple: none at all is an answer
        parents = process_table()
        tasks = task_processes(parents, alloc_ids)
        if len(tasks) != count:  # a task between writing ``ready`` and exec'ing ``sleep``
            return None
        in_data_dir = working_under(parents, agent.data_dir)
        return (supervision_pids(parents, tasks, (agent.pid, os.getpid()), in_data_dir),)

    (pids,) = await poll(lambda: asyncio.to_thread(supervision), 30.0,
                         f"{count} idle task processes and their supervision")
    agent_idle, supervision_idle = await idle_window([[agent.pid], sorted(pids)], idle)
    memory = await asyncio.to_thread(memory_of, pids)
    agent_memory = await asyncio.to_thread(memory_of, [agent.pid])
    names = await asyncio.to_thread(command_names, pids)
    return Loaded(count, Spread.of(seen.values()), Spread.of(to_socket), len(pids), names,
                  memory, agent_memory, agent_idle, supervision_idle)


@attrs.frozen
class Restart:
    agent_up_s: float  # spawn -> HTTP API listening
    reattached_s: float  # spawn -> every alloc running, every socket answering
    restarts: int  # task restarts seen after the restart (should be 0)
    kept: int  # task processes of before the SIGKILL still running afterwards


def live_tasks(alloc_ids: Iterable[str]) -> set[int]:
    return set(task_processes(process_table(), set(alloc_ids)))


async def restart(agent: DensityAgent, alloc_ids: Sequence[str], timeout: float) -> Restart:
    """SIGKILL the agent, start it on the same data dir, time the reattachment."""
    before = await asyncio.to_thread(live_tasks, alloc_ids)
    await agent.kill()
    start = time.monotonic()
    await agent.start(timeout=timeout)
    agent_up = time.monotonic() - start
    answering: set[str] = set()
    gate = asyncio.Semaphore(32)

    async def answers(alloc_id: str) -> None:
        secrets = agent.task_dir(alloc_id) / "secrets"
        async with gate:
            try:
                token = (await asyncio.to_thread((secrets / "nomad_token").read_text)).strip()
                status, _ = await request_status(HEALTH_URL, str(secrets / "api.sock"), token)
            except (OSError, aiohttp.ClientError):  # not listening again yet
                return
            if status == 200:
                answering.add(alloc_id)

    async with agent.api(timeout=timeout) as api:
        async def reattached() -> int | None:
            stubs = await api.job_allocations(COUNT_JOB)
            lost = [s["ID"] for s in stubs if s["ClientStatus"] in ("failed", "lost")]
            if lost:
                raise BenchError(f"{len(lost)} allocs failed or lost across the restart, "
                                 f"first {lost[0]}")
            running = [s for s in stubs if s["ID"] in alloc_ids and s["ClientStatus"] ==
                       "running" and task_state(s).get("State") == "running"]
            await asyncio.gather(*(answers(a) for a in alloc_ids if a not in answering))
            if len(running) == len(alloc_ids) and len(answering) == len(alloc_ids):
                return 1 + sum(int(task_state(s).get("Restarts", 0)) for s in running)
            return None

        restarts = await poll(reattached, timeout, "every task to be reattached") - 1
    elapsed = time.monotonic() - start
    kept = len(before & await asyncio.to_thread(live_tasks, alloc_ids))
    return Restart(agent_up, elapsed, restarts, kept)


# ------------------------------------------------------------------------------ report


SummaryRow = tuple[str, str, str, str]  # measure, target, measured, verdict


def verdict(met: bool | None) -> str:
    return "-" if met is None else ("met" if met else "NOT met")


def summary_rows(singles: Singles, base_memory: Memory, base_idle: Idle, loaded: Loaded,
                 restarted: Restart) -> list[SummaryRow]:
    n = loaded.tasks
    pss_per_task = loaded.supervision.pss / n
    rss_per_task = (loaded.agent.rss - base_memory.rss) / n
    pss_growth = (loaded.agent.pss - base_memory.pss) / n
    private_growth = (loaded.agent.private - base_memory.private) / n
    allowed_wakeups = base_idle.wakeups_per_s + n / 60
    return [
        ("PSS per task of supervision", "<= 1024 KiB",
         f"{pss_per_task / KIB:.0f} KiB ({loaded.supervisors} procs)",
         verdict(pss_per_task <= TARGET_SUPERVISION_PSS)),
        ("agent RSS growth per task", "<= 64 KiB",
         f"{rss_per_task / KIB:.1f} KiB (PSS {pss_growth / KIB:.1f}, private "
         f"{private_growth / KIB:.1f})",
         verdict(rss_per_task <= TARGET_AGENT_RSS)),
        ("agent CPU idle, N tasks", "no per-task timers",
         f"{loaded.agent_idle.cpu_pct:.2f} % (0 tasks: {base_idle.cpu_pct:.2f} %)", "-"),
        ("agent wakeups/s idle, N tasks", f"<= {allowed_wakeups:.1f}",
         f"{loaded.agent_idle.wakeups_per_s:.1f} (0 tasks: {base_idle.wakeups_per_s:.1f})",
         verdict(loaded.agent_idle.wakeups_per_s <= allowed_wakeups)),
        ("supervision CPU idle, N tasks", "-",
         f"{loaded.supervision_idle.cpu_pct:.2f} %, "
         f"{loaded.supervision_idle.wakeups_per_s:.1f} wakeups/s", "-"),
        ("register -> running, 1 task", "-", singles.to_running.text(), "-"),
        (f"register -> running, count {n}", "-", loaded.to_running.text(), "-"),
        ("task start -> socket answers, 1 task", "-", singles.to_socket.text(), "-"),
        (f"task start -> socket answers, count {n}", "-", loaded.to_socket.text(), "-"),
        ("restart -> all reattached", f"<= {TARGET_RESTART_S:.0f} s (at 500)",
         f"{restarted.reattached_s:.2f} s (API up {restarted.agent_up_s:.2f} s)",
         verdict(restarted.reattached_s <= TARGET_RESTART_S)),
        ("tasks kept across the restart", f"{n} of {n}, 0 restarts",
         f"{restarted.kept} of {n}, {restarted.restarts} restarts",
         verdict(restarted.kept == n and restarted.restarts == 0)),
    ]


def mib(memory: Memory) -> str:
    return (f"RSS {memory.rss / MIB:.1f} MiB, PSS {memory.pss / MIB:.1f} MiB, private "
            f"{memory.private / MIB:.1f} MiB")


def print_summary(args: argparse.Namespace, base_memory: Memory, loaded: Loaded,
                  rows: Sequence[SummaryRow]) -> None:
    print(f"\ndensity: {loaded.tasks} tasks, driver {args.driver}, idle window "
          f"{args.idle:.0f} s, {args.singles} single-task jobs")
    print(f"agent, 0 tasks: {mib(base_memory)}; {loaded.tasks} tasks: {mib(loaded.agent)}")
    print(f"supervision: {loaded.supervisors} processes ({loaded.supervisor_names}): "
          f"{mib(loaded.supervision)}")
    width = max(len(row[0]) for row in rows)
    print(f"\n{'measure':<{width}}  {'target':<22} {'measured':<48} result")
    for name, target, measured, met in rows:
        print(f"{name:<{width}}  {target:<22} {measured:<48} {met}")


# ------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Benchmark task density (see module docstring).")
    p.add_argument("--tasks", type=int, default=200, help="tasks of the count-N job")
    p.add_argument("--driver", choices=("raw_exec", "exec"), default="raw_exec")
    p.add_argument("--singles", type=int, default=20,
                   help="single-task jobs run one after the other for start latencies")
    p.add_argument("--idle", type=float, default=30.0,
                   help="seconds of each idle window (0 tasks, then N tasks)")
    args = p.parse_args(argv)
    if not 1 <= args.tasks <= 2000:
        p.error(f"--tasks must be within 1..2000, got {args.tasks}")
    if not 1 <= args.singles <= 500:
        p.error(f"--singles must be within 1..500, got {args.singles}")
    if not 1 <= args.idle <= 600:
        p.error(f"--idle must be within 1..600 seconds, got {args.idle}")
    return args


async def measure(args: argparse.Namespace, root: Path) -> None:
    agent = DensityAgent(root)
    try:
        await agent.start()
        await check_driver(agent, args.driver)
        print(f"agent up at {agent.address}; {args.singles} single-task jobs ...", flush=True)
        singles = await single_tasks(agent, args.driver, args.singles)
        base_memory = await asyncio.to_thread(memory_of, [agent.pid])
        print(f"idle window, 0 tasks ({args.idle:.0f} s) ...", flush=True)
        (base_idle,) = await idle_window([[agent.pid]], args.idle)
        print(f"count {args.tasks} job, then idle window ({args.idle:.0f} s) ...", flush=True)
        loaded = await count_job(agent, args.driver, args.tasks, args.idle)
        print("SIGKILL the agent and restart it ...", flush=True)
        async with agent.api() as api:
            alloc_ids = [stub["ID"] for stub in await api.job_allocations(COUNT_JOB)]
        restarted = await restart(agent, alloc_ids, 60.0 + args.tasks * 0.5)
        rows = summary_rows(singles, base_memory, base_idle, loaded, restarted)
        print_summary(args, base_memory, loaded, rows)
    finally:
        # The agent stops its tasks itself where it still can; what is left is killed.
        for job_id in list(agent.jobs):
            with contextlib.suppress(Exception):
                await asyncio.shield(stop_job(agent, job_id, 60.0 + args.tasks * 0.2))
        await asyncio.shield(agent.stop())


async def run(args: argparse.Namespace) -> None:
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    root = Path(tempfile.mkdtemp(prefix="density-bench-"))
    try:
        await measure(args, root)
    finally:
        await asyncio.shield(asyncio.to_thread(kill_leftovers, root))
        await asyncio.shield(asyncio.to_thread(shutil.rmtree, root, True))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(run(args))
    except BenchError as err:
        print(f"benchmark failed: {err}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
