"""The built-in hooks, in run order: what the client gives every alloc runner (through
``AllocRunnerConfig``). The runners themselves know no hook by name."""

from __future__ import annotations

import functools

from nomad_client.allocrunner.alloc_dir_hook import AllocDirHook
from nomad_client.allocrunner.checks import CheckResults
from nomad_client.allocrunner.hooks import AllocHookFactory, TaskHookFactory
from nomad_client.allocrunner.service_hook import ServiceCatalog, ServiceHook
from nomad_client.allocrunner.taskapi_hook import TaskAPIHook
from nomad_client.allocrunner.taskrunner.dispatch_payload_hook import DispatchPayloadHook
from nomad_client.allocrunner.taskrunner.identity_hook import IdentityHook
from nomad_client.allocrunner.taskrunner.task_dir_hook import TaskDirHook

# alloc_dir first: the Task API's sockets and staging dir live inside the alloc dir.
BUILTIN_ALLOC_HOOKS: tuple[AllocHookFactory, ...] = (AllocDirHook, TaskAPIHook)
# task_dir first: the identity hook writes its token file into the task's secrets dir, the
# dispatch_payload hook a dispatched job's payload into its local dir.
BUILTIN_TASK_HOOKS: tuple[TaskHookFactory, ...] = (TaskDirHook, IdentityHook,
                                                   DispatchPayloadHook)


def builtin_alloc_hooks(catalog: ServiceCatalog, checks: CheckResults
                        ) -> tuple[AllocHookFactory, ...]:
    """A client's alloc hooks: ``BUILTIN_ALLOC_HOOKS``, then the service hook, made with
    the client's way to the servers' service catalog and its check results."""
    return (*BUILTIN_ALLOC_HOOKS,
            functools.partial(ServiceHook, catalog=catalog, checks=checks))
