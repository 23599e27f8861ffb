"""A task's Terminated event as Nomad reports it, an OOM kill included."""

from __future__ import annotations

from nomad_client.allocrunner.taskrunner.task_runner import terminated_event
from nomad_client.client.drivers.base import ExitResult
from nomad_client.structs.codec import to_api


def test_an_oom_kill_is_reported_as_oom_killed() -> None:
    event = to_api(terminated_event(ExitResult(exit_code=137, signal=9, oom_killed=True)))
    assert event["Type"] == "Terminated"
    assert event["Message"] == "OOM Killed"
    assert event["DisplayMessage"] == 'Exit Code: 137, Signal: 9, Exit Message: "OOM Killed"'
    assert event["Details"] == {"exit_code": "137", "signal": "9", "oom_killed": "true",
                                "exit_message": "OOM Killed"}
    assert (event["ExitCode"], event["Signal"]) == (137, 9)


def test_an_ordinary_exit_says_it_was_not_oom_killed() -> None:
    event = to_api(terminated_event(ExitResult(exit_code=3)))
    assert event["Message"] == ""
    assert event["DisplayMessage"] == "Exit Code: 3"
    assert event["Details"] == {"exit_code": "3", "signal": "0", "oom_killed": "false"}


def test_a_driver_error_is_the_exit_message_even_after_an_oom_kill() -> None:
    event = to_api(terminated_event(ExitResult(exit_code=1, err="executor lost",
                                               oom_killed=True)))
    assert event["Message"] == "executor lost"
    assert event["DisplayMessage"] == 'Exit Code: 1, Exit Message: "executor lost"'
    assert event["Details"]["oom_killed"] == "true"
    assert event["Details"]["exit_message"] == "executor lost"
