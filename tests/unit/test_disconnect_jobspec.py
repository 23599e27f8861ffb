"""A group's ``disconnect`` block: decoded into Nomad's API shape, filled and checked as
Nomad's Canonicalize and Validate do."""

from __future__ import annotations

import textwrap
from typing import Any

import pytest

from nomad_client.jobspec import JobValidationError, canonicalize_job, parse_jobspec

HOUR_NS = 3600 * 1_000_000_000


def job_with(disconnect: str, job_type: str = "service") -> dict[str, Any]:
    src = f"""
    job "web" {{
      type = "{job_type}"
      group "g" {{
        disconnect {{
          {disconnect}
        }}
        task "t" {{
          driver = "raw_exec"
          config {{ command = "/bin/true" }}
        }}
      }}
    }}
    """
    return parse_jobspec(textwrap.dedent(src), "test.nomad.hcl")


def group_of(job: dict[str, Any]) -> dict[str, Any]:
    group: dict[str, Any] = job["TaskGroups"][0]
    return group


def test_the_block_decodes_into_nomads_fields() -> None:
    job = job_with('lost_after = "1h"\nreplace = false\nreconcile = "keep_replacement"')
    assert group_of(job)["Disconnect"] == {"LostAfter": HOUR_NS, "Replace": False,
                                           "Reconcile": "keep_replacement",
                                           "StopOnClientAfter": None}
    assert group_of(canonicalize_job(job))["Disconnect"]["LostAfter"] == HOUR_NS


def test_an_empty_block_gets_nomads_defaults() -> None:
    filled = group_of(canonicalize_job(job_with("")))
    assert filled["Disconnect"] == {"LostAfter": 0, "Replace": True,
                                    "Reconcile": "best_score", "StopOnClientAfter": None}


def test_a_group_without_the_block_has_none() -> None:
    job = job_with("")
    del group_of(job)["Disconnect"]
    assert group_of(canonicalize_job(job))["Disconnect"] is None


def test_stop_on_client_after_is_decoded() -> None:
    filled = group_of(canonicalize_job(job_with('stop_on_client_after = "90s"')))
    assert filled["Disconnect"]["StopOnClientAfter"] == 90 * 1_000_000_000


@pytest.mark.parametrize(("body", "job_type", "message"), [
    ('reconcile = "newest"', "service", "reconcile option is invalid: newest"),
    ('lost_after = "-1m"', "service", "lost_after cannot be a negative duration"),
    ('stop_on_client_after = "-1m"', "service", "stop_after cannot be a negative duration"),
    ('stop_on_client_after = "1m"', "system",
     "stop_after can only be used with service or batch job types"),
    ('lost_after = "1h"\nstop_on_client_after = "1m"', "batch",
     "Disconnect cannot be configured with both lost_after and stop_after"),
])
def test_nomads_validation_messages(body: str, job_type: str, message: str) -> None:
    with pytest.raises(JobValidationError) as caught:
        canonicalize_job(job_with(body, job_type))
    assert f"group 'g' disconnect: {message}" in caught.value.problems


def test_a_bad_value_is_refused_at_decode_time_with_its_path() -> None:
    with pytest.raises(Exception, match=r"disconnect\.replace: expected true or false"):
        job_with('replace = "sometimes"')


def test_an_unknown_key_in_the_block_is_refused() -> None:
    with pytest.raises(Exception, match=r"unknown attribute 'max_lost'"):
        job_with('max_lost = "1h"')


def test_a_json_job_with_a_mistyped_block_gets_a_clear_error() -> None:
    job = canonicalize_job(job_with(""))
    group_of(job)["Disconnect"] = {"LostAfter": "soon", "Replace": True,
                                   "Reconcile": "best_score"}
    with pytest.raises(JobValidationError, match="LostAfter must be a duration"):
        canonicalize_job(job)
