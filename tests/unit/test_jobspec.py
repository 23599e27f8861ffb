"""Tests for the HCL2 jobspec parser and job canonicalization."""

from __future__ import annotations

import copy
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nomad_client.jobspec import (
    DurationError,
    JobspecError,
    JobValidationError,
    canonicalize_job,
    format_duration,
    parse_duration_ns,
    parse_jobspec,
    parse_var_assignments,
)

JOBS = Path(__file__).resolve().parents[2] / "testdata" / "jobs"
S = 1_000_000_000
MIN = 60 * S
H = 60 * MIN

JOB_KEYS = {
    "ID", "Name", "Type", "Namespace", "Region", "Priority", "Datacenters", "NodePool", "Meta",
    "Constraints", "TaskGroups",
}
GROUP_KEYS = {
    "Name", "Count", "Constraints", "Meta", "RestartPolicy", "ReschedulePolicy", "Tasks",
}
TASK_KEYS = {
    "Name", "Driver", "User", "Config", "Env", "Meta", "Constraints", "Resources",
    "RestartPolicy", "KillTimeout", "Leader", "Identity", "Identities", "TaskAPI",
}
IDENTITY_KEYS = {
    "Name", "Audience", "Env", "File", "Filepath", "TTL", "ChangeMode", "ChangeSignal",
}


def parse(src: str, **kwargs: Any) -> dict[str, Any]:
    return parse_jobspec(textwrap.dedent(src), "test.nomad.hcl", **kwargs)


def task_job(task_body: str, extra_task: str = "", group_body: str = "") -> str:
    """A one-group, one-task job with ``task_body`` inside the task block."""
    return (
        'job "j" {\n'
        '  group "g" {\n'
        f"{group_body}\n"
        '    task "t" {\n'
        '      driver = "raw_exec"\n'
        f"{task_body}\n"
        "    }\n"
        f"{extra_task}\n"
        "  }\n"
        "}\n"
    )


def first_task(job: dict[str, Any]) -> dict[str, Any]:
    return job["TaskGroups"][0]["Tasks"][0]


def parse_error(src: str, **kwargs: Any) -> JobspecError:
    with pytest.raises(JobspecError) as info:
        parse(src, **kwargs)
    return info.value


# --------------------------------------------------------------------------- test data files


# The optional blocks an example job writes (job keys, group keys): only those are decoded.
EXAMPLE_BLOCKS: dict[str, tuple[set[str], set[str]]] = {
    "example.nomad.hcl": ({"Update", "Migrate"},
                          {"Networks", "Services", "EphemeralDisk"}),
    "taskapi-exec.nomad.hcl": (set(), {"Networks"}),
    "ui-proxy.nomad.hcl": (set(), {"Networks"}),
}


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.hcl")), ids=lambda p: p.name)
def test_every_example_job_parses_and_canonicalizes(path: Path) -> None:
    job = parse_jobspec(path.read_text(), str(path))
    job_blocks, group_blocks = EXAMPLE_BLOCKS.get(path.name, (set(), set()))
    assert set(job) == JOB_KEYS | job_blocks
    for group in job["TaskGroups"]:
        assert set(group) == GROUP_KEYS | group_blocks
        for task in group["Tasks"]:
            assert set(task) == TASK_KEYS
    canonical = canonicalize_job(job)
    assert canonical["ID"] == job["ID"]


@pytest.mark.parametrize("path", sorted((JOBS / "bad").glob("*.hcl")), ids=lambda p: p.name)
def test_every_bad_job_fails_naming_file_and_line(path: Path) -> None:
    with pytest.raises(JobspecError) as info:
        parse_jobspec(path.read_text(), str(path))
    err = info.value
    assert err.filename == str(path)
    assert isinstance(err.line, int) and err.line >= 1
    assert str(err).startswith(f"{path}:{err.line}: ")


def test_hello_job() -> None:
    job = parse_jobspec((JOBS / "hello.nomad.hcl").read_text(), "hello.nomad.hcl")
    assert job["ID"] == "hello"
    assert job["Name"] == "hello"
    assert job["Type"] == "batch"
    assert [g["Name"] for g in job["TaskGroups"]] == ["hello"]
    task = first_task(job)
    assert task["Name"] == "hello"
    assert task["Driver"] == "raw_exec"
    assert task["Config"] == {
        "command": "/bin/sh",
        "args": ["-c", 'echo "hello from ${NOMAD_TASK_NAME}"'],
    }


@pytest.mark.parametrize(
    ("filename", "driver", "config_key", "config_value"),
    [
        ("taskapi-example.docker.nomad.hcl", "docker", "image", "curlimages/curl:7.87.0"),
        ("taskapi-example.nomad.hcl", "raw_exec", "command", "curl"),
    ],
)
def test_taskapi_examples(filename: str, driver: str, config_key: str, config_value: str) -> None:
    job = parse_jobspec((JOBS / filename).read_text(), filename)
    assert job["Type"] == "batch"
    task = first_task(job)
    assert task["Driver"] == driver
    assert task["Config"][config_key] == config_value
    assert task["Config"]["args"] == [
        "--unix-socket", "${NOMAD_SECRETS_DIR}/api.sock",
        "-H", "Authorization: Bearer ${NOMAD_TOKEN}",
        "--data-binary", '{"Meta": {"example": "Hello World!"}}',
        "--fail-with-body",
        "--verbose",
        "localhost/v1/client/metadata",
    ]
    assert task["Identity"]["Env"] is True
    assert task["Identities"] is None


def test_sleep_service_job() -> None:
    job = parse_jobspec((JOBS / "sleep-service.nomad.hcl").read_text(), "sleep.hcl")
    assert job["Type"] == "service"
    assert job["Meta"] == {"owner": "ops", "purpose": "demo"}
    group = job["TaskGroups"][0]
    assert group["RestartPolicy"] == {
        "Attempts": 2, "Interval": 5 * MIN, "Delay": 5 * S, "Mode": "fail",
    }
    task = first_task(job)
    assert task["Config"] == {"command": "/bin/sleep", "args": ["3600"]}
    assert task["KillTimeout"] == 10 * S
    assert task["Resources"] == {"CPU": 100, "MemoryMB": 64}


def test_vars_locals_job() -> None:
    text = (JOBS / "vars-locals.nomad.hcl").read_text()
    job = parse_jobspec(text, "vars.hcl")
    assert job["ID"] == "vars-locals"
    assert job["Name"] == "vars-hello"
    assert job["Datacenters"] == ["*"]
    assert job["TaskGroups"][0]["Count"] == 1
    task = first_task(job)
    assert task["Env"] == {"GREETING": "hello"}
    assert task["Config"]["args"] == [
        "-c",
        'echo "HELLO from vars-hello"\n'
        'echo "running in ${NOMAD_ALLOC_DIR} on ${node.unique.name}"\n',
    ]
    job2 = parse_jobspec(text, "vars.hcl", variables={"greeting": "hi", "count": "3"})
    assert job2["Name"] == "vars-hi"
    assert job2["TaskGroups"][0]["Count"] == 3


# --------------------------------------------------------------------------- shape and defaults


def test_unset_fields_are_none() -> None:
    job = parse('job "x" {\n group "g" {\n  task "t" {\n   driver = "exec"\n  }\n }\n}\n')
    assert job["Name"] == "x"
    for key in ("Type", "Namespace", "Region", "Priority", "Datacenters", "NodePool", "Meta",
                "Constraints"):
        assert job[key] is None, key
    group = job["TaskGroups"][0]
    for key in ("Count", "Constraints", "Meta", "RestartPolicy", "ReschedulePolicy"):
        assert group[key] is None, key
    task = first_task(job)
    for key in ("User", "Config", "Env", "Meta", "Constraints", "Resources", "RestartPolicy",
                "KillTimeout", "Identity", "Identities"):
        assert task[key] is None, key
    assert task["Leader"] is False


def test_job_level_attributes() -> None:
    job = parse(
        """
        job "web" {
          name        = "Web Frontend"
          type        = "system"
          namespace   = "apps"
          region      = "eu"
          priority    = 70
          datacenters = ["dc1", "dc2"]
          node_pool   = "gpu"
          group "g" {
            task "t" {
              driver = "exec"
              user   = "nobody"
              leader = true
            }
          }
        }
        """
    )
    assert {k: job[k] for k in JOB_KEYS - {"TaskGroups", "Meta", "Constraints"}} == {
        "ID": "web", "Name": "Web Frontend", "Type": "system", "Namespace": "apps",
        "Region": "eu", "Priority": 70, "Datacenters": ["dc1", "dc2"], "NodePool": "gpu",
    }
    assert first_task(job)["User"] == "nobody"
    assert first_task(job)["Leader"] is True


def test_count_accepts_numeric_string_like_hcl() -> None:
    job = parse(task_job("", group_body='    count = "4"'))
    assert job["TaskGroups"][0]["Count"] == 4


def test_meta_and_env_accept_block_or_map_attribute() -> None:
    job = parse(
        task_job(
            '      env = { "A.B" = "1", N = 2, T = true }\n'
            "      meta {\n        x = \"y\"\n      }"
        )
    )
    task = first_task(job)
    assert task["Env"] == {"A.B": "1", "N": "2", "T": "true"}
    assert task["Meta"] == {"x": "y"}


def test_meta_block_and_attribute_together_is_error() -> None:
    err = parse_error(task_job('      meta { a = "1" }\n      meta = { b = "2" }'))
    assert "meta" in err.message and "both" in err.message


def test_config_keeps_arbitrary_nesting_and_nested_blocks() -> None:
    job = parse(
        task_job(
            """
      config {
        image   = "redis:7"
        ports   = ["db"]
        labels  = { "com.example/a" = "b", nested = { deep = [1, 2.5, true, null] } }
        mount {
          type   = "bind"
          source = "/a"
        }
        mount {
          type = "tmpfs"
        }
      }"""
        )
    )
    assert first_task(job)["Config"] == {
        "image": "redis:7",
        "ports": ["db"],
        "labels": {"com.example/a": "b", "nested": {"deep": [1, 2.5, True, None]}},
        "mount": [{"type": "bind", "source": "/a"}, {"type": "tmpfs"}],
    }


# --------------------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("text", "ns"),
    [
        ("15s", 15 * S),
        ("1m30s", 90 * S),
        ("250ms", 250_000_000),
        ("1h", H),
        ("1.5h", 90 * MIN),
        ("2h45m10.5s", 2 * H + 45 * MIN + 10 * S + S // 2),
        ("100us", 100_000),
        ("100\u00b5s", 100_000),
        ("7ns", 7),
        ("0", 0),
        ("-5s", -5 * S),
    ],
)
def test_parse_duration(text: str, ns: int) -> None:
    assert parse_duration_ns(text) == ns


@pytest.mark.parametrize("text", ["", "15", "s", "10 s", "1x", "1.2.3s", "--1s", "1h 2m"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(DurationError):
        parse_duration_ns(text)


@pytest.mark.parametrize(
    ("ns", "text"),
    [(0, "0s"), (90 * S, "1m30s"), (H, "1h0m0s"), (1_500_000, "1.5ms"), (42, "42ns"),
     (-2 * S, "-2s"), (3 * H + 500_000_000, "3h0m0.5s")],
)
def test_format_duration_matches_go(ns: int, text: str) -> None:
    assert format_duration(ns) == text


@given(st.integers(min_value=-(10**15), max_value=10**15))
def test_duration_round_trip(ns: int) -> None:
    assert parse_duration_ns(format_duration(ns)) == ns


@given(
    st.lists(
        st.tuples(st.integers(min_value=0, max_value=10_000),
                  st.sampled_from(["ns", "us", "ms", "s", "m", "h"])),
        min_size=1, max_size=5,
    )
)
def test_duration_components_add_up(parts: list[tuple[int, str]]) -> None:
    unit_ns = {"ns": 1, "us": 1_000, "ms": 1_000_000, "s": S, "m": MIN, "h": H}
    text = "".join(f"{n}{u}" for n, u in parts)
    assert parse_duration_ns(text) == sum(n * unit_ns[u] for n, u in parts)


def test_bad_duration_names_key_and_line() -> None:
    err = parse_error(task_job('      kill_timeout = "ten seconds"'))
    assert err.line == 6
    assert err.message.startswith("job.group[g].task[t].kill_timeout: invalid duration")


def test_duration_must_be_string() -> None:
    err = parse_error(task_job("      kill_timeout = 10"))
    assert "kill_timeout" in err.message and "duration string" in err.message


# --------------------------------------------------------------------------- variables


VARS_JOB = """
variable "image" {
  type    = string
  default = "redis:7"
}
variable "replicas" {
  type    = number
  default = 2
}
variable "tags" {
  type    = list(string)
  default = ["a"]
}
job "v" {
  datacenters = var.tags
  group "g" {
    count = var.replicas
    task "t" {
      driver = "docker"
      config {
        image = var.image
        label = "img=${var.image} n=${var.replicas}"
      }
    }
  }
}
"""


def test_variable_defaults() -> None:
    job = parse(VARS_JOB)
    assert first_task(job)["Config"] == {"image": "redis:7", "label": "img=redis:7 n=2"}
    assert job["TaskGroups"][0]["Count"] == 2
    assert job["Datacenters"] == ["a"]


def test_variables_override_defaults_and_are_converted_to_declared_type() -> None:
    job = parse(VARS_JOB, variables={"image": "nginx", "replicas": "5", "tags": '["x", "y"]'})
    assert first_task(job)["Config"]["image"] == "nginx"
    assert job["TaskGroups"][0]["Count"] == 5
    assert job["Datacenters"] == ["x", "y"]


def test_var_file_overrides_defaults_and_cli_overrides_var_file() -> None:
    var_file = 'image = "from-file"\nreplicas = 7\n'
    job = parse(VARS_JOB, var_files_text=var_file)
    assert first_task(job)["Config"]["image"] == "from-file"
    assert job["TaskGroups"][0]["Count"] == 7
    job = parse(VARS_JOB, var_files_text=var_file, variables={"image": "from-cli"})
    assert first_task(job)["Config"]["image"] == "from-cli"
    assert job["TaskGroups"][0]["Count"] == 7


def test_variable_without_default_must_be_supplied() -> None:
    job_src = task_job("").replace('job "j" {', 'job "j" {\n region = var.region')
    src = 'variable "region" {}\n' + job_src
    err = parse_error(src)
    assert "'region'" in err.message and "no default" in err.message
    assert err.line == 1
    assert parse(src, variables={"region": "eu"})["Region"] == "eu"


def test_undeclared_variable_supplied_is_error() -> None:
    err = parse_error(VARS_JOB, variables={"nope": "1"})
    assert "undeclared variable 'nope'" in err.message


def test_undeclared_variable_in_var_file_is_error() -> None:
    err = parse_error(VARS_JOB, var_files_text='image = "x"\nmystery = 1\n')
    assert err.filename == "<var-file>"
    assert err.line == 2
    assert "mystery" in err.message


def test_later_var_file_wins_and_files_may_set_the_same_variable() -> None:
    files = [("a.hcl", 'image = "from-a"\nreplicas = 3\n'), ("b.hcl", 'image = "from-b"\n')]
    job = parse(VARS_JOB, var_files=files)
    assert first_task(job)["Config"]["image"] == "from-b"
    assert job["TaskGroups"][0]["Count"] == 3
    job = parse(VARS_JOB, var_files=files, variables={"image": "from-cli"})
    assert first_task(job)["Config"]["image"] == "from-cli"


def test_var_files_come_after_var_files_text() -> None:
    job = parse(VARS_JOB, var_files_text="replicas = 4\n", var_files=[("a.hcl", "replicas = 5\n")])
    assert job["TaskGroups"][0]["Count"] == 5


@pytest.mark.parametrize(
    ("second", "line", "fragment"),
    [
        ('\n\nmystery = 1\n', 3, "undeclared variable 'mystery'"),
        ('image = "x"\nreplicas = "many"\n', 2, "replicas: expected a value of type number"),
        ('image = "x"\nimage = "y"\n', 2, "set more than once"),
        ('\n\nimage = \n', 3, "syntax error"),
    ],
)
def test_var_file_errors_name_that_file_and_its_own_line(
    second: str, line: int, fragment: str
) -> None:
    files = [("a.hcl", 'image = "a"\nreplicas = 1\n'), ("b.hcl", second)]
    err = parse_error(VARS_JOB, var_files=files)
    assert (err.filename, err.line) == ("b.hcl", line)
    assert fragment in err.message


def test_malformed_var_files_argument_is_jobspec_error() -> None:
    with pytest.raises(JobspecError, match="pair of strings"):
        parse(VARS_JOB, var_files=[("a.hcl", 1)])  # type: ignore[list-item]
    with pytest.raises(JobspecError, match="must be text"):
        parse(VARS_JOB, var_files_text=["x"])  # type: ignore[arg-type]


def test_reference_to_undeclared_variable_is_error() -> None:
    err = parse_error(task_job("      user = var.who"))
    assert "var.who" in err.message
    assert err.line == 6


def test_variable_value_of_wrong_type_is_error() -> None:
    err = parse_error(VARS_JOB, variables={"replicas": '"many"'})
    assert "replicas" in err.message and "number" in err.message


def test_parse_var_assignments() -> None:
    assert parse_var_assignments(["a=1", "b=x=y", "c=", "a=2"]) == {"a": "2", "b": "x=y", "c": ""}
    with pytest.raises(JobspecError, match="expected NAME=VALUE"):
        parse_var_assignments(["novalue"])
    with pytest.raises(JobspecError, match="not a valid name"):
        parse_var_assignments(["=x"])


# --------------------------------------------------------------------------- locals


def test_locals_refer_to_vars_and_other_locals_in_any_order() -> None:
    job = parse(
        """
        variable "env" { default = "prod" }
        locals {
          full = "${local.prefix}-${var.env}"
        }
        locals {
          prefix = "app"
          n      = 2 * 3 + 1
        }
        job "l" {
          name = local.full
          group "g" {
            count = local.n
            task "t" { driver = "exec" }
          }
        }
        """
    )
    assert job["Name"] == "app-prod"
    assert job["TaskGroups"][0]["Count"] == 7


def test_local_cycle_is_error() -> None:
    err = parse_error('locals {\n  a = local.b\n  b = local.a\n}\n' + task_job(""))
    assert "cycle" in err.message


def test_undefined_local_is_error() -> None:
    err = parse_error(task_job("      user = local.missing"))
    assert "local.missing" in err.message


def test_duplicate_local_is_error() -> None:
    err = parse_error('locals { a = 1 }\nlocals { a = 2 }\n' + task_job(""))
    assert "'a'" in err.message and err.line == 2


def test_long_chain_of_locals_in_reverse_order_evaluates() -> None:
    lines = [f"  l{i} = local.l{i + 1}" for i in range(300)] + ['  l300 = "end"']
    src = "locals {\n" + "\n".join(lines) + "\n}\n" + task_job("      user = local.l0")
    assert first_task(parse(src))["User"] == "end"


def test_local_mentioned_only_in_text_is_not_a_cycle() -> None:
    src = 'locals {\n  a = "local.b is text"\n  b = local.a\n}\n' + task_job(
        "      user = local.b"
    )
    assert first_task(parse(src))["User"] == "local.b is text"


# --------------------------------------------------------------------------- limits


def locals_job(lines: list[str], task_body: str = "") -> str:
    """A job after a ``locals`` block holding ``lines`` (line i of the list is line i + 2)."""
    return "locals {\n" + "\n".join(lines) + "\n}\n" + task_job(task_body)


def doubling(first: str, step: str, count: int) -> list[str]:
    """``l0 = first`` then ``l{i} = step`` with ``{p}`` standing for ``local.l{i-1}``."""
    return [f"l0 = {first}"] + [
        f"l{i} = " + step.replace("{p}", f"local.l{i - 1}") for i in range(1, count)
    ]


@pytest.mark.timeout(30)
def test_string_doubling_stops_at_the_string_limit() -> None:
    # "ab" doubled 19 times is exactly 1 MiB; once more is too long.
    err = parse_error(locals_job(doubling('"ab"', '"${{p}}${{p}}"', 24)))
    assert (err.filename, err.line) == ("test.nomad.hcl", 22)
    assert "string would be 2097152 characters long; the limit is 1 MiB" in err.message


@pytest.mark.timeout(30)
def test_heredoc_doubling_stops_at_the_string_limit() -> None:
    lines = ['l0 = "ab"'] + [
        f"l{i} = <<EOF\n${{local.l{i - 1}}}${{local.l{i - 1}}}\nEOF" for i in range(1, 24)
    ]
    err = parse_error(locals_job(lines))
    assert "the limit is 1 MiB" in err.message and err.line is not None


@pytest.mark.timeout(30)
def test_integer_squaring_stops_at_the_integer_limit() -> None:
    # 3**128 has 203 bits; 3**256 would have 406.
    err = parse_error(locals_job(doubling("3", "{p} * {p}", 14)))
    assert err.line == 10
    assert "local.l7 * local.l7: number is larger than the limit of 256 bits" in err.message


@pytest.mark.timeout(30)
def test_concat_doubling_stops_at_the_element_limit() -> None:
    err = parse_error(locals_job(doubling("[1]", "concat({p}, {p})", 20)))
    assert err.line == 16
    assert "concat(): list would have 16384 elements; the limit is 10000" in err.message


@pytest.mark.timeout(30)
def test_nested_doubling_stops_at_the_size_limit() -> None:
    # Every level is a two-element list, but its copies in JSON would double each time.
    err = parse_error(locals_job(doubling('["x"]', "[{p}, {p}]", 40)))
    assert "larger than the limit of 4 MiB" in err.message and err.line == 23


@pytest.mark.timeout(30)
def test_value_nesting_through_locals_is_limited() -> None:
    err = parse_error(locals_job(doubling("1", "[{p}]", 40)))
    assert "nested more than 32 levels deep" in err.message and err.line == 35


@pytest.mark.timeout(30)
@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        ([f'  s = "{"x" * 2000}"', '  out = replace(local.s, "", local.s)'],
         "replace(): string would be 4004000 characters long"),
        # 1024 copies of a 2000-character string, joined.
        ([f'  s = "{"x" * 2000}"', "  m0 = [local.s]",
          *[f"  m{i} = concat(local.m{i - 1}, local.m{i - 1})" for i in range(1, 11)],
          '  out = join("", local.m10)'],
         "join(): string would be 2048000 characters long"),
        ([f'  s = "{"x" * 11000}"', '  out = split("x", local.s)'],
         "split(): list would have 11001 elements; the limit is 10000"),
    ],
)
def test_functions_refuse_oversized_results_before_building_them(
    lines: list[str], fragment: str
) -> None:
    err = parse_error(locals_job(lines))
    assert fragment in err.message and err.line == len(lines) + 1


@pytest.mark.timeout(30)
def test_many_uses_of_a_big_value_are_limited() -> None:
    # 1 MiB string, then used in 40 env entries: each use ends up in the job.
    env = "\n".join(f"        E{i} = local.l19" for i in range(40))
    err = parse_error(locals_job(doubling('"ab"', '"${{p}}${{p}}"', 20),
                                 f"      env {{\n{env}\n      }}"))
    assert "too much data" in err.message and err.line is not None


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("9" * 5000, "number is larger than the limit of 256 bits"),
        ("2 * " + "9" * 100, "number is larger than the limit of 256 bits"),
        ('tonumber("' + "9" * 4000 + '")', "number is larger than the limit of 256 bits"),
        ('tonumber("' + "9" * 5000 + '")', "number is out of range"),
        ("1e999", "number is out of range"),
        ("[1].99999999999999999999999999999999999999999999999999999999999999999999999999999999999",
         "larger than the limit"),
        ('["a"]["²"]', "a list index must be a number"),
        ('["a"]["--0"]', "a list index must be a number"),
        ('["a"]["' + "9" * 5000 + '"]', "index out of range"),
        ("{}[[]]", "an object key must be a string, got list"),
        ("[" * 3000 + "]" * 3000, "expression nested too deeply"),
        ("(" * 3000 + "1" + ")" * 3000, "expression nested too deeply"),
        (" + ".join(["1"] * 3000), "expression nested too deeply"),
        ('"\\U0011FFFF"', "not a Unicode character"),
    ],
)
def test_hostile_expressions_are_jobspec_errors(expr: str, fragment: str) -> None:
    err = parse_error(task_job(f"      user = {expr}"))
    assert err.line == 6
    assert fragment in err.message


@pytest.mark.parametrize(
    ("attr", "fragment"),
    [
        ('kill_timeout = "' + "9" * 5000 + 's"', "kill_timeout: duration '9999"),
        ('kill_timeout = "' + "9" * 4000 + 's"', "is out of range"),
        ('kill_timeout = "0.' + "9" * 5000 + 's"', "is out of range"),
        ('kill_timeout = "2562048h"', "is out of range"),
        ('user = "x"\n      resources {\n        cpu = "' + "9" * 4000 + '"\n      }',
         "resources.cpu: number is out of range for a 64-bit integer"),
        ('user = "x"\n      resources {\n        cpu = 1e300\n      }',
         "resources.cpu: number is out of range for a 64-bit integer"),
    ],
)
def test_numbers_past_int64_are_jobspec_errors(attr: str, fragment: str) -> None:
    err = parse_error(task_job(f"      {attr}"))
    assert fragment in err.message and err.line is not None


def test_exact_limits_are_allowed() -> None:
    limits = pytest.importorskip("nomad_client.jobspec.limits")
    big = 2**limits.MAX_INT_BITS - 1
    job = parse(task_job(f"      meta {{\n        n = {big}\n      }}"))
    assert first_task(job)["Meta"] == {"n": str(big)}
    job = parse(locals_job(doubling('"ab"', '"${{p}}${{p}}"', 20), "      user = local.l19"))
    assert len(first_task(job)["User"]) == limits.MAX_STRING_CHARS


@pytest.mark.parametrize(
    "locals_body",
    [
        "  x = " + "[" * 400 + "]" * 400,
        "  x = " + "upper(" * 400 + '"a"' + ")" * 400,
        "  x = " + '"${' * 400 + "1" + '}"' * 400,
        # Dynamic references are not ordered ahead of time, so they recurse.
        "\n".join(f'  l{i} = local["l{i + 1}"]' for i in range(400)) + "\n  l400 = 1",
    ],
    ids=["lists", "calls", "templates", "local-chain"],
)
def test_nesting_limit_leaves_room_on_the_python_stack(locals_body: str) -> None:
    # Callers (an HTTP handler, a CLI) may already be a few hundred frames deep.
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    old_limit = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + 450)
    try:
        err = parse_error("locals {\n" + locals_body + "\n}\n" + task_job(""))
    finally:
        sys.setrecursionlimit(old_limit)
    assert "expression nested too deeply" in err.message


def test_deeply_nested_blocks_are_jobspec_errors() -> None:
    config = "a {\n" * 3000 + "}\n" * 3000
    err = parse_error(task_job(f"      config {{\n{config}      }}"))
    assert "blocks nested too deeply" in err.message and err.line is not None


# The pieces random jobspecs are made of: enough real syntax to reach the evaluator.
ATOMS = [
    "0", "1", "-1", "2.5", "1e999", "9" * 90, "true", "false", "null", '""', '"a"', '"²"',
    '"\\u00e9"', '"\\U0011ffff"', '"\\q"', '"$${x}"', '"%{if}"', "local.a", "local.b",
    "local.c", "var.v", "local", "var", "NOMAD_ALLOC_DIR", "attr.kernel.name", "[]", "{}",
    '"x,y"', "<<EOF\nhi ${local.a}\nEOF\n", '"1s"', '"' + "9" * 5000 + 's"',
]
FUNCTION_NAMES = [
    "upper", "trimspace", "join", "split", "replace", "concat", "contains", "length",
    "lookup", "merge", "coalesce", "tonumber", "tobool", "min", "abs", "nope",
]
OPERATORS = ["+", "-", "*", "/", "%", "==", "!=", "<", ">=", "&&", "||"]


def _compound(e: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    keys = st.sampled_from(["k", "a", '"q"', "(local.a)", "1"])
    return st.one_of(
        st.lists(e, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
        st.lists(st.tuples(keys, e), max_size=3).map(
            lambda kv: "{" + ", ".join(f"{k} = {v}" for k, v in kv) + "}"
        ),
        st.tuples(e, st.sampled_from(OPERATORS), e).map(" ".join),
        st.tuples(st.sampled_from(["-", "!", ""]), e).map(lambda t: f"{t[0]}({t[1]})"),
        st.tuples(e, e, e).map(lambda t: f"{t[0]} ? {t[1]} : {t[2]}"),
        st.tuples(e, e).map(lambda t: f"{t[0]}[{t[1]}]"),
        st.tuples(e, st.sampled_from(["a", "k", "0"])).map(lambda t: f"{t[0]}.{t[1]}"),
        st.tuples(st.sampled_from(FUNCTION_NAMES), st.lists(e, max_size=3), st.booleans()).map(
            lambda t: f"{t[0]}({', '.join(t[1])}{'...' if t[2] and t[1] else ''})"
        ),
        st.lists(e, max_size=3).map(lambda ps: '"' + "".join("${" + p + "}" for p in ps) + ' x"'),
    )


EXPRESSIONS = st.recursive(st.sampled_from(ATOMS), _compound, max_leaves=10)
TOKENS = st.sampled_from(
    ["job", "group", "task", "locals", "variable", "config", '"j"', "{", "}", "[", "]", "(",
     ")", "=", ",", ".", "?", ":", "...", "local", "var", "x", "1", "9" * 90, '"', "${", "%{",
     "\\", "\n", " ", "<<EOF\n", "EOF\n", "#", "/*", "*", "!", "²", "\x00", "\r"]
)


@st.composite
def jobspec_texts(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 2))
    if kind == 0:
        return draw(st.text(max_size=200))
    if kind == 1:
        return "".join(draw(st.lists(TOKENS, max_size=60)))
    a, b, v, user, dcs, kill, count = (draw(EXPRESSIONS) for _ in range(7))
    job_id = draw(st.sampled_from(["j", ".", "a/b", "x" * 129]))
    var_type = draw(st.sampled_from(["", "type = number\n", "type = list(string)\n"]))
    return (
        f'variable "v" {{\n  {var_type}  default = {v}\n}}\n'
        f"locals {{\n  a = {a}\n  b = {b}\n  c = local.b\n}}\n"
        f'job "{job_id}" {{\n  datacenters = {dcs}\n'
        + task_job(f"      user = {user}\n      kill_timeout = {kill}", "",
                   f"    count = {count}")[9:]
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobspec_texts(), st.one_of(st.none(), EXPRESSIONS))
def test_random_jobspecs_fail_only_with_jobspec_or_validation_errors(
    src: str, var_value: str | None
) -> None:
    var_files = None if var_value is None else [("v.hcl", f"v = {var_value}\n")]
    try:
        job = parse_jobspec(src, "fuzz.hcl", var_files=var_files)
        canonicalize_job(job)
    except (JobspecError, JobValidationError):
        pass


# --------------------------------------------------------------------------- heredocs


def test_heredoc_keeps_indentation_and_trailing_newline() -> None:
    src = task_job("      config {\n        script = <<EOF\n  one\n    two\nEOF\n      }")
    assert first_task(parse(src))["Config"]["script"] == "  one\n    two\n"


def test_indented_heredoc_strips_common_indentation() -> None:
    job = parse(
        task_job(
            """
      config {
        args = ["-c", <<-EOF
            set -e
              echo indented

            echo "$HOME ${NOMAD_TASK_DIR} $${escaped}"
            EOF
        ]
      }"""
        )
    )
    assert first_task(job)["Config"]["args"] == [
        "-c",
        'set -e\n  echo indented\n\necho "$HOME ${NOMAD_TASK_DIR} ${escaped}"\n',
    ]


def test_heredoc_interpolates_vars_and_locals() -> None:
    job = parse(
        'variable "who" { default = "world" }\nlocals { greeting = "hi" }\n'
        + task_job(
            "      config {\n        script = <<-EOT\n"
            "          echo ${local.greeting} ${upper(var.who)} ${attr.kernel.name}\n"
            "        EOT\n      }"
        )
    )
    assert first_task(job)["Config"]["script"] == "echo hi WORLD ${attr.kernel.name}\n"


def test_heredoc_bad_interpolation_reports_line_in_file() -> None:
    src = task_job("      config {\n        script = <<EOF\nok\n${var.nope}\nEOF\n      }")
    err = parse_error(src)
    assert "var.nope" in err.message
    assert err.line == 9


# --------------------------------------------------------------------------- runtime refs


RUNTIME_REFS = [
    "${NOMAD_SECRETS_DIR}",
    "${NOMAD_TOKEN}",
    "${attr.kernel.name}",
    "${node.unique.name}",
    "${meta.x}",
    "${env.X}",
    '${env["X-Y"]}',
    "${NOMAD_META_x}",
    "${NOMAD_META_a.b}",
]


@pytest.mark.parametrize("ref", RUNTIME_REFS)
def test_runtime_references_stay_verbatim(ref: str) -> None:
    hcl_ref = ref  # quotes inside ${...} are expression syntax, not escaped
    job = parse(
        task_job(
            f'      env {{\n        V = "pre {hcl_ref} post"\n      }}\n'
            f'      meta {{\n        m = "{hcl_ref}"\n      }}\n'
            f'      config {{\n        args = ["{hcl_ref}", "a/{hcl_ref}/b"]\n      }}\n'
            f'      constraint {{\n        attribute = "{hcl_ref}"\n        value = "v"\n      }}'
        )
    )
    task = first_task(job)
    assert task["Env"] == {"V": f"pre {ref} post"}
    assert task["Meta"] == {"m": ref}
    assert task["Config"]["args"] == [ref, f"a/{ref}/b"]
    assert task["Constraints"][0]["LTarget"] == ref


def test_runtime_reference_mixed_with_var_and_bare_reference() -> None:
    job = parse(
        'variable "sub" { default = "data" }\n'
        + task_job(
            '      config {\n'
            '        path = "${NOMAD_ALLOC_DIR}/${var.sub}/${ NOMAD_TASK_NAME }"\n'
            "        dir  = NOMAD_TASK_DIR\n"
            '        both = "${var.sub == "data" ? "yes" : "no"}"\n'
            "      }"
        )
    )
    assert first_task(job)["Config"] == {
        "path": "${NOMAD_ALLOC_DIR}/data/${ NOMAD_TASK_NAME }",
        "dir": "${NOMAD_TASK_DIR}",
        "both": "yes",
    }


def test_escaped_interpolation_becomes_literal() -> None:
    job = parse(task_job('      env {\n        A = "$${NOMAD_X} %%{y} \\t\\"q\\""\n      }'))
    assert first_task(job)["Env"] == {"A": '${NOMAD_X} %{y} \t"q"'}


# --------------------------------------------------------------------------- expressions


def test_literal_expressions_are_evaluated() -> None:
    job = parse(
        task_job(
            "      config {\n"
            "        sum    = 1 + 2 * 3\n"
            "        div    = 7 / 2\n"
            "        neg    = -(4)\n"
            "        cmp    = 3 > 2 && !false\n"
            '        cond   = 1 == 2 ? "a" : "b"\n'
            '        joined = join(",", ["x", "y"])\n'
            '        idx    = ["p", "q"][1]\n'
            '        attr   = { k = "v" }.k\n'
            "      }"
        )
    )
    assert first_task(job)["Config"] == {
        "sum": 7, "div": 3.5, "neg": -4, "cmp": True, "cond": "b", "joined": "x,y",
        "idx": "q", "attr": "v",
    }


def test_unknown_function_is_error() -> None:
    err = parse_error(task_job('      user = file("/etc/passwd")'))
    assert "unknown function 'file'" in err.message


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ('upper(["a"])', "upper(): cannot convert list to a string"),
        ('contains({ a = 1 }, "a")', "contains(): expected a list, got object"),
        ('merge("x")', "merge(): expected a map, got string"),
    ],
)
def test_function_errors_name_hcl_types(call: str, message: str) -> None:
    err = parse_error(task_job(f"      user = {call}"))
    assert message in err.message


def test_template_directive_is_rejected_clearly() -> None:
    err = parse_error(task_job('      user = "%{ if true }x%{ endif }"'))
    assert "directives" in err.message


# --------------------------------------------------------------------------- errors


def test_syntax_error_names_file_line_and_expectation() -> None:
    err = parse_error(task_job("      user = "))
    assert err.filename == "test.nomad.hcl"
    assert err.line == 6
    assert "syntax error" in err.message and "expected an expression" in err.message
    assert str(err) == f"test.nomad.hcl:6: {err.message}"


def test_unclosed_block_reports_end_of_file() -> None:
    err = parse_error('job "x" {\n  group "g" {\n')
    assert "end of file" in err.message and "'}'" in err.message


def test_unexpected_character_is_named() -> None:
    err = parse_error('job "x" {\n  type = @\n}\n')
    assert err.line == 2 and "'@'" in err.message


def test_jobspec_error_str_without_line() -> None:
    err = JobspecError("f.hcl", None, "boom")
    assert str(err) == "f.hcl: boom"
    assert (err.filename, err.line, err.message) == ("f.hcl", None, "boom")


@pytest.mark.parametrize(
    ("src", "line", "fragment"),
    [
        ('job "a" {}\njob "b" {}\n', 2, "only one job block"),
        ('variable "x" { default = 1 }\n', None, "no job block"),
        ('foo = 1\njob "a" {}\n', 1, "unexpected attribute 'foo' at top level"),
        ('job "a" {}\nterraform {}\n', 2, "unknown top-level block 'terraform'"),
        ("job {\n}\n", 1, 'missing label: write job "<id>"'),
        ('job "a" {\n  group "g" {\n    task {\n    }\n  }\n}\n', 3,
         "job.group[g].task: missing label"),
        ('job "a" {\n  typo = 1\n}\n', 2, "job.typo: unknown attribute 'typo'"),
        ('job "a" {\n  type = "batch"\n  type = "service"\n}\n', 3, "set more than once"),
        ('job "a" {\n  group "g" {\n    count = "x"\n  }\n}\n', 3,
         "job.group[g].count: expected a whole number"),
        ('job "a" {\n  priority = true\n}\n', 2, "job.priority: expected a whole number"),
        ('job "a" {\n  datacenters = "dc1"\n}\n', 2, "job.datacenters: expected a list"),
        ('job "a" {\n  group "g" {\n    task "t" {\n      leader = "yes"\n    }\n  }\n}\n', 4,
         "leader: expected true or false"),
        ('job "a" {\n  group "g" {\n    service {}\n  }\n}\n', 3,
         "job.group[g].service: the 'service' block is not supported"),
        ('job "a" {\n  group "g" {\n    task "t" {\n      template {}\n    }\n  }\n}\n', 4,
         "'template' block is not supported"),
        ('job "a" {\n  group "g" {\n    task "t" {\n      resources { gpu = 1 }\n    }\n  }\n}\n',
         4, "resources.gpu: unknown attribute"),
        ('job "a" {\n  group "g" {\n    task "t" {\n      config {}\n      config {}\n'
         "    }\n  }\n}\n", 5, "only one config block"),
    ],
)
def test_semantic_errors(src: str, line: int | None, fragment: str) -> None:
    err = parse_error(src)
    assert fragment in err.message
    assert err.line == line


def test_empty_jobspec_is_error() -> None:
    err = parse_error("  \n")
    assert "empty" in err.message


# --------------------------------------------------------------------------- constraints


def test_constraints() -> None:
    job = parse(
        """
        job "c" {
          constraint {
            attribute = "${attr.kernel.name}"
            value     = "linux"
          }
          constraint {
            distinct_hosts = true
          }
          constraint {
            distinct_hosts = false
          }
          constraint {
            attribute = "${attr.nomad.version}"
            version   = ">= 1.6"
          }
          constraint {
            attribute = "${meta.rack}"
            operator  = "regexp"
            value     = "r[0-9]+"
          }
          constraint {
            distinct_property = "${meta.rack}"
            value             = 2
          }
          group "g" {
            constraint {
              operator  = "is_set"
              attribute = "${attr.driver.docker}"
            }
            task "t" { driver = "exec" }
          }
        }
        """
    )
    assert job["Constraints"] == [
        {"LTarget": "${attr.kernel.name}", "RTarget": "linux", "Operand": "="},
        {"LTarget": "", "RTarget": "true", "Operand": "distinct_hosts"},
        {"LTarget": "${attr.nomad.version}", "RTarget": ">= 1.6", "Operand": "version"},
        {"LTarget": "${meta.rack}", "RTarget": "r[0-9]+", "Operand": "regexp"},
        {"LTarget": "${meta.rack}", "RTarget": "2", "Operand": "distinct_property"},
    ]
    assert job["TaskGroups"][0]["Constraints"] == [
        {"LTarget": "${attr.driver.docker}", "RTarget": "", "Operand": "is_set"},
    ]


# --------------------------------------------------------------------------- restart/reschedule


def test_restart_at_group_and_task_level_and_reschedule() -> None:
    job = parse(
        task_job(
            '      restart {\n        attempts = 0\n        mode = "delay"\n      }\n'
            '      kill_timeout = "1m30s"',
            group_body=(
                '    restart {\n      attempts = 5\n      interval = "10m"\n'
                '      delay = "250ms"\n      mode = "fail"\n    }\n'
                '    reschedule {\n      attempts = 3\n      interval = "1h"\n'
                '      delay = "30s"\n      delay_function = "exponential"\n'
                '      max_delay = "2h"\n      unlimited = false\n    }'
            ),
        )
    )
    group = job["TaskGroups"][0]
    assert group["RestartPolicy"] == {
        "Attempts": 5, "Interval": 10 * MIN, "Delay": 250_000_000, "Mode": "fail",
    }
    assert group["ReschedulePolicy"] == {
        "Attempts": 3, "Interval": H, "Delay": 30 * S, "DelayFunction": "exponential",
        "MaxDelay": 2 * H, "Unlimited": False,
    }
    task = first_task(job)
    assert task["RestartPolicy"] == {
        "Attempts": 0, "Interval": None, "Delay": None, "Mode": "delay",
    }
    assert task["KillTimeout"] == 90 * S


def test_restart_unknown_attribute_is_error() -> None:
    err = parse_error(task_job("      restart {\n        tries = 1\n      }"))
    assert "restart.tries: unknown attribute" in err.message
    assert err.line == 7


# --------------------------------------------------------------------------- identities


def test_default_and_named_identities() -> None:
    job = parse(
        task_job(
            "      identity {\n        env  = true\n        file = true\n      }\n"
            '      identity "vault" {\n        aud = ["vault.io"]\n        ttl = "1h"\n'
            '        change_mode = "signal"\n        change_signal = "SIGHUP"\n'
            '        filepath = "secrets/v.jwt"\n      }\n'
            '      identity {\n        name = "consul"\n        aud = ["consul.io"]\n      }'
        )
    )
    task = first_task(job)
    assert task["Identity"] == {
        "Name": None, "Audience": None, "Env": True, "File": True, "Filepath": None,
        "TTL": None, "ChangeMode": None, "ChangeSignal": None,
    }
    assert [set(i) for i in task["Identities"]] == [IDENTITY_KEYS, IDENTITY_KEYS]
    vault, consul = task["Identities"]
    assert vault == {
        "Name": "vault", "Audience": ["vault.io"], "Env": None, "File": None,
        "Filepath": "secrets/v.jwt", "TTL": H, "ChangeMode": "signal", "ChangeSignal": "SIGHUP",
    }
    assert consul["Name"] == "consul" and consul["Audience"] == ["consul.io"]


def test_two_default_identities_is_error() -> None:
    err = parse_error(task_job("      identity {}\n      identity { env = true }"))
    assert "only one default" in err.message


# --------------------------------------------------------------------------- task_api


@pytest.mark.parametrize(("value", "enabled"), [("true", True), ("false", False)])
def test_task_api_block_is_the_tasks_own_choice(value: str, enabled: bool) -> None:
    job = parse(task_job(f"      task_api {{\n        enabled = {value}\n      }}"))
    assert first_task(job)["TaskAPI"] == {"Enabled": enabled}
    assert first_task(canonicalize_job(job))["TaskAPI"] == {"Enabled": enabled}


def test_no_task_api_block_is_no_choice() -> None:
    assert first_task(parse(task_job("")))["TaskAPI"] is None


@pytest.mark.parametrize(
    ("body", "line", "fragment"),
    [
        ("      task_api {\n        enabled = \"maybe\"\n      }", 7,
         "task_api.enabled: expected true or false, got string"),
        ("      task_api {\n        enabled = true\n        mode = \"x\"\n      }", 8,
         "task_api.mode: unknown attribute 'mode' (allowed attributes: enabled)"),
        ("      task_api {\n      }", 6,
         "task_api.enabled: missing attribute: write enabled = true or enabled = false"),
        ("      task_api {\n        enabled = true\n      }\n      task_api {\n"
         "        enabled = false\n      }", 9, "only one task_api block is allowed"),
        ("      task_api \"x\" {\n        enabled = true\n      }", 6,
         "the task_api block takes no label"),
        ("      task_api {\n        enabled = true\n        sub {}\n      }", 8,
         "unknown block 'sub'"),
    ],
)
def test_bad_task_api_blocks_name_the_key_and_line(body: str, line: int, fragment: str) -> None:
    err = parse_error(task_job(body))
    assert fragment in err.message, err.message
    assert err.line == line


# --------------------------------------------------------------------------- canonicalize


def minimal_job(**job: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "ID": "web",
        "TaskGroups": [{"Name": "g", "Tasks": [{"Name": "t", "Driver": "raw_exec"}]}],
    }
    base.update(job)
    return base


def test_canonicalize_fills_defaults_for_parsed_job() -> None:
    parsed = parse('job "x" {\n group "g" {\n  task "t" {\n   driver = "exec"\n  }\n }\n}\n')
    before = copy.deepcopy(parsed)
    job = canonicalize_job(parsed)
    assert parsed == before, "input must not be modified"
    assert {k: job[k] for k in JOB_KEYS - {"TaskGroups"}} == {
        "ID": "x", "Name": "x", "Type": "service", "Namespace": "default", "Region": "global",
        "Priority": 50, "Datacenters": ["*"], "NodePool": "default", "Meta": {},
        "Constraints": [],
    }
    group = job["TaskGroups"][0]
    assert group["Count"] == 1
    assert group["RestartPolicy"] == {
        "Attempts": 2, "Interval": 30 * MIN, "Delay": 15 * S, "Mode": "fail",
    }
    task = first_task(job)
    assert task["RestartPolicy"] == group["RestartPolicy"]
    assert task["KillTimeout"] == 5 * S
    assert (task["Env"], task["Meta"], task["Config"], task["Constraints"]) == ({}, {}, {}, [])
    assert task["Resources"] == {"CPU": 100, "MemoryMB": 300}
    assert task["Leader"] is False
    assert task["Identity"] == {
        "Name": "default", "Audience": ["nomadproject.io"], "Env": False, "File": False,
        "Filepath": None, "TTL": None, "ChangeMode": "noop", "ChangeSignal": None,
    }
    assert task["Identities"] == []
    assert task["TaskAPI"] is None


def test_canonicalize_batch_restart_defaults_and_task_merge() -> None:
    job = canonicalize_job(
        minimal_job(
            Type="batch",
            TaskGroups=[{
                "Name": "g",
                "RestartPolicy": {"Attempts": 1},
                "Tasks": [
                    {"Name": "a", "Driver": "exec", "RestartPolicy": {"Mode": "delay",
                                                                      "Delay": 2 * S}},
                    {"Name": "b", "Driver": "exec", "Resources": {"CPU": 500}},
                ],
            }],
        )
    )
    group = job["TaskGroups"][0]
    assert group["RestartPolicy"] == {
        "Attempts": 1, "Interval": 24 * H, "Delay": 15 * S, "Mode": "fail",
    }
    a, b = group["Tasks"]
    assert a["RestartPolicy"] == {"Attempts": 1, "Interval": 24 * H, "Delay": 2 * S,
                                  "Mode": "delay"}
    assert b["RestartPolicy"] == group["RestartPolicy"]
    assert b["Resources"] == {"CPU": 500, "MemoryMB": 300}


def test_canonicalize_json_job_with_missing_keys_and_identity() -> None:
    job = canonicalize_job(
        minimal_job(
            Name="",
            TaskGroups=[{"Name": "g", "Count": 3, "Tasks": [
                {"Name": "t", "Driver": "raw_exec", "Identity": {"Env": True, "File": True}},
            ]}],
        )
    )
    assert job["Name"] == "web"
    assert job["TaskGroups"][0]["Count"] == 3
    ident = first_task(job)["Identity"]
    assert ident["Env"] is True and ident["File"] is True
    assert ident["Name"] == "default" and ident["ChangeMode"] == "noop"


def test_validation_lists_every_problem() -> None:
    with pytest.raises(JobValidationError) as info:
        canonicalize_job({
            "Type": "cron",
            "TaskGroups": [
                {"Name": "g", "Count": -1, "Tasks": [
                    {"Name": "t"},
                    {"Name": "t", "Driver": "exec",
                     "RestartPolicy": {"Mode": "sometimes"}},
                ]},
                {"Name": "g", "Tasks": []},
            ],
        })
    problems = info.value.problems
    expected = [
        "missing job ID",
        "unknown job type 'cron'",
        "group 'g': count must not be negative",
        "group 'g' task 't': missing driver",
        "group 'g' task 't': duplicate task name",
        "unsupported restart mode 'sometimes'",
        "group 'g': duplicate group name",
        "group 'g': group has no tasks",
    ]
    for fragment in expected:
        assert any(fragment in p for p in problems), (fragment, problems)
    assert str(info.value).startswith(f"{len(problems)} errors occurred:")


def test_validation_no_task_groups() -> None:
    with pytest.raises(JobValidationError, match="job has no task groups"):
        canonicalize_job({"ID": "x"})


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"Priority": 0}, "priority must be between 1 and 100"),
        ({"ID": "has space"}, "contains a space"),
        ({"Constraints": [{"LTarget": "a", "RTarget": "b", "Operand": "~="}]},
         "unknown constraint operator '~='"),
        ({"Meta": {"a": 1}}, "Meta must be a map of strings"),
    ],
)
def test_validation_job_level(change: dict[str, Any], fragment: str) -> None:
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(minimal_job(**change))
    assert any(fragment in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize(
    ("task_change", "fragment"),
    [
        ({"Identity": {"TTL": -1}}, "TTL must be a non-negative number"),
        ({"Identity": {"ChangeMode": "signal"}}, "change_signal is required"),
        ({"Identity": {"ChangeMode": "explode"}}, "invalid change_mode 'explode'"),
        ({"Identities": [{"Name": "v"}, {"Name": "v"}]}, "duplicate identity name 'v'"),
        ({"Identities": [{"Name": "bad name!"}]}, "invalid identity name"),
        ({"Resources": {"MemoryMB": 5}}, "minimum MemoryMB value is 10"),
        ({"KillTimeout": -1}, "KillTimeout must be a non-negative"),
        ({"RestartPolicy": {"Interval": S}}, "interval can not be less than 5s"),
        ({"Env": {"A": 1}}, "Env must be a map of strings"),
        ({"TaskAPI": {"Enabled": "yes"}}, "TaskAPI.Enabled must be a bool, got 'yes'"),
        ({"TaskAPI": {}}, "TaskAPI.Enabled must be a bool, got None"),
        ({"TaskAPI": True}, "TaskAPI must be an object, got True"),
        ({"TaskAPI": {"Enabled": True, "Mode": "x"}},
         "TaskAPI has unknown fields Mode (allowed: Enabled)"),
    ],
)
def test_validation_task_level(task_change: dict[str, Any], fragment: str) -> None:
    job = minimal_job()
    job["TaskGroups"][0]["Tasks"][0].update(task_change)
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(job)
    assert any(fragment in p for p in info.value.problems), info.value.problems


def test_default_identity_may_carry_a_ttl() -> None:
    job = minimal_job()
    job["TaskGroups"][0]["Tasks"][0]["Identity"] = {"TTL": H, "Env": True}
    assert canonicalize_job(job)["TaskGroups"][0]["Tasks"][0]["Identity"]["TTL"] == H


def test_canonicalize_valid_job_passes_and_is_idempotent() -> None:
    once = canonicalize_job(minimal_job())
    assert canonicalize_job(once) == once


@pytest.mark.parametrize(
    ("job_id", "fragment"),
    [
        (".", "job ID '.' is not allowed"),
        ("..", "job ID '..' is not allowed"),
        ("a/b", "must not contain '/'"),
        ("has space", "contains a space at position 3"),
        ("tab\there", "contains whitespace (U+0009)"),
        ("nl\n", "contains whitespace (U+000A)"),
        ("nbsp\u00a0", "contains whitespace (U+00A0)"),
        ("nul\x00", "contains a control character (U+0000)"),
        ("del\x7f", "contains a control character (U+007F)"),
        ("x" * 129, "job ID is 129 characters long; the limit is 128"),
    ],
)
def test_unusable_job_ids_are_rejected(job_id: str, fragment: str) -> None:
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(minimal_job(ID=job_id))
    assert any(fragment in p for p in info.value.problems), info.value.problems


@pytest.mark.parametrize("job_id", ["x" * 128, "a.b", "...", "web-1_2.v3", "日本"])
def test_usual_job_ids_are_accepted(job_id: str) -> None:
    assert canonicalize_job(minimal_job(ID=job_id))["ID"] == job_id


def test_job_id_from_hcl_label_is_validated() -> None:
    job = parse('job ".." {\n group "g" {\n  task "t" {\n   driver = "exec"\n  }\n }\n}\n')
    with pytest.raises(JobValidationError, match="not allowed"):
        canonicalize_job(job)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"Constraints": [{"Operand": ["x"]}]}, "constraint Operand must be a string"),
        ({"Constraints": [{"LTarget": {"a": 1}}]}, "constraint LTarget must be a string"),
        ({"Priority": 10**5000}, "job priority must be between 1 and 100, got <a 16610-bit"),
        ({"Region": ["eu"]}, "Region must be a string"),
        ({"Type": {"a": []}}, "unknown job type {'a': []}"),
        ({"TaskGroups": [{"Name": ["g"], "Tasks": []}]}, "group 0: missing group name"),
        ({"TaskGroups": [{"Name": "g", "Count": 2**63, "Tasks": [
            {"Name": "t", "Driver": "exec"}]}]}, "count must be a whole number"),
        ({"TaskGroups": [{"Name": "g", "ReschedulePolicy": {"DelayFunction": ["x"]}, "Tasks": [
            {"Name": "t", "Driver": "exec"}]}]}, "invalid delay function ['x']"),
    ],
)
def test_mistyped_json_fields_are_validation_errors(
    change: dict[str, Any], fragment: str
) -> None:
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(minimal_job(**change))
    assert any(fragment in p for p in info.value.problems), info.value.problems


def test_deeply_nested_json_job_is_validation_error() -> None:
    # Nested far past the limit: refused before the deep copy could recurse too far.
    deep: Any = "x"
    for _ in range(5000):
        deep = [deep]
    job = minimal_job()
    job["TaskGroups"][0]["Tasks"][0]["Config"] = {"deep": deep}
    with pytest.raises(JobValidationError, match="job is nested too deeply"):
        canonicalize_job(job)


def test_unhashable_identity_name_is_validation_error() -> None:
    job = minimal_job()
    job["TaskGroups"][0]["Tasks"][0]["Identities"] = [{"Name": ["a"]}, {"Name": ["a"]}]
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(job)
    assert any("identity ['a']: invalid identity name" in p for p in info.value.problems)


def test_shared_parts_are_not_mistaken_for_depth() -> None:
    # A value reused many times (as the HCL parser may produce) is walked once.
    shared: Any = ["x"]
    for _ in range(60):
        shared = [shared, shared]
    job = minimal_job()
    job["TaskGroups"][0]["Tasks"][0]["Config"] = {"v": shared}
    copied = canonicalize_job(job)["TaskGroups"][0]["Tasks"][0]["Config"]["v"]
    # Still shared after the copy (comparing it with == would walk 2**60 leaves).
    assert copied is not shared and copied[0] is copied[1]


_FIELD_NAMES = [
    "ID", "Name", "Type", "Namespace", "Region", "Priority", "Datacenters", "NodePool",
    "Count", "Driver", "User", "Config", "Env", "Meta", "Leader", "KillTimeout", "CPU",
    "MemoryMB", "Attempts", "Interval", "Delay", "Mode", "DelayFunction", "MaxDelay",
    "Unlimited", "Audience", "File", "Filepath", "TTL", "ChangeMode", "ChangeSignal",
    "LTarget", "RTarget", "Operand",
]
_JSON_SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8),
    st.sampled_from(["service", "batch", "system", "fail", "delay", "signal", ".", "a/b", "="]),
)
_JSON = st.recursive(
    _JSON_SCALARS,
    lambda c: st.lists(c, max_size=3)
    | st.dictionaries(st.text(max_size=4) | st.sampled_from(_FIELD_NAMES), c, max_size=3),
    max_leaves=8,
)


def _shaped(keys: set[str], **inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Objects with some of ``keys`` (random values unless given), or random JSON."""
    fields = {k: inner.get(k, _JSON) for k in sorted(keys)}
    return st.one_of(_JSON, st.fixed_dictionaries({}, optional=fields))


def _some(item: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.one_of(_JSON, st.lists(item, max_size=3))


_POLICY = _shaped(set(_FIELD_NAMES))
_TASK = _shaped(
    TASK_KEYS, Identities=_some(_POLICY), Identity=_POLICY, Constraints=_some(_POLICY),
    Resources=_POLICY, RestartPolicy=_POLICY,
)
_GROUP = _shaped(
    GROUP_KEYS | {"ReschedulePolicy"}, Tasks=_some(_TASK), Constraints=_some(_POLICY),
    RestartPolicy=_POLICY, ReschedulePolicy=_POLICY,
)
_JOB = _shaped(JOB_KEYS, TaskGroups=_some(_GROUP), Constraints=_some(_POLICY))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_JOB)
def test_random_json_jobs_fail_only_with_validation_errors(job: Any) -> None:
    try:
        out = canonicalize_job(job)
    except JobValidationError as err:
        assert err.problems
        return
    assert canonicalize_job(out) == out


def test_canonicalize_rejects_non_mapping() -> None:
    with pytest.raises(JobValidationError, match="must be an object"):
        canonicalize_job(["not", "a", "job"])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- odds and ends


def test_crlf_and_comments_parse_like_lf() -> None:
    src = (
        'job "a" {\r\n  # hash\r\n  // slashes\r\n  /* block\r\n  comment */\r\n'
        '  meta {\r\n    a = "1"\r\n  }\r\n  group "g" {\r\n    task "t" {\r\n'
        '      driver = "exec"\r\n      config {\r\n        s = <<EOF\r\nline\r\nEOF\r\n'
        "      }\r\n    }\r\n  }\r\n}\r\n"
    )
    job = parse_jobspec(src, "crlf.hcl")
    assert job["Meta"] == {"a": "1"}
    assert first_task(job)["Config"] == {"s": "line\n"}


def test_cli_value_that_is_not_valid_for_declared_type() -> None:
    err = parse_error('variable "n" { type = number }\n' + task_job(""), variables={"n": "abc"})
    assert err.filename == "-var"
    assert "n='abc' is not a valid number value" in err.message


def test_variable_default_cannot_use_runtime_values() -> None:
    err = parse_error('variable "d" { default = NOMAD_ALLOC_DIR }\n' + task_job(""))
    assert err.line == 1 and "not known when the jobspec is parsed" in err.message


def test_variable_validation_block_is_rejected() -> None:
    err = parse_error('variable "d" {\n  default = 1\n  validation {}\n}\n' + task_job(""))
    assert err.line == 3 and "'validation' is not supported" in err.message


@pytest.mark.parametrize("name", ["alloc", ".taskapi", "a/b"])
def test_reserved_task_names_are_refused(name: str) -> None:
    job = minimal_job()
    job["TaskGroups"][0]["Tasks"][0]["Name"] = name
    with pytest.raises(JobValidationError) as info:
        canonicalize_job(job)
    assert any("task name must not be" in p for p in info.value.problems)
