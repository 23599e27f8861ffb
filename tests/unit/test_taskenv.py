"""Task environment building and ``${...}`` interpolation."""

from __future__ import annotations

import attrs
import pytest

from nomad_client.client.taskenv import (
    NodeView,
    TaskEnvInput,
    build_task_env,
    clean_env_key,
    interpolate,
    interpolate_config,
)
from nomad_client.structs.node_properties import NODE_FIELDS, NODE_REGION

NODE = NodeView(
    id="node-1234",
    name="client-1",
    datacenter="dc1",
    region="global",
    node_class="gpu",
    pool="default",
    attributes={"kernel.name": "linux", "cpu.numcores": "8"},
    meta={"rack": "r1"},
)

ALLOC_ID = "5fc3c8bb-0b1a-4c1e-9f56-3a6f0f6c2a11"


def make_input(**overrides: object) -> TaskEnvInput:
    values: dict[str, object] = {
        "alloc_id": ALLOC_ID,
        "alloc_name": "example.cache[2]",
        "alloc_index": 2,
        "job_id": "example",
        "job_name": "Example",
        "group": "cache",
        "task": "redis",
        "namespace": "default",
        "region": "global",
        "datacenter": "dc1",
        "alloc_dir": "/data/alloc/x/alloc",
        "task_dir": "/data/alloc/x/redis/local",
        "secrets_dir": "/data/alloc/x/redis/secrets",
        "job_meta": {},
        "group_meta": {},
        "task_meta": {},
        "task_env": {},
        "cpu_mhz": 500,
        "memory_mb": 256,
    }
    values.update(overrides)
    return TaskEnvInput(**values)  # type: ignore[arg-type]


def test_standard_variables() -> None:
    env = build_task_env(make_input(), NODE, {})
    assert env == {
        "NOMAD_ALLOC_DIR": "/data/alloc/x/alloc",
        "NOMAD_TASK_DIR": "/data/alloc/x/redis/local",
        "NOMAD_SECRETS_DIR": "/data/alloc/x/redis/secrets",
        "NOMAD_CPU_LIMIT": "500",
        "NOMAD_MEMORY_LIMIT": "256",
        "NOMAD_ALLOC_ID": ALLOC_ID,
        "NOMAD_SHORT_ALLOC_ID": "5fc3c8bb",
        "NOMAD_ALLOC_NAME": "example.cache[2]",
        "NOMAD_ALLOC_INDEX": "2",
        "NOMAD_JOB_ID": "example",
        "NOMAD_JOB_NAME": "Example",
        "NOMAD_GROUP_NAME": "cache",
        "NOMAD_TASK_NAME": "redis",
        "NOMAD_NAMESPACE": "default",
        "NOMAD_REGION": "global",
        "NOMAD_DC": "dc1",
    }


def test_a_child_job_names_its_parent() -> None:
    env = build_task_env(make_input(job_id="batch/dispatch-1700000000-0a1b2c3d",
                                    parent_job_id="batch"), NODE, {})
    assert env["NOMAD_JOB_PARENT_ID"] == "batch"
    assert "NOMAD_JOB_PARENT_ID" not in build_task_env(make_input(), NODE, {})


def test_unknown_values_are_not_set() -> None:
    env = build_task_env(make_input(cpu_mhz=0, memory_mb=0, namespace="", region=""), NODE, {})
    for key in ("NOMAD_CPU_LIMIT", "NOMAD_MEMORY_LIMIT", "NOMAD_NAMESPACE", "NOMAD_REGION"):
        assert key not in env
    assert env["NOMAD_ALLOC_INDEX"] == "2"


def test_meta_merge_both_cases_and_precedence() -> None:
    inp = make_input(
        job_meta={"owner": "job", "tier": "job"},
        group_meta={"tier": "group", "zone": "z1"},
        task_meta={"zone": "task"},
    )
    env = build_task_env(inp, NODE, {})
    assert env["NOMAD_META_owner"] == env["NOMAD_META_OWNER"] == "job"
    assert env["NOMAD_META_tier"] == env["NOMAD_META_TIER"] == "group"
    assert env["NOMAD_META_zone"] == env["NOMAD_META_ZONE"] == "task"


def test_meta_keys_and_values_are_interpolated_and_cleaned() -> None:
    inp = make_input(
        job_meta={
            "my-key": "x",
            "a.b": "${node.datacenter}",
            "${NOMAD_TASK_NAME}_k": "${attr.kernel.name}",
        }
    )
    env = build_task_env(inp, NODE, {})
    assert env["NOMAD_META_my_key"] == "x"
    assert env["NOMAD_META_MY_KEY"] == "x"
    assert env["NOMAD_META_a.b"] == "dc1"  # dots survive cleaning
    assert env["NOMAD_META_redis_k"] == "linux"
    assert "NOMAD_META_my-key" not in env


def test_host_env_only_fills_gaps_and_credentials_never_leak() -> None:
    host = {
        "PATH": "/usr/bin",
        "HOME": "/root",
        "NOMAD_TASK_NAME": "from-host",
        "NOMAD_TOKEN": "agent-management-token",
        "VAULT_TOKEN": "s.agent",
        "CONSUL_HTTP_TOKEN": "agent",
        "NOMAD_UNIX_ADDR": "unix:///elsewhere/api.sock",  # a task without a socket has none
    }
    env = build_task_env(make_input(), NODE, host)
    assert env["PATH"] == "/usr/bin" and env["HOME"] == "/root"
    assert env["NOMAD_TASK_NAME"] == "redis"
    for key in ("NOMAD_TOKEN", "VAULT_TOKEN", "CONSUL_HTTP_TOKEN", "NOMAD_UNIX_ADDR"):
        assert key not in env


def test_extra_env_beats_host_env_and_task_env_beats_everything() -> None:
    extra = {"NOMAD_TOKEN": "workload.jwt", "NOMAD_UNIX_ADDR": "unix:///s/api.sock"}
    inp = make_input(
        extra_env=extra,
        task_env={
            "NOMAD_ADDR": "${NOMAD_UNIX_ADDR}",
            "NOMAD_TASK_NAME": "renamed",
            "WHERE": "${node.unique.name}/${meta.rack}/${env.HOME}",
            "UNKNOWN": "${attr.nope} ${nope}",
        },
    )
    env = build_task_env(inp, NODE, {"NOMAD_UNIX_ADDR": "host", "HOME": "/root"})
    assert env["NOMAD_TOKEN"] == "workload.jwt"
    assert env["NOMAD_UNIX_ADDR"] == "unix:///s/api.sock"
    assert env["NOMAD_ADDR"] == "unix:///s/api.sock"
    assert env["NOMAD_TASK_NAME"] == "renamed"
    assert env["WHERE"] == "client-1/r1//root"
    assert env["UNKNOWN"] == "${attr.nope} ${nope}"


def test_task_env_keys_with_label_prefixes_are_cleaned() -> None:
    env = build_task_env(make_input(task_env={"NOMAD_PORT_my-port": "80", "MY-VAR": "1"}), NODE, {})
    assert env["NOMAD_PORT_my_port"] == "80"
    assert env["MY-VAR"] == "1"  # only label-prefixed keys are cleaned


def test_clean_env_key() -> None:
    assert clean_env_key("NOMAD_META_a.b-c d") == "NOMAD_META_a.b_c_d"
    assert clean_env_key("NOMAD_META_é") == "NOMAD_META___"  # two UTF-8 bytes
    assert clean_env_key("9lives") == "_lives"


def test_interpolate_node_names() -> None:
    text = (
        "${node.unique.id} ${node.unique.name} ${node.datacenter} ${node.region} "
        "${node.class} ${node.pool} ${attr.cpu.numcores} ${meta.rack}"
    )
    assert interpolate(text, {}, NODE) == "node-1234 client-1 dc1 global gpu default 8 r1"


def test_every_node_property_of_constraints_interpolates() -> None:
    # One list of ${node.*} names serves constraints and tasks: each one resolves here too.
    for name in [*NODE_FIELDS, NODE_REGION]:
        assert interpolate("${" + name + "}", {}, NODE) != "${" + name + "}", name


def test_driver_config_spellings_of_attr_and_meta() -> None:
    text = "${node.attr.kernel.name} ${node.meta.rack} ${node.attr.none}"
    assert interpolate(text, {}, NODE) == "linux r1 ${node.attr.none}"


def test_interpolate_env_first_and_unknowns_verbatim() -> None:
    env = {"NOMAD_TASK_NAME": "redis", "attr.kernel.name": "shadowed"}
    assert interpolate("${NOMAD_TASK_NAME}-${env.NOMAD_TASK_NAME}", env, NODE) == "redis-redis"
    assert interpolate("${attr.kernel.name}", env, NODE) == "shadowed"
    assert interpolate("${MISSING} ${meta.none} $NOMAD_TASK_NAME ${bad name}", env, NODE) == (
        "${MISSING} ${meta.none} $NOMAD_TASK_NAME ${bad name}"
    )


def test_interpolation_is_single_pass() -> None:
    env = {"A": "${B}", "B": "x"}
    assert interpolate("${A}", env, NODE) == "${B}"


def test_interpolate_config_recurses_without_mutating() -> None:
    config = {
        "command": "${NOMAD_TASK_DIR}/run",
        "args": ["--dc", "${node.datacenter}", ("${attr.kernel.name}",)],
        "nested": {"${NOMAD_TASK_DIR}": {"n": 3, "flag": True, "none": None}},
    }
    original = {**config}
    out = interpolate_config(config, {"NOMAD_TASK_DIR": "/t"}, NODE)
    assert out == {
        "command": "/t/run",
        "args": ["--dc", "dc1", ("linux",)],
        "nested": {"${NOMAD_TASK_DIR}": {"n": 3, "flag": True, "none": None}},
    }
    assert config == original


def test_input_is_a_frozen_value() -> None:
    inp = make_input()
    assert inp.extra_env == {}
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        inp.task = "other"  # type: ignore[misc]
