"""Nomad namespaces on the server: validation, writes, the refusals of a delete, and what a
namespace admits of a job.

The default namespace exists from the start (a seed row of the state store), may be
updated and is never deleted. Every check that depends on other rows (a namespace being
deleted holds no live job, allocation or variable; a job's namespace exists and allows its
drivers) runs inside a row update under the store's write lock, so a job registered into a
namespace while it is deleted can never slip between the two. Errors carry Nomad's texts
and the HTTP status they map to (Nomad answers most with 500; they are the caller's doing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from nomad_client.server.acls import multierror
from nomad_client.server.state import (
    DELETE,
    JOBS,
    NAMESPACES,
    VARIABLES,
    StateStore,
)
from nomad_client.structs.jobs import iter_groups
from nomad_client.structs.models import Allocation, Variable
from nomad_client.structs.namespaces import (
    DEFAULT_NAMESPACE,
    MAX_DESCRIPTION_LENGTH,
    NAMESPACE_NAME,
    NAMESPACE_NAME_RULE,
    Namespace,
    job_namespace,
    quoted,
    task_api_mode_problem,
)


class NamespaceError(Exception):
    """A namespace operation (or a job's admission) refused; ``status`` is its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def validate_namespace(namespace: Namespace) -> None:
    """Nomad's ``Namespace.Validate`` and the CE checks of its endpoint (no quotas here)."""
    problems = []
    if not NAMESPACE_NAME.fullmatch(namespace.name):
        problems.append(f"invalid name {quoted(namespace.name)}. Must match regex "
                        f"{NAMESPACE_NAME_RULE}")
    if len(namespace.description) > MAX_DESCRIPTION_LENGTH:
        problems.append(f"description longer than {MAX_DESCRIPTION_LENGTH}")
    if namespace.capabilities is not None:
        mode_problem = task_api_mode_problem(namespace.capabilities.task_api)
        if mode_problem is not None:
            problems.append(f"Capabilities.TaskAPI: {mode_problem}")
    if problems:
        raise NamespaceError(400, f"Invalid namespace {quoted(namespace.name)}: "
                                  + multierror(problems))
    if namespace.quota:
        raise NamespaceError(400, f"namespace {quoted(namespace.name)} using non-existent "
                                  f"quota {quoted(namespace.quota)}")


def admit_job(namespace: Namespace | None, job: Mapping[str, Any]) -> None:
    """Refuse a job whose namespace does not exist or refuses one of its task drivers."""
    name = job_namespace(job)
    if namespace is None:
        raise NamespaceError(400, f"job {quoted(str(job.get('ID', '')))} is in nonexistent "
                                  f"namespace {quoted(name)}")
    drivers = {str(task.get("Driver") or "") for group in iter_groups(job)
               for task in group.get("Tasks") or ()}
    refused = sorted(d for d in drivers - {""} if not namespace.allows_driver(d))
    if len(refused) == 1:
        raise NamespaceError(400, f"used task driver {quoted(refused[0])} is not allowed in "
                                  f"namespace {quoted(name)}")
    if refused:
        listed = " ".join(quoted(d) for d in refused)
        raise NamespaceError(400, f"used task drivers [{listed}] are not allowed in "
                                  f"namespace {quoted(name)}")


class Namespaces:
    """The namespaces table. ``job_status`` is the server's reading of a job's status
    (``dead`` is the only terminal one); ``region`` the one region this server is (Nomad
    names the regions a namespace is still in use in)."""

    def __init__(self, store: StateStore, job_status: Callable[[Mapping[str, Any]], str], *,
                 region: str) -> None:
        self._store = store
        self._job_status = job_status
        self._regions = f"[{region}]"

    def get(self, name: str) -> Namespace | None:
        row: Namespace | None = self._store.get(NAMESPACES, name)
        return row

    def all(self) -> list[Namespace]:
        """Every namespace, by name."""
        return self._store.rows(NAMESPACES)

    async def upsert(self, namespace: Namespace) -> int:
        """Create or replace (whole) a namespace; the write's index."""
        validate_namespace(namespace)
        return await self._store.write({NAMESPACES: [(namespace.name, namespace)]})

    async def delete(self, name: str) -> int:
        if name == DEFAULT_NAMESPACE:
            raise NamespaceError(400, "can not delete default namespace")

        def refuse_unless_empty(current: Namespace | None, index: int) -> Any:
            if current is None:
                raise NamespaceError(404, "namespace not found")
            problems = self._still_in_use(name)
            if problems:
                raise NamespaceError(400, multierror(problems))
            return DELETE

        return await self._store.write(updates={NAMESPACES: [(name, refuse_unless_empty)]})

    def _still_in_use(self, name: str) -> list[str]:
        """Why ``name`` cannot go yet: Nomad's texts. Dead jobs not yet purged do not count."""
        problems = []
        label = f"namespace {quoted(name)}"
        jobs = [j for j in self._store.values(JOBS) if job_namespace(j) == name]
        if any(self._job_status(j) != "dead" for j in jobs):
            problems.append(f"{label} has non-terminal jobs in regions: {self._regions}")
        allocs: list[Allocation] = self._store.values("allocs")
        if any(a.namespace == name and not a.client_terminal() for a in allocs):
            problems.append(f"{label} has non-terminal allocations in regions: {self._regions}")
        variables: list[Variable] = self._store.values(VARIABLES)
        if any(v.namespace == name for v in variables):
            problems.append(f"{label} has variables associated with it in regions: "
                            f"{self._regions}")
        return problems
