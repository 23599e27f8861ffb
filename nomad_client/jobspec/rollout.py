"""Defaults and validation of the blocks that say how a group's allocations are sized on disk
and replaced: ``ephemeral_disk`` (group), a task's ``logs`` (kept within that disk),
``migrate`` (group) and ``update`` (job and group), as Nomad's Canonicalize and Validate
treat them; ``canonical`` calls in here for every job.

A group's ``update`` is the job's ``update`` overridden by its own, over Nomad's defaults, for
service and system jobs; batch jobs take none. ``migrate`` is for service jobs only. Canary
deployments are not implemented: a ``canary`` above zero is refused, naming it. Pure
computation.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nomad_client.durations import MINUTE, SECOND
from nomad_client.jobspec.errors import short_repr
from nomad_client.jobspec.walk import object_groups, object_tasks

DEFAULT_DISK_MB = 300
MIN_DISK_MB = 10
HEALTH_CHECKS = ("checks", "task_states", "manual")
MIGRATE_HEALTH_CHECKS = ("checks", "task_states")
UPDATED_TYPES = ("service", "system")

_DISK_DEFAULTS: dict[str, Any] = {"SizeMB": DEFAULT_DISK_MB, "Sticky": False, "Migrate": False}
# A task's log rotation: at most MaxFiles files of MaxFileSizeMB per stream.
LOG_DEFAULTS: dict[str, Any] = {"MaxFiles": 10, "MaxFileSizeMB": 10, "Disabled": False}
_MIGRATE_DEFAULTS: dict[str, Any] = {"MaxParallel": 1, "HealthCheck": "checks",
                                     "MinHealthyTime": 10 * SECOND,
                                     "HealthyDeadline": 5 * MINUTE}
_UPDATE_DEFAULTS: dict[str, Any] = {"Stagger": 30 * SECOND, "MaxParallel": 1,
                                    "HealthCheck": "checks", "MinHealthyTime": 10 * SECOND,
                                    "HealthyDeadline": 5 * MINUTE,
                                    "ProgressDeadline": 10 * MINUTE, "AutoRevert": False,
                                    "AutoPromote": False, "Canary": 0}


def _set(given: Any) -> dict[str, Any]:
    return {k: v for k, v in given.items() if v is not None} if isinstance(given, dict) else {}


def fill_rollout_blocks(job: dict[str, Any]) -> None:
    """Fill every group's ``EphemeralDisk``, and ``Migrate`` and ``Update`` where its job
    type takes them, each over the job's own block (a block written where it is not taken
    is kept, for validation)."""
    job_type = job.get("Type")
    job_update = job.get("Update")
    if job_type in UPDATED_TYPES:
        _fill(job, "Update", _UPDATE_DEFAULTS, keep_unset=True)
    for group in object_groups(job):
        _fill(group, "EphemeralDisk", _DISK_DEFAULTS)
        for task in object_tasks(group):
            _fill(task, "LogConfig", LOG_DEFAULTS)
        if job_type == "service":
            _fill(group, "Migrate", {**_MIGRATE_DEFAULTS, **_set(job.get("Migrate"))})
        if job_type in UPDATED_TYPES:
            _fill(group, "Update", {**_UPDATE_DEFAULTS, **_set(job_update)})


def _fill(holder: dict[str, Any], key: str, defaults: Mapping[str, Any],
          keep_unset: bool = False) -> None:
    """``holder[key]`` over ``defaults``; left alone when it is not an object (validation
    says so), and with ``keep_unset`` when it is not there."""
    given = holder.get(key)
    if (given is None and not keep_unset) or isinstance(given, dict):
        holder[key] = {**defaults, **_set(given)}


def rollout_problems(job: Mapping[str, Any]) -> list[str]:
    """Every problem of a filled job's rollout blocks, each as ``where: message``."""
    job_type = job.get("Type")
    problems: list[str] = []
    if job.get("Update") is not None and job_type not in UPDATED_TYPES:
        problems.append(f"job: Job type {short_repr(job_type)} does not allow update block")
    if job.get("Migrate") is not None and job_type != "service":
        problems.append(f"job: Job type {short_repr(job_type)} does not allow migrate block")
    for group in object_groups(job):
        where = f"group {group.get('Name')!r}"
        disk = group.get("EphemeralDisk")
        problems.extend(f"{where} ephemeral_disk: {p}" for p in _disk(disk))
        for task in object_tasks(group):
            problems.extend(f"{where} task {task.get('Name')!r} logs: {p}"
                            for p in _logs(task.get("LogConfig"), disk))
        migrate = group.get("Migrate")
        if migrate is not None and job_type != "service":
            problems.append(f"{where}: Job type {short_repr(job_type)} does not allow migrate "
                            "block")
        elif migrate is not None:
            problems.extend(f"{where} migrate: {p}" for p in _migrate(migrate))
        update = group.get("Update")
        if update is not None and job_type not in UPDATED_TYPES:
            problems.append(f"{where}: Job type {short_repr(job_type)} does not allow update "
                            "block")
        elif update is not None:
            problems.extend(f"{where} update: {p}" for p in _update(update))
    return problems


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63


def _disk(disk: Any) -> list[str]:
    if not isinstance(disk, dict):
        return ["EphemeralDisk must be an object"]
    size: Any = disk.get("SizeMB")
    if not _whole(size):
        return [f"SizeMB must be a whole number, got {short_repr(size)}"]
    problems = [] if size >= MIN_DISK_MB else [
        f"minimum DiskMB value is {MIN_DISK_MB}; got {size}"]
    problems += [f"{key} must be true or false" for key in ("Sticky", "Migrate")
                 if not isinstance(disk.get(key), bool)]
    return problems


def _logs(logs: Any, disk: Any) -> list[str]:
    """Nomad's checks: at least one file of at least 1 MB, and all of them together less
    than the group's disk."""
    if not isinstance(logs, dict):
        return ["LogConfig must be an object"]
    files: Any = logs.get("MaxFiles")
    size: Any = logs.get("MaxFileSizeMB")
    problems = [] if isinstance(logs.get("Disabled"), bool) else ["Disabled must be true or false"]
    for value, minimum in ((files, "minimum number of files is 1"),
                           (size, "minimum file size is 1MB")):
        if not _whole(value) or value < 1:
            problems.append(f"{minimum}; got {short_repr(value)}")
    disk_mb: Any = disk.get("SizeMB") if isinstance(disk, dict) else None
    if not problems and _whole(disk_mb) and disk_mb <= files * size:
        problems.append(f"log storage ({files * size} MB) must be less than requested disk "
                        f"capacity ({disk_mb} MB)")
    return problems


def _whole_fields(policy: Mapping[str, Any], keys: tuple[str, ...]) -> list[str]:
    return [f"{key} must be a non-negative whole number, got {short_repr(policy.get(key))}"
            for key in keys if not _whole(policy.get(key))]


def _migrate(migrate: Any) -> list[str]:
    """Nomad's MigrateStrategy.Validate: a zero healthy deadline is allowed, and only the
    checks or the task states tell health (no ``manual``)."""
    if not isinstance(migrate, dict):
        return ["Migrate must be an object"]
    problems = _whole_fields(migrate, ("MaxParallel", "MinHealthyTime", "HealthyDeadline"))
    if migrate.get("HealthCheck") not in MIGRATE_HEALTH_CHECKS:
        problems.append(f"Invalid HealthCheck: {short_repr(migrate.get('HealthCheck'))}")
    if not problems and migrate["MinHealthyTime"] > migrate["HealthyDeadline"]:
        problems.append("MinHealthyTime must be less than HealthyDeadline")
    return problems


def _update(update: Any) -> list[str]:
    """Nomad's UpdateStrategy.Validate (its texts), and canaries refused."""
    if not isinstance(update, dict):
        return ["Update must be an object"]
    problems = _whole_fields(update, ("MaxParallel", "MinHealthyTime", "HealthyDeadline",
                                      "Stagger", "ProgressDeadline", "Canary"))
    if update.get("HealthCheck") not in HEALTH_CHECKS:
        problems.append(f"Invalid health check given: {short_repr(update.get('HealthCheck'))}")
    problems += [f"{key} must be true or false" for key in ("AutoRevert", "AutoPromote")
                 if not isinstance(update.get(key), bool)]
    if problems:
        return problems
    healthy, progress = update["HealthyDeadline"], update["ProgressDeadline"]
    if update["Canary"] > 0:
        problems.append("canary deployments are not supported by this agent (canary = "
                        f"{update['Canary']}); set canary = 0")
    elif update["AutoPromote"]:
        problems.append("Auto Promote requires a Canary count greater than zero")
    if healthy <= 0:
        problems.append("Healthy deadline must be greater than zero")
    if update["MinHealthyTime"] >= healthy:
        problems.append("Minimum healthy time must be less than healthy deadline")
    if progress != 0 and healthy >= progress:
        problems.append("Healthy deadline must be less than progress deadline")
    if update["Stagger"] <= 0:
        problems.append("Stagger must be greater than zero")
    return problems
