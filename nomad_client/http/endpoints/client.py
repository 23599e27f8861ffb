"""Client-local endpoints: /v1/client/metadata and /v1/client/fs/{ls,stat,cat,logs}/:alloc.

File access goes through ``AllocDir.resolve`` (the one home of path confinement) and runs in
a worker thread so a slow disk never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import os
import re
import stat
from pathlib import Path
from typing import Any

from aiohttp import web

from nomad_client.client.allocdir import AllocDir, PathEscapeError, SecretReadError
from nomad_client.http.errors import HTTPError, bad_request, not_found
from nomad_client.http.query import query_bool
from nomad_client.http.router import ApiRequest, Router
from nomad_client.http.services import LocalClient, Services
from nomad_client.structs.models import rfc3339

_HCL_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
MAX_CAT_BYTES = 64 * 1024 * 1024


def validate_meta_update(body: Any) -> dict[str, str | None]:
    if not isinstance(body, dict):
        raise bad_request("Request body must be a JSON object")
    unknown = sorted(set(body) - {"Meta", "NodeID"})
    if unknown:
        raise bad_request(f"Unknown field(s) in request body: {', '.join(unknown)}")
    meta = body.get("Meta")
    if not meta or not isinstance(meta, dict):
        raise bad_request("missing required Meta object")
    for key, value in meta.items():
        if not key:
            raise bad_request("metadata keys must not be empty")
        if not all(_HCL_IDENT.match(part) for part in key.split(".")):
            raise bad_request(f"{key!r} is invalid; metadata keys must be valid dotted hcl "
                              "identifiers")
        if value is not None and not isinstance(value, str):
            raise bad_request(f"metadata value for {key!r} must be a string or null")
    return meta


def _file_info(path: Path, name: str) -> dict[str, Any]:
    st = path.lstat()
    return {"Name": name, "IsDir": stat.S_ISDIR(st.st_mode), "Size": st.st_size,
            "FileMode": stat.filemode(st.st_mode), "ModTime": rfc3339(st.st_mtime)}


def _ls(path: Path) -> list[dict[str, Any]]:
    if not path.is_dir():
        raise bad_request(f"{path.name!r} is not a directory")
    return [_file_info(child, child.name) for child in sorted(path.iterdir())]


def _stat(path: Path) -> dict[str, Any]:
    info = _file_info(path, path.name)
    if info["IsDir"]:
        info["ContentType"] = "application/octet-stream"
    else:
        info["ContentType"] = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return info


def _read(path: Path) -> bytes:
    if path.is_dir():
        raise bad_request(f"file {path.name!r} is a directory")
    # O_NOFOLLOW: the path was confined after resolving links; refuse a link swapped in since.
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        data = f.read(MAX_CAT_BYTES + 1)
    if len(data) > MAX_CAT_BYTES:
        raise bad_request("file too large to cat; use logs or readat")
    return data


def _log_files(logs_dir: Path, task: str, kind: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(task)}\.{kind}\.(\d+)$")
    found = [(int(m.group(1)), p) for p in logs_dir.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found)]


def register(router: Router, services: Services) -> None:
    def local_client() -> LocalClient:
        if services.client is None:
            raise bad_request("No local Node and node_id not provided")
        return services.client

    def check_node(req: ApiRequest, body_node: str = "") -> LocalClient:
        client = local_client()
        node_id = req.query.get("node_id") or body_node
        if node_id and node_id != client.node_id:
            raise not_found(f"No path to node {node_id}")
        return client

    async def read_metadata(req: ApiRequest) -> Any:
        return check_node(req).metadata()

    async def apply_metadata(req: ApiRequest) -> Any:
        body = await req.json()
        meta = validate_meta_update(body)
        client = check_node(req, str(body.get("NodeID") or ""))
        return await client.apply_metadata(meta)

    def alloc_dir(req: ApiRequest) -> AllocDir:
        alloc_id = req.params.get("alloc_id", "")
        if not alloc_id:
            raise bad_request("must provide a valid alloc id")
        found = local_client().alloc_dir_for(alloc_id)
        if found is None:
            raise not_found(f"Unknown allocation {alloc_id!r}")
        return found

    async def confined(req: ApiRequest, *, for_read: bool, required: bool) -> Path:
        rel = req.query.get("path", "")
        if required and not rel:
            raise bad_request("must provide a file name")
        adir = alloc_dir(req)
        try:
            return await asyncio.to_thread(adir.resolve, rel or "/", for_read=for_read)
        except PathEscapeError as err:
            raise HTTPError(403, f"Path escapes the alloc directory: {err}") from None
        except SecretReadError as err:
            raise HTTPError(403, f"Reading secret file prohibited: {err}") from None
        except ValueError as err:
            raise bad_request(str(err)) from None

    async def in_thread(fn: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(fn, *args)
        except FileNotFoundError:
            raise not_found("no such file or directory") from None
        except OSError as err:
            raise bad_request(f"cannot access file: {err.strerror}") from None

    async def fs_ls(req: ApiRequest) -> Any:
        return await in_thread(_ls, await confined(req, for_read=False, required=False))

    async def fs_stat(req: ApiRequest) -> Any:
        return await in_thread(_stat, await confined(req, for_read=False, required=True))

    async def fs_cat(req: ApiRequest) -> Any:
        data = await in_thread(_read, await confined(req, for_read=True, required=True))
        return web.Response(body=data, content_type="application/octet-stream")

    async def fs_logs(req: ApiRequest) -> Any:
        task = req.query.get("task", "")
        kind = req.query.get("type", "")
        if not task:
            raise bad_request("must provide task name")
        if kind not in ("stdout", "stderr"):
            raise bad_request("must provide log type (stdout/stderr)")
        if query_bool(req.query, "follow"):
            raise bad_request("follow is not supported by this agent")
        adir = alloc_dir(req)
        alloc = services.server.store.get("allocs", req.params["alloc_id"])
        if alloc is not None and task not in {t["Name"] for g in alloc.job["TaskGroups"]
                                              if g["Name"] == alloc.task_group
                                              for t in g["Tasks"]}:
            raise bad_request(f"unknown task name {task!r}")
        files = await in_thread(_log_files, adir.logs_dir, task, kind)
        if not files:
            raise not_found(f"task {task!r} not started yet. No logs available")
        chunks = [(p, await in_thread(_read, p)) for p in files]
        if query_bool(req.query, "plain"):
            return web.Response(body=b"".join(d for _, d in chunks), content_type="text/plain")
        frames = "".join(json.dumps({"Offset": len(d), "Data": base64.b64encode(d).decode(),
                                     "File": f"alloc/logs/{p.name}"}) for p, d in chunks if d)
        return web.Response(text=frames, content_type="application/json")

    router.add(("GET",), "/v1/client/metadata", read_metadata, "node:read")
    router.add(("POST",), "/v1/client/metadata", apply_metadata, "node:write")
    router.add(("GET",), "/v1/client/fs/ls/{alloc_id}", fs_ls, "namespace:read-fs")
    router.add(("GET",), "/v1/client/fs/stat/{alloc_id}", fs_stat, "namespace:read-fs")
    router.add(("GET",), "/v1/client/fs/cat/{alloc_id}", fs_cat, "namespace:read-fs")
    router.add(("GET",), "/v1/client/fs/logs/{alloc_id}", fs_logs, "namespace:read-logs")
