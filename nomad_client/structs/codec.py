"""Conversion between our attrs models and the two wire forms they travel in.

* the HTTP API form: Nomad's Go-style field names (``JobID``, ``TaskStates``), with fields
  marked ``api=False`` left out (signed identities, node secrets);
* the RPC form: the same names, every field kept, encoded with msgpack where it crosses the
  client/server interface.

Nothing here performs I/O.
"""

from __future__ import annotations

from typing import Any, Final, TypeVar

import attrs
import cattrs
import msgpack
from cattrs.gen import make_dict_structure_fn, make_dict_unstructure_fn, override

from nomad_client.structs.jobs import shared_jobs

T = TypeVar("T")

# Go initialisms keep their capitals in Nomad's JSON (JobID, HTTPAddr, FailedTGAllocs).
_INITIALISMS = {
    "id": "ID", "ip": "IP", "http": "HTTP", "tls": "TLS", "acl": "ACL", "cpu": "CPU",
    "mb": "MB", "ttl": "TTL", "url": "URL", "tg": "TG", "jwt": "JWT", "api": "API",
}


def go_name(python_name: str) -> str:
    """``alloc_modify_index`` -> ``AllocModifyIndex``; ``job_id`` -> ``JobID``."""
    override_name = _GO_NAME_OVERRIDES.get(python_name)
    if override_name is not None:
        return override_name
    return "".join(_INITIALISMS.get(part, part.capitalize()) for part in python_name.split("_"))


_GO_NAME_OVERRIDES = {"global_": "Global", "gc_volumes_on_node_gc": "GCVolumesOnNodeGC",
                      "csi_controller_plugins": "CSIControllerPlugins",
                      "csi_node_plugins": "CSINodePlugins"}


def _make_converter(*, api: bool) -> cattrs.Converter:
    conv = cattrs.Converter()

    def unstructure_factory(cls: type) -> Any:
        overrides = {
            f.name: override(rename=go_name(f.name), omit=api and not f.metadata.get("api", True))
            for f in attrs.fields(cls)
        }
        return make_dict_unstructure_fn(cls, conv, **overrides)  # type: ignore[arg-type]

    def structure_factory(cls: type) -> Any:
        overrides = {f.name: override(rename=go_name(f.name),
                                      struct_hook=_shared_job if f.metadata.get("job") else None)
                     for f in attrs.fields(cls)}
        return make_dict_structure_fn(cls, conv, **overrides)  # type: ignore[arg-type]

    conv.register_unstructure_hook_factory(attrs.has, unstructure_factory)
    conv.register_structure_hook_factory(attrs.has, structure_factory)
    return conv


api_converter = _make_converter(api=True)
rpc_converter = _make_converter(api=False)


def to_api(obj: Any) -> Any:
    """The JSON-ready HTTP API form of a model (or a list/dict of models)."""
    return api_converter.unstructure(obj)


def to_rpc(obj: Any) -> Any:
    return rpc_converter.unstructure(obj)


def from_rpc(data: Any, cls: type[T]) -> T:
    return rpc_converter.structure(data, cls)


def msgpack_roundtrip(value: Any) -> Any:
    """Encode and decode a plain value exactly as it would cross a process boundary."""
    return msgpack.unpackb(msgpack.packb(value, use_bin_type=True), raw=False, strict_map_key=False)


def _shared_job(value: Any, _: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"a job must be a map, not {type(value).__name__}")
    return shared_jobs.share(dict(value))


# The metadata of an attrs field holding a job dict: decoded records share one copy of each
# job version (``structs.jobs.SharedJobs``), so such a job must never be mutated in place.
SHARED_JOB: Final = {"job": True}


def hidden_from_api(default: Any = attrs.NOTHING, **kwargs: Any) -> Any:
    """Declare an attrs field that the HTTP API form never shows."""
    return attrs.field(default=default, metadata={"api": False}, **kwargs)
