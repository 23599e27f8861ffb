"""Fields of a decoded JSON request body, read as Go's encoding/json reads a struct: keys
matched case-insensitively (a later key wins), unknown keys ignored, ``null`` meaning "not
given". A field of the wrong type is a 400 naming it. Shared by the endpoints whose bodies
are Nomad objects (ACL tokens, policies and roles, namespaces).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from nomad_client.http.errors import bad_request


def object_fields(body: Any, names: Iterable[str], what: str = "Request body"
                  ) -> dict[str, Any]:
    """The known fields of a JSON object; unknown keys and nulls are dropped."""
    if not isinstance(body, dict):
        raise bad_request(f"{what} must be a JSON object")
    known = {name.lower(): name for name in names}
    out: dict[str, Any] = {}
    for key, value in body.items():
        name = known.get(key.lower())
        if name is not None and value is not None:  # null leaves a Go field as it was
            out[name] = value
    return out


def string_field(fields: dict[str, Any], name: str) -> str:
    value = fields.get(name, "")
    if not isinstance(value, str):
        raise bad_request(f"{name} must be a string")
    return value


def strings_field(fields: dict[str, Any], name: str) -> tuple[str, ...]:
    value = fields.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad_request(f"{name} must be a list of strings")
    return tuple(value)


def string_map_field(fields: dict[str, Any], name: str) -> dict[str, str]:
    value = fields.get(name, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise bad_request(f"{name} must be an object of strings")
    return dict(value)


def path_id(given: str, path_value: str | None, mismatch: str) -> str:
    """The object's ID or name: the body's, which must match the path's when the route has
    one in its path (a body that leaves it out takes the path's)."""
    if path_value is None:
        return given
    if given and given != path_value:
        raise bad_request(mismatch)
    return path_value
