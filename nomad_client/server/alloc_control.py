"""A user's stop of one allocation (Nomad's ``Alloc.Stop``, ``/v1/allocation/:id/stop``).

The allocation is marked as Nomad marks it (``DesiredTransition.Migrate``, with the caller's
``NoShutdownDelay`` and ``Reschedule``) and, if it was meant to run, stopped; then its job
is evaluated (``TriggeredBy: alloc-stop``). A stopped allocation holds no slot of its group,
so the scheduler places a replacement under the same name index, for batch jobs too (as
Nomad reschedules a stopped allocation). Its client sees the stop and kills its tasks.
"""

from __future__ import annotations

from typing import Any

import attrs

from nomad_client.server.state import RowUpdate
from nomad_client.structs.models import DESIRED_RUN, DESIRED_STOP, Allocation, DesiredTransition

ALLOC_STOP_TRIGGER = "alloc-stop"
STOPPED_BY_USER = "alloc is being migrated"


def stopped_by_user(*, no_shutdown_delay: bool, reschedule: bool) -> RowUpdate:
    """The row update of a user's stop: the transition always (an allocation already
    stopped or finished is marked too, as Nomad does), the stop when it was to run."""
    transition = DesiredTransition(migrate=True, reschedule=reschedule,
                                   no_shutdown_delay=no_shutdown_delay)

    def apply(current: Allocation | None, index: int) -> Any:
        if current is None:
            return None
        changes: dict[str, Any] = {"desired_transition": transition,
                                   "alloc_modify_index": index}
        if current.desired_status == DESIRED_RUN:
            changes |= {"desired_status": DESIRED_STOP,
                        "desired_description": STOPPED_BY_USER}
        return attrs.evolve(current, **changes)
    return apply
