"""``nomad-client agent``: parse flags and config files, run the agent until SIGINT/SIGTERM;
SIGHUP reads the same files and flags again and reloads what can change live."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import resource
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
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
from nomad_client.server.etcd.client import EtcdError
from nomad_client.server.etcd.kek import KEKError
from nomad_client.server.keyring import KeyringError
from nomad_client.state_db import StateDBError

log = logging.getLogger(__name__)


def run_agent_command(argv: Sequence[str]) -> int:
    try:
        flags = parse_agent_args(argv)
        read_config = functools.partial(
            build_agent_config, [Path(f) for f in flags.config_files], flags)
        config = read_config()
    except ConfigError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 1
    logging.basicConfig(level=LOG_LEVELS.get(config.log_level.upper(), logging.INFO),
                        format="%(asctime)s [%(levelname)s] %(name)s: %(message)s")
    logredact.install()  # on the root handlers: every library's records pass through it
    try:
        return _run_loop(_serve(config, read_config))
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


async def _serve(config: AgentConfig, read_config: Callable[[], AgentConfig]) -> int:
    agent = Agent(config)
    stop = asyncio.Event()
    reloads = ReloadLoop(agent, read_config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # From here a SIGHUP never kills the agent: one during start-up is served after it.
    loop.add_signal_handler(signal.SIGHUP, reloads.request)
    try:
        await agent.start()
    except (OSError, StateDBError, KeyringError, KEKError, EtcdError) as err:
        print(f"Error starting agent: {err}", file=sys.stderr)
        return 1
    reloads.start()
    _raise_open_file_limit()
    # Everything loaded so far lives as long as the agent: keep the garbage collector from
    # rescanning it, so per-request collections stay small.
    gc.freeze()
    if agent.rpc_address:
        print(f"==> RPC: {agent.rpc_address}", flush=True)
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
        await reloads.close()
        await agent.stop()
    return 0


class ReloadLoop:
    """Serves SIGHUP: one owned task reloads one request at a time. A SIGHUP during a
    reload starts another after it (several coalesce into one: each reload reads the files
    afresh). On shutdown a reload under way is allowed to finish."""

    def __init__(self, agent: Agent, read_config: Callable[[], AgentConfig]) -> None:
        self._agent = agent
        self._read_config = read_config
        self._wanted = asyncio.Event()
        self._reloading = False
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def request(self) -> None:
        self._wanted.set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="config-reload")

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            self._reloading = True
            try:
                await self._reload()
            finally:
                self._reloading = False
            if self._closing:
                return

    async def _reload(self) -> None:
        log.info("config reload: reading the configuration again (SIGHUP)")
        try:
            # The same files and flags as at start; reading files stays off the loop.
            config = await asyncio.to_thread(self._read_config)
        except ConfigError as err:
            log.error("config reload: %s; keeping the current configuration", err)
            return
        except Exception:  # the loop must outlive any one failed read
            log.exception("config reload: reading the configuration failed; keeping the "
                          "current configuration")
            return
        try:
            await self._agent.reload(config)
        except Exception:  # the loop must outlive any one failed reload
            log.exception("config reload failed; keeping the current configuration")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        self._closing = True
        if not self._reloading:
            task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _raise_open_file_limit() -> None:
    """Every task socket and client connection is a file descriptor: allow as many as the
    system lets this process have (the soft limit is often a small 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            log.warning("could not raise the open-file limit")
