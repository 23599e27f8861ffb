"""How many Task API requests were answered, by HTTP status (``/v1/metrics``'s
``nomad.client.task_api.requests``). One process-wide tally, as a metrics sink is: counted
on the request path with one dict update, read when metrics are asked for."""

from __future__ import annotations


class StatusCounts:
    def __init__(self) -> None:
        self._counts: dict[int, int] = {}

    def count(self, status: int) -> None:
        self._counts[status] = self._counts.get(status, 0) + 1

    def snapshot(self) -> dict[int, int]:
        return dict(self._counts)


TASK_API_REQUESTS = StatusCounts()
