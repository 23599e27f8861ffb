"""Dispatching parameterized jobs (Nomad's ``Job.Dispatch``).

A dispatch checks the request against the parent's ``parameterized`` block (payload rule,
required and permitted meta keys, payload size: Nomad's messages), then registers a child
``<parent>/dispatch-<unix seconds>-<8 hex>``: a copy of the parent with ``ParentID``,
``Dispatched``, the payload (base64, as the API shows it) and the request's meta merged into
the job's meta (so ``NOMAD_META_*`` reach the tasks; every optional key the request left out
is there as ""). The child is evaluated like any new job, unless the parent is periodic too:
then the child is itself a periodic parent.

An idempotency token already used by a live child of the parent returns that child and
creates nothing. Dispatches carrying a token run one at a time, so two racing requests with
one token cannot both create a child.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from nomad_client.server.parent_jobs import (
    RegisterJob,
    child_job,
    children,
    is_live,
    is_parameterized,
)
from nomad_client.server.state import JOBS, StateStore, job_key
from nomad_client.structs.namespaces import job_namespace

MAX_PAYLOAD_BYTES = 16 * 1024

JobStatus = Callable[[Mapping[str, Any]], str]


class DispatchError(ValueError):
    """A dispatch request the parent does not accept (Nomad's message)."""


class ParentNotFound(LookupError):
    pass


@attrs.frozen
class DispatchResult:
    dispatched_job_id: str
    eval_id: str
    eval_create_index: int
    job_create_index: int
    index: int


def dispatch_id(parent_id: str, now: float, template: str = "") -> str:
    """``<parent>/dispatch-[<template>-]<unix seconds>-<8 hex>``."""
    prefix = f"dispatch-{template}-" if template else "dispatch-"
    return f"{parent_id}/{prefix}{int(now)}-{uuid.uuid4().hex[:8]}"


def _key_list(keys: list[str]) -> str:
    return "[" + " ".join(keys) + "]"  # as Go prints a []string


def check_request(parent: Mapping[str, Any], payload: bytes | None,
                  meta: Mapping[str, str]) -> None:
    """Raise ``DispatchError`` unless ``parent`` accepts this payload and meta."""
    spec = parent.get("ParameterizedJob") or {}
    rule = spec.get("Payload") or "optional"
    if rule == "required" and not payload:
        raise DispatchError("Payload is not provided but required by parameterized job")
    if rule == "forbidden" and payload:
        raise DispatchError("Payload provided but forbidden by parameterized job")
    if payload is not None and len(payload) > MAX_PAYLOAD_BYTES:
        raise DispatchError(f"Payload exceeds maximum size; {len(payload)} > "
                            f"{MAX_PAYLOAD_BYTES}")
    required = list(spec.get("MetaRequired") or ())
    permitted = set(required) | set(spec.get("MetaOptional") or ())
    unpermitted = sorted(k for k in meta if k not in permitted)
    if unpermitted:
        raise DispatchError("Dispatch request included unpermitted metadata keys: "
                            f"{_key_list(unpermitted)}")
    missing = sorted(k for k in required if k not in meta)
    if missing:
        raise DispatchError(f"Dispatch did not provide required meta keys: {_key_list(missing)}")


class Dispatcher:
    def __init__(self, store: StateStore, register: RegisterJob, job_status: JobStatus,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._register = register
        self._job_status = job_status
        self._clock = clock
        self._token_lock = asyncio.Lock()

    async def dispatch(self, namespace: str, parent_id: str, payload: bytes | None,
                       meta: Mapping[str, str], idempotency_token: str = "", *,
                       id_prefix_template: str = "", priority: int | None = None
                       ) -> DispatchResult:
        """Dispatch the parameterized job ``parent_id`` (``ParentNotFound``,
        ``DispatchError``); the child's ID holds ``id_prefix_template`` when given, and its
        priority is ``priority`` (None: the parent's)."""
        parent = self._parent(namespace, parent_id)
        check_request(parent, payload, meta)
        child_of = functools.partial(self._child, payload=payload, meta=meta,
                                     token=idempotency_token, template=id_prefix_template,
                                     priority=priority)
        if not idempotency_token:
            return await self._create(child_of(parent))
        async with self._token_lock:
            # The parent again: it may have been stopped while we waited.
            parent = self._parent(namespace, parent_id)
            for existing in children(self._store.values(JOBS), parent):
                if (existing.get("DispatchIdempotencyToken") == idempotency_token
                        and is_live(existing, self._job_status)):
                    return DispatchResult(dispatched_job_id=existing["ID"], eval_id="",
                                          eval_create_index=0,
                                          job_create_index=existing["CreateIndex"],
                                          index=existing["ModifyIndex"])
            return await self._create(child_of(parent))

    def _parent(self, namespace: str, parent_id: str) -> Mapping[str, Any]:
        parent = self._store.get(JOBS, job_key(namespace, parent_id))
        if parent is None:
            raise ParentNotFound("parameterized job not found")
        if not is_parameterized(parent):
            raise DispatchError(f'Specified job "{parent_id}" is not a parameterized job')
        if parent.get("Stop"):
            raise DispatchError(f'Specified job "{parent_id}" is stopped')
        result: Mapping[str, Any] = parent
        return result

    def _child(self, parent: Mapping[str, Any], *, payload: bytes | None,
               meta: Mapping[str, str], token: str, template: str, priority: int | None
               ) -> dict[str, Any]:
        optional = parent["ParameterizedJob"].get("MetaOptional") or ()
        return child_job(
            parent, dispatch_id(parent["ID"], self._clock(), template), Dispatched=True,
            DispatchIdempotencyToken=token or None,
            Payload=base64.b64encode(payload).decode() if payload else None,
            Meta={**dict.fromkeys(optional, ""), **(parent.get("Meta") or {}), **meta},
            Priority=priority or parent.get("Priority"))

    async def _create(self, child: dict[str, Any]) -> DispatchResult:
        eval_id, index = await self._register(child, triggered_by="job-register")
        stored = self._store.get(JOBS, job_key(job_namespace(child), child["ID"]))
        create_index = stored["CreateIndex"] if stored is not None else index
        return DispatchResult(dispatched_job_id=child["ID"], eval_id=eval_id,
                              eval_create_index=index if eval_id else 0,
                              job_create_index=create_index, index=index)
