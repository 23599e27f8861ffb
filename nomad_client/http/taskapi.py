"""The HTTP layer's side of the Task API: serves a task's socket through the agent's one
router, as that task's Task API listener.

The alloc runner's Task API hook decides when a task has a socket and creates it safely; it
reaches this module only through the ``TaskSocketServer`` interface, so the alloc runner
never loads the HTTP layer.
"""

from __future__ import annotations

import socket

from nomad_client.http.context import ListenerContext
from nomad_client.http.listeners import Listener
from nomad_client.http.router import Router

TASK_API_LISTENER_NAME = "task-api"


class TaskAPIServer:
    """Implements ``allocrunner.hooks.TaskSocketServer`` with one ``Listener`` per socket."""

    def __init__(self, router: Router) -> None:
        self._router = router

    async def serve(self, sock: socket.socket, alloc_id: str, task: str) -> Listener:
        # task_api=True: a credential is always required and the anonymous policy never applies.
        ctx = ListenerContext(name=TASK_API_LISTENER_NAME, task_api=True, alloc_id=alloc_id,
                              task=task)
        listener = Listener(self._router, ctx, sock)
        try:
            await listener.start()
        except BaseException:
            await listener.close()  # the socket is ours from the call on: never leak it
            raise
        return listener
