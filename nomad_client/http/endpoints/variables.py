"""/v1/vars (list, metadata only) and /v1/var/:path (read, write, delete, locks).

No route ``Need``: variables capabilities are never granted by namespace policy, so each
handler asks the ACL about the variable's own path (``allows_variable``) before it
validates anything or looks the variable up. A list keeps only what the caller may
``list``; it never refuses.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from aiohttp import web

from nomad_client.durations import DurationError, format_duration, parse_duration_ns
from nomad_client.http.auth import (
    PERMISSION_REFUSED,
    allows_variable,
    request_namespace,
)
from nomad_client.http.endpoints.routes import Routes, RouteTable
from nomad_client.http.errors import HTTPError, bad_request
from nomad_client.http.query import blocking_params, by_namespace_and, list_query, parse_uint64
from nomad_client.http.router import ApiRequest, Reply, json_response
from nomad_client.http.services import Services
from nomad_client.server.server import Resource
from nomad_client.server.variables import (
    DEFAULT_LOCK_DELAY,
    DEFAULT_LOCK_TTL,
    Conflict,
    VariableError,
    Variables,
)
from nomad_client.structs.models import Variable, VariableLock

LOCK_OPS = ("lock-acquire", "lock-release", "lock-renew")


# ---- shapes ------------------------------------------------------------------------------
def lock_api(lock: VariableLock) -> dict[str, Any]:
    return {"ID": lock.id, "TTL": _go_duration(lock.ttl),
            "LockDelay": _go_duration(lock.lock_delay)}


def _go_duration(ns: int) -> str:
    return format_duration(ns) if ns else ""


def metadata_api(variable: Variable, *, show_lock: bool) -> dict[str, Any]:
    """VariableMetadata: everything but the items; ``Lock`` only when ``show_lock``."""
    out: dict[str, Any] = {
        "Namespace": variable.namespace, "Path": variable.path,
        "CreateIndex": variable.create_index, "CreateTime": variable.create_time,
        "ModifyIndex": variable.modify_index, "ModifyTime": variable.modify_time}
    if show_lock and variable.lock is not None:
        out["Lock"] = lock_api(variable.lock)
    return out


def zero_value(namespace: str, path: str) -> dict[str, Any]:
    return {"Namespace": namespace, "Path": path, "CreateIndex": 0, "CreateTime": 0,
            "ModifyIndex": 0, "ModifyTime": 0}


def _variable_reply(variables: Variables, variable: Variable, *, show_lock: bool,
                    with_items: bool = True) -> Reply:
    body = metadata_api(variable, show_lock=show_lock)
    if with_items:
        items = variables.items(variable)
        if items:
            body["Items"] = items
    return Reply(body, variable.modify_index)


# ---- request parsing ---------------------------------------------------------------------
def _field(body: Mapping[str, Any], name: str) -> Any:
    """``name`` in a decoded body, matched case-insensitively as Go's decoder does."""
    if name in body:
        return body[name]
    lowered = name.lower()
    for key, value in body.items():
        if key.lower() == lowered:
            return value
    return None


async def _body(req: ApiRequest) -> dict[str, Any]:
    body = await req.json()
    if not isinstance(body, dict):
        raise bad_request("Failed to decode request body: expected a JSON object")
    return body


def _items(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise bad_request("Failed to decode request body: Items must map strings to strings")
    return raw


def _duration(raw: Any, name: str) -> int:
    if raw is None or raw == "":
        return 0
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str):
        try:
            return parse_duration_ns(raw)
        except DurationError as err:
            raise bad_request(f"Failed to decode request body: Lock.{name}: {err}") from None
    raise bad_request(f"Failed to decode request body: Lock.{name} must be a duration")


def _lock(raw: Any) -> dict[str, Any] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise bad_request("Failed to decode request body: Lock must be an object")
    lock_id = _field(raw, "ID")
    if lock_id is not None and not isinstance(lock_id, str):
        raise bad_request("Failed to decode request body: Lock.ID must be a string")
    return {"ID": lock_id or None, "TTL": _duration(_field(raw, "TTL"), "TTL"),
            "LockDelay": _duration(_field(raw, "LockDelay"), "LockDelay")}


def _cas(req: ApiRequest) -> int | None:
    raw = req.query.get("cas")
    if not raw:
        return None
    value = parse_uint64(raw)
    if value is None:
        raise bad_request(f'can not parse cas: strconv.ParseUint: parsing "{raw}": '
                          "invalid syntax")
    return value


def _lock_op(req: ApiRequest) -> str | None:
    # [quirk] as Nomad: by presence; ?lock-acquire=false still acquires.
    ops = [op for op in LOCK_OPS if op in req.query]
    if len(ops) > 1:
        raise bad_request("multiple lock operations")
    return ops[0] if ops else None


def _variable_error(err: VariableError) -> HTTPError:
    message = f"RPC Error:: {err.status},{err.message}" if err.validation else err.message
    return HTTPError(err.status, message)


def _conflict_reply(services: Services, req: ApiRequest, conflict: Conflict) -> Reply:
    """409 with the variable as it stands (its items only for a caller who may read them;
    its lock only for management, as on GET: a lock ID is the holder's alone)."""
    current = conflict.current
    if current is None:
        return Reply(zero_value(conflict.namespace, conflict.path), 0, status=409)
    readable = allows_variable(req, services.own_server, current.namespace, current.path, "read")
    reply = _variable_reply(services.own_server.variables, current,
                            show_lock=req.identity.acl.management, with_items=readable)
    return Reply(reply.body, reply.index, status=409)


def _require(services: Services, req: ApiRequest, namespace: str, path: str, op: str) -> None:
    if not allows_variable(req, services.own_server, namespace, path, op):
        raise PERMISSION_REFUSED


# ---- handlers ------------------------------------------------------------------------------
BY_NAMESPACE_AND_PATH = by_namespace_and("Path")


async def list_variables(services: Services, req: ApiRequest) -> web.StreamResponse:
    variables = services.own_server.variables
    listing = await list_query(services.own_server, req.query, (Resource.VARIABLES,))
    management = req.identity.acl.management
    visible = [metadata_api(v, show_lock=management)
               for v in variables.list(request_namespace(req.query), listing.prefix)
               if allows_variable(req, services.own_server, v.namespace, v.path, "list")]
    return await listing.reply(visible, BY_NAMESPACE_AND_PATH, prefix_of=lambda m: m["Path"])


async def missing_path(services: Services, req: ApiRequest) -> Any:
    raise bad_request("missing variable path")


async def variable(services: Services, req: ApiRequest) -> web.StreamResponse | Reply:
    path = req.params["path"]
    if req.method == "GET":
        return await _read(services, req, path)
    if req.method in ("PUT", "POST"):
        return await _write(services, req, path)
    if req.method == "DELETE":
        return await _delete(services, req, path)
    raise bad_request("Invalid method")  # [quirk] as Nomad: not 405


async def _read(services: Services, req: ApiRequest, path: str) -> Reply:
    namespace = request_namespace(req.query)
    _require(services, req, namespace, path, "read")
    min_index, wait = blocking_params(req.query)
    variables = services.own_server.variables
    if min_index > 0:
        current, _ = await variables.wait_for(namespace, path, min_index, wait)
    else:
        current = variables.get(namespace, path)
    if current is None:
        raise HTTPError(404, "variable not found")
    return _variable_reply(variables, current, show_lock=req.identity.acl.management)


async def _write(services: Services, req: ApiRequest, path: str) -> Reply:
    op = _lock_op(req)
    cas = _cas(req)
    if op is not None and cas is not None:
        raise bad_request("CAS can't be used with lock operations")
    body = await _body(req)
    # [quirk] as Nomad: the body's namespace wins over ?namespace.
    namespace = _field(body, "Namespace") or request_namespace(req.query)
    if not isinstance(namespace, str):
        raise bad_request("Failed to decode request body: Namespace must be a string")
    _require(services, req, namespace, path, "write")
    items = _items(_field(body, "Items"))
    lock = _lock(_field(body, "Lock"))
    variables = services.own_server.variables
    management = req.identity.acl.management
    try:
        if op == "lock-acquire":
            ttl = lock["TTL"] if lock and lock["TTL"] else DEFAULT_LOCK_TTL
            delay = lock["LockDelay"] if lock and lock["LockDelay"] else DEFAULT_LOCK_DELAY
            written = await variables.acquire(namespace, path, items, ttl=ttl,
                                              lock_delay=delay,
                                              lock_id=lock["ID"] if lock else None)
            return _variable_reply(variables, written, show_lock=True)
        if op == "lock-renew":
            renewed = await variables.renew(request_namespace(req.query), path,
                                            _lock_id(lock, "missing lock ID"))
            return Reply(metadata_api(renewed, show_lock=True))
        if op == "lock-release":
            if _field(body, "Items") is not None:
                raise bad_request("lock release operation doesn't take variable items")
            released = await variables.release(namespace, path,
                                               _lock_id(lock, "missing lock information"))
            return Reply(metadata_api(released, show_lock=False), released.modify_index)
        if not items:
            raise bad_request("variable missing required Items object")
        if lock is not None and (lock["TTL"] or lock["LockDelay"]):
            raise HTTPError(400, "RPC Error:: 400,variable should not contain lock definition")
        lock_id = lock["ID"] if lock else None
        written = await variables.put(namespace, path, items, cas=cas, lock_id=lock_id)
        return _variable_reply(variables, written,
                               show_lock=management or (lock_id is not None
                                                        and written.lock is not None
                                                        and written.lock.id == lock_id))
    except Conflict as conflict:
        return _conflict_reply(services, req, conflict)
    except VariableError as err:
        raise _variable_error(err) from None


def _lock_id(lock: dict[str, Any] | None, missing: str) -> str:
    if lock is None or not lock["ID"]:
        raise bad_request(missing)
    lock_id: str = lock["ID"]
    return lock_id


async def _delete(services: Services, req: ApiRequest, path: str) -> web.StreamResponse | Reply:
    namespace = request_namespace(req.query)
    _require(services, req, namespace, path, "destroy")
    if _lock_op(req) is not None:
        raise bad_request("Invalid method")
    cas = _cas(req)
    try:
        index = await services.own_server.variables.delete(namespace, path, cas=cas)
    except Conflict as conflict:
        return _conflict_reply(services, req, conflict)
    except VariableError as err:
        raise _variable_error(err) from None
    response = json_response(Reply(None, index))
    # 204 carries no body, only the index headers.
    return web.Response(status=204, headers={k: v for k, v in response.headers.items()
                                             if k.startswith("X-Nomad-")})


def register(router: RouteTable, services: Services) -> None:
    routes = Routes(router, services)
    routes.add(("GET",), "/v1/vars", list_variables)
    every_method = ("GET", "PUT", "POST", "DELETE", "PATCH", "OPTIONS", "HEAD")
    routes.add(every_method, "/v1/var/", missing_path)
    routes.add(every_method, "/v1/var/{path*}", variable)

