"""The fields of Nomad's ``api.Job``, ``api.TaskGroup`` and ``api.Task`` that a filled-in job
has nothing else for, at the value Go encodes for an unset field: clients that decode our
jobs into Nomad's structs (and people comparing) see every field Nomad has.

Only absent keys are added: whatever the jobspec or the other fillers set stays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nomad_client.jobspec.walk import object_groups, object_tasks

JOB_ZEROS: Mapping[str, Any] = {
    "AllAtOnce": False, "Affinities": None, "Spreads": None, "Update": None,
    "Multiregion": None, "Reschedule": None, "Migrate": None, "UI": None, "ParentID": "",
    "Dispatched": False, "DispatchIdempotencyToken": "", "Payload": None,
    "ConsulNamespace": "", "VaultNamespace": "", "NomadTokenID": "", "StatusDescription": "",
    "Stable": False, "VersionTag": None,
}
GROUP_ZEROS: Mapping[str, Any] = {
    "Affinities": None, "Spreads": None, "Volumes": None, "Disconnect": None,
    "ShutdownDelay": None, "MaxRunDuration": None, "StopAfterClientDisconnect": None,
    "MaxClientDisconnect": None, "Consul": None, "PreventRescheduleOnLost": False,
}
TASK_ZEROS: Mapping[str, Any] = {
    "Lifecycle": None, "Affinities": None, "LogConfig": None, "Artifacts": None,
    "Vault": None, "Consul": None, "Templates": None, "VolumeMounts": None,
    "ShutdownDelay": 0, "KillSignal": "", "Kind": "", "ScalingPolicies": None,
    "Secrets": None, "Actions": None, "Schedule": None,
}


def _add_absent(d: dict[str, Any], zeros: Mapping[str, Any]) -> None:
    for key, zero in zeros.items():
        d.setdefault(key, zero)


def fill_api_zeros(job: dict[str, Any]) -> None:
    """Add the Go zero value of each of Nomad's Job, TaskGroup and Task fields ``job``
    lacks (in place; a malformed part is left to the checks)."""
    _add_absent(job, JOB_ZEROS)
    for group in object_groups(job):
        _add_absent(group, GROUP_ZEROS)
        for task in object_tasks(group):
            _add_absent(task, TASK_ZEROS)
