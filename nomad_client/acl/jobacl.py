"""Which policies a workload identity gets: a policy's JobACL names the workloads it is
attached to (a namespace, optionally narrowed to a job, a group, a task). Pure functions.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class JobACL:
    namespace: str = ""
    job_id: str = ""
    group: str = ""
    task: str = ""


def job_acl_matches(
    job_acl: JobACL, *, namespace: str, job_id: str, group: str, task: str
) -> bool:
    """Whether a policy attached by ``job_acl`` applies to the workload: the namespace
    must be equal (no globs); an empty job, group or task part covers everything below it.
    ``job_id`` is the parent job of dispatched and periodic children; ``task`` is empty for
    service identities, so task-scoped policies never match them."""
    if not job_acl.namespace or job_acl.namespace != namespace:
        return False
    if not job_acl.job_id:
        return True
    if job_acl.job_id != job_id:
        return False
    if not job_acl.group:
        return True
    return job_acl.group == group and job_acl.task in ("", task)


def validate_job_acl(job_acl: JobACL) -> list[str]:
    """Nomad's errors for a JobACL whose parts skip a level (each needs the one above)."""
    problems = []
    if job_acl.job_id and not job_acl.namespace:
        problems.append("namespace must be set to set job ID")
    if job_acl.group and not job_acl.job_id:
        problems.append("job ID must be set to set group")
    if job_acl.task and not job_acl.group:
        problems.append("group must be set to set task")
    return problems
