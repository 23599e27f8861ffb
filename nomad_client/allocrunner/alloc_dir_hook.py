"""Alloc hook ``alloc_dir``: builds the allocation's directory tree before any task runs and
removes it when the allocation is destroyed."""

from __future__ import annotations

import asyncio

from nomad_client.allocrunner.hooks import AllocHookDeps


class AllocDirHook:
    name = "alloc_dir"

    def __init__(self, deps: AllocHookDeps) -> None:
        self._alloc_dir = deps.alloc_dir
        self._log = deps.log

    async def prerun(self) -> None:
        gid = await asyncio.to_thread(self._build)
        # Files and processes show the group as a bare number; this ties it to the alloc.
        self._log.debug("alloc dir %s built; allocation group %s", self._alloc_dir.path, gid)

    def _build(self) -> int | None:
        # Also picks (or, after an agent restart, reads back) the allocation's group.
        self._alloc_dir.build()
        return self._alloc_dir.gid

    async def destroy(self) -> None:
        await asyncio.to_thread(self._alloc_dir.destroy)
