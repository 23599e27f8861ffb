"""``nomad-client agent``: parse flags and config files, run the agent until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import signal
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from nomad_client import logredact
from nomad_client.agent.agent import Agent
from nomad_client.agent.config import (
    LOG_LEVELS,
    AgentConfig,
    ConfigError,
    build_agent_config,
    parse_agent_args,
)
from nomad_client.server.keyring import KeyringError
from nomad_client.state_db import StateDBError


def run_agent_command(argv: Sequence[str]) -> int:
    try:
        flags = parse_agent_args(argv)
        config = build_agent_config([Path(f) for f in flags.config_files], flags)
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    logging.basicConfig(level=LOG_LEVELS.get(config.log_level.upper(), logging.INFO),
                        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    logredact.install()  # on the root handlers: every library's records pass through it
    try:
        return _run_loop(_serve(config))
    except KeyboardInterrupt:
        return 0


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run the agent on uvloop when it is installed: the same asyncio program with a
    faster event loop (measured by bench/taskapi_bench.py), else on asyncio's own."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run(main)
    return uvloop.run(main)


async def _serve(config: AgentConfig) -> int:
    agent = Agent(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await agent.start()
    except (OSError, StateDBError, KeyringError) as err:
        print(f"Error starting agent: {err}", file=sys.stderr)
        return 1
    _raise_open_file_limit()
    # Everything loaded so far lives as long as the agent: keep the garbage collector from
    # rescanning it, so per-request collections stay small.
    gc.freeze()
    mode = "dev mode" if config.dev_mode else "agent"
    print(f"==> nomad-client {mode} started! HTTP API: http://{agent.http_addr} "
          f"(data dir {agent.data_dir})", flush=True)
    if config.acl.enabled:
        print("==> ACLs are enabled: run 'nomad-client acl bootstrap' to create the management "
              "token", flush=True)
    try:
        await stop.wait()
    finally:
        print("==> shutting down", flush=True)
        await agent.stop()
    return 0


def _raise_open_file_limit() -> None:
    """Every task socket and client connection is a file descriptor: allow as many as the
    system lets this process have (the soft limit is often a small 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            logging.getLogger(__name__).warning("could not raise the open-file limit")
