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
from nomad_client.jobspec import network, services
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
        "ephemeral_disk",
        "lifecycle",
        "migrate",
        "multiregion",
        "network",
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
    job.update(_present(Periodic=_optional_block(r, "periodic", _periodic),
                        ParameterizedJob=_optional_block(r, "parameterized", _parameterized)))
    job.update(_present(Update=_optional_block(r, "update", _update),
                        Migrate=_optional_block(r, "migrate", _migrate)))
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
    group.update(_present(Networks=_networks(r)))
    group.update(_present(Scaling=_optional_block(r, "scaling", _scaling)))
    group.update(_present(Services=_services(r)))
    group.update(_present(EphemeralDisk=_optional_block(r, "ephemeral_disk", _ephemeral_disk),
                          Migrate=_optional_block(r, "migrate", _migrate),
                          Update=_optional_block(r, "update", _update)))
    group.update(_present(Disconnect=_optional_block(r, "disconnect", _disconnect)))
    r.finish()
    return group


# ---- group network ----------------------------------------------------------------------


def _check(dec: _Decoder, problem: str | None, line: int | None, path: str) -> None:
    """Report a broken ``jobspec.network`` rule at the line it was written on."""
    if problem is not None:
        raise dec.error(line, path, problem)


def _networks(r: _Reader) -> list[dict[str, Any]] | None:
    """``network { mode = "host"  port "http" { static = 8080  to = 80 } }``: Nomad's
    ``Networks`` (a port with ``static`` is reserved, one without is dynamic)."""
    block = r.one_block("network")
    if block is None:
        return None
    rr = _Reader(r.dec, block.body, f"{r.path}.network")
    mode = rr.get("mode", r.dec.to_str)
    if mode is not None:
        _check(r.dec, network.mode_problem(mode), rr.line_of("mode"), f"{rr.path}.mode")
    reserved: list[dict[str, Any]] = []
    dynamic: list[dict[str, Any]] = []
    label_lines: dict[str, int | None] = {}
    static_labels: dict[int, str] = {}
    for port_block in _labelled(rr, "port"):
        label = port_block.labels[0]
        path = f"{rr.path}.port[{label}]"
        _check(r.dec, network.label_problem(label), port_block.line, path)
        if label in label_lines:
            _check(r.dec, f"{network.duplicate_label(label)} (first at line "
                          f"{label_lines[label]})", port_block.line, path)
        label_lines[label] = port_block.line
        port = _port(r.dec, port_block, path, static_labels)
        (reserved if port["Value"] else dynamic).append(port)
    rr.finish()
    return [{"Mode": mode, "ReservedPorts": reserved or None, "DynamicPorts": dynamic or None}]


def _port(dec: _Decoder, block: Block, path: str, static_labels: dict[int, str]
          ) -> dict[str, Any]:
    """One ``port "label" { static, to, host_network }``; ``static_labels`` (static port ->
    label) collects the group's static ports, so none is reserved twice."""
    label = block.labels[0]
    r = _Reader(dec, block.body, path)
    static = r.get("static", dec.to_int)
    to = r.get("to", dec.to_int)
    host_network = r.get("host_network", dec.to_str)
    r.finish()
    if static is not None:
        where, line = f"{path}.static", r.line_of("static")
        _check(dec, network.static_problem(label, static), line, where)
        if static in static_labels:
            _check(dec, network.duplicate_static(static, static_labels[static]), line, where)
        static_labels[static] = label
    if to is not None:
        _check(dec, network.to_problem(label, to), r.line_of("to"), f"{path}.to")
    port: dict[str, Any] = {"Label": label, "Value": static or 0, "To": to or 0}
    if host_network is not None:
        _check(dec, network.host_network_problem(label, host_network),
               r.line_of("host_network"), f"{path}.host_network")
        port["HostNetwork"] = host_network
    return port


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
    task.update(_present(
        DispatchPayload=_optional_block(r, "dispatch_payload", _dispatch_payload),
        LogConfig=_optional_block(r, "logs", _logs)))
    task.update(_present(Services=_services(r)))
    r.finish()
    return task


def _logs(r: _Reader) -> dict[str, Any]:
    """``logs { max_files, max_file_size, disabled }`` (size in MB; defaults and checks in
    ``rollout``). Nomad's deprecated ``enabled`` is refused as unknown, not half-honoured."""
    return {"MaxFiles": r.get("max_files", r.dec.to_int),
            "MaxFileSizeMB": r.get("max_file_size", r.dec.to_int),
            "Disabled": r.get("disabled", r.dec.to_bool)}


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
    resources = {"CPU": r.get("cpu", r.dec.to_int), "MemoryMB": r.get("memory", r.dec.to_int)}
    # Only when written: a task without them keeps Nomad's defaults (no pinning, no
    # oversubscription), and canonical.py tells "cores given" from "cores absent".
    resources.update(_present(Cores=r.get("cores", r.dec.to_int),
                              MemoryMaxMB=r.get("memory_max", r.dec.to_int)))
    return resources


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


def _free_body(dec: _Decoder, body: Body, path: str, *, labelled: bool = False
               ) -> dict[str, Any]:
    """A driver config body: any attributes; nested blocks become lists of objects. With
    ``labelled`` (an autoscaler policy) a block may have one label and becomes an object
    keyed by it, as Nomad's parser gives it: ``check "cpu" {...}`` -> ``{"cpu": [{...}]}``."""
    out: dict[str, Any] = {a.name: dec.evaluator.value(a.expr) for a in body.attributes}
    attribute_names = set(out)
    for block in body.blocks:
        sub = f"{path}.{block.type}"
        if len(block.labels) > (1 if labelled else 0):
            raise dec.error(block.line, sub, "labelled blocks are not supported inside config"
                            if not labelled else "a policy block takes at most one label")
        if block.type in attribute_names:
            raise dec.error(block.line, sub, f"{block.type!r} is set both as block and attribute")
        inner = _free_body(dec, block.body, sub, labelled=labelled)
        out.setdefault(block.type, []).append({block.labels[0]: [inner]} if block.labels
                                              else inner)
    return out


# ---- periodic, parameterized, scaling, dispatch_payload ---------------------------------
# Only present in the decoded job when their block is written: a job without them keeps the
# keys it always had.


def _present(**fields: Any) -> dict[str, Any]:
    return {key: value for key, value in fields.items() if value is not None}


def _periodic(r: _Reader) -> dict[str, Any]:
    """``periodic { cron | crons, prohibit_overlap, time_zone, enabled }``."""
    return {
        "Spec": r.get("cron", r.dec.to_str),
        "Specs": r.get("crons", r.dec.to_str_list),
        "ProhibitOverlap": r.get("prohibit_overlap", r.dec.to_bool),
        "TimeZone": r.get("time_zone", r.dec.to_str),
        "Enabled": r.get("enabled", r.dec.to_bool),
    }


def _parameterized(r: _Reader) -> dict[str, Any]:
    """``parameterized { payload, meta_required, meta_optional }``."""
    return {
        "Payload": r.get("payload", r.dec.to_str),
        "MetaRequired": r.get("meta_required", r.dec.to_str_list),
        "MetaOptional": r.get("meta_optional", r.dec.to_str_list),
    }


def _scaling(r: _Reader) -> dict[str, Any]:
    """Group ``scaling { enabled, min, max, policy { ... } }``; the policy is opaque (for an
    autoscaler), read like a driver config."""
    policy = r.one_block("policy")
    return {
        "Enabled": r.get("enabled", r.dec.to_bool),
        "Min": r.get("min", r.dec.to_int),
        "Max": r.get("max", r.dec.to_int),
        "Policy": None if policy is None else _free_body(r.dec, policy.body,
                                                          f"{r.path}.policy", labelled=True),
    }


def _dispatch_payload(r: _Reader) -> dict[str, Any]:
    """Task ``dispatch_payload { file }``: where in ``local/`` a dispatched payload goes."""
    return {"File": r.get("file", r.dec.to_str)}


# ---- service discovery ------------------------------------------------------------------
# Only present in the decoded job when written, as the blocks above. The rules live in
# ``jobspec.services``; here each value is checked where it was written, for its line.


def _services(r: _Reader) -> list[dict[str, Any]] | None:
    """The ``service`` blocks of a group or task: Nomad's ``Services``."""
    found = []
    for block in r.blocks("service"):
        r.check_labels(block, 0)
        found.append(_service(r.dec, block, f"{r.path}.service"))
    return found or None


def _checked(r: _Reader, name: str, conv: Converter,
             problem: Callable[[Any], str | None]) -> Any:
    """The attribute ``name`` (None when not set), refused at its line if it has a
    ``problem``."""
    value = r.get(name, conv)
    if value is not None:
        _check(r.dec, problem(value), r.line_of(name), f"{r.path}.{name}")
    return value


def _service(dec: _Decoder, block: Block, path: str) -> dict[str, Any]:
    r = _Reader(dec, block.body, path)
    provider = r.get("provider", dec.to_str)
    # Without one it is Nomad's default, consul: refused at the block.
    _check(dec, services.provider_problem(provider), r.line_of("provider") or block.line,
           path if provider is None else f"{path}.provider")
    checks = r.blocks("check")
    for check in checks:
        r.check_labels(check, 0)
    service = {
        "Name": r.get("name", dec.to_str),
        "PortLabel": r.get("port", dec.to_str),
        "Tags": r.get("tags", dec.to_str_list),
        "AddressMode": _checked(r, "address_mode", dec.to_str, services.address_mode_problem),
        "Meta": r.string_map("meta"),
        "Provider": provider,
        "Checks": [_service_check(dec, c, f"{path}.check") for c in checks] or None,
    }
    r.finish()
    return service


def _service_check(dec: _Decoder, block: Block, path: str) -> dict[str, Any]:
    r = _Reader(dec, block.body, path)
    check = {
        "Name": r.get("name", dec.to_str),
        "Type": _checked(r, "type", dec.to_str, services.check_type_problem),
        "Path": _checked(r, "path", dec.to_str, services.path_problem),
        "Method": _checked(r, "method", dec.to_str, services.method_problem),
        "Interval": _checked(r, "interval", dec.to_duration, services.interval_problem),
        "Timeout": _checked(r, "timeout", dec.to_duration, services.timeout_problem),
        "PortLabel": r.get("port", dec.to_str),
    }
    r.finish()
    if check["Type"] is None:
        raise dec.error(block.line, f"{path}.type",
                        'missing attribute: write type = "http" or type = "tcp"')
    return check


# ---- ephemeral_disk, migrate, update (defaults and checks: ``rollout``) ------------------
def _ephemeral_disk(r: _Reader) -> dict[str, Any]:
    """Group ``ephemeral_disk { size, sticky, migrate }`` (size in MB)."""
    return {
        "SizeMB": r.get("size", r.dec.to_int),
        "Sticky": r.get("sticky", r.dec.to_bool),
        "Migrate": r.get("migrate", r.dec.to_bool),
    }


def _health_timing(r: _Reader) -> dict[str, Any]:
    """The fields migrate and update share: how many at a time, and when one is healthy."""
    return {
        "MaxParallel": r.get("max_parallel", r.dec.to_int),
        "HealthCheck": r.get("health_check", r.dec.to_str),
        "MinHealthyTime": r.get("min_healthy_time", r.dec.to_duration),
        "HealthyDeadline": r.get("healthy_deadline", r.dec.to_duration),
    }


def _migrate(r: _Reader) -> dict[str, Any]:
    return _health_timing(r)


def _disconnect(r: _Reader) -> dict[str, Any]:
    """Group ``disconnect { lost_after, replace, reconcile, stop_on_client_after }``
    (``jobspec.disconnect`` fills and checks it)."""
    return {
        "LostAfter": r.get("lost_after", r.dec.to_duration),
        "Replace": r.get("replace", r.dec.to_bool),
        "Reconcile": r.get("reconcile", r.dec.to_str),
        "StopOnClientAfter": r.get("stop_on_client_after", r.dec.to_duration),
    }


def _update(r: _Reader) -> dict[str, Any]:
    """Job or group ``update { max_parallel, health_check, min_healthy_time,
    healthy_deadline, progress_deadline, auto_revert, auto_promote, canary, stagger }``."""
    return {
        **_health_timing(r),
        "ProgressDeadline": r.get("progress_deadline", r.dec.to_duration),
        "AutoRevert": r.get("auto_revert", r.dec.to_bool),
        "AutoPromote": r.get("auto_promote", r.dec.to_bool),
        "Canary": r.get("canary", r.dec.to_int),
        "Stagger": r.get("stagger", r.dec.to_duration),
    }
