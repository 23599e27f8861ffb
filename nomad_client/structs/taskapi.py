"""Names shared by everything that decides whether a task gets a Task API socket: the agent's
``client { task_api { default_mode } }``, a namespace's ``Capabilities.TaskAPI`` and a task's
own ``task_api`` block."""

from __future__ import annotations

# A namespace's Task API capability (Capabilities.TaskAPI); "" (unset) defers to the agent.
TASK_API_ENABLED = "enabled"
TASK_API_DISABLED = "disabled"
TASK_API_OPT_IN = "opt_in"
NAMESPACE_TASK_API_MODES = (TASK_API_ENABLED, TASK_API_DISABLED, TASK_API_OPT_IN)
# The agent's default_mode.
AGENT_DEFAULT_MODES = (TASK_API_ENABLED, TASK_API_OPT_IN)
