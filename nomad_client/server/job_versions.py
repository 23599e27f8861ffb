"""A job's versions: when a registration makes a new one, the bounded history of them, and the
register-time checks that speak of versions and indexes (``EnforceIndex``, revert's
``EnforcePriorVersion``), with Nomad's error texts, and a version's ``Stable`` mark.

A registration that changes nothing but what the server sets (Nomad's ``SpecChanged``) keeps
the job as it is: same ``Version``, same ``JobModifyIndex``. Any other bumps ``Version`` and
is recorded in the job's history row (``state.JOB_VERSIONS``, keyed like the job: the newest
``tracked`` versions, newest first). Pure functions over job dicts; the server calls them
under the store's write lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Job = Mapping[str, Any]

# Nomad's default ``server { job_tracked_versions }``.
DEFAULT_TRACKED_VERSIONS = 6
# Nomad's RegisterEnforceIndexErrPrefix: `nomad job run -check-index` looks for it.
ENFORCE_INDEX_PREFIX = "Enforcing job modify index"
# What the server sets on a job: a change only here is no change of the job.
_SERVER_SET = frozenset({"Status", "StatusDescription", "Stable", "Version", "CreateIndex",
                         "ModifyIndex", "JobModifyIndex", "SubmitTime"})


class VersionConflict(ValueError):
    """A write that names an index or version the job no longer has (Nomad's message)."""


class VersionNotFound(LookupError):
    """No such job, or no such version of it, to read or revert to (Nomad's message)."""


def job_modify_index(job: Job) -> int:
    """The index of the job's last version change (rows older than versions: ModifyIndex)."""
    return int(job.get("JobModifyIndex") or job.get("ModifyIndex") or 0)


def spec_changed(previous: Job | None, job: Job) -> bool:
    """Whether ``job`` differs from ``previous`` in more than what the server sets."""
    if previous is None:
        return True
    return _spec(previous) != _spec(job)


def _spec(job: Job) -> dict[str, Any]:
    return {k: v for k, v in job.items() if k not in _SERVER_SET}


def check_enforced_index(previous: Job | None, expected: int) -> None:
    """``EnforceIndex``: the caller's ``JobModifyIndex`` must be the job's (0: no job)."""
    if previous is not None:
        current = job_modify_index(previous)
        if expected == 0:
            raise VersionConflict(f"{ENFORCE_INDEX_PREFIX} 0: job already exists")
        if expected != current:
            raise VersionConflict(f"{ENFORCE_INDEX_PREFIX} {expected}: job exists with "
                                  f"conflicting job modify index: {current}")
    elif expected != 0:
        raise VersionConflict(f"{ENFORCE_INDEX_PREFIX} {expected}: job does not exist")


def versioned(previous: Job | None, job: Mapping[str, Any], index: int) -> dict[str, Any]:
    """``job`` as the next version after ``previous``, written at ``index``."""
    version = int(previous.get("Version", 0)) + 1 if previous is not None else 0
    create_index = previous.get("CreateIndex", index) if previous is not None else index
    return {**job, "Version": version, "JobModifyIndex": index, "CreateIndex": create_index,
            "ModifyIndex": index}


def with_version(history: Job | None, previous: Job | None, job: Job, tracked: int,
                 submission: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The history row ``history`` with ``job`` as its newest version after ``previous``,
    ``tracked`` kept, and the sources they were submitted as (``submission``: ``job``'s, if
    it had one)."""
    # The previous version may have been made elsewhere (a scaling): it is kept too.
    candidates = [dict(job), *([dict(previous)] if previous is not None else []),
                  *(history or {}).get("Versions", ())]
    seen: set[Any] = set()
    kept = []
    for version in candidates:
        if version.get("Version") not in seen:
            seen.add(version.get("Version"))
            kept.append(version)
    kept = sorted(kept, key=lambda v: -int(v.get("Version", 0)))[:max(tracked, 1)]
    sources = {**(history or {}).get("Submissions", {})}
    if submission is not None:
        sources[str(job.get("Version", 0))] = dict(submission)
    alive = {str(v.get("Version", 0)) for v in kept}
    return {"Versions": kept,
            "Submissions": {k: v for k, v in sources.items() if k in alive}}


def submission_of(history: Job | None, version: int) -> dict[str, Any] | None:
    """The source ``version`` was submitted as (None: none was sent, or it is gone)."""
    found = (history or {}).get("Submissions", {}).get(str(version))
    return dict(found) if found is not None else None


def versions(current: Job, history: Job | None) -> list[dict[str, Any]]:
    """Every version kept of ``current`` (the job as it is now first), newest first."""
    older = [dict(v) for v in (history or {}).get("Versions", ())
             if v.get("Version") != current.get("Version")]
    return sorted([dict(current), *older], key=lambda v: -int(v.get("Version", 0)))


def find_version(current: Job, history: Job | None, version: int) -> dict[str, Any] | None:
    return next((v for v in versions(current, history) if v.get("Version") == version), None)


def revert_target(current: Job | None, history: Job | None, job_id: str, namespace: str,
                  version: int, enforce_prior: int | None) -> dict[str, Any]:
    """What to register again for a revert to ``version``, after Nomad's checks in Nomad's
    order."""
    if current is None:
        raise VersionNotFound(f'job "{job_id}" not found')
    if current.get("Version") == version:
        raise VersionConflict("can't revert to current version")
    target = find_version(current, history, version)
    if target is None:
        raise VersionNotFound(f'job "{job_id}" in namespace "{namespace}" at version '
                              f"{version} not found")
    if enforce_prior is not None and current.get("Version") != enforce_prior:
        raise VersionConflict(f"Current job has version {current.get('Version')}; "
                              f"enforcing version {enforce_prior}")
    return _spec(target)


def check_version_kept(current: Job | None, history: Job | None, job_id: str, namespace: str,
                       version: int) -> None:
    """``VersionNotFound`` (Nomad's text) unless the job exists and keeps ``version``."""
    if current is None or find_version(current, history, version) is None:
        raise VersionNotFound(f'job "{job_id}" in namespace "{namespace}" at version '
                              f"{version} not found")


def marked_stable(job: Job | None, version: int, stable: bool, index: int
                  ) -> dict[str, Any] | None:
    """``job`` with ``Stable`` set, if it is ``version`` and not already so (else None:
    nothing to write). As in Nomad, only ``ModifyIndex`` moves: it is no new version."""
    if job is None or job.get("Version") != version or bool(job.get("Stable")) == stable:
        return None
    return {**job, "Stable": stable, "ModifyIndex": index}


def history_marked_stable(history: Job | None, version: int, stable: bool, index: int
                          ) -> dict[str, Any] | None:
    """The history row with its copy of ``version`` marked (None: nothing to change)."""
    if history is None:
        return None
    kept = history.get("Versions", ())
    changed = [marked_stable(v, version, stable, index) for v in kept]
    if not any(changed):
        return None
    marked = [new or dict(old) for new, old in zip(changed, kept, strict=True)]
    return {**history, "Versions": marked}
