"""The exec driver's configuration: a task's ``config {}``, its limits, the client's options
(``client { chroot_env }``, ``plugin "exec" { config {} }``), the task paths it implies, and
what it refuses before touching anything."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nomad_client.agent.config import (
    AgentFlags,
    ConfigError,
    build_agent_config,
    exec_driver_config,
    load_config_file,
)
from nomad_client.client import cgroups
from nomad_client.client.drivers import DriverError, TaskConfig
from nomad_client.client.drivers import exec as exec_mod
from nomad_client.client.drivers.exec import (
    DEFAULT_CHROOT_ENV,
    ExecDriver,
    ExecDriverConfig,
    cgroup_limits,
    parse_caps,
    parse_task_config,
)
from nomad_client.client.drivers.isolation import CAPABILITIES, DEFAULT_CAPS
from nomad_client.client.drivers.raw_exec import RawExecDriver
from nomad_client.client.taskenv import FS_ISOLATION_CHROOT, FS_ISOLATION_NONE, task_paths

PLUGIN = ExecDriverConfig()


def parse(**config: Any) -> Any:
    return parse_task_config({"command": "/bin/true", **config}, PLUGIN)


def refusal(**config: Any) -> str:
    with pytest.raises(DriverError) as info:
        parse(**config)
    assert info.value.recoverable is False
    return str(info.value)


def test_defaults_are_nomads() -> None:
    parsed = parse(args=["-x"])
    assert (parsed.command, parsed.args) == ("/bin/true", ("-x",))
    assert (parsed.pid_mode, parsed.ipc_mode, parsed.work_dir) == ("private", "private", "/")
    assert parsed.capabilities == DEFAULT_CAPS and parsed.added == frozenset()
    assert "NET_RAW" not in DEFAULT_CAPS and "SYS_ADMIN" not in DEFAULT_CAPS
    assert set(DEFAULT_CHROOT_ENV) >= {"/bin", "/etc", "/lib", "/lib32", "/lib64",
                                        "/run/resolvconf", "/sbin", "/usr"}


def test_capability_names_as_nomad_accepts_them() -> None:
    assert parse_caps(["cap_kill", "Net_Bind_Service", "ALL"], "cap_add") == {
        "KILL", "NET_BIND_SERVICE", "ALL"}
    parsed = parse(cap_drop=["all"], cap_add=["net_bind_service"])
    assert parsed.capabilities == {"NET_BIND_SERVICE"} == parsed.added
    assert parse(cap_drop=["CAP_CHOWN"]).capabilities == DEFAULT_CAPS - {"CHOWN"}
    assert parse(cap_add=["all"]).added == DEFAULT_CAPS
    assert max(CAPABILITIES.values()) == 40 and CAPABILITIES["SYS_ADMIN"] == 21


@pytest.mark.parametrize(("config", "message"), [
    ({"cap_add": ["net_raw"]}, "driver does not allow the following capabilities: net_raw"),
    ({"cap_drop": ["bogus"]}, "cap_drop configured with capabilities not supported by system: "
                              "bogus"),
    ({"cap_add": "kill"}, "'cap_add' must be a list of strings"),
    ({"pid_mode": "shared"}, "pid_mode must be \"private\" or \"host\", got 'shared'"),
    ({"ipc_mode": "none"}, "ipc_mode must be \"private\" or \"host\", got 'none'"),
    ({"work_dir": "local"}, "work_dir must be absolute but got relative path 'local'"),
    ({"privileged": True}, "unknown config key(s) 'privileged'"),
])
def test_bad_config_is_refused_naming_the_key(config: dict[str, Any], message: str) -> None:
    assert message in refusal(**config)


def test_plugin_allow_caps_widens_cap_add() -> None:
    plugin = ExecDriverConfig(allow_caps=DEFAULT_CAPS | {"NET_RAW"}, default_pid_mode="host")
    parsed = parse_task_config({"command": "x", "cap_add": ["net_raw"]}, plugin)
    assert "NET_RAW" in parsed.capabilities and parsed.pid_mode == "host"
    everything = parse_task_config({"command": "x", "cap_add": ["sys_time"]},
                                   ExecDriverConfig(allow_caps={"ALL"}))
    assert "SYS_TIME" in everything.capabilities


def test_resources_become_cgroup_limits() -> None:
    mib = 1024 * 1024
    limits = cgroup_limits({"CPU": 500, "MemoryMB": 256}, 100)
    assert (limits.memory_bytes, limits.memory_max_bytes, limits.cpu_shares, limits.pids_max) \
        == (256 * mib, None, 500, 100)
    assert limits.hard_and_soft == (256 * mib, 0)
    oversubscribed = cgroup_limits({"CPU": 100, "MemoryMB": 64, "MemoryMaxMB": 128}, None)
    assert oversubscribed.hard_and_soft == (128 * mib, 64 * mib)
    unlimited = cgroup_limits({"MemoryMB": 64, "MemoryMaxMB": -1}, None)
    assert unlimited.hard_and_soft == (cgroups.NO_MEMORY_LIMIT, 64 * mib)


def test_task_paths_inside_a_chroot() -> None:
    host = {"alloc_dir": "/d/a/alloc", "local_dir": "/d/a/t/local", "secrets_dir": "/d/a/t/s"}
    chroot = task_paths(FS_ISOLATION_CHROOT, **host)
    assert (chroot.alloc_dir, chroot.local_dir, chroot.secrets_dir) == (
        "/alloc", "/local", "/secrets")
    plain = task_paths(FS_ISOLATION_NONE, **host)
    assert (plain.alloc_dir, plain.local_dir, plain.secrets_dir) == tuple(host.values())
    assert ExecDriver.fs_isolation == FS_ISOLATION_CHROOT
    assert getattr(RawExecDriver, "fs_isolation", FS_ISOLATION_NONE) == FS_ISOLATION_NONE


def task_config(tmp_path: Path, **overrides: Any) -> TaskConfig:
    logs = tmp_path / "alloc" / "logs"
    values: dict[str, Any] = dict(
        alloc_id="a1", task="t", driver_config={"command": "/bin/true"}, env={},
        task_dir=tmp_path / "t", user=None, stdout_path=logs / "t.stdout.0",
        stderr_path=logs / "t.stderr.0", kill_timeout=1.0, state_dir=tmp_path / "state")
    values.update(overrides)
    return TaskConfig(**values)


async def test_start_refuses_before_touching_anything(tmp_path: Path) -> None:
    driver = ExecDriver(ExecDriverConfig(cgroup_root=tmp_path / "no-cgroups"))
    with pytest.raises(DriverError, match="does not support 'bridge' networking mode"):
        await driver.start_task(task_config(tmp_path, network_mode="bridge"))
    with pytest.raises(DriverError, match='running as user "root" is disallowed'):
        await driver.start_task(task_config(tmp_path, user="root"))
    assert not (tmp_path / "state").exists() and not (tmp_path / "no-cgroups").exists()


async def test_raw_exec_refuses_network_isolation(tmp_path: Path) -> None:
    with pytest.raises(DriverError, match="does not support 'none' networking mode") as info:
        await RawExecDriver().start_task(task_config(tmp_path, network_mode="none"))
    assert info.value.recoverable is False


def test_fingerprint_says_why_it_cannot_run(tmp_path: Path) -> None:
    info = ExecDriver(ExecDriverConfig(cgroup_root=tmp_path)).fingerprint()
    assert info.detected and not info.healthy
    assert info.health_description.startswith(
        ("Failed to discover cgroup mount point", "Driver must run as root", "namespaces"))
    assert "driver.exec" not in info.attributes


# -- the agent's config ---------------------------------------------------------------------


def write(tmp_path: Path, text: str, name: str = "agent.hcl") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_chroot_env_and_exec_plugin_options(tmp_path: Path) -> None:
    path = write(tmp_path, """
client {
  enabled    = true
  chroot_env = { "/usr" = "/usr", "/etc/ssl" = "/etc/ssl" }
  options    = { "user.denylist" = "admin, ops" }
}
plugin "exec" {
  config {
    allow_caps       = ["kill", "CAP_NET_RAW"]
    default_pid_mode = "host"
    pids_limit       = 128
  }
}
""")
    cfg = build_agent_config([path], AgentFlags(data_dir=str(tmp_path / "data")))
    driver = exec_driver_config(cfg, tmp_path / "data")
    assert driver.chroot_env == {"/usr": "/usr", "/etc/ssl": "/etc/ssl"}
    assert driver.allow_caps == {"KILL", "NET_RAW"}
    assert (driver.default_pid_mode, driver.default_ipc_mode) == ("host", "private")
    assert driver.pids_limit == 128 and driver.user_denylist == {"admin", "ops"}
    assert driver.cgroup_parent == cgroups.agent_parent(tmp_path / "data")


def test_exec_defaults_without_options(tmp_path: Path) -> None:
    cfg = build_agent_config([], AgentFlags(dev=True))
    driver = exec_driver_config(cfg, tmp_path)
    assert driver.chroot_env == DEFAULT_CHROOT_ENV and driver.allow_caps == DEFAULT_CAPS
    assert driver.user_denylist == {"root", "Administrator"}


def test_plugin_block_as_json(tmp_path: Path) -> None:
    path = write(tmp_path, '{"plugin": {"exec": {"config": {"default_ipc_mode": "host"}}}}',
                 "agent.json")
    assert load_config_file(path)["plugin"] == {"exec": {"default_ipc_mode": "host"}}


@pytest.mark.parametrize(("text", "message"), [
    ('plugin "docker" {\n config {}\n}\n', 'plugin.docker: unknown plugin'),
    ('plugin "exec" {\n config {\n no_pivot_root = true\n }\n}\n',
     "plugin.exec.config.no_pivot_root: unknown configuration key"),
    ('plugin "exec" {\n config {\n allow_caps = ["bogus"]\n }\n}\n',
     "not supported by system: bogus"),
    ('plugin "exec" {\n config {\n default_pid_mode = "shared"\n }\n}\n',
     "unknown value 'shared'"),
    ('client {\n chroot_env = { "bin" = "/bin" }\n}\n', "chroot_env paths must be absolute"),
    ('client {\n chroot_env = { "/bin" = "/../bin" }\n}\n', "must not contain '..'"),
])
def test_bad_exec_options_name_file_line_and_key(tmp_path: Path, text: str,
                                                 message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config_file(write(tmp_path, text))
    assert message in str(info.value) and "agent.hcl" in str(info.value)


class FakeManager:
    """Records what the driver asks of its cgroup manager; no pids controller."""

    def __init__(self, stale: Any = None) -> None:
        self.stale = stale
        self.created: list[cgroups.CgroupLimits] = []

    def open(self, name: str) -> Any:
        return self.stale

    def create(self, name: str, limits: cgroups.CgroupLimits) -> str:
        if limits.pids_max is not None:
            raise cgroups.CgroupsUnavailable("the pids controller is unavailable")
        self.created.append(limits)
        return name


class StaleCgroup:
    destroyed = False

    def destroy(self) -> None:
        self.destroyed = True


def test_a_stale_cgroup_is_replaced_and_a_missing_pids_controller_tolerated() -> None:
    stale = StaleCgroup()
    manager = FakeManager(stale)
    limits = cgroup_limits({"CPU": 100, "MemoryMB": 64}, 4096)
    assert exec_mod._fresh_cgroup(manager, "a.t", limits) == "a.t"  # type: ignore[arg-type]
    assert stale.destroyed
    assert [c.pids_max for c in manager.created] == [None]
    assert manager.created[0].memory_bytes == 64 * 1024 * 1024
