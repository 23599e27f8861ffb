"""Tests for the HCL2 jobspec parser and job canonicalization."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
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
    "RestartPolicy", "KillTimeout", "Leader", "Identity", "Identities",
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


@pytest.mark.parametrize("path", sorted(JOBS.glob("*.hcl")), ids=lambda p: p.name)
def test_every_example_job_parses_and_canonicalizes(path: Path) -> None:
    job = parse_jobspec(path.read_text(), str(path))
    assert set(job) == JOB_KEYS
    for group in job["TaskGroups"]:
        assert set(group) == GROUP_KEYS
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
