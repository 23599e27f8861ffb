"""Agent configuration: config files (HCL or JSON), command-line flags and their merge.

This module reads the config files it is given and nothing else; it never creates
directories or opens sockets.  The result is an immutable :class:`AgentConfig`.  HCL files
are read by the jobspec package's HCL front-end (``jobspec.plain``), so every error names
the real line, as a jobspec's does.

Precedence (lowest first): built-in defaults, the ``-dev`` defaults, config files in the
order given (later files override earlier ones key by key, maps merge), then flags.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import math
import os
import re
import socket
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from nomad_client.client.cgroups import agent_parent
from nomad_client.client.drivers import DriverError
from nomad_client.client.drivers.exec import (
    DEFAULT_CHROOT_ENV,
    DEFAULT_PIDS_LIMIT,
    DEFAULT_USER_DENYLIST,
    NAMESPACE_MODES,
    ExecDriverConfig,
    parse_caps,
)
from nomad_client.client.drivers.isolation import DEFAULT_CAPS
from nomad_client.client.fingerprint import network_address
from nomad_client.client.nodemeta import MetaLimits, meta_key_problem
from nomad_client.client.taskapi_config import PEER_CREDENTIALS_MODES, TaskAPIConfig
from nomad_client.durations import parse_duration
from nomad_client.goflags import GoArgumentParser, UsageError
from nomad_client.http.endpoint_rules import parse_endpoint_rule
from nomad_client.jobspec.errors import JobspecError, type_name
from nomad_client.jobspec.plain import parse_plain
from nomad_client.structs.taskapi import AGENT_DEFAULT_MODES

# Nomad's log level names and the Python level each runs the agent at (no TRACE below DEBUG).
LOG_LEVELS = {"TRACE": logging.DEBUG, "DEBUG": logging.DEBUG, "INFO": logging.INFO,
              "WARN": logging.WARNING, "ERROR": logging.ERROR}
DEFAULT_HTTP_PORT = 4646
DEFAULT_RPC_PORT = 4647
# How a server keeps its state: in this agent's own files, or in an etcd cluster it shares.
SERVER_STORES = ("embedded", "etcd")
# The smallest audit file worth rotating: a few lines.
MIN_AUDIT_FILE_SIZE = 4096


class ConfigError(Exception):
    """A configuration problem; str() names the file (and line when known) and the key."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 key: str | None = None) -> None:
        self.message = message
        self.file = file
        self.line = line
        self.key = key
        super().__init__(str(self))

    def __str__(self) -> str:
        parts = []
        if self.file:
            parts.append(f"{self.file}:{self.line}" if self.line else self.file)
        if self.key:
            parts.append(self.key)
        parts.append(self.message)
        return ": ".join(parts)


# --------------------------------------------------------------------------------------
# Value objects


def _frozen_map(value: Mapping[str, str] | None) -> Mapping[str, str]:
    # A sorted plain dict copy: callers cannot mutate the config through their own dict.
    return dict(sorted((value or {}).items()))


@attrs.frozen
class PortsConfig:
    http: int = DEFAULT_HTTP_PORT
    # The server's RPC listener (clients and other agents connect here); 0 picks a free port.
    rpc: int = DEFAULT_RPC_PORT


@attrs.frozen
class AdvertiseConfig:
    """What other agents are told to dial ("host" or "host:port"); unset: the bound address."""

    http: str | None = None
    rpc: str | None = None


@attrs.frozen
class TLSConfig:
    """Nomad's ``tls`` block, for the RPC port: mutual TLS between clients and servers."""

    rpc: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    verify_server_hostname: bool = False
    # Plaintext RPC is taken from loopback peers only, unless the operator says otherwise
    # here (a private network they trust); with ``rpc = true`` every peer uses TLS anyway.
    rpc_allow_plaintext_remote: bool = False


def _tuple(value: Sequence[str] | None) -> tuple[str, ...]:
    return tuple(value or ())


@attrs.frozen
class EtcdTLSConfig:
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def _etcd_tls(value: EtcdTLSConfig | Mapping[str, Any] | None) -> EtcdTLSConfig | None:
    if value is None or isinstance(value, EtcdTLSConfig):
        return value
    return EtcdTLSConfig(**value)


@attrs.frozen
class EtcdConfig:
    endpoints: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    # Every key this cluster writes starts with it: several clusters may share one etcd.
    prefix: str = "/nomad/"
    tls: EtcdTLSConfig | None = attrs.field(default=None, converter=_etcd_tls)


def _etcd(value: EtcdConfig | Mapping[str, Any]) -> EtcdConfig:
    return value if isinstance(value, EtcdConfig) else EtcdConfig(**value)


@attrs.frozen
class ServerConfig:
    enabled: bool = False
    # Issuer URL of workload identities and OIDC discovery (Nomad's server.oidc_issuer);
    # unset: the agent's advertised HTTP address.
    oidc_issuer: str | None = None
    # How many versions of each job the server keeps (Nomad's job_tracked_versions).
    job_tracked_versions: int = 6
    # "embedded": this agent's own files; "etcd": shared by every server of the cluster.
    store: str = "embedded"
    etcd: EtcdConfig = attrs.field(factory=EtcdConfig, converter=_etcd)
    # etcd mode: the key-encryption key file (32 random bytes, base64) sealing the keyring.
    keyring_kek_file: str | None = None
    # Nomad's heartbeat settings: the TTL grows with the number of nodes so the servers
    # handle at most max_heartbeats_per_second; a node is down after TTL + grace.
    min_heartbeat_ttl: float = 10.0
    max_heartbeats_per_second: float = 50.0
    heartbeat_grace: float = 10.0
    # etcd mode: the leader's lease; another server takes over at most this long after the
    # leader stops renewing it.
    leader_lease_ttl: int = 10


def _meta_limits(value: MetaLimits | Mapping[str, int]) -> MetaLimits:
    return value if isinstance(value, MetaLimits) else MetaLimits(**value)


def _task_api(value: TaskAPIConfig | Mapping[str, Any]) -> TaskAPIConfig:
    return value if isinstance(value, TaskAPIConfig) else TaskAPIConfig(**value)


@attrs.frozen
class ClientConfig:
    enabled: bool = False
    # RPC addresses of the servers ("host:port"); empty: this agent's own server.
    servers: tuple[str, ...] = attrs.field(default=(), converter=_tuple)
    alloc_dir: str | None = None
    state_dir: str | None = None
    node_class: str = ""
    node_pool: str = "default"
    meta: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    options: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    # Nomad's chroot_env for exec tasks (host path -> path inside); None: Nomad's default.
    chroot_env: Mapping[str, str] | None = None
    meta_limits: MetaLimits = attrs.field(factory=MetaLimits, converter=_meta_limits)
    task_api: TaskAPIConfig = attrs.field(factory=TaskAPIConfig, converter=_task_api)
    # Nomad's: refuse every `alloc exec` on this node. Read at start (a reload keeps it).
    disable_remote_exec: bool = False


@attrs.frozen
class ACLConfig:
    enabled: bool = False
    # A client without a local server caches what servers said of a token and of a policy
    # this long (seconds); a deleted token stops working within token_ttl.
    token_ttl: float = 30.0
    policy_ttl: float = 30.0


@attrs.frozen
class AgentConfig:
    data_dir: str | None = None
    bind_addr: str = "127.0.0.1"
    region: str = "global"
    datacenter: str = "dc1"
    name: str = attrs.field(factory=socket.gethostname)
    log_level: str = "INFO"
    ports: PortsConfig = attrs.field(factory=PortsConfig)
    advertise: AdvertiseConfig = attrs.field(factory=AdvertiseConfig)
    tls: TLSConfig = attrs.field(factory=TLSConfig)
    server: ServerConfig = attrs.field(factory=ServerConfig)
    client: ClientConfig = attrs.field(factory=ClientConfig)
    acl: ACLConfig = attrs.field(factory=ACLConfig)
    dev_mode: bool = False
    # Nomad's `plugin "<name>" { config { ... } }` blocks: plugin name -> its config.
    plugin: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)

    def _server_api_dict(self) -> dict[str, Any]:
        server: dict[str, Any] = {"Enabled": self.server.enabled,
                                  "Store": self.server.store}
        if self.server.store == "etcd":
            # Endpoints and prefix only: the KEK file's path is shown, never its content.
            server["Etcd"] = {"Endpoints": list(self.server.etcd.endpoints),
                              "Prefix": self.server.etcd.prefix}
            server["KeyringKEKFile"] = self.server.keyring_kek_file or ""
        if self.server.oidc_issuer:
            server["OIDCIssuer"] = self.server.oidc_issuer
        return server

    def to_api_dict(self) -> dict[str, Any]:
        """The agent config as reported under "config" by GET /v1/agent/self."""
        return {
            "Region": self.region,
            "Datacenter": self.datacenter,
            "NodeName": self.name,
            "DataDir": self.data_dir or "",
            "BindAddr": self.bind_addr,
            "LogLevel": self.log_level,
            "Ports": {"HTTP": self.ports.http, "RPC": self.ports.rpc},
            "AdvertiseAddrs": {"HTTP": self.advertise.http or "",
                               "RPC": self.advertise.rpc or ""},
            "TLSConfig": {"EnableRPC": self.tls.rpc, "CAFile": self.tls.ca_file or "",
                          "CertFile": self.tls.cert_file or "",
                          "KeyFile": self.tls.key_file or "",
                          "VerifyServerHostname": self.tls.verify_server_hostname},
            "Server": self._server_api_dict(),
            "Client": {
                "Enabled": self.client.enabled,
                "Servers": list(self.client.servers),
                "AllocDir": self.client.alloc_dir or "",
                "StateDir": self.client.state_dir or "",
                "Meta": dict(self.client.meta),
                "Options": dict(self.client.options),
                "TaskAPI": self.client.task_api.to_api_dict(),
                "DisableRemoteExec": self.client.disable_remote_exec,
            },
            "ACL": {"Enabled": self.acl.enabled, "TokenTTL": self.acl.token_ttl,
                    "PolicyTTL": self.acl.policy_ttl},
            "DevMode": self.dev_mode,
        }


@attrs.frozen
class AgentFlags:
    dev: bool = False
    config_files: tuple[str, ...] = ()
    data_dir: str | None = None
    bind: str | None = None
    acl_enabled: bool | None = None
    log_level: str | None = None
    meta: Mapping[str, str] = attrs.field(factory=dict, converter=_frozen_map)
    http_port: int | None = None
    # Nomad's agent flags for settings a config file also holds (None: not given).
    node_name: str | None = None
    region: str | None = None
    datacenter: str | None = None
    node_class: str | None = None
    node_pool: str | None = None
    state_dir: str | None = None
    alloc_dir: str | None = None
    server: bool | None = None
    client: bool | None = None
    # -servers (comma-separated) and -join (repeatable): RPC addresses of servers.
    servers: tuple[str, ...] = attrs.field(default=(), converter=_tuple)


# --------------------------------------------------------------------------------------
# Schema.  A field kind is one of: "string", "bool", "port", "bind", "level", "path",
# "limit", "meta", "options", the Task API's "default_mode", "peer_credentials",
# "endpoint_rules", "rate" and "audit_size", or a nested dict (a block).

_SCHEMA: dict[str, Any] = {
    "data_dir": "path",
    "bind_addr": "bind",
    "region": "string",
    "datacenter": "string",
    "name": "string",
    "log_level": "level",
    "ports": {"http": "port", "rpc": "port"},
    "advertise": {"http": "address", "rpc": "address"},
    "tls": {"rpc": "bool", "ca_file": "path", "cert_file": "path", "key_file": "path",
            "verify_server_hostname": "bool", "rpc_allow_plaintext_remote": "bool"},
    "server": {"enabled": "bool", "oidc_issuer": "issuer", "job_tracked_versions": "limit",
               "store": "server_store",
               "etcd": {"endpoints": "addresses", "prefix": "etcd_prefix",
                        "tls": {"ca_file": "path", "cert_file": "path", "key_file": "path"}},
               "keyring_kek_file": "path",
               "min_heartbeat_ttl": "duration", "max_heartbeats_per_second": "positive_rate",
               "heartbeat_grace": "duration", "leader_lease_ttl": "lease_ttl"},
    "client": {
        "enabled": "bool",
        "servers": "addresses",
        "alloc_dir": "path",
        "state_dir": "path",
        "node_class": "string",
        "node_pool": "node_pool",
        "chroot_env": "chroot_env",
        "meta": "meta",
        "options": "options",
        "meta_limits": {field.name: "limit" for field in attrs.fields(MetaLimits)},
        "task_api": {
            "enabled": "bool",
            "default_mode": "default_mode",
            "allowed_endpoints": "endpoint_rules",
            "denied_endpoints": "endpoint_rules",
            "max_connections_per_task": "limit",
            "rate_limit": {"requests_per_second": "rate", "burst": "limit"},
            "audit": {"enabled": "bool", "path": "path", "max_size": "audit_size",
                      "max_files": "limit"},
            "peer_credentials": "peer_credentials",
            "bind_identity_to_socket": "bool",
            "secrets_tmpfs": "bool",
        },
        "disable_remote_exec": "bool",
    },
    "acl": {"enabled": "bool", "token_ttl": "duration", "policy_ttl": "duration"},
    "plugin": "plugin",
}

_BLOCK_MAPS = ("meta", "options")  # may be written as a block or as `key = { ... }`


class _Source:
    """Where a config came from: its name and the line each key path is set on."""

    def __init__(self, name: str, lines: Mapping[tuple[str, ...], int] | None = None) -> None:
        self.name = name
        self.lines = lines or {}

    def line_of(self, key_path: Sequence[str]) -> int | None:
        """The line ``key_path`` is set on, else that of its nearest enclosing key."""
        for end in range(len(key_path), 0, -1):
            line = self.lines.get(tuple(key_path[:end]))
            if line is not None:
                return line
        return None

    def error(self, key_path: Sequence[str], message: str) -> ConfigError:
        return ConfigError(message, file=self.name, line=self.line_of(key_path),
                           key=".".join(key_path))


# --------------------------------------------------------------------------------------
# Reading files


def _read_hcl(name: str, text: str) -> tuple[dict[str, Any], _Source]:
    try:
        document = parse_plain(text, name)
    except JobspecError as err:  # the HCL front-end's error type, whatever the file holds
        raise ConfigError(err.message, file=name, line=err.line) from None
    return document.data, _Source(name, document.lines)


def _read_json(name: str, text: str) -> tuple[dict[str, Any], _Source]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"invalid JSON: {exc.msg}", file=name, line=exc.lineno) from exc
    except ValueError:  # e.g. an integer beyond Python's digit limit
        raise ConfigError("invalid JSON: a number is too large", file=name) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"expected a JSON object at top level, got {type_name(raw)}",
                          file=name)
    return raw, _Source(name, _json_key_lines(text))


# In a document json.loads accepted, only strings hold quotes or brackets, and a string
# followed by a colon is a key: this finds every key exactly.
_JSON_TOKEN = re.compile(r'("(?:[^"\\]|\\.)*")(\s*:)?|[{}\[\]]')


def _json_key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line each key path of a valid JSON document is set on (none inside arrays)."""
    lines: dict[tuple[str, ...], int] = {}
    # One entry per open bracket: an object's key being read, or None for an array.
    open_brackets: list[str | None] = []
    line, counted_to = 1, 0
    for token in _JSON_TOKEN.finditer(text):
        if token.group() in ("{", "["):
            open_brackets.append("" if token.group() == "{" else None)
        elif token.group() in ("}", "]"):
            open_brackets.pop()
        elif token.group(2):
            open_brackets[-1] = json.loads(token.group(1))
            line += text.count("\n", counted_to, token.start())
            counted_to = token.start()
            keys = [key for key in open_brackets if key is not None]
            if len(keys) == len(open_brackets):
                lines[tuple(keys)] = line
    return lines


def _as_body(value: Any, src: _Source, path: list[str]) -> dict[str, Any]:
    """A block may come as one body (JSON object) or a list of bodies (repeated blocks)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        merged: dict[str, Any] = {}
        for body in value:
            for k, v in body.items():
                if k in _BLOCK_MAPS and isinstance(v, list):
                    v = _as_body(v, src, [*path, k])
                if k in _BLOCK_MAPS and isinstance(v, dict) and isinstance(merged.get(k), dict):
                    merged[k] = {**merged[k], **v}
                else:
                    merged[k] = v
        return merged
    raise src.error(path, f"expected a block, got {type_name(value)}")


def _check_path(value: Any, src: _Source, path: list[str]) -> str:
    s = _check_string(value, src, path)
    return os.path.abspath(s)


def _check_string(value: Any, src: _Source, path: list[str]) -> str:
    if not isinstance(value, str):
        raise src.error(path, f"expected a string, got {type_name(value)}")
    if value == "":
        raise src.error(path, "must not be empty")
    return value


def _check_bool(value: Any, src: _Source, path: list[str]) -> bool:
    if not isinstance(value, bool):
        raise src.error(path, f"expected a bool (true or false), got {type_name(value)}")
    return value


def _check_port(value: Any, src: _Source, path: list[str]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise src.error(path, f"expected a port number, got {type_name(value)}")
    if not 0 <= value <= 65535:
        raise src.error(path, f"port {value} out of range 0..65535")
    return value


def _check_issuer(value: Any, src: _Source, path: list[str]) -> str:
    s = _check_string(value, src, path)
    problem = _issuer_problem(s)
    if problem:
        raise src.error(path, problem)
    return s


# Nomad's node pool names; "all" is the built-in pool of every node, which none may join.
_NODE_POOL_NAME = re.compile(r"[a-zA-Z0-9_-]{1,128}")
_NODE_POOL_ALL = "all"


def _check_node_pool(value: Any, src: _Source, path: list[str]) -> str:
    s = _check_string(value, src, path)
    if not _NODE_POOL_NAME.fullmatch(s):
        raise src.error(path, f"invalid node pool {s!r}: 1 to 128 letters, digits, '-' or '_'")
    if s == _NODE_POOL_ALL:
        raise src.error(path, f"a node may not register in the built-in node pool {s!r}")
    return s


def _issuer_problem(url: str) -> str | None:
    """Why ``url`` cannot be an OIDC issuer (an http(s) URL with a host, and no user
    info, query or fragment), or None when it can."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # a bad port raises here
    except ValueError:
        return "expected an http:// or https:// URL"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"expected an http:// or https:// URL, got {url!r}"
    if parts.username is not None or parts.password is not None:
        return "must not contain a user name or password"  # never echo a credential
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        return f"must not have a query or fragment, got {url!r}"
    if any(c.isspace() or not c.isprintable() for c in url):
        return f"must not contain spaces or control characters, got {url!r}"
    return None


def advertise_http_url(host: str, port: int) -> str:
    """The URL others reach the agent's HTTP API at, from the address it is bound to.

    A wildcard bind (``0.0.0.0``, ``::``) names no address: the host's first private
    address of that family stands in (as Nomad's advertise default), else loopback.
    """
    addr = ipaddress.ip_address(network_address(host))
    shown = f"[{addr}]" if addr.version == 6 else str(addr)
    return f"http://{shown}:{port}"


def _check_bind(value: Any, src: _Source, path: list[str]) -> str:
    s = _check_string(value, src, path)
    try:
        ipaddress.ip_address(s)
    except ValueError:
        raise src.error(path, f"{s!r} is not a valid IP address") from None
    return s


def _check_limit(value: Any, src: _Source, path: list[str], *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise src.error(path, f"expected a whole number, got {type_name(value)}")
    if value < minimum:
        raise src.error(path, f"must be at least {minimum}, got {value}")
    return value


def _check_rate(value: Any, src: _Source, path: list[str]) -> float:
    """A number of requests per second: 0 (off) or more, fractions allowed."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise src.error(path, f"expected a number, got {type_name(value)}")
    if not math.isfinite(value) or value < 0:
        raise src.error(path, f"must be a finite number of at least 0, got {value}")
    return float(value)


def _check_positive_rate(value: Any, src: _Source, path: list[str]) -> float:
    rate = _check_rate(value, src, path)
    if rate <= 0:
        raise src.error(path, f"must be greater than 0, got {value}")
    return rate


def _check_duration(value: Any, src: _Source, path: list[str]) -> float:
    """A Go duration ("10s", "1m30s") or a number of seconds; more than 0."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise src.error(path, f"expected a duration such as \"10s\", got {type_name(value)}")
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise src.error(path, str(exc)) from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise src.error(path, f"must be a duration greater than 0, got {value!r}")
    return seconds


def _check_lease_ttl(value: Any, src: _Source, path: list[str]) -> int:
    # etcd leases are whole seconds; below 2 s a busy machine would lose leadership for nothing.
    seconds = math.ceil(_check_duration(value, src, path))
    if not 2 <= seconds <= 3600:
        raise src.error(path, f"must be between 2s and 1h, got {value!r}")
    return seconds


def _check_address(value: Any, src: _Source, path: list[str]) -> str:
    """"host" or "host:port" ("[v6]:port"), as Nomad's advertise and servers take them."""
    s = _check_string(value, src, path)
    problem = address_problem(s)
    if problem:
        raise src.error(path, problem)
    return s


def _check_addresses(value: Any, src: _Source, path: list[str]) -> tuple[str, ...]:
    if isinstance(value, str):  # a single address, as a flag gives it
        value = [value]
    if not isinstance(value, list) or not value:
        raise src.error(path, f"expected a non-empty list of addresses, got {type_name(value)}")
    return tuple(_check_address(item, src, [*path, str(i)]) for i, item in enumerate(value))


def _check_etcd_prefix(value: Any, src: _Source, path: list[str]) -> str:
    s = _check_string(value, src, path)
    if not s.startswith("/") or "\x00" in s:
        raise src.error(path, f"must start with \"/\", got {s!r}")
    return s if s.endswith("/") else s + "/"


def address_problem(text: str) -> str | None:
    """Why ``text`` is not "host", "host:port" or "[v6]:port" (None: it is)."""
    host, port = text, ""
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return f"invalid address {text!r}: missing ']'"
        host, rest = text[1:end], text[end + 1:]
        if rest and not rest.startswith(":"):
            return f"invalid address {text!r}"
        port = rest[1:]
    elif text.count(":") == 1:
        host, port = text.split(":")
    if not host or any(c.isspace() for c in host) or "/" in host:
        return f"invalid address {text!r}: expected host or host:port"
    if text.startswith("[") or port:
        if not port.isdigit() or not 0 < int(port) <= 65535:
            return f"invalid address {text!r}: port must be 1..65535"
    return None


def _check_choice(value: Any, src: _Source, path: list[str], *,
                  choices: Sequence[str]) -> str:
    s = _check_string(value, src, path)
    if s not in choices:
        wanted = ", ".join(f'"{c}"' for c in choices)
        raise src.error(path, f"unknown value {s!r} (want one of {wanted})")
    return s


def _check_endpoint_rules(value: Any, src: _Source, path: list[str]) -> list[str]:
    """A list of "METHOD /path/glob" rules, each checked by the HTTP layer's own parser."""
    if not isinstance(value, list):
        raise src.error(path, f"expected a list of strings, got {type_name(value)}")
    for number, rule in enumerate(value, 1):
        if not isinstance(rule, str):
            raise src.error(path, f"rule {number}: expected a string, got {type_name(rule)}")
        try:
            parse_endpoint_rule(rule)
        except ValueError as exc:
            raise src.error(path, f"rule {number}: {exc}") from None
    return list(value)


def _check_level(value: Any, src: _Source, path: list[str]) -> str:
    s = _check_string(value, src, path)
    if s.upper() not in LOG_LEVELS:
        raise src.error(path, f"unknown log level {s!r} (want one of {', '.join(LOG_LEVELS)})")
    return s.upper()


def _check_string_map(value: Any, src: _Source, path: list[str], *,
                      dotted_keys: bool) -> dict[str, str]:
    body = _as_body(value, src, path) if isinstance(value, list) else value
    if not isinstance(body, dict):
        raise src.error(path, f"expected a map of strings, got {type_name(body)}")
    out: dict[str, str] = {}
    for k, v in body.items():
        key_path = [*path, k]
        if dotted_keys:
            problem = meta_key_problem(k)
        else:
            problem = None if k else "keys must not be empty"
        if problem:
            raise src.error(key_path, problem)
        if not isinstance(v, str):
            raise src.error(key_path, f"expected a string, got {type_name(v)}")
        out[k] = v
    return out


# --------------------------------------------------------------------------------------
# Driver options: `client { chroot_env = { ... } }` and `plugin "exec" { config { ... } }`.

# The exec plugin's config keys (Nomad's names) and their kinds.
_EXEC_PLUGIN_SCHEMA: dict[str, Any] = {
    "allow_caps": "caps",
    "default_pid_mode": "namespace_mode",
    "default_ipc_mode": "namespace_mode",
    "pids_limit": "limit",
}


def _check_chroot_env(value: Any, src: _Source, path: list[str]) -> dict[str, str]:
    env = _check_string_map(value, src, path, dotted_keys=False)
    for host_path, inside in env.items():
        if not host_path.startswith("/") or not inside.startswith("/"):
            raise src.error([*path, host_path], "chroot_env paths must be absolute")
        if ".." in inside.split("/"):
            raise src.error([*path, host_path], "chroot_env paths must not contain '..'")
    return env


def _check_caps(value: Any, src: _Source, path: list[str]) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise src.error(path, f"expected a list of strings, got {type_name(value)}")
    try:
        return sorted(parse_caps(value, path[-1]))
    except DriverError as exc:
        raise src.error(path, str(exc)) from None


def _check_plugin(value: Any, src: _Source, path: list[str]) -> dict[str, Any]:
    """`plugin "exec" { config { ... } }` (HCL: a list of {label: body}; JSON: a map)."""
    labelled = value if isinstance(value, list) else [value]
    out: dict[str, Any] = {}
    for entry in labelled:
        if not isinstance(entry, dict):
            raise src.error(path, f"expected a labelled block, got {type_name(entry)}")
        for name, body in entry.items():
            block_path = [*path, name]
            if name != "exec":
                raise src.error(block_path, "unknown plugin (only \"exec\" takes options)")
            block = _as_body(body, src, block_path)
            unknown = sorted(set(block) - {"config"})
            if unknown:
                raise src.error([*block_path, unknown[0]], "unknown configuration key")
            config_path = [*block_path, "config"]
            config = _as_body(block.get("config", {}), src, config_path)
            checked: dict[str, Any] = {}
            for key, item in config.items():
                kind = _EXEC_PLUGIN_SCHEMA.get(key)
                if kind is None:
                    raise src.error([*config_path, key], "unknown configuration key")
                checked[key] = _CHECKS[kind](item, src, [*config_path, key])
            out[name] = {**out.get(name, {}), **checked}
    return out


def exec_driver_config(cfg: AgentConfig, data_dir: Path) -> ExecDriverConfig:
    """The exec driver's options from the agent config; its cgroups go under this agent's
    own parent (``agent_parent(data_dir)``)."""
    plugin = dict(cfg.plugin.get("exec") or {})
    denylist = cfg.client.options.get("user.denylist")
    return ExecDriverConfig(
        chroot_env=(DEFAULT_CHROOT_ENV if cfg.client.chroot_env is None
                    else cfg.client.chroot_env),
        allow_caps=plugin.get("allow_caps", DEFAULT_CAPS),
        default_pid_mode=plugin.get("default_pid_mode", "private"),
        default_ipc_mode=plugin.get("default_ipc_mode", "private"),
        pids_limit=plugin.get("pids_limit", DEFAULT_PIDS_LIMIT),
        user_denylist=(DEFAULT_USER_DENYLIST if denylist is None
                       else {u.strip() for u in denylist.split(",") if u.strip()}),
        cgroup_parent=agent_parent(data_dir))


_CHECKS: dict[str, Callable[[Any, _Source, list[str]], Any]] = {
    "string": _check_string,
    "bool": _check_bool,
    "port": _check_port,
    "bind": _check_bind,
    "level": _check_level,
    "limit": _check_limit,
    "path": _check_path,
    "issuer": _check_issuer,
    "node_pool": _check_node_pool,
    "rate": _check_rate,
    "positive_rate": _check_positive_rate,
    "duration": _check_duration,
    "lease_ttl": _check_lease_ttl,
    "address": _check_address,
    "addresses": _check_addresses,
    "etcd_prefix": _check_etcd_prefix,
    "server_store": functools.partial(_check_choice, choices=SERVER_STORES),
    "audit_size": functools.partial(_check_limit, minimum=MIN_AUDIT_FILE_SIZE),
    "default_mode": functools.partial(_check_choice, choices=AGENT_DEFAULT_MODES),
    "peer_credentials": functools.partial(_check_choice, choices=PEER_CREDENTIALS_MODES),
    "endpoint_rules": _check_endpoint_rules,
    "chroot_env": _check_chroot_env,
    "plugin": _check_plugin,
    "caps": _check_caps,
    "namespace_mode": functools.partial(_check_choice, choices=NAMESPACE_MODES),
}


def _validate(body: dict[str, Any], schema: dict[str, Any], src: _Source,
              path: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in body.items():
        key_path = [*path, key]
        kind = schema.get(key)
        if kind is None:
            raise src.error(key_path, "unknown configuration key")
        if isinstance(kind, dict):
            out[key] = _validate(_as_body(value, src, key_path), kind, src, key_path)
        elif kind in ("meta", "options"):
            out[key] = _check_string_map(value, src, key_path, dotted_keys=kind == "meta")
        else:
            out[key] = _CHECKS[kind](value, src, key_path)
    return out


def load_config_file(path: Path) -> dict[str, Any]:
    """Read one config file (JSON when it ends in .json, else HCL) into a validated dict.

    The dict uses the config's own key names; blocks become nested dicts, only keys that
    the file sets are present, paths are made absolute and log levels upper-cased.
    """
    path = Path(path)
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", file=name) from None
    except IsADirectoryError:
        raise ConfigError("is a directory", file=name) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {exc}", file=name) from exc
    read = _read_json if path.suffix.lower() == ".json" else _read_hcl
    raw, src = read(name, text)
    return _validate(raw, _SCHEMA, src, [])


def _expand(files: Sequence[Path]) -> list[Path]:
    """A directory stands for the .hcl and .json files directly inside it, by name."""
    out: list[Path] = []
    for f in files:
        p = Path(f)
        if p.is_dir():
            out.extend(sorted(c for c in p.iterdir()
                              if c.is_file() and c.suffix.lower() in (".hcl", ".json")))
        else:
            out.append(p)
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = _merge(merged[k], v)
        else:
            merged[k] = v
    return merged


def _dev_defaults() -> dict[str, Any]:
    return {
        "bind_addr": "127.0.0.1",
        "log_level": "DEBUG",
        "server": {"enabled": True},
        "client": {"enabled": True},
    }


def _flag_overrides(flags: AgentFlags) -> dict[str, Any]:
    src = _Source("command line")
    over: dict[str, Any] = {}
    if flags.data_dir is not None:
        over["data_dir"] = _check_path(flags.data_dir, src, ["-data-dir"])
    if flags.bind is not None:
        over["bind_addr"] = _check_bind(flags.bind, src, ["-bind"])
    if flags.log_level is not None:
        over["log_level"] = _check_level(flags.log_level, src, ["-log-level"])
    if flags.http_port is not None:
        over["ports"] = {"http": _check_port(flags.http_port, src, ["-http-port"])}
    if flags.acl_enabled is not None:
        over["acl"] = {"enabled": flags.acl_enabled}
    for key, (target, flag) in _TOP_SETTING_FLAGS.items():
        value = getattr(flags, key)
        if value is not None:
            over[target] = _check_string(value, src, [flag])
    for role in ("server", "client"):
        enabled = getattr(flags, role)
        if enabled is not None:
            over[role] = {"enabled": enabled}
    client: dict[str, Any] = {}
    if flags.servers:
        client["servers"] = _check_addresses(list(flags.servers), src, ["-servers"])
    if flags.meta:
        client["meta"] = _check_string_map(dict(flags.meta), src, ["-meta"], dotted_keys=True)
    for key, flag in _CLIENT_SETTING_FLAGS.items():
        value = getattr(flags, key)
        if value is not None:
            client[key] = _CHECKS[_SCHEMA["client"][key]](value, src, [flag])
    if client:
        over["client"] = {**over.get("client", {}), **client}
    return over


# Flags that set a top-level key: AgentFlags field -> (config key, flag).
_TOP_SETTING_FLAGS = {"node_name": ("name", "-node"), "region": ("region", "-region"),
                      "datacenter": ("datacenter", "-dc")}
# Flags that set a key of the client block: AgentFlags field (= config key) -> flag.
_CLIENT_SETTING_FLAGS = {"node_class": "-node-class", "node_pool": "-node-pool",
                         "state_dir": "-state-dir", "alloc_dir": "-alloc-dir"}


def build_agent_config(files: Sequence[Path], flags: AgentFlags) -> AgentConfig:
    """Merge defaults, dev defaults, the given files (directories expanded) and flags."""
    merged: dict[str, Any] = _dev_defaults() if flags.dev else {}
    for path in _expand(files):
        merged = _merge(merged, load_config_file(path))
    merged = _merge(merged, _flag_overrides(flags))

    server = ServerConfig(**merged.get("server", {}))
    client = ClientConfig(**merged.get("client", {}))
    tls = TLSConfig(**merged.get("tls", {}))
    _check_roles(server, client, tls, dev=flags.dev)
    if not flags.dev:
        if not (server.enabled or client.enabled):
            raise ConfigError("must enable at least one of server or client "
                              "(server { enabled = true } or client { enabled = true }), "
                              "or run with -dev")
        if not merged.get("data_dir"):
            raise ConfigError("data_dir is required unless running with -dev "
                              "(set data_dir in a config file or pass -data-dir)",
                              key="data_dir")
    top = {k: v for k, v in merged.items()
           if k not in ("ports", "advertise", "tls", "server", "client", "acl")}
    return AgentConfig(
        **top,
        ports=PortsConfig(**merged.get("ports", {})),
        advertise=AdvertiseConfig(**merged.get("advertise", {})),
        tls=tls,
        server=server,
        client=client,
        acl=ACLConfig(**merged.get("acl", {})),
        dev_mode=flags.dev,
    )


def _check_roles(server: ServerConfig, client: ClientConfig, tls: TLSConfig, *,
                 dev: bool) -> None:
    """Settings that only make sense together, checked once the files and flags are merged."""
    if server.store == "etcd":
        if dev:
            raise ConfigError("-dev keeps the server's state in memory: "
                              "server.store = \"etcd\" cannot be used with it",
                              key="server.store")
        if not server.etcd.endpoints:
            raise ConfigError("server.store = \"etcd\" needs server.etcd.endpoints",
                              key="server.etcd.endpoints")
        if not server.keyring_kek_file:
            raise ConfigError("server.store = \"etcd\" needs server.keyring_kek_file: the "
                              "key-encryption key (32 random bytes, base64) that every server "
                              "uses to seal the shared keyring", key="server.keyring_kek_file")
    if client.servers and server.enabled:
        raise ConfigError("client.servers names other agents' servers: leave it out on an "
                          "agent whose server is enabled (its client uses that server)",
                          key="client.servers")
    if tls.rpc:
        for name in ("ca_file", "cert_file", "key_file"):
            if not getattr(tls, name):
                raise ConfigError(f"tls.rpc = true needs tls.{name}", key=f"tls.{name}")


# --------------------------------------------------------------------------------------
# Flags


def _agent_parser() -> GoArgumentParser:
    p = GoArgumentParser("nomad-client agent", description="Run the agent.",
                         usage="nomad-client agent [options]")
    p.add_bool_flag("dev", help="run a development agent: server and client, temporary data dir")
    p.add_flag("config", action="append", default=[], metavar="PATH",
               help="config file or directory (repeatable; later ones win)")
    p.add_flag("data-dir", metavar="PATH", help="directory for agent state")
    p.add_flag("bind", metavar="ADDR", help="IP address to bind the HTTP API to")
    p.add_bool_flag("acl-enabled", default=None, help="enable ACL enforcement")
    p.add_flag("log-level", metavar="LEVEL", help="TRACE, DEBUG, INFO, WARN or ERROR")
    p.add_flag("meta", action="append", default=[], metavar="KEY=VALUE",
               help="client node metadata (repeatable)")
    p.add_flag("http-port", metavar="PORT", help="HTTP API port (0 picks a free port)")
    p.add_flag("node", dest="node_name", metavar="NAME", help="the node's name")
    p.add_flag("region", metavar="REGION", help="the agent's region (default global)")
    p.add_flag("dc", dest="datacenter", metavar="DC", help="the node's datacenter (default dc1)")
    p.add_flag("node-class", metavar="CLASS", help="the client node's class")
    p.add_flag("node-pool", metavar="POOL", help="the client node's pool (default default)")
    p.add_flag("state-dir", metavar="PATH", help="directory for the client's state")
    p.add_flag("alloc-dir", metavar="PATH", help="directory for allocation directories")
    p.add_bool_flag("server", default=None, help="enable server mode")
    p.add_bool_flag("client", default=None, help="enable client mode")
    p.add_flag("servers", metavar="ADDRS",
               help="comma-separated RPC addresses of servers for the client (host:port)")
    p.add_flag("join", action="append", default=[], metavar="ADDR",
               help="a server's RPC address to join (repeatable; servers find each other "
                    "through etcd, so only a client uses it)")
    return p


def parse_agent_args(argv: Sequence[str]) -> AgentFlags:
    """Parse ``agent`` command-line flags; bad flags raise ConfigError with usage attached.

    ``-h``/``-help`` raises ``nomad_client.goflags.HelpRequested``.
    """
    parser = _agent_parser()
    try:
        ns = parser.parse(list(argv))
    except UsageError as exc:
        raise ConfigError(f"{exc}\n{exc.usage}".rstrip()) from None
    meta: dict[str, str] = {}
    for item in ns.meta:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"-meta {item!r}: expected KEY=VALUE")
        problem = meta_key_problem(key)
        if problem:
            raise ConfigError(problem, key=f"-meta {key}")
        meta[key] = value
    port: int | None = None
    if ns.http_port is not None:
        try:
            port = int(ns.http_port)
        except ValueError:
            raise ConfigError(f"-http-port: {ns.http_port!r} is not a number") from None
        if not 0 <= port <= 65535:
            raise ConfigError(f"-http-port: port {port} out of range 0..65535")
    servers = [a.strip() for a in (ns.servers or "").split(",") if a.strip()]
    servers += [a.strip() for a in ns.join if a.strip()]
    return AgentFlags(
        dev=bool(ns.dev),
        config_files=tuple(ns.config),
        data_dir=ns.data_dir,
        bind=ns.bind,
        acl_enabled=ns.acl_enabled,
        log_level=ns.log_level,
        meta=meta,
        http_port=port,
        node_name=ns.node_name, region=ns.region, datacenter=ns.datacenter,
        node_class=ns.node_class, node_pool=ns.node_pool, state_dir=ns.state_dir,
        alloc_dir=ns.alloc_dir, server=ns.server, client=ns.client,
        servers=tuple(servers),
    )
