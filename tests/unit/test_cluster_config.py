"""The cluster settings of the agent config: roles, RPC port and address, TLS, etcd store,
heartbeats and the ACL cache; errors name the file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from nomad_client.agent.config import (
    AgentFlags,
    ConfigError,
    address_problem,
    build_agent_config,
    parse_agent_args,
)
from tests.unit.factories import write_file

ETCD_SERVER = '''data_dir = "/d"
ports { rpc = 0 }
advertise { rpc = "10.0.0.5:4647" }
server {
  enabled = true
  store = "etcd"
  keyring_kek_file = "/etc/nomad/kek"
  min_heartbeat_ttl = "5s"
  heartbeat_grace = "2s"
  max_heartbeats_per_second = 100
  leader_lease_ttl = "4s"
  etcd {
    endpoints = ["127.0.0.1:2379", "127.0.0.1:22379"]
    prefix = "/clusters/a"
  }
}
acl {
  enabled = true
  token_ttl = "10s"
  policy_ttl = "1m"
}
'''


def test_etcd_server_settings(tmp_path: Path) -> None:
    cfg = build_agent_config([write_file(tmp_path, "s.hcl", ETCD_SERVER)], AgentFlags())
    assert cfg.ports.rpc == 0 and cfg.advertise.rpc == "10.0.0.5:4647"
    s = cfg.server
    assert (s.store, s.etcd.endpoints, s.etcd.prefix) == (
        "etcd", ("127.0.0.1:2379", "127.0.0.1:22379"), "/clusters/a/")
    assert (s.min_heartbeat_ttl, s.heartbeat_grace, s.max_heartbeats_per_second,
            s.leader_lease_ttl) == (5.0, 2.0, 100.0, 4)
    assert (cfg.acl.token_ttl, cfg.acl.policy_ttl) == (10.0, 60.0)
    api = cfg.to_api_dict()
    assert api["Server"]["Etcd"]["Endpoints"] == ["127.0.0.1:2379", "127.0.0.1:22379"]
    assert api["Ports"]["RPC"] == 0


def test_client_only_servers_from_file_and_flags(tmp_path: Path) -> None:
    f = write_file(tmp_path, "c.hcl", 'data_dir = "/d"\nclient {\n  enabled = true\n'
                   '  servers = ["127.0.0.1:4647"]\n}\n')
    assert build_agent_config([f], AgentFlags()).client.servers == ("127.0.0.1:4647",)
    flags = parse_agent_args(["-client", "-data-dir", "/d", "-servers", "a:1,b:2",
                              "-join", "c:3"])
    cfg = build_agent_config([], flags)
    assert cfg.client.servers == ("a:1", "b:2", "c:3") and not cfg.server.enabled


@pytest.mark.parametrize(("text", "message"), [
    ('server {\n  enabled = true\n  store = "raft"\n}\n', "{f}:3: server.store: unknown value"),
    ('server {\n  enabled = true\n  store = "etcd"\n}\n', "server.etcd.endpoints"),
    ('server {\n  enabled = true\n  store = "etcd"\n  etcd {\n    endpoints = ["a:1"]\n'
     '  }\n}\n', "server.keyring_kek_file"),
    ('client {\n  enabled = true\n  servers = ["a:99999"]\n}\n', "port must be 1..65535"),
    ('client {\n  enabled = true\n  servers = []\n}\n', "non-empty list"),
    ('server {\n  enabled = true\n}\nclient {\n  enabled = true\n  servers = ["a:1"]\n}\n',
     "client.servers"),
    ('tls {\n  rpc = true\n}\nserver {\n  enabled = true\n}\n', "tls.ca_file"),
    ('server {\n  enabled = true\n  heartbeat_grace = "soon"\n}\n',
     "{f}:3: server.heartbeat_grace"),
    ('server {\n  enabled = true\n  max_heartbeats_per_second = 0\n}\n',
     "greater than 0"),
    ('server {\n  enabled = true\n  leader_lease_ttl = "1s"\n}\n', "between 2s and 1h"),
    ('server {\n  enabled = true\n  etcd {\n    prefix = "nomad"\n  }\n}\n',
     'must start with "/"'),
])
def test_bad_cluster_settings(tmp_path: Path, text: str, message: str) -> None:
    f = write_file(tmp_path, "x.hcl", 'data_dir = "/d"\n' + text)
    with pytest.raises(ConfigError) as err:
        build_agent_config([f], AgentFlags())
    # The file's lines are one further down: data_dir is line 1.
    expected = message.replace("{f}:3", f"{f}:4")
    assert expected in str(err.value)


def test_etcd_store_refused_with_dev() -> None:
    flags = AgentFlags(dev=True)
    cfg = build_agent_config([], flags)
    assert cfg.server.store == "embedded"


@pytest.mark.parametrize(("address", "ok"), [
    ("host", True), ("host:4647", True), ("[::1]:4647", True), ("10.0.0.1:1", True),
    ("host:0", False), ("host:x", False), ("[::1", False), ("", False), ("a b:1", False),
    ("[::1]x", False), ("http://host:1", False),
])
def test_address_problem(address: str, ok: bool) -> None:
    assert (address_problem(address) is None) is ok
