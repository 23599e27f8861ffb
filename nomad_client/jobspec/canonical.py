"""Fill a job's defaults and validate it (Nomad's Canonicalize + Validate).

Accepts a job dict from the HCL parser or from a user's JSON request (where
any key may be missing or mistyped), returns a new dict with every default
filled in, and raises ``JobValidationError`` listing every problem found.
Pure computation: the input is never modified.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from nomad_client.durations import HOUR, MINUTE, SECOND
from nomad_client.jobspec.errors import JobValidationError

JOB_TYPES = ("service", "batch", "system", "sysbatch")
RESTART_MODES = ("fail", "delay")
IDENTITY_CHANGE_MODES = ("noop", "restart", "signal")
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
_IDENTITY_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")


def _merge(defaults: Mapping[str, Any], given: Any) -> dict[str, Any]:
    """``defaults`` overridden by every field of ``given`` that is set (not None)."""
    out = dict(defaults)
    if isinstance(given, Mapping):
        out.update({k: v for k, v in given.items() if v is not None})
    return out


def _family(job_type: Any) -> str:
    # system/sysbatch share the service/batch restart defaults respectively.
    return "batch" if job_type in ("batch", "sysbatch") else "service"


def canonicalize_job(job: Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of ``job`` with defaults filled; raise if it is invalid."""
    if not isinstance(job, Mapping):
        raise JobValidationError("job must be an object", ("job must be an object",))
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
    task["Resources"] = _merge({"CPU": 100, "MemoryMB": 300}, task.get("Resources"))
    task["RestartPolicy"] = _merge(group_restart, task.get("RestartPolicy"))
    _default(task, "KillTimeout", DEFAULT_KILL_TIMEOUT)
    _default(task, "Leader", False)
    identity = _merge(
        {
            "Name": "default",
            "Audience": [DEFAULT_AUDIENCE],
            "Env": False,
            "File": False,
            "Filepath": None,
            "TTL": None,
            "ChangeMode": "noop",
            "ChangeSignal": None,
        },
        task.get("Identity"),
    )
    task["Identity"] = identity
    named = task.get("Identities")
    if named is None:
        task["Identities"] = []
    elif isinstance(named, list):
        task["Identities"] = [
            _merge(
                {
                    "Name": None,
                    "Audience": None,
                    "Env": False,
                    "File": False,
                    "Filepath": None,
                    "TTL": None,
                    "ChangeMode": "noop",
                    "ChangeSignal": None,
                },
                ident,
            )
            if isinstance(ident, Mapping)
            else ident
            for ident in named
        ]


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
            self.add("", "job ID must be a string")
        elif " " in job_id or "\x00" in job_id:
            self.add("", f"job ID {job_id!r} contains a space or null character")
        if job["Type"] not in JOB_TYPES:
            self.add(
                "", f"unknown job type {job['Type']!r} (expected one of {', '.join(JOB_TYPES)})"
            )
        if not _is_int(job["Priority"]) or not 1 <= job["Priority"] <= 100:
            self.add("", f"job priority must be between 1 and 100, got {job['Priority']!r}")
        dcs = job["Datacenters"]
        if not isinstance(dcs, list) or not all(isinstance(d, str) and d for d in dcs):
            self.add("", "Datacenters must be a list of non-empty strings")
        self._string_map("", "Meta", job["Meta"])
        self._constraints("", job["Constraints"])
        groups = job["TaskGroups"]
        if not isinstance(groups, list):
            self.add("", "TaskGroups must be a list")
            return self.problems
        if not groups:
            self.add("", "job has no task groups")
        seen: set[str] = set()
        for i, group in enumerate(groups):
            if not isinstance(group, dict):
                self.add(f"group {i}", "must be an object")
                continue
            name = group.get("Name")
            where = f"group {name!r}" if name else f"group {i}"
            if not name or not isinstance(name, str):
                self.add(where, "missing group name")
            elif name in seen:
                self.add(where, "duplicate group name")
            else:
                seen.add(name)
            self._group(where, group)
        return self.problems

    def _group(self, where: str, group: dict[str, Any]) -> None:
        count = group["Count"]
        if not _is_int(count):
            self.add(where, f"count must be a whole number, got {count!r}")
        elif count < 0:
            self.add(where, f"count must not be negative, got {count}")
        self._string_map(where, "Meta", group["Meta"])
        self._constraints(where, group["Constraints"])
        self._restart(where, group["RestartPolicy"])
        tasks = group["Tasks"]
        if not isinstance(tasks, list):
            self.add(where, "Tasks must be a list")
            return
        if not tasks:
            self.add(where, "group has no tasks")
        seen: set[str] = set()
        for i, task in enumerate(tasks):
            if not isinstance(task, dict):
                self.add(f"{where} task {i}", "must be an object")
                continue
            name = task.get("Name")
            twhere = f"{where} task {name!r}" if name else f"{where} task {i}"
            if not name or not isinstance(name, str):
                self.add(twhere, "missing task name")
            elif name in seen:
                self.add(twhere, "duplicate task name")
            else:
                seen.add(name)
            self._task(twhere, task)

    def _task(self, where: str, task: dict[str, Any]) -> None:
        driver = task.get("Driver")
        if not driver or not isinstance(driver, str):
            self.add(where, "missing driver")
        if not isinstance(task["Config"], dict):
            self.add(where, "Config must be an object")
        self._string_map(where, "Env", task["Env"])
        self._string_map(where, "Meta", task["Meta"])
        self._constraints(where, task["Constraints"])
        self._restart(where, task["RestartPolicy"])
        kill = task["KillTimeout"]
        if not _is_int(kill) or kill < 0:
            self.add(
                where, f"KillTimeout must be a non-negative number of nanoseconds, got {kill!r}"
            )
        if not isinstance(task["Leader"], bool):
            self.add(where, "Leader must be a bool")
        res = task["Resources"]
        if not _is_int(res["CPU"]) or res["CPU"] < 1:
            self.add(where, f"resources: minimum CPU value is 1, got {res['CPU']!r}")
        if not _is_int(res["MemoryMB"]) or res["MemoryMB"] < 10:
            self.add(where, f"resources: minimum MemoryMB value is 10, got {res['MemoryMB']!r}")
        self._identity(where, task["Identity"], default=True)
        idents = task["Identities"]
        if not isinstance(idents, list):
            self.add(where, "Identities must be a list")
            return
        seen: set[Any] = {"default"}
        for ident in idents:
            if not isinstance(ident, dict):
                self.add(where, "each identity must be an object")
                continue
            name = ident.get("Name")
            if name in seen:
                self.add(where, f"duplicate identity name {name!r}")
            seen.add(name)
            self._identity(where, ident, default=False)

    def _identity(self, where: str, ident: dict[str, Any], default: bool) -> None:
        name = ident.get("Name")
        iwhere = f"{where} identity {name!r}"
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
        mode = ident.get("ChangeMode")
        if mode not in IDENTITY_CHANGE_MODES:
            self.add(
                iwhere,
                f"invalid change_mode {mode!r} (expected one of "
                f"{', '.join(IDENTITY_CHANGE_MODES)})",
            )
        if mode == "signal" and not ident.get("ChangeSignal"):
            self.add(iwhere, 'change_signal is required when change_mode is "signal"')
        if ident.get("Filepath") and not ident.get("File"):
            self.add(iwhere, "filepath requires file = true")
        # Unlike Nomad, the default identity may have a ttl: it then carries an exp claim.
        ttl = ident.get("TTL")
        if ttl is not None and (not _is_int(ttl) or ttl < 0):
            self.add(iwhere, f"TTL must be a non-negative number of nanoseconds, got {ttl!r}")

    def _restart(self, where: str, policy: dict[str, Any]) -> None:
        rwhere = f"{where} restart"
        attempts, interval, delay = policy["Attempts"], policy["Interval"], policy["Delay"]
        ok = True
        if not _is_int(attempts) or attempts < 0:
            self.add(rwhere, f"attempts must be a non-negative whole number, got {attempts!r}")
            ok = False
        for key, value in (("Interval", interval), ("Delay", delay)):
            if not _is_int(value) or value < 0:
                self.add(
                    rwhere, f"{key} must be a non-negative number of nanoseconds, got {value!r}"
                )
                ok = False
        if policy["Mode"] not in RESTART_MODES:
            self.add(
                rwhere,
                f"unsupported restart mode {policy['Mode']!r} (expected "
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

    def _constraints(self, where: str, constraints: Any) -> None:
        if not isinstance(constraints, list):
            self.add(where, "Constraints must be a list")
            return
        for c in constraints:
            if not isinstance(c, dict):
                self.add(where, "each constraint must be an object")
                continue
            op = c.get("Operand") or "="
            if op not in CONSTRAINT_OPERANDS:
                self.add(where, f"unknown constraint operator {op!r}")

    def _string_map(self, where: str, key: str, value: Any) -> None:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            self.add(where, f"{key} must be a map of strings")
