"""Decode the ``job`` block of a parsed jobspec into Nomad's API JSON shape.

Maps HCL blocks/attributes to Go-style keys (``TaskGroups``, ``KillTimeout``,
...), converts values to the field's type, and rejects unknown or unsupported
keys with an error naming the key path and line. Unset fields become ``None``;
defaults are filled later by ``canonical``. Pure computation: no I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nomad_client.durations import DurationError, parse_duration_ns
from nomad_client.jobspec.errors import JobspecError, short_repr, type_name
from nomad_client.jobspec.evaluate import Evaluator
from nomad_client.jobspec.syntax import Block, Body
from nomad_client.jobspec.values import as_hcl_bool, as_hcl_string

# Nomad blocks this client knows of but does not implement: named in the error
# so users are not told a perfectly valid Nomad key is a typo.
UNSUPPORTED_BLOCKS = frozenset(
    {
        "action",
        "affinity",
        "artifact",
        "check",
        "connect",
        "consul",
        "csi_plugin",
        "device",
        "disconnect",
        "dispatch_payload",
        "ephemeral_disk",
        "lifecycle",
        "logs",
        "migrate",
        "multiregion",
        "network",
        "parameterized",
        "periodic",
        "scaling",
        "schedule",
        "secret",
        "service",
        "spread",
        "template",
        "ui",
        "update",
        "vault",
        "volume",
        "volume_mount",
    }
)

Converter = Callable[[Any, str, "int | None"], Any]

# Nomad's whole-number and duration fields are Go int64s.
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class _Decoder:
    def __init__(self, filename: str, evaluator: Evaluator) -> None:
        self.filename = filename
        self.evaluator = evaluator

    def error(self, line: int | None, path: str, message: str) -> JobspecError:
        return JobspecError(self.filename, line, f"{path}: {message}")

    # -- value converters (value, key path, line) -> converted ---------------

    def to_str(self, value: Any, path: str, line: int | None) -> str:
        text = as_hcl_string(value)
        if text is not None:
            return text
        raise self.error(line, path, f"expected a string, got {type_name(value)}")

    def to_int(self, value: Any, path: str, line: int | None) -> int:
        if isinstance(value, bool):
            raise self.error(line, path, "expected a whole number, got bool")
        number: int | None = None
        if isinstance(value, int):
            number = value
        elif isinstance(value, float) and value.is_integer():
            number = int(value)
        elif isinstance(value, str):
            try:
                number = int(value.strip())
            except ValueError:
                pass
        if number is not None:
            if not _INT64_MIN <= number <= _INT64_MAX:
                raise self.error(line, path, "number is out of range for a 64-bit integer")
            return number
        raise self.error(
            line, path, f"expected a whole number, got {type_name(value)} {short_repr(value)}"
        )

    def to_bool(self, value: Any, path: str, line: int | None) -> bool:
        as_bool = as_hcl_bool(value)
        if as_bool is not None:
            return as_bool
        raise self.error(
            line, path, f"expected true or false, got {type_name(value)} {short_repr(value)}"
        )

    def to_duration(self, value: Any, path: str, line: int | None) -> int:
        if not isinstance(value, str):
            raise self.error(
                line, path, f'expected a duration string like "30s", got {type_name(value)}'
            )
        try:
            ns = parse_duration_ns(value)
        except DurationError as err:
            raise self.error(line, path, str(err)) from None
        except ValueError:  # a number with thousands of digits
            raise self.error(line, path, f"duration {short_repr(value)} is out of range") from None
        if not _INT64_MIN <= ns <= _INT64_MAX:
            raise self.error(line, path, f"duration {short_repr(value)} is out of range")
        return ns

    def to_str_list(self, value: Any, path: str, line: int | None) -> list[str]:
        if not isinstance(value, list):
            raise self.error(line, path, f"expected a list of strings, got {type_name(value)}")
        return [self.to_str(v, f"{path}[{i}]", line) for i, v in enumerate(value)]

    def to_str_map(self, value: Any, path: str, line: int | None) -> dict[str, str]:
        if not isinstance(value, dict):
            raise self.error(line, path, f"expected a map of strings, got {type_name(value)}")
        return {k: self.to_str(v, f"{path}.{k}", line) for k, v in value.items()}


class _Reader:
    """Reads one block body, remembering which keys were used.

    ``finish`` turns anything left over into an "unknown key" error, so typos
    are never silently dropped.
    """

    def __init__(self, dec: _Decoder, body: Body, path: str) -> None:
        self.dec = dec
        self.body = body
        self.path = path
        self.attrs = {a.name: a for a in body.attributes}
        self.known_attrs: list[str] = []
        self.known_blocks: list[str] = []

    def get(self, name: str, conv: Converter) -> Any:
        self.known_attrs.append(name)
        attr = self.attrs.get(name)
        if attr is None:
            return None
        value = self.dec.evaluator.value(attr.expr)
        if value is None:
            return None
        return conv(value, f"{self.path}.{name}", attr.line)

    def line_of(self, name: str) -> int | None:
        attr = self.attrs.get(name)
        return attr.line if attr is not None else None

    def blocks(self, name: str) -> list[Block]:
        self.known_blocks.append(name)
        return [b for b in self.body.blocks if b.type == name]

    def one_block(self, name: str, labels: int = 0) -> Block | None:
        found = self.blocks(name)
        if len(found) > 1:
            raise self.dec.error(
                found[1].line,
                f"{self.path}.{name}",
                f"only one {name} block is allowed (first at line {found[0].line})",
            )
        if found:
            self.check_labels(found[0], labels)
            return found[0]
        return None

    def check_labels(self, block: Block, count: int) -> None:
        if len(block.labels) == count:
            return
        where = f"{self.path}.{block.type}"
        if count == 0:
            raise self.dec.error(block.line, where, f"the {block.type} block takes no label")
        if not block.labels:
            raise self.dec.error(
                block.line,
                where,
                f'missing label: write {block.type} "<name>" {{ ... }}',
            )
        raise self.dec.error(block.line, where, f"the {block.type} block takes exactly one label")

    def string_map(self, name: str) -> dict[str, str] | None:
        """``meta``/``env``: either ``name { k = v }`` or ``name = { k = v }``."""
        block = self.one_block(name)
        value = self.get(name, self.dec.to_str_map)
        if block is not None and value is not None:
            raise self.dec.error(
                block.line, f"{self.path}.{name}", f"{name} is set both as a block and attribute"
            )
        if block is None:
            return value
        sub_path = f"{self.path}.{name}"
        if block.body.blocks:
            inner = block.body.blocks[0]
            raise self.dec.error(inner.line, sub_path, f"unexpected block {inner.type!r}")
        return {
            a.name: self.dec.to_str(
                self.dec.evaluator.value(a.expr), f"{sub_path}.{a.name}", a.line
            )
            for a in block.body.attributes
        }

    def finish(self) -> None:
        for attr in self.body.attributes:
            if attr.name not in self.known_attrs:
                raise self.dec.error(
                    attr.line,
                    f"{self.path}.{attr.name}",
                    f"unknown attribute {attr.name!r}" + _expected(self.known_attrs, "attributes"),
                )
        for block in self.body.blocks:
            if block.type in self.known_blocks:
                continue
            where = f"{self.path}.{block.type}"
            if block.type in UNSUPPORTED_BLOCKS:
                raise self.dec.error(
                    block.line, where, f"the {block.type!r} block is not supported by this client"
                )
            raise self.dec.error(
                block.line,
                where,
                f"unknown block {block.type!r}" + _expected(self.known_blocks, "blocks"),
            )


def _expected(names: list[str], what: str) -> str:
    unique = sorted(set(names))
    return f" (allowed {what}: {', '.join(unique)})" if unique else f" (no {what} allowed here)"


def decode_job(block: Block, filename: str, evaluator: Evaluator) -> dict[str, Any]:
    """Decode a ``job "id" { ... }`` block."""
    dec = _Decoder(filename, evaluator)
    if len(block.labels) != 1:
        msg = (
            'missing label: write job "<id>" { ... }'
            if not block.labels
            else ("a job block takes exactly one label")
        )
        raise dec.error(block.line, "job", msg)
    job_id = block.labels[0]
    r = _Reader(dec, block.body, "job")
    name = r.get("name", dec.to_str)
    job: dict[str, Any] = {
        "ID": job_id,
        # Nomad's parser names the job after its label unless told otherwise.
        "Name": name if name is not None else job_id,
        "Type": r.get("type", dec.to_str),
        "Namespace": r.get("namespace", dec.to_str),
        "Region": r.get("region", dec.to_str),
        "Priority": r.get("priority", dec.to_int),
        "Datacenters": r.get("datacenters", dec.to_str_list),
        "NodePool": r.get("node_pool", dec.to_str),
        "Meta": r.string_map("meta"),
        "Constraints": _constraints(r),
        "TaskGroups": [_group(dec, g, r) for g in _labelled(r, "group")] or None,
    }
    r.finish()
    return job


def _labelled(r: _Reader, name: str) -> list[Block]:
    found = r.blocks(name)
    for b in found:
        r.check_labels(b, 1)
    return found


def _constraints(r: _Reader) -> list[dict[str, str]] | None:
    out = []
    for i, block in enumerate(r.blocks("constraint")):
        r.check_labels(block, 0)
        c = _constraint(r.dec, block, f"{r.path}.constraint[{i}]")
        if c is not None:
            out.append(c)
    return out or None


# Shorthand attributes: ``version = ">= 1.2"`` means operator "version" with
# that value, and so on.
_OPERATOR_SHORTHANDS = (
    "version",
    "semver",
    "regexp",
    "set_contains",
    "set_contains_any",
    "set_contains_all",
)


def _constraint(dec: _Decoder, block: Block, path: str) -> dict[str, str] | None:
    r = _Reader(dec, block.body, path)
    c = {
        "LTarget": r.get("attribute", dec.to_str) or "",
        "RTarget": r.get("value", dec.to_str) or "",
        "Operand": r.get("operator", dec.to_str) or "=",
    }
    for op in _OPERATOR_SHORTHANDS:
        value = r.get(op, dec.to_str)
        if value is not None:
            c["Operand"] = op
            c["RTarget"] = value
    distinct_hosts = r.get("distinct_hosts", dec.to_bool)
    distinct_property = r.get("distinct_property", dec.to_str)
    r.finish()
    if distinct_hosts is not None:
        if not distinct_hosts:
            return None  # "distinct_hosts = false" asks for nothing
        c["Operand"] = "distinct_hosts"
        c["RTarget"] = "true"
    if distinct_property is not None:
        c["Operand"] = "distinct_property"
        c["LTarget"] = distinct_property
    return c


def _optional_block(
    r: _Reader, name: str, read: Callable[[_Reader], dict[str, Any]]
) -> dict[str, Any] | None:
    """The fields ``read`` takes from the one unlabelled ``name`` block, or None without one."""
    block = r.one_block(name)
    if block is None:
        return None
    rr = _Reader(r.dec, block.body, f"{r.path}.{name}")
    fields = read(rr)
    rr.finish()
    return fields


def _retry_window(r: _Reader) -> dict[str, Any]:
    """The fields restart and reschedule share: attempts per interval, the delay between."""
    return {
        "Attempts": r.get("attempts", r.dec.to_int),
        "Interval": r.get("interval", r.dec.to_duration),
        "Delay": r.get("delay", r.dec.to_duration),
    }


def _restart_policy(r: _Reader) -> dict[str, Any]:
    return {**_retry_window(r), "Mode": r.get("mode", r.dec.to_str)}


def _reschedule_policy(r: _Reader) -> dict[str, Any]:
    return {
        **_retry_window(r),
        "DelayFunction": r.get("delay_function", r.dec.to_str),
        "MaxDelay": r.get("max_delay", r.dec.to_duration),
        "Unlimited": r.get("unlimited", r.dec.to_bool),
    }


def _group(dec: _Decoder, block: Block, parent: _Reader) -> dict[str, Any]:
    name = block.labels[0]
    r = _Reader(dec, block.body, f"{parent.path}.group[{name}]")
    group = {
        "Name": name,
        "Count": r.get("count", dec.to_int),
        "Constraints": _constraints(r),
        "Meta": r.string_map("meta"),
        "RestartPolicy": _optional_block(r, "restart", _restart_policy),
        "ReschedulePolicy": _optional_block(r, "reschedule", _reschedule_policy),
        "Tasks": [_task(dec, t, r) for t in _labelled(r, "task")] or None,
    }
    r.finish()
    return group


def _task(dec: _Decoder, block: Block, parent: _Reader) -> dict[str, Any]:
    name = block.labels[0]
    r = _Reader(dec, block.body, f"{parent.path}.task[{name}]")
    identity, identities = _identities(r)
    task = {
        "Name": name,
        "Driver": r.get("driver", dec.to_str),
        "User": r.get("user", dec.to_str),
        "Config": _config(r),
        "Env": r.string_map("env"),
        "Meta": r.string_map("meta"),
        "Constraints": _constraints(r),
        "Resources": _optional_block(r, "resources", _resources),
        "RestartPolicy": _optional_block(r, "restart", _restart_policy),
        "KillTimeout": r.get("kill_timeout", dec.to_duration),
        "Leader": bool(r.get("leader", dec.to_bool)),
        "Identity": identity,
        "Identities": identities,
        "TaskAPI": _task_api(r),
    }
    r.finish()
    return task


def _task_api(r: _Reader) -> dict[str, Any] | None:
    """``task_api { enabled = true|false }``: the task's own choice (None: it made none)."""
    block = r.one_block("task_api")
    if block is None:
        return None
    rr = _Reader(r.dec, block.body, f"{r.path}.task_api")
    enabled = rr.get("enabled", r.dec.to_bool)
    rr.finish()
    if enabled is None:
        raise r.dec.error(block.line, f"{rr.path}.enabled",
                          "missing attribute: write enabled = true or enabled = false")
    return {"Enabled": enabled}


def _resources(r: _Reader) -> dict[str, Any]:
    return {"CPU": r.get("cpu", r.dec.to_int), "MemoryMB": r.get("memory", r.dec.to_int)}


def _identities(r: _Reader) -> tuple[dict[str, Any] | None, list[dict[str, Any]] | None]:
    default: dict[str, Any] | None = None
    default_line: int | None = None
    named: list[dict[str, Any]] = []
    for i, block in enumerate(r.blocks("identity")):
        if len(block.labels) > 1:
            r.check_labels(block, 1)
        path = f"{r.path}.identity[{block.labels[0] if block.labels else i}]"
        ident = _identity(r.dec, block, path)
        if ident["Name"] in (None, "default"):
            if default is not None:
                raise r.dec.error(
                    block.line,
                    path,
                    f"only one default (unnamed) identity is allowed (first at line "
                    f"{default_line})",
                )
            default, default_line = ident, block.line
        else:
            named.append(ident)
    return default, named or None


def _identity(dec: _Decoder, block: Block, path: str) -> dict[str, Any]:
    r = _Reader(dec, block.body, path)
    name = r.get("name", dec.to_str)
    if block.labels:
        if name is not None and name != block.labels[0]:
            raise dec.error(
                r.line_of("name"),
                f"{path}.name",
                f"name {name!r} conflicts with the block label {block.labels[0]!r}",
            )
        name = block.labels[0]
    ident = {
        "Name": name,
        "Audience": r.get("aud", dec.to_str_list),
        "Env": r.get("env", dec.to_bool),
        "File": r.get("file", dec.to_bool),
        "Filepath": r.get("filepath", dec.to_str),
        "TTL": r.get("ttl", dec.to_duration),
        "ChangeMode": r.get("change_mode", dec.to_str),
        "ChangeSignal": r.get("change_signal", dec.to_str),
    }
    r.finish()
    return ident


def _config(r: _Reader) -> dict[str, Any] | None:
    block = r.one_block("config")
    value = r.get("config", lambda v, p, ln: v)
    if block is not None and value is not None:
        raise r.dec.error(
            block.line, f"{r.path}.config", "config is set both as block and attribute"
        )
    if value is not None:
        if not isinstance(value, dict):
            raise r.dec.error(
                r.line_of("config"),
                f"{r.path}.config",
                f"expected an object, got {type_name(value)}",
            )
        return value
    if block is None:
        return None
    return _free_body(r.dec, block.body, f"{r.path}.config")


def _free_body(dec: _Decoder, body: Body, path: str) -> dict[str, Any]:
    """A driver config body: any attributes; nested blocks become lists of objects."""
    out: dict[str, Any] = {a.name: dec.evaluator.value(a.expr) for a in body.attributes}
    attribute_names = set(out)
    for block in body.blocks:
        sub = f"{path}.{block.type}"
        if block.labels:
            raise dec.error(block.line, sub, "labelled blocks are not supported inside config")
        if block.type in attribute_names:
            raise dec.error(block.line, sub, f"{block.type!r} is set both as block and attribute")
        out.setdefault(block.type, []).append(_free_body(dec, block.body, sub))
    return out
