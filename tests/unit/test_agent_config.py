"""Agent configuration: files (HCL/JSON), validation errors, merging, flags."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from nomad_client.agent.config import (
    AgentConfig,
    AgentFlags,
    ConfigError,
    build_agent_config,
    load_config_file,
    parse_agent_args,
)
from tests.unit.factories import write_file

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
    assert api["Ports"] == {"HTTP": 4646} and api["ACL"] == {"Enabled": False}
    assert api["Client"]["Enabled"] is True and api["Server"] == {"Enabled": False}
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
