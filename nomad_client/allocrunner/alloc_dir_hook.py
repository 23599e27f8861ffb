"""Alloc hook ``alloc_dir``: builds the allocation's directory tree before any task runs and
removes it when the allocation is destroyed."""

from __future__ import annotations

import asyncio

from nomad_client.allocrunner.hooks import AllocHookDeps


class AllocDirHook:
    name = "alloc_dir"

    def __init__(self, deps: AllocHookDeps) -> None:
        self._alloc_dir = deps.alloc_dir

    async def prerun(self) -> None:
        await asyncio.to_thread(self._alloc_dir.build)

    async def destroy(self) -> None:
        await asyncio.to_thread(self._alloc_dir.destroy)
