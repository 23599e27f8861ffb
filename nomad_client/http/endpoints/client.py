"""Client-local endpoints: /v1/client/metadata and /v1/client/fs/{ls,stat,cat,logs}/:alloc.

Every file is opened with ``AllocDir.open_path`` (the one home of path confinement, which
never follows a symlink) and then served from that descriptor, never re-opened by name:
tasks can rewrite most of the alloc dir while a request runs. All file work, including the
encoding of log frames, runs in a worker thread so the event loop never blocks on it.
"""

from __future__ import annotations

import asyncio
import base64
import json
import mimetypes
import os
import re
import stat
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web

from nomad_client.client.allocdir import (
    AllocDir,
    AllocPathError,
    PathEscapeError,
    PathNotFoundError,
    SecretReadError,
    SymlinkError,
)
from nomad_client.http.errors import HTTPError, bad_request, not_found
from nomad_client.http.query import query_bool
from nomad_client.http.router import ApiRequest, Router
from nomad_client.http.services import LocalClient, Services
from nomad_client.structs.models import rfc3339

_HCL_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
MAX_CAT_BYTES = 64 * 1024 * 1024
# Log reads stop after this many bytes in total (files in index order): a task decides how
# many log files there are and how large (sparse) they look.
MAX_LOG_BYTES = 16 * 1024 * 1024
# Largest data payload of one log frame, as Nomad's.
LOG_FRAME_BYTES = 64 * 1024
T = TypeVar("T")


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


def _file_info(name: str, st: os.stat_result) -> dict[str, Any]:
    return {"Name": name, "IsDir": stat.S_ISDIR(st.st_mode), "Size": st.st_size,
            "FileMode": stat.filemode(st.st_mode), "ModTime": rfc3339(st.st_mtime)}


def _ls(adir: AllocDir, rel: str) -> list[dict[str, Any]]:
    with adir.open_path(rel, want="dir") as opened:
        found = []
        with os.scandir(opened.fd) as entries:
            for entry in entries:
                try:
                    # lstat semantics: a symlink shows as a link and is never followed.
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # removed since the directory was read: just not listed
                found.append(_file_info(entry.name, st))
    return sorted(found, key=lambda info: info["Name"])


def _stat(adir: AllocDir, rel: str) -> dict[str, Any]:
    with adir.open_path(rel, want="any") as opened:
        info = _file_info(opened.name, opened.st)
    if info["IsDir"]:
        info["ContentType"] = "application/octet-stream"
    else:
        info["ContentType"] = mimetypes.guess_type(opened.name)[0] or "application/octet-stream"
    return info


def _cat(adir: AllocDir, rel: str) -> bytes:
    with adir.open_path(rel, want="file", for_read=True) as opened:
        data = _read_up_to(opened.fd, MAX_CAT_BYTES + 1)
    if len(data) > MAX_CAT_BYTES:
        raise bad_request("file too large to cat; use logs or readat")
    return data


def _read_up_to(fd: int, limit: int) -> bytes:
    chunks: list[bytes] = []
    left = limit
    while left > 0:
        chunk = os.read(fd, min(left, 1024 * 1024))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _log_names(adir: AllocDir, task: str, kind: str) -> list[str]:
    pattern = re.compile(rf"^{re.escape(task)}\.{kind}\.(\d+)$")
    with adir.open_path("alloc/logs", want="dir", for_read=True) as logs, \
            os.scandir(logs.fd) as entries:
        found = [(int(m.group(1)), e.name) for e in entries if (m := pattern.match(e.name))]
    return [name for _, name in sorted(found)]


def _read_logs(adir: AllocDir, task: str, kind: str, *, plain: bool,
               max_bytes: int = MAX_LOG_BYTES) -> bytes | None:
    """The task's logs, oldest first, at most ``max_bytes`` of file data in total.

    Plain: the raw bytes. Otherwise concatenated JSON frames of at most ``LOG_FRAME_BYTES``
    each, ``Offset`` being the file offset just past the frame's data (as Nomad's).
    ``None`` when there is no log file at all.
    """
    names = _log_names(adir, task, kind)
    if not names:
        return None
    out: list[bytes] = []
    left = max_bytes
    for name in names:
        if left <= 0:
            break
        try:
            opened = adir.open_path(f"alloc/logs/{name}", want="file", for_read=True)
        except PathNotFoundError:
            continue  # rotated away since the listing
        with opened:
            offset = 0
            while left > 0:
                chunk = os.read(opened.fd, min(LOG_FRAME_BYTES, left))
                if not chunk:
                    break
                offset += len(chunk)
                left -= len(chunk)
                if plain:
                    out.append(chunk)
                else:
                    out.append(json.dumps({"Offset": offset,
                                           "Data": base64.b64encode(chunk).decode(),
                                           "File": f"alloc/logs/{name}"}).encode())
    return b"".join(out)


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

    async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run file work in a worker thread; every refusal becomes a plain 4xx."""
        try:
            return await asyncio.to_thread(fn, *args, **kwargs)
        except SecretReadError as err:
            raise HTTPError(403, f"Reading secret file prohibited: {err}") from None
        except SymlinkError as err:
            raise HTTPError(403, str(err)) from None
        except PathEscapeError as err:
            raise HTTPError(403, f"Path escapes the alloc directory: {err}") from None
        except PathNotFoundError as err:
            raise not_found(str(err)) from None
        except AllocPathError as err:
            raise bad_request(str(err)) from None
        except FileNotFoundError:
            raise not_found("no such file or directory") from None
        except OSError as err:
            raise bad_request(f"cannot access file: {err.strerror or err}") from None

    def fs_path(req: ApiRequest, *, required: bool) -> str:
        rel = req.query.get("path", "")
        if required and not rel:
            raise bad_request("must provide a file name")
        return rel or "/"

    async def fs_ls(req: ApiRequest) -> Any:
        return await in_thread(_ls, alloc_dir(req), fs_path(req, required=False))

    async def fs_stat(req: ApiRequest) -> Any:
        return await in_thread(_stat, alloc_dir(req), fs_path(req, required=True))

    async def fs_cat(req: ApiRequest) -> Any:
        data = await in_thread(_cat, alloc_dir(req), fs_path(req, required=True))
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
        plain = query_bool(req.query, "plain")
        body = await in_thread(_read_logs, adir, task, kind, plain=plain)
        if body is None:
            raise not_found(f"task {task!r} not started yet. No logs available")
        if plain:
            return web.Response(body=body, content_type="text/plain")
        return web.Response(body=body, content_type="application/json")

    router.add(("GET",), "/v1/client/metadata", read_metadata, "node:read")
    router.add(("POST",), "/v1/client/metadata", apply_metadata, "node:write")
    router.add(("GET",), "/v1/client/fs/ls/{alloc_id}", fs_ls, "namespace:read-fs")
    router.add(("GET",), "/v1/client/fs/stat/{alloc_id}", fs_stat, "namespace:read-fs")
    router.add(("GET",), "/v1/client/fs/cat/{alloc_id}", fs_cat, "namespace:read-fs")
    router.add(("GET",), "/v1/client/fs/logs/{alloc_id}", fs_logs, "namespace:read-logs")
