"""Agent configuration: files (HCL/JSON), validation errors, merging, flags; what a running
agent shows of it (``/v1/agent/self``) and how it reloads it (``Agent.reload``, SIGHUP)."""

from __future__ import annotations

import asyncio
import functools
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import attrs
import pytest

from nomad_client.agent.agent import Agent
from nomad_client.agent.config import (
    AgentConfig,
    AgentFlags,
    ConfigError,
    build_agent_config,
    load_config_file,
    parse_agent_args,
)
from nomad_client.agent.run import ReloadLoop
from nomad_client.client.taskapi_config import AuditConfig, RateLimitConfig, TaskAPIConfig
from tests.unit.factories import settle, wait_until, write_file

CONFIGS = Path(__file__).resolve().parents[2] / "testdata" / "configs"


def load_error(path: Path) -> ConfigError:
    """The ConfigError that loading the config file at ``path`` must raise."""
    with pytest.raises(ConfigError) as info:
        load_config_file(path)
    return info.value


def test_sample_dev_config() -> None:
    raw = load_config_file(CONFIGS / "dev.hcl")
    assert raw == {"data_dir": "/var/lib/nomad-client", "bind_addr": "127.0.0.1",
                   "log_level": "DEBUG", "ports": {"http": 4646},
                   "server": {"enabled": True}, "client": {"enabled": True}}


def test_sample_meta_and_acl_merge() -> None:
    cfg = build_agent_config([CONFIGS / "meta.hcl", CONFIGS / "acl.hcl"], AgentFlags())
    assert cfg.client.meta == {"rack": "r1", "tier": "gold"}
    assert cfg.client.options == {"driver.raw_exec.enable": "1"}
    assert (cfg.datacenter, cfg.name, cfg.acl.enabled) == ("dc2", "client-meta", True)
    assert (cfg.server.enabled, cfg.client.enabled) == (False, True)


def test_json_config() -> None:
    cfg = build_agent_config([CONFIGS / "client.json"], AgentFlags())
    assert (cfg.region, cfg.ports.http, cfg.client.meta) == ("europe", 0, {"zone.name": "z1"})


def test_defaults_and_api_dict(tmp_path: Path) -> None:
    f = write_file(tmp_path, "a.hcl", 'data_dir = "/d"\nclient { enabled = true }\n')
    cfg = build_agent_config([f], AgentFlags())
    assert cfg == AgentConfig(data_dir="/d", name=socket.gethostname(),
                              client=cfg.client, dev_mode=False)
    api = cfg.to_api_dict()
    assert api["Region"] == "global" and api["Datacenter"] == "dc1"
    assert api["Ports"] == {"HTTP": 4646, "RPC": 4647} and api["ACL"]["Enabled"] is False
    assert api["Client"]["Enabled"] is True
    assert api["Server"] == {"Enabled": False, "Store": "embedded"}
    assert api["NodeName"] == socket.gethostname() and api["DevMode"] is False


def test_later_files_override_and_maps_merge(tmp_path: Path) -> None:
    a = write_file(tmp_path, "a.hcl", 'data_dir = "/a"\nregion = "r1"\n'
                   'client {\n  enabled = true\n  meta {\n    rack = "r1"\n    x = "1"\n  }\n}\n')
    b = write_file(tmp_path, "b.json", '{"region": "r2", "client": {"meta": {"rack": "r2"}}}')
    cfg = build_agent_config([a, b], AgentFlags())
    assert cfg.region == "r2" and cfg.data_dir == "/a"
    assert cfg.client.meta == {"rack": "r2", "x": "1"}
    assert cfg.client.enabled is True


def test_directory_expands_to_its_config_files(tmp_path: Path) -> None:
    write_file(tmp_path, "10-base.hcl", 'data_dir = "/a"\nserver { enabled = true }\n')
    write_file(tmp_path, "20-over.json", '{"data_dir": "/b"}')
    write_file(tmp_path, "README", "not a config")
    cfg = build_agent_config([tmp_path], AgentFlags())
    assert cfg.data_dir == "/b" and cfg.server.enabled


def test_flags_override_files(tmp_path: Path) -> None:
    f = write_file(tmp_path, "a.hcl", 'data_dir = "/a"\nbind_addr = "10.0.0.1"\n'
                   'client {\n  enabled = true\n  meta = { rack = "r1" }\n}\n')
    flags = parse_agent_args(["-data-dir", "/flag", "-bind=0.0.0.0", "-acl-enabled",
                              "-log-level", "warn", "-meta", "rack=r9", "--meta=zone=z",
                              "-http-port", "0"])
    cfg = build_agent_config([f], flags)
    assert (cfg.data_dir, cfg.bind_addr, cfg.log_level) == ("/flag", "0.0.0.0", "WARN")
    assert cfg.acl.enabled and cfg.ports.http == 0
    assert cfg.client.meta == {"rack": "r9", "zone": "z"}


def test_dev_mode() -> None:
    cfg = build_agent_config([], parse_agent_args(["-dev"]))
    assert cfg.dev_mode and cfg.server.enabled and cfg.client.enabled
    assert cfg.data_dir is None and cfg.bind_addr == "127.0.0.1" and cfg.ports.http == 4646
    cfg = build_agent_config([], parse_agent_args(["-dev", "-http-port=0"]))
    assert cfg.ports.http == 0


def test_non_dev_requirements(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least one of server or client"):
        build_agent_config([], AgentFlags(data_dir="/x"))
    f = write_file(tmp_path, "c.hcl", "client { enabled = true }\n")
    with pytest.raises(ConfigError, match="data_dir is required"):
        build_agent_config([f], AgentFlags())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('client {\n  enabled = true\n  meta {\n    rack = ["a"]\n  }\n}\n',
         "{f}:4: client.meta.rack: expected a string, got list"),
        ("client {\n  enabled = true\n  bogus = 1\n}\n",
         "{f}:3: client.bogus: unknown configuration key"),
        ("# c\nservers {\n}\n", "{f}:2: servers: unknown configuration key"),
        ('acl {\n  enabled = "true"\n}\n', "{f}:2: acl.enabled: expected a bool"),
        ("ports {\n  http = 70000\n}\n", "{f}:2: ports.http: port 70000 out of range"),
        ('ports {\n  http = "80"\n}\n', "{f}:2: ports.http: expected a port number, got string"),
        ('bind_addr = "localhost"\n', "{f}:1: bind_addr: 'localhost' is not a valid IP"),
        ('log_level = "loud"\n', "{f}:1: log_level: unknown log level 'loud'"),
        ('client {\n  meta = { "9lives" = "x" }\n}\n',
         '{f}:2: client.meta.9lives: "9lives" is invalid; '
         "metadata keys must be valid dotted hcl identifiers"),
        ("data_dir = var.dir\n", "{f}:1: data_dir: expected a string, got expression var.dir"),
        ('data_dir = ""\n', "{f}:1: data_dir: must not be empty"),
        ("x = 1\ny = = 2\n", "{f}:2: syntax error"),
        ("client {\n", "{f}:2: syntax error: unexpected end of file"),
    ],
)
def test_hcl_errors_name_file_line_and_key(tmp_path: Path, text: str, expected: str) -> None:
    f = write_file(tmp_path, "agent.hcl", text)
    err = load_error(f)
    assert str(err).startswith(expected.format(f=f))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"client": {"meta": {"rack": 1}}}', "client.meta.rack: expected a string, got number"),
        ('{"acl": {"enabled": 1}}', "acl.enabled: expected a bool"),
        ('{"nope": 1}', "nope: unknown configuration key"),
        ("[1]", "expected a JSON object"),
        ('{"ports": {"http": ' + "9" * 5000 + "}}", "invalid JSON: a number is too large"),
    ],
)
def test_json_errors(tmp_path: Path, text: str, expected: str) -> None:
    f = write_file(tmp_path, "agent.json", text)
    err = load_error(f)
    assert str(err).startswith(f"{f}")
    assert expected in str(err)


def test_unknown_key_is_reported_at_the_line_that_sets_it(tmp_path: Path) -> None:
    # Text that looks like the key, earlier in the file, must not be taken for it.
    f = write_file(tmp_path, "agent.hcl", 'data_dir = "/d"\n'
                   "client {\n"
                   "  enabled = true\n"
                   "  meta {\n"
                   "    motd = <<EOF\n"
                   "bogus = 1\n"
                   "EOF\n"
                   "  }\n"
                   "  # bogus = 0\n"
                   "  bogus = 2\n"
                   "}\n")
    err = load_error(f)
    assert (err.line, err.key) == (10, "client.bogus")
    assert str(err) == f"{f}:10: client.bogus: unknown configuration key"


def test_syntax_error_is_reported_at_its_line(tmp_path: Path) -> None:
    f = write_file(tmp_path, "agent.hcl", 'data_dir = "/d"\n'
                   "client {\n"
                   "  meta {\n"
                   '    rack = "r1"\n'
                   '    zone = = "z"\n'
                   "  }\n"
                   "}\n")
    err = load_error(f)
    assert err.line == 5
    assert str(err).startswith(
        f"{f}:5: syntax error at column 12: unexpected '= '; expected an expression")


def test_hcl_reading_rules_are_the_jobspecs(tmp_path: Path) -> None:
    # One HCL front-end: an attribute set twice is refused with both lines, as in a jobspec.
    f = write_file(tmp_path, "agent.hcl", 'data_dir = "/a"\nregion = "r"\ndata_dir = "/b"\n')
    with pytest.raises(ConfigError, match=rf"^{f}:3: attribute 'data_dir' is set more than "
                                          r"once \(first at line 1\)$"):
        load_config_file(f)
    # Config values are never interpolated: ${...} is kept as written.
    f = write_file(tmp_path, "agent.hcl", 'data_dir = "/srv/${node}"\nname = "a\\tb"\n')
    assert load_config_file(f) == {"data_dir": "/srv/${node}", "name": "a\tb"}


def test_json_semantic_errors_name_the_line_of_the_key(tmp_path: Path) -> None:
    f = write_file(tmp_path, "agent.json", '{\n  "region": "has \\"meta\\": ]",\n'
                   '  "client": {\n    "enabled": true,\n    "meta": {"rack": 1}\n  }\n}\n')
    err = load_error(f)
    assert str(err) == f"{f}:5: client.meta.rack: expected a string, got number"


def test_json_syntax_error_has_line(tmp_path: Path) -> None:
    f = write_file(tmp_path, "agent.json", '{\n  "region": "x",\n  oops\n}')
    with pytest.raises(ConfigError, match=rf"^{f}:3: invalid JSON"):
        load_config_file(f)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.hcl: no such file"):
        build_agent_config([tmp_path / "nope.hcl"], AgentFlags())


def test_parse_agent_args() -> None:
    flags = parse_agent_args(["-dev", "-config", "a.hcl", "--config=b.hcl",
                              "-acl-enabled=false", "-meta", "a.b=c"])
    assert flags == AgentFlags(dev=True, config_files=("a.hcl", "b.hcl"), acl_enabled=False,
                               meta={"a.b": "c"})
    assert parse_agent_args([]) == AgentFlags()


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["-nope"], "unrecognized arguments: -nope"),
        (["-dev", "extra"], "unrecognized arguments: extra"),
        (["-http-port", "x"], "-http-port: 'x' is not a number"),
        (["-http-port", "65536"], "out of range"),
        (["-meta", "novalue"], "expected KEY=VALUE"),
        (["-meta=-bad=x"], "is invalid"),
        (["-acl-enabled=maybe"], "invalid boolean value 'maybe'"),
    ],
)
def test_bad_agent_flags(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        parse_agent_args(argv)


GO_TRUE = ["1", "t", "T", "TRUE", "true", "True"]
GO_FALSE = ["0", "f", "F", "FALSE", "false", "False"]


@pytest.mark.parametrize("value", GO_TRUE + GO_FALSE)
def test_boolean_flags_take_go_spellings(value: str) -> None:
    assert parse_agent_args([f"-acl-enabled={value}"]).acl_enabled is (value in GO_TRUE)


@pytest.mark.parametrize("value", ["tRUE", "FaLsE", "yes", "on", "2", ""])
def test_boolean_flags_refuse_what_go_refuses(value: str) -> None:
    with pytest.raises(ConfigError, match=f"invalid boolean value '{value}'"):
        parse_agent_args([f"-acl-enabled={value}"])


def test_bad_flag_values_rejected_at_build() -> None:
    with pytest.raises(ConfigError, match="-bind: 'nowhere' is not a valid IP"):
        build_agent_config([], AgentFlags(dev=True, bind="nowhere"))
    with pytest.raises(ConfigError, match="-log-level: unknown log level"):
        build_agent_config([], AgentFlags(dev=True, log_level="chatty"))


# ---- client { meta_limits { ... } } --------------------------------------------------
def test_meta_limits_defaults_hcl_json_and_merge(tmp_path: Path) -> None:
    from nomad_client.client.nodemeta import MetaLimits

    base = write_file(tmp_path, "a.hcl", 'data_dir = "/d"\nclient { enabled = true }\n')
    assert build_agent_config([base], AgentFlags()).client.meta_limits == MetaLimits(
        max_keys=512, max_key_length=128, max_value_length=4096, max_total_bytes=65536)
    hcl = write_file(tmp_path, "b.hcl", "client {\n  meta_limits {\n    max_keys = 10\n"
                     "    max_value_length = 100\n  }\n}\n")
    json_file = write_file(tmp_path, "c.json", '{"client": {"meta_limits": {"max_keys": 20, '
                           '"max_total_bytes": 1000}}}')
    cfg = build_agent_config([base, hcl, json_file], AgentFlags())
    # Later files override key by key; unset limits keep their defaults.
    assert cfg.client.meta_limits == MetaLimits(max_keys=20, max_key_length=128,
                                                max_value_length=100, max_total_bytes=1000)


@pytest.mark.parametrize(("limits", "expected"), [
    ("max_keys = 0", "{f}:3: client.meta_limits.max_keys: must be at least 1, got 0"),
    ('max_value_length = "4k"',
     "{f}:3: client.meta_limits.max_value_length: expected a whole number, got string"),
    ("max_key_length = true",
     "{f}:3: client.meta_limits.max_key_length: expected a whole number, got bool"),
    ("max_total_bytes = 1.5",
     "{f}:3: client.meta_limits.max_total_bytes: expected a whole number, got number"),
    ("max_bytes = 1", "{f}:3: client.meta_limits.max_bytes: unknown configuration key"),
])
def test_meta_limits_errors_name_file_line_and_key(tmp_path: Path, limits: str,
                                                   expected: str) -> None:
    f = write_file(tmp_path, "agent.hcl",
                   f"client {{\n  meta_limits {{\n    {limits}\n  }}\n}}\n")
    err = load_error(f)
    assert str(err).startswith(expected.format(f=f))


def test_meta_key_with_trailing_newline_is_refused(tmp_path: Path) -> None:
    f = write_file(tmp_path, "agent.json", '{"client": {"meta": {"rack\\n": "r1"}}}')
    with pytest.raises(ConfigError, match="is invalid"):
        load_config_file(f)
    with pytest.raises(ConfigError, match="is invalid"):
        parse_agent_args(["-meta", "rack\n=r1"])
    with pytest.raises(ConfigError, match="is invalid"):
        build_agent_config([], AgentFlags(dev=True, meta={"a.b\n": "x"}))


# ---- client { task_api { ... } } -----------------------------------------------------
EVERY_TASK_API_KEY_HCL = """data_dir = "/d"
client {
  enabled = true
  task_api {
    enabled = false
    default_mode = "opt_in"
    allowed_endpoints = ["GET /v1/agent/health", "* /v1/var/*"]
    denied_endpoints  = ["PUT /v1/client/metadata"]
    max_connections_per_task = 8
    rate_limit { requests_per_second = 2.5  burst = 3 }
    audit { enabled = true  path = "/x/audit.log"  max_size = 4096  max_files = 2 }
    peer_credentials = "enforce"
    bind_identity_to_socket = true
    secrets_tmpfs = false
  }
}
"""
EVERY_TASK_API_KEY_JSON = """{"data_dir": "/d", "client": {"enabled": true, "task_api": {
  "enabled": false, "default_mode": "opt_in",
  "allowed_endpoints": ["GET /v1/agent/health", "* /v1/var/*"],
  "denied_endpoints": ["PUT /v1/client/metadata"],
  "max_connections_per_task": 8,
  "rate_limit": {"requests_per_second": 2.5, "burst": 3},
  "audit": {"enabled": true, "path": "/x/audit.log", "max_size": 4096, "max_files": 2},
  "peer_credentials": "enforce", "bind_identity_to_socket": true, "secrets_tmpfs": false}}}
"""
EVERY_TASK_API_KEY = TaskAPIConfig(
    enabled=False, default_mode="opt_in",
    allowed_endpoints=("GET /v1/agent/health", "* /v1/var/*"),
    denied_endpoints=("PUT /v1/client/metadata",), max_connections_per_task=8,
    rate_limit=RateLimitConfig(requests_per_second=2.5, burst=3),
    audit=AuditConfig(enabled=True, path="/x/audit.log", max_size=4096, max_files=2),
    peer_credentials="enforce", bind_identity_to_socket=True, secrets_tmpfs=False)


@pytest.mark.parametrize(("name", "text"), [("agent.hcl", EVERY_TASK_API_KEY_HCL),
                                            ("agent.json", EVERY_TASK_API_KEY_JSON)])
def test_task_api_every_key(tmp_path: Path, name: str, text: str) -> None:
    cfg = build_agent_config([write_file(tmp_path, name, text)], AgentFlags())
    assert cfg.client.task_api == EVERY_TASK_API_KEY


def test_task_api_defaults_and_api_dict(tmp_path: Path) -> None:
    f = write_file(tmp_path, "a.hcl", 'data_dir = "/d"\nclient { enabled = true }\n')
    cfg = build_agent_config([f], AgentFlags())
    assert cfg.client.task_api == TaskAPIConfig()
    assert cfg.to_api_dict()["Client"]["TaskAPI"] == TaskAPIConfig().to_api_dict()
    f = write_file(tmp_path, "b.hcl", EVERY_TASK_API_KEY_HCL)
    assert build_agent_config([f], AgentFlags()).to_api_dict()["Client"]["TaskAPI"] == {
        "Enabled": False, "DefaultMode": "opt_in",
        "AllowedEndpoints": ["GET /v1/agent/health", "* /v1/var/*"],
        "DeniedEndpoints": ["PUT /v1/client/metadata"], "MaxConnectionsPerTask": 8,
        "RateLimit": {"RequestsPerSecond": 2.5, "Burst": 3},
        "Audit": {"Enabled": True, "Path": "/x/audit.log", "MaxSize": 4096, "MaxFiles": 2},
        "PeerCredentials": "enforce", "BindIdentityToSocket": True, "SecretsTmpfs": False}


def test_task_api_sample_config() -> None:
    cfg = build_agent_config([CONFIGS / "dev.hcl", CONFIGS / "task-api.hcl"], AgentFlags())
    defaults = TaskAPIConfig()
    assert cfg.client.task_api == attrs.evolve(
        defaults, denied_endpoints=("PUT /v1/client/metadata", "POST /v1/client/metadata"),
        audit=attrs.evolve(defaults.audit, enabled=True), bind_identity_to_socket=True)


def test_task_api_files_merge_key_by_key_and_lists_replace(tmp_path: Path) -> None:
    a = write_file(tmp_path, "a.hcl", 'data_dir = "/d"\nclient {\n  enabled = true\n'
                   '  task_api {\n    denied_endpoints = ["PUT /v1/a", "PUT /v1/b"]\n'
                   '    rate_limit {\n      requests_per_second = 5\n      burst = 7\n    }\n'
                   '    audit {\n      enabled = true\n    }\n  }\n}\n')
    b = write_file(tmp_path, "b.json", '{"client": {"task_api": {'
                   '"denied_endpoints": ["PUT /v1/c"], "rate_limit": {"burst": 9},'
                   '"peer_credentials": "off"}}}')
    task_api = build_agent_config([a, b], AgentFlags()).client.task_api
    assert task_api.denied_endpoints == ("PUT /v1/c",)
    assert task_api.rate_limit == RateLimitConfig(requests_per_second=5, burst=9)
    assert task_api.audit == attrs.evolve(AuditConfig(), enabled=True)
    assert (task_api.peer_credentials, task_api.enabled) == ("off", True)


def _task_api_file(tmp_path: Path, body: str) -> Path:
    """``body`` (one line) on line 4 of a file, inside ``client { task_api { ... } }``."""
    return write_file(tmp_path, "agent.hcl",
                      f'data_dir = "/d"\nclient {{\n  task_api {{\n    {body}\n  }}\n}}\n')


@pytest.mark.parametrize(("body", "expected"), [
    ('enabled = "yes"', "client.task_api.enabled: expected a bool (true or false), got string"),
    ('default_mode = "disabled"', "client.task_api.default_mode: unknown value 'disabled' "
                                  '(want one of "enabled", "opt_in")'),
    ("default_mode = 1", "client.task_api.default_mode: expected a string, got number"),
    ('allowed_endpoints = "GET /v1/agent/health"',
     "client.task_api.allowed_endpoints: expected a list of strings, got string"),
    ("denied_endpoints = [1]", "client.task_api.denied_endpoints: rule 1: expected a string, "
                               "got number"),
    ('denied_endpoints = ["PUT /v1/x", "v1/agent/health"]',
     "client.task_api.denied_endpoints: rule 2: endpoint rule 'v1/agent/health' must be "
     '"METHOD /path"'),
    ('allowed_endpoints = ["GET v1/agent/health"]',
     "client.task_api.allowed_endpoints: rule 1: endpoint rule 'GET v1/agent/health': the "
     "path must start with /"),
    ('allowed_endpoints = [""]', "client.task_api.allowed_endpoints: rule 1: endpoint rule ''"),
    ('denied_endpoints = ["FETCH /v1/x"]', "client.task_api.denied_endpoints: rule 1: endpoint "
                                            "rule 'FETCH /v1/x': unknown method 'FETCH'"),
    ('denied_endpoints = ["GET /v1/x?y=1"]', "client.task_api.denied_endpoints: rule 1: "
                                              "endpoint rule 'GET /v1/x?y=1': the path may not "
                                              "hold a query string"),
    ("max_connections_per_task = 0",
     "client.task_api.max_connections_per_task: must be at least 1, got 0"),
    ("max_connections_per_task = -3",
     "client.task_api.max_connections_per_task: must be at least 1, got -3"),
    ("max_connections_per_task = 1.5",
     "client.task_api.max_connections_per_task: expected a whole number, got number"),
    ("rate_limit { requests_per_second = -1 }",
     "client.task_api.rate_limit.requests_per_second: must be a finite number of at least 0, "
     "got -1"),
    ('rate_limit { requests_per_second = "10/s" }',
     "client.task_api.rate_limit.requests_per_second: expected a number, got string"),
    ("rate_limit { requests_per_second = true }",
     "client.task_api.rate_limit.requests_per_second: expected a number, got bool"),
    ("rate_limit { burst = 0 }", "client.task_api.rate_limit.burst: must be at least 1, got 0"),
    ("rate_limit { per_minute = 5 }",
     "client.task_api.rate_limit.per_minute: unknown configuration key"),
    ('rate_limit = "fast"', "client.task_api.rate_limit: expected a block, got string"),
    ("audit { max_size = 4095 }",
     "client.task_api.audit.max_size: must be at least 4096, got 4095"),
    ("audit { max_files = 0 }", "client.task_api.audit.max_files: must be at least 1, got 0"),
    ('audit { path = "" }', "client.task_api.audit.path: must not be empty"),
    ("audit { enabled = 1 }", "client.task_api.audit.enabled: expected a bool"),
    ('peer_credentials = "strict"', "client.task_api.peer_credentials: unknown value 'strict' "
                                    '(want one of "off", "log", "enforce")'),
    ('bind_identity_to_socket = "true"',
     "client.task_api.bind_identity_to_socket: expected a bool"),
    ("secrets_tmpfs = 0", "client.task_api.secrets_tmpfs: expected a bool"),
    ("max_conns = 5", "client.task_api.max_conns: unknown configuration key"),
])
def test_task_api_errors_name_file_line_and_key(tmp_path: Path, body: str,
                                                expected: str) -> None:
    f = _task_api_file(tmp_path, body)
    assert str(load_error(f)).startswith(f"{f}:4: {expected}")


@pytest.mark.parametrize(("body", "expected"), [
    ('"default_mode": "always"', "client.task_api.default_mode: unknown value 'always'"),
    ('"rate_limit": {"requests_per_second": NaN}',
     "client.task_api.rate_limit.requests_per_second: must be a finite number"),
    ('"rate_limit": {"requests_per_second": Infinity}',
     "client.task_api.rate_limit.requests_per_second: must be a finite number"),
    ('"rate_limit": {"burst": 2.0}',
     "client.task_api.rate_limit.burst: expected a whole number, got number"),
    ('"audit": {"max_files": null}', "client.task_api.audit.max_files: expected a whole "
                                     "number, got null"),
    ('"denied_endpoints": ["GET /ok", {"rule": 1}]',
     "client.task_api.denied_endpoints: rule 2: expected a string, got object"),
    ('"allowed_endpoints": ["/v1/agent/health"]',
     "client.task_api.allowed_endpoints: rule 1: endpoint rule '/v1/agent/health' must be"),
    ('"peer_credentials": true', "client.task_api.peer_credentials: expected a string"),
    ('"audit": {"rotate": true}', "client.task_api.audit.rotate: unknown configuration key"),
])
def test_task_api_json_errors_name_file_line_and_key(tmp_path: Path, body: str,
                                                     expected: str) -> None:
    f = write_file(tmp_path, "agent.json", '{\n  "client": {\n    "task_api": {\n'
                   f"      {body}\n    }}\n  }}\n}}\n")
    assert str(load_error(f)).startswith(f"{f}:4: {expected}")


def test_task_api_rate_may_be_off_or_fractional(tmp_path: Path) -> None:
    for rate in ("0", "0.5", "1000"):
        f = _task_api_file(tmp_path, f"rate_limit {{ requests_per_second = {rate} }}")
        cfg = build_agent_config([f], AgentFlags(data_dir="/d", dev=True))
        assert cfg.client.task_api.rate_limit.requests_per_second == float(rate)


# ---- the running agent: /v1/agent/self and reload --------------------------------------
def _agent_file(tmp_path: Path, task_api: str, *, port: int = 0) -> Path:
    return write_file(tmp_path, "agent.hcl",
                      f'data_dir = "{tmp_path / "data"}"\n'
                      f'ports {{\n  http = {port}\n  rpc = 0\n}}\n'
                      "server { enabled = true }\n"
                      f"client {{\n  enabled = true\n  task_api {{\n{task_api}\n  }}\n}}\n")


@pytest.fixture
async def running_agent(tmp_path: Path) -> AsyncIterator[Agent]:
    """A real agent in-process (server, client, router, TCP listener), ``secrets_tmpfs``
    off so it touches no mounts."""
    config = _agent_file(tmp_path, 'denied_endpoints = ["PUT /v1/a"]\nsecrets_tmpfs = false')
    agent = Agent(build_agent_config([config], AgentFlags()))
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def _agent_self(agent: Agent) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://{agent.http_addr}/v1/agent/self") as r:
        assert r.status == 200
        body: dict[str, Any] = await r.json()
        return body["config"]


async def test_agent_self_shows_the_task_api_config_as_reloaded(
        running_agent: Agent, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    agent = running_agent
    shown = await _agent_self(agent)
    assert shown["Client"]["TaskAPI"] == agent.config.client.task_api.to_api_dict()
    assert shown["Client"]["TaskAPI"]["DeniedEndpoints"] == ["PUT /v1/a"]
    port = shown["Ports"]["HTTP"]

    # The same file, changed: a Task API setting (applied) and the port (kept, with a warning).
    new = build_agent_config([_agent_file(
        tmp_path, 'denied_endpoints = ["PUT /v1/b"]\nsecrets_tmpfs = false\n'
                  "rate_limit { burst = 5 }", port=port + 1)], AgentFlags())
    with caplog.at_level(logging.INFO, logger="nomad_client.agent.agent"):
        await agent.reload(new)
    assert agent.task_api_config.current == new.client.task_api
    shown = await _agent_self(agent)
    assert shown["Client"]["TaskAPI"] == new.client.task_api.to_api_dict()
    assert shown["Ports"]["HTTP"] == port
    messages = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert (logging.WARNING, "config reload: these settings cannot change while the agent "
                             "runs and keep their current values: ports.http") in messages
    assert (logging.INFO, 'config reload: applied client.task_api changes: '
                          'client.task_api.denied_endpoints: ["PUT /v1/a"] -> ["PUT /v1/b"]; '
                          f"client.task_api.rate_limit.burst: {RateLimitConfig().burst} -> 5"
            ) in messages

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nomad_client.agent.agent"):
        await agent.reload(new)
    assert [r.getMessage() for r in caplog.records] == [
        "config reload: these settings cannot change while the agent runs and keep their "
        "current values: ports.http", "config reload: no change to client.task_api"]


async def test_a_reload_that_fails_to_apply_puts_the_previous_config_back(
        running_agent: Agent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    agent = running_agent
    before = agent.config
    assert agent.client is not None
    applied: list[TaskAPIConfig] = []
    real_apply = agent.client.apply_task_api_config

    async def apply_once_failing() -> None:
        applied.append(agent.task_api_config.current)
        if len(applied) == 1:
            raise OSError("cannot open the audit log")
        await real_apply()

    monkeypatch.setattr(agent.client, "apply_task_api_config", apply_once_failing)
    new = build_agent_config([_agent_file(tmp_path, "enabled = false")], AgentFlags())
    await agent.reload(new)
    # Tried, then the previous config applied again; the agent shows what is in force.
    assert applied == [new.client.task_api, before.client.task_api]
    assert agent.config == before and agent.task_api_config.current == before.client.task_api
    assert (await _agent_self(agent))["Client"]["TaskAPI"]["Enabled"] is True
    assert "putting the previous Task API config back" in caplog.text


class RecordingAgent:
    """Stands in for ``Agent`` in the reload loop: records each reload, one at a time."""

    def __init__(self) -> None:
        self.reloaded: list[AgentConfig] = []
        self.running = 0
        self.most_at_once = 0
        self.release = asyncio.Event()
        self.release.set()

    async def reload(self, config: AgentConfig) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            await self.release.wait()
            self.reloaded.append(config)
        finally:
            self.running -= 1


def _reload_loop(tmp_path: Path) -> tuple[ReloadLoop, RecordingAgent, Path]:
    path = tmp_path / "agent.hcl"
    agent = RecordingAgent()
    loop = ReloadLoop(agent,  # type: ignore[arg-type]
                      functools.partial(build_agent_config, [path], AgentFlags()))
    return loop, agent, path


async def test_reload_with_a_bad_file_logs_where_and_applies_nothing(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    loop, agent, path = _reload_loop(tmp_path)
    path.write_text(_agent_file(tmp_path, "max_connections_per_task = 2").read_text())
    loop.start()
    try:
        loop.request()
        await wait_until(lambda: len(agent.reloaded) == 1, "the first reload")
        assert agent.reloaded[0].client.task_api.max_connections_per_task == 2
        _agent_file(tmp_path, 'peer_credentials = "always"')  # line 10 of the file
        with caplog.at_level(logging.INFO, logger="nomad_client.agent.run"):
            loop.request()
            await wait_until(lambda: "keeping the current configuration" in caplog.text,
                             "the reload's error line")
    finally:
        await loop.close()
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [f"config reload: {path}:10: client.task_api.peer_credentials: unknown "
                      "value 'always' (want one of \"off\", \"log\", \"enforce\"); keeping "
                      "the current configuration"]
    assert len(agent.reloaded) == 1


async def test_reloads_run_one_at_a_time_and_shutdown_awaits_the_one_under_way(
        tmp_path: Path) -> None:
    loop, agent, path = _reload_loop(tmp_path)
    _agent_file(tmp_path, "max_connections_per_task = 2")
    loop.start()
    agent.release.clear()
    loop.request()
    await wait_until(lambda: agent.running == 1, "a reload under way")
    _agent_file(tmp_path, "max_connections_per_task = 3")
    loop.request()  # during the first: runs after it, reading the file as it is then
    loop.request()  # and a third one coalesces with the second
    agent.release.set()
    await wait_until(lambda: len(agent.reloaded) == 2, "the second reload")
    assert [c.client.task_api.max_connections_per_task for c in agent.reloaded] == [2, 3]
    assert agent.most_at_once == 1

    agent.release.clear()
    loop.request()
    await wait_until(lambda: agent.running == 1, "a third reload under way")
    closing = asyncio.create_task(loop.close())
    await settle()
    assert not closing.done()  # shutdown waits for the reload under way ...
    agent.release.set()
    await closing  # ... which completes
    assert len(agent.reloaded) == 3 and agent.running == 0


async def test_reload_loop_closes_when_idle(tmp_path: Path) -> None:
    loop, agent, _ = _reload_loop(tmp_path)
    loop.start()
    await asyncio.wait_for(loop.close(), 5)
    assert agent.reloaded == []
