"""Which jobs a user's re-evaluation of one node evaluates (Nomad's ``Node.Evaluate``,
``PUT /v1/node/:id/evaluate``): every job with an allocation on the node that may still
matter there, then every live system job the node could run, each job once.

Pure over the node, its allocations and the jobs; the server makes the evaluations
(``TriggeredBy: node-update``, naming the node).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from typing import Any

from nomad_client.structs.models import Allocation, Node
from nomad_client.structs.namespaces import job_namespace

JobRef = tuple[str, str]  # (namespace, job ID)


def _alloc_matters(alloc: Allocation) -> bool:
    """As Nomad: a service allocation unless stopped on both sides, a batch one unless
    terminal on either; system and sysbatch jobs are the second pass's (sysbatch: never)."""
    kind = alloc.job.get("Type", "service")
    if kind == "service":
        return not (alloc.server_terminal() and alloc.client_terminal())
    if kind == "batch":
        return not alloc.terminal()
    return False


def _system_job_fits(job: Mapping[str, Any], node: Node) -> bool:
    """A live system job whose node pool and datacenters include the node (the cheap part of
    feasibility, as Nomad checks before evaluating)."""
    if job.get("Type") != "system" or job.get("Stop"):
        return False
    if (job.get("NodePool") or "default") not in ("all", node.node_pool):
        return False
    return any(fnmatch.fnmatchcase(node.datacenter, dc)
               for dc in job.get("Datacenters") or ["*"])


def jobs_to_evaluate(node: Node, allocs: Iterable[Allocation],
                     jobs: Iterable[Mapping[str, Any]]) -> list[JobRef]:
    """The jobs to evaluate for ``node``, in Nomad's order: its allocations' jobs, then
    the system jobs that fit it."""
    wanted: dict[JobRef, None] = {}
    for alloc in allocs:
        if alloc.node_id == node.id and _alloc_matters(alloc):
            wanted.setdefault((alloc.namespace, alloc.job_id), None)
    for job in jobs:
        if _system_job_fits(job, node):
            wanted.setdefault((job_namespace(job), job["ID"]), None)
    return list(wanted)
