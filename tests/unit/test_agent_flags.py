"""Nomad's agent flags for settings a config file also holds (-node, -region, -dc,
-node-class, -node-pool, -state-dir, -alloc-dir, -server, -client), and -servers refused."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from nomad_client.agent.agent import Agent
from nomad_client.agent.config import ConfigError, build_agent_config, parse_agent_args
from tests.unit.factories import write_file


def test_setting_flags_override_the_config_file(tmp_path: Path) -> None:
    config = write_file(tmp_path, "agent.hcl",
                        'name = "from-file"\nregion = "r0"\ndatacenter = "d0"\n'
                        'client {\n  enabled = true\n  node_class = "c0"\n}\n')
    flags = parse_agent_args(["-dev", "-node", "n1", "-region=eu", "-dc", "dc9",
                              "-node-class", "big", "-node-pool=gpu", "-state-dir", "/s",
                              "-alloc-dir", "/a", "-server=false", "-client"])
    cfg = build_agent_config([config], flags)
    assert (cfg.name, cfg.region, cfg.datacenter) == ("n1", "eu", "dc9")
    assert (cfg.client.node_class, cfg.client.node_pool) == ("big", "gpu")
    assert (cfg.client.state_dir, cfg.client.alloc_dir) == ("/s", "/a")
    assert (cfg.server.enabled, cfg.client.enabled) == (False, True)


def test_without_the_flags_the_file_wins(tmp_path: Path) -> None:
    config = write_file(tmp_path, "agent.hcl",
                        'region = "r0"\nclient {\n  enabled = true\n  node_pool = "p0"\n}\n')
    cfg = build_agent_config([config], parse_agent_args(["-dev"]))
    assert (cfg.region, cfg.client.node_pool, cfg.client.node_class) == ("r0", "p0", "")


@pytest.mark.parametrize(("argv", "expected"), [
    (["-servers", "10.0.0.1:99999"], "-servers.0: invalid address"),
    (["-dc"], "expected one argument"),
    (["-n", "x"], "unrecognized arguments: -n"),
    # Nomad's node pool names; no node may join the built-in pool "all".
    (["-node-pool", "all"], "-node-pool: .*built-in node pool 'all'"),
    (["-node-pool", "a/b"], "-node-pool: invalid node pool"),
    (["-node-pool", "x" * 129], "-node-pool: invalid node pool"),
])
def test_bad_setting_flags(argv: list[str], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        build_agent_config([], parse_agent_args(["-dev", *argv]))


@pytest.mark.parametrize("pool", ["all", "a b", ""])
def test_a_config_files_node_pool_is_checked_as_the_flag_is(tmp_path: Path, pool: str) -> None:
    config = write_file(tmp_path, "agent.hcl",
                        f'client {{\n  enabled = true\n  node_pool = "{pool}"\n}}\n')
    with pytest.raises(ConfigError, match="node_pool"):
        build_agent_config([config], parse_agent_args(["-dev"]))


async def test_the_node_registers_with_its_class_and_pool(tmp_path: Path) -> None:
    flags = parse_agent_args(["-dev", "-data-dir", str(tmp_path / "data"), "-http-port", "0",
                              "-node-class", "big", "-node-pool", "gpu", "-node", "n7"])
    config = write_file(tmp_path, "agent.hcl", "client {\n  task_api {\n"
                        "    secrets_tmpfs = false\n  }\n}\n")
    agent = Agent(build_agent_config([config], flags))
    await agent.start()
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"http://{agent.http_addr}/v1/nodes") as resp:
            nodes = await resp.json()
        assert [(n["Name"], n["NodeClass"], n["NodePool"]) for n in nodes] == [
            ("n7", "big", "gpu")]
    finally:
        await agent.stop()
