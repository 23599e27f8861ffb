"""Fill a job's defaults and validate it (Nomad's Canonicalize + Validate).

Accepts a job dict from the HCL parser or from a user's JSON request (where
any key may be missing or mistyped), returns a new dict with every default
filled in, and raises ``JobValidationError`` listing every problem found.
Every field is type-checked before it is used, so no malformed job gets past
as any other exception. Pure computation: the input is never modified.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from nomad_client.durations import HOUR, MINUTE, SECOND
from nomad_client.jobspec.api_zeros import fill_api_zeros
from nomad_client.jobspec.disconnect import disconnect_problems, fill_disconnect
from nomad_client.jobspec.errors import JobValidationError, short_repr
from nomad_client.jobspec.launch_blocks import fill_launch_blocks, launch_block_problems
from nomad_client.jobspec.network import fill_networks, network_problems
from nomad_client.jobspec.rollout import fill_rollout_blocks, rollout_problems
from nomad_client.jobspec.services import fill_services, service_problems

JOB_TYPES = ("service", "batch", "system", "sysbatch")
RESTART_MODES = ("fail", "delay")
DELAY_FUNCTIONS = ("constant", "exponential", "fibonacci")
IDENTITY_CHANGE_MODES = ("noop", "restart", "signal")
# Copies of one group a job may ask for. Nomad has no such limit, but our scheduler places a
# registration's allocations on the event loop: 100,000 of them would hold every request for
# seconds. Scale actions are held to it too (``http/endpoints/scaling.py``).
MAX_GROUP_COUNT = 10_000
CONSTRAINT_OPERANDS = frozenset(
    {
        "=",
        "==",
        "is",
        "!=",
        "not",
        ">",
        ">=",
        "<",
        "<=",
        "regexp",
        "version",
        "semver",
        "set_contains",
        "set_contains_any",
        "set_contains_all",
        "is_set",
        "is_not_set",
        "distinct_hosts",
        "distinct_property",
    }
)
DEFAULT_AUDIENCE = "nomadproject.io"
MIN_RESTART_INTERVAL = 5 * SECOND
DEFAULT_KILL_TIMEOUT = 5 * SECOND
# Job IDs become URL path segments (/v1/job/<id>) and file names.
MAX_JOB_ID_LENGTH = 128
# Deeper jobs are refused before copying, which would otherwise recurse too far.
MAX_JOB_DEPTH = 100

_RESTART_DEFAULTS: dict[str, dict[str, Any]] = {
    "service": {"Attempts": 2, "Interval": 30 * MINUTE, "Delay": 15 * SECOND, "Mode": "fail"},
    "batch": {"Attempts": 3, "Interval": 24 * HOUR, "Delay": 15 * SECOND, "Mode": "fail"},
}
_RESCHEDULE_DEFAULTS: dict[str, dict[str, Any]] = {
    "service": {
        "Attempts": 0,
        "Interval": 0,
        "Delay": 30 * SECOND,
        "DelayFunction": "exponential",
        "MaxDelay": HOUR,
        "Unlimited": True,
    },
    "batch": {
        "Attempts": 1,
        "Interval": 24 * HOUR,
        "Delay": 5 * SECOND,
        "DelayFunction": "constant",
        "MaxDelay": 0,
        "Unlimited": False,
    },
}
# A named identity's defaults; the default identity also gets its name and an audience.
_IDENTITY_DEFAULTS: dict[str, Any] = {
    "Name": None,
    "Audience": None,
    "Env": False,
    "File": False,
    "Filepath": None,
    "TTL": None,
    "ChangeMode": "noop",
    "ChangeSignal": None,
}
_IDENTITY_NAME_RE = re.compile(r"\A[a-zA-Z0-9_-]{1,128}\Z")  # \Z: `$` accepts a trailing newline


def _merge(defaults: Mapping[str, Any], given: Any) -> dict[str, Any]:
    """``defaults`` overridden by every field of ``given`` that is set (not None)."""
    out = dict(defaults)
    if isinstance(given, Mapping):
        out.update({k: v for k, v in given.items() if v is not None})
    return out


def _fill_resources(given: Any) -> dict[str, Any]:
    """Nomad's resource defaults; a task that asks for ``cores`` gets no default ``cpu``.
    ``Cores`` and ``MemoryMaxMB`` stay absent unless given (absent reads as Nomad's 0)."""
    asks_cores = isinstance(given, Mapping) and given.get("Cores") is not None
    return _merge({"CPU": 0 if asks_cores else 100, "MemoryMB": 300}, given)


def _family(job_type: Any) -> str:
    # system/sysbatch share the service/batch restart defaults respectively.
    return "batch" if job_type in ("batch", "sysbatch") else "service"


def _children(value: Any) -> Iterator[Any] | None:
    if isinstance(value, Mapping):
        return iter(value.values())
    if isinstance(value, list | tuple):
        return iter(value)
    return None


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether ``value`` nests lists/objects more than ``limit`` levels (cycles count).

    Iterative, and each shared part is walked once, so any input is cheap to check.
    """
    top = _children(value)
    if top is None:
        return False
    heights: dict[int, int] = {}
    on_path = {id(value)}
    # (container, its children still to visit, tallest child height so far)
    stack: list[tuple[Any, Iterator[Any], int]] = [(value, top, 0)]
    while stack:
        node, pending, tallest = stack[-1]
        for child in pending:
            inner = _children(child)
            if inner is None:
                continue
            known = heights.get(id(child))
            if known is not None:
                if len(stack) + known > limit:
                    return True
                tallest = max(tallest, known)
                continue
            if id(child) in on_path or len(stack) >= limit:
                return True
            stack[-1] = (node, pending, tallest)
            on_path.add(id(child))
            stack.append((child, inner, 0))
            break
        else:
            stack.pop()
            on_path.discard(id(node))
            heights[id(node)] = tallest + 1
            if stack:
                parent, parent_pending, parent_tallest = stack[-1]
                stack[-1] = (parent, parent_pending, max(parent_tallest, tallest + 1))
    return False


def _invalid(message: str) -> JobValidationError:
    return JobValidationError(f"1 error occurred:\n  * {message}", (message,))


def canonicalize_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``job`` with defaults filled; raise if it is invalid."""
    if not isinstance(job, Mapping):
        raise JobValidationError("job must be an object", ("job must be an object",))
    if _deeper_than(job, MAX_JOB_DEPTH):
        raise _invalid(f"job is nested too deeply (more than {MAX_JOB_DEPTH} levels)")
    out: dict[str, Any] = copy.deepcopy(dict(job))
    _fill_job(out)
    problems = _JobChecker().check(out)
    if problems:
        count = len(problems)
        noun = "error" if count == 1 else "errors"
        lines = "\n".join(f"  * {p}" for p in problems)
        raise JobValidationError(f"{count} {noun} occurred:\n{lines}", tuple(problems))
    return out


def _default(d: dict[str, Any], key: str, value: Any) -> None:
    if d.get(key) is None:
        d[key] = value


def _fill_job(job: dict[str, Any]) -> None:
    if not job.get("Type"):
        job["Type"] = "service"
    _default(job, "Priority", 50)
    if not job.get("Region"):
        job["Region"] = "global"
    if not job.get("Namespace"):
        job["Namespace"] = "default"
    if not job.get("Datacenters"):
        job["Datacenters"] = ["*"]
    if not job.get("NodePool"):
        job["NodePool"] = "default"
    if not job.get("Name"):
        job["Name"] = job.get("ID")
    _default(job, "Meta", {})
    _default(job, "Constraints", [])
    _default(job, "TaskGroups", [])
    family = _family(job["Type"])
    for group in job["TaskGroups"] if isinstance(job["TaskGroups"], list) else []:
        if isinstance(group, dict):
            _fill_group(group, job["Type"], family)
    fill_launch_blocks(job)
    fill_services(job)
    fill_rollout_blocks(job)
    fill_disconnect(job)
    fill_api_zeros(job)  # last: only what nothing else has filled


def _fill_group(group: dict[str, Any], job_type: str, family: str) -> None:
    _default(group, "Count", 1)
    _default(group, "Constraints", [])
    _default(group, "Meta", {})
    group["RestartPolicy"] = _merge(_RESTART_DEFAULTS[family], group.get("RestartPolicy"))
    if job_type in ("system", "sysbatch"):
        # Nomad never reschedules system jobs; keep whatever the user wrote.
        _default(group, "ReschedulePolicy", None)
        group.setdefault("ReschedulePolicy", None)
    else:
        group["ReschedulePolicy"] = _merge(
            _RESCHEDULE_DEFAULTS[family], group.get("ReschedulePolicy")
        )
    _default(group, "Networks", [])
    fill_networks(group["Networks"])
    _default(group, "Tasks", [])
    for task in group["Tasks"] if isinstance(group["Tasks"], list) else []:
        if isinstance(task, dict):
            _fill_task(task, group["RestartPolicy"])


def _fill_task(task: dict[str, Any], group_restart: dict[str, Any]) -> None:
    task.setdefault("Driver", None)
    task.setdefault("User", None)
    _default(task, "Config", {})
    _default(task, "Env", {})
    _default(task, "Meta", {})
    _default(task, "Constraints", [])
    task["Resources"] = _fill_resources(task.get("Resources"))
    task["RestartPolicy"] = _merge(group_restart, task.get("RestartPolicy"))
    _default(task, "KillTimeout", DEFAULT_KILL_TIMEOUT)
    _default(task, "Leader", False)
    # A fresh audience list per job: filled-in jobs must not share one mutable default.
    default_identity = {**_IDENTITY_DEFAULTS, "Name": "default", "Audience": [DEFAULT_AUDIENCE]}
    task["Identity"] = _merge(default_identity, task.get("Identity"))
    task.setdefault("TaskAPI", None)  # no choice: the namespace or the agent decides
    named = task.get("Identities")
    if named is None:
        task["Identities"] = []
    elif isinstance(named, list):
        task["Identities"] = [
            _merge(_IDENTITY_DEFAULTS, ident) if isinstance(ident, Mapping) else ident
            for ident in named
        ]


def _is_int(value: Any) -> bool:
    """A whole number that fits Nomad's 64-bit fields."""
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _id_problem(job_id: str) -> str | None:
    """Why ``job_id`` cannot be used (it ends up in URL paths), or None."""
    if job_id in (".", ".."):
        return f"job ID {job_id!r} is not allowed: it would name a directory in URL paths"
    if len(job_id) > MAX_JOB_ID_LENGTH:
        return (
            f"job ID is {len(job_id)} characters long; the limit is {MAX_JOB_ID_LENGTH} characters"
        )
    if "/" in job_id:
        return f"job ID {job_id!r} must not contain '/'"
    for pos, char in enumerate(job_id):
        if char == " ":
            found = "a space"
        elif char.isspace():
            found = f"whitespace (U+{ord(char):04X})"
        elif unicodedata.category(char) == "Cc":
            found = f"a control character (U+{ord(char):04X})"
        else:
            continue
        return (
            f"job ID {job_id!r} contains {found} at position {pos}; "
            "IDs must not contain whitespace or control characters"
        )
    return None


def _task_name_problem(name: str) -> str | None:
    if name == "alloc" or name.startswith(".") or "/" in name or "\x00" in name:
        # The task's directory sits beside the shared "alloc" dir and the agent's
        # own dot-directories in the allocation directory.
        return "task name must not be 'alloc', start with '.' or contain '/'"
    return None


class _JobChecker:
    """Collects every validation problem instead of stopping at the first."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, where: str, message: str) -> None:
        self.problems.append(f"{where}: {message}" if where else message)

    def check(self, job: dict[str, Any]) -> list[str]:
        job_id = job.get("ID")
        if not job_id:
            self.add("", "missing job ID")
        elif not isinstance(job_id, str):
            self.add("", f"job ID must be a string, got {short_repr(job_id)}")
        else:
            problem = _id_problem(job_id)
            if problem:
                self.add("", problem)
        for key in ("Name", "Region", "Namespace", "NodePool"):
            value = job[key]
            # Name is None only when the ID is missing, which is reported above.
            if value is not None and not isinstance(value, str):
                self.add("", f"{key} must be a string, got {short_repr(value)}")
        if job["Type"] not in JOB_TYPES:
            self.add(
                "",
                f"unknown job type {short_repr(job['Type'])} "
                f"(expected one of {', '.join(JOB_TYPES)})",
            )
        if not _is_int(job["Priority"]) or not 1 <= job["Priority"] <= 100:
            self.add(
                "", f"job priority must be between 1 and 100, got {short_repr(job['Priority'])}"
            )
        dcs = job["Datacenters"]
        if not isinstance(dcs, list) or not all(isinstance(d, str) and d for d in dcs):
            self.add("", "Datacenters must be a list of non-empty strings")
        self._string_map("", "Meta", job["Meta"])
        self._constraints("", job["Constraints"])
        self.problems.extend(launch_block_problems(job))
        groups = job["TaskGroups"]
        if not isinstance(groups, list):
            self.add("", "TaskGroups must be a list")
            return self.problems
        if not groups:
            self.add("", "job has no task groups")
        for where, group in self._members("group", "group", groups):
            self._group(where, group)
        self.problems.extend(service_problems(job))
        self.problems.extend(rollout_problems(job))
        self.problems.extend(disconnect_problems(job))
        return self.problems

    def _members(
        self,
        prefix: str,
        kind: str,
        members: list[Any],
        name_problem: Callable[[str], str | None] = lambda name: None,
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """Each object of ``members`` (a job's groups, a group's tasks) with where it stands;
        reports the others, and missing, repeated or refused (``name_problem``) names."""
        seen: set[str] = set()
        for i, member in enumerate(members):
            if not isinstance(member, dict):
                self.add(f"{prefix} {i}", "must be an object")
                continue
            name = member.get("Name")
            if not isinstance(name, str) or not name:
                where = f"{prefix} {i}"
                self.add(where, f"missing {kind} name")
            else:
                where = f"{prefix} {name!r}"
                if name in seen:
                    self.add(where, f"duplicate {kind} name")
                elif (problem := name_problem(name)) is not None:
                    self.add(where, problem)
                else:
                    seen.add(name)
            yield where, member

    def _group(self, where: str, group: dict[str, Any]) -> None:
        count = group["Count"]
        if not _is_int(count):
            self.add(where, f"count must be a whole number, got {short_repr(count)}")
        elif count < 0:
            self.add(where, f"count must not be negative, got {count}")
        elif count > MAX_GROUP_COUNT:
            self.add(where, f"count must be at most {MAX_GROUP_COUNT}, got {count}")
        self._string_map(where, "Meta", group["Meta"])
        self._constraints(where, group["Constraints"])
        self._restart(where, group["RestartPolicy"])
        self._reschedule(where, group["ReschedulePolicy"])
        for problem in network_problems(group["Networks"]):
            self.add(f"{where} network", problem)
        tasks = group["Tasks"]
        if not isinstance(tasks, list):
            self.add(where, "Tasks must be a list")
            return
        if not tasks:
            self.add(where, "group has no tasks")
        for twhere, task in self._members(f"{where} task", "task", tasks, _task_name_problem):
            self._task(twhere, task)

    def _resources(self, where: str, res: dict[str, Any]) -> None:
        """Nomad's checks: ``cores`` instead of ``cpu``, never both; ``memory_max`` (the
        oversubscription hard limit) at least ``memory``, or -1 for no hard limit."""
        cores = res.get("Cores", 0)
        if not _is_int(cores) or cores < 0:
            self.add(where, f"resources: cores value cannot be negative, got {short_repr(cores)}")
            cores = 0
        if cores and _is_int(res["CPU"]) and res["CPU"] > 0:
            self.add(where, "resources: Task can only ask for 'cpu' or 'cores' resource, not both.")
        elif not cores and (not _is_int(res["CPU"]) or res["CPU"] < 1):
            self.add(where, f"resources: minimum CPU value is 1, got {short_repr(res['CPU'])}")
        memory = res["MemoryMB"]
        if not _is_int(memory) or memory < 10:
            self.add(where, f"resources: minimum MemoryMB value is 10, got {short_repr(memory)}")
            return
        memory_max = res.get("MemoryMaxMB", 0)
        if not _is_int(memory_max) or memory_max not in (0, -1) and memory_max < memory:
            self.add(where, f"resources: MemoryMaxMB value ({short_repr(memory_max)}) should be"
                            f" larger than MemoryMB value ({memory})")

    def _task(self, where: str, task: dict[str, Any]) -> None:
        driver = task.get("Driver")
        if not driver or not isinstance(driver, str):
            self.add(where, "missing driver")
        user = task.get("User")
        if user is not None and not isinstance(user, str):
            self.add(where, f"User must be a string, got {short_repr(user)}")
        if not isinstance(task["Config"], dict):
            self.add(where, "Config must be an object")
        self._string_map(where, "Env", task["Env"])
        self._string_map(where, "Meta", task["Meta"])
        self._constraints(where, task["Constraints"])
        self._restart(where, task["RestartPolicy"])
        kill = task["KillTimeout"]
        if not _is_int(kill) or kill < 0:
            self.add(
                where,
                f"KillTimeout must be a non-negative number of nanoseconds, got {short_repr(kill)}",
            )
        if not isinstance(task["Leader"], bool):
            self.add(where, "Leader must be a bool")
        self._resources(where, task["Resources"])
        self._task_api(where, task["TaskAPI"])
        self._identity(where, task["Identity"], default=True)
        idents = task["Identities"]
        if not isinstance(idents, list):
            self.add(where, "Identities must be a list")
            return
        seen: set[str] = {"default"}
        for ident in idents:
            if not isinstance(ident, dict):
                self.add(where, "each identity must be an object")
                continue
            name = ident.get("Name")
            # A name that is not a string is reported by _identity.
            if isinstance(name, str):
                if name in seen:
                    self.add(where, f"duplicate identity name {name!r}")
                seen.add(name)
            self._identity(where, ident, default=False)

    def _task_api(self, where: str, spec: Any) -> None:
        if spec is None:
            return
        if not isinstance(spec, dict):
            self.add(where, f"TaskAPI must be an object, got {short_repr(spec)}")
            return
        if not isinstance(spec.get("Enabled"), bool):
            enabled = spec.get("Enabled")
            self.add(where, f"TaskAPI.Enabled must be a bool, got {short_repr(enabled)}")
        unknown = sorted(str(key) for key in spec if key != "Enabled")
        if unknown:
            self.add(where, f"TaskAPI has unknown fields {', '.join(unknown)} (allowed: Enabled)")

    def _identity(self, where: str, ident: dict[str, Any], default: bool) -> None:
        name = ident.get("Name")
        iwhere = f"{where} identity {short_repr(name)}"
        if not isinstance(name, str) or not _IDENTITY_NAME_RE.match(name):
            self.add(iwhere, "invalid identity name (letters, digits, '-' and '_', 1-128 chars)")
        aud = ident.get("Audience")
        if aud is not None and (
            not isinstance(aud, list) or not all(isinstance(a, str) for a in aud)
        ):
            self.add(iwhere, "Audience must be a list of strings")
        for flag in ("Env", "File"):
            if not isinstance(ident.get(flag), bool):
                self.add(iwhere, f"{flag} must be a bool")
        for key in ("Filepath", "ChangeSignal"):
            value = ident.get(key)
            if value is not None and not isinstance(value, str):
                self.add(iwhere, f"{key} must be a string, got {short_repr(value)}")
        mode = ident.get("ChangeMode")
        if mode not in IDENTITY_CHANGE_MODES:
            self.add(
                iwhere,
                f"invalid change_mode {short_repr(mode)} (expected one of "
                f"{', '.join(IDENTITY_CHANGE_MODES)})",
            )
        if mode == "signal" and not ident.get("ChangeSignal"):
            self.add(iwhere, 'change_signal is required when change_mode is "signal"')
        if ident.get("Filepath") and not ident.get("File"):
            self.add(iwhere, "filepath requires file = true")
        # Unlike Nomad, the default identity may have a ttl: it then carries an exp claim.
        ttl = ident.get("TTL")
        if ttl is not None and (not _is_int(ttl) or ttl < 0):
            self.add(
                iwhere, f"TTL must be a non-negative number of nanoseconds, got {short_repr(ttl)}"
            )

    def _restart(self, where: str, policy: dict[str, Any]) -> None:
        rwhere = f"{where} restart"
        attempts, interval, delay = policy["Attempts"], policy["Interval"], policy["Delay"]
        ok = True
        if not _is_int(attempts) or attempts < 0:
            self.add(
                rwhere,
                f"attempts must be a non-negative whole number, got {short_repr(attempts)}",
            )
            ok = False
        for key, value in (("Interval", interval), ("Delay", delay)):
            if not _is_int(value) or value < 0:
                self.add(
                    rwhere,
                    f"{key} must be a non-negative number of nanoseconds, got {short_repr(value)}",
                )
                ok = False
        if policy["Mode"] not in RESTART_MODES:
            self.add(
                rwhere,
                f"unsupported restart mode {short_repr(policy['Mode'])} (expected "
                f"{' or '.join(RESTART_MODES)})",
            )
        if not ok:
            return
        if interval < MIN_RESTART_INTERVAL:
            self.add(rwhere, "interval can not be less than 5s")
        elif attempts * delay > interval:
            self.add(
                rwhere,
                f"cannot restart {attempts} times within the interval when each "
                "restart waits for the delay",
            )

    def _reschedule(self, where: str, policy: Any) -> None:
        if policy is None:
            return  # system jobs may leave it unset
        rwhere = f"{where} reschedule"
        if not isinstance(policy, dict):
            self.add(rwhere, "ReschedulePolicy must be an object")
            return
        for key in ("Attempts", "Interval", "Delay", "MaxDelay"):
            value = policy.get(key)
            if value is not None and (not _is_int(value) or value < 0):
                self.add(
                    rwhere, f"{key} must be a non-negative whole number, got {short_repr(value)}"
                )
        func = policy.get("DelayFunction")
        if func is not None and func not in DELAY_FUNCTIONS:
            self.add(
                rwhere,
                f"invalid delay function {short_repr(func)} (expected one of "
                f"{', '.join(DELAY_FUNCTIONS)})",
            )
        unlimited = policy.get("Unlimited")
        if unlimited is not None and not isinstance(unlimited, bool):
            self.add(rwhere, f"Unlimited must be a bool, got {short_repr(unlimited)}")

    def _constraints(self, where: str, constraints: Any) -> None:
        if not isinstance(constraints, list):
            self.add(where, "Constraints must be a list")
            return
        for c in constraints:
            if not isinstance(c, dict):
                self.add(where, "each constraint must be an object")
                continue
            for key in ("LTarget", "RTarget"):
                value = c.get(key)
                if value is not None and not isinstance(value, str):
                    self.add(where, f"constraint {key} must be a string, got {short_repr(value)}")
            op = c.get("Operand") or "="
            if not isinstance(op, str):
                self.add(where, f"constraint Operand must be a string, got {short_repr(op)}")
            elif op not in CONSTRAINT_OPERANDS:
                self.add(where, f"unknown constraint operator {op!r}")

    def _string_map(self, where: str, key: str, value: Any) -> None:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            self.add(where, f"{key} must be a map of strings")
