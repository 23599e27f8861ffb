"""Native service discovery in a job: the ``service`` blocks of groups and tasks (provider
``"nomad"``) and their ``check`` blocks, in Nomad's API shape, with their defaults and rules.

The one home of those rules: the HCL decoder asks the per-value ones (``*_problem``) so its
errors carry a line, and ``canonicalize_job`` fills defaults (``fill_services``) and checks
everything again (``service_problems``), so a JSON job is held to the same rules.

Shape (durations in nanoseconds)::

    "Services": [{"Name", "TaskName", "PortLabel", "Tags", "AddressMode", "Meta", "Provider",
                  "Checks": [{"Name", "Type", "Path", "Method", "Interval", "Timeout",
                              "PortLabel"}]}]

Only what makes sense without Consul and containers is accepted: provider ``nomad``, address
modes ``auto``/``host`` (tasks share the host's network), ``http`` and ``tcp`` checks. A port
is a label of the group's ``network`` ports or a number. Pure computation.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from nomad_client.durations import SECOND
from nomad_client.jobspec.errors import short_repr

PROVIDER_NOMAD = "nomad"
PROVIDER_CONSUL = "consul"  # Nomad's default provider
CHECK_TYPES = ("http", "tcp")
ADDRESS_MODES = ("auto", "host")
# Modes Nomad has that need a network namespace or a driver network this client never makes.
_NETWORK_NAMESPACE_MODES = ("alloc", "alloc_ipv6", "driver")
HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE")
MIN_CHECK_INTERVAL = SECOND
MIN_CHECK_TIMEOUT = SECOND
# Nomad's service name rule (RFC 1123 labels), checked with ``${...}`` parts taken out.
_SERVICE_NAME = re.compile(r"\A(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]{0,61}[a-zA-Z0-9])\Z")
_INTERPOLATION = re.compile(r"\$\{[^}]*\}")
_PRINTABLE_PATH = re.compile(r"\A[\x21-\x7e]*\Z")


# ---- one value at a time (the decoder adds the line) -----------------------------------
def provider_problem(provider: Any) -> str | None:
    """Why a service cannot have ``provider`` (None: it was not given, Nomad's default)."""
    if provider == PROVIDER_NOMAD:
        return None
    if provider is None or provider == PROVIDER_CONSUL:
        default = " (the default)" if provider is None else ""
        return (f'the \'service\' block is not supported with provider "consul"{default}: '
                'this client has no Consul; set provider = "nomad"')
    return f'unknown service provider {short_repr(provider)} (want "nomad")'


def address_mode_problem(mode: Any) -> str | None:
    if mode in ADDRESS_MODES:
        return None
    if mode in _NETWORK_NAMESPACE_MODES:
        return (f"address_mode {short_repr(mode)} is not available: tasks here share the "
                'host\'s network (use "auto" or "host")')
    return f"unknown address_mode {short_repr(mode)} (want one of {', '.join(ADDRESS_MODES)})"


def check_type_problem(check_type: Any) -> str | None:
    if check_type in CHECK_TYPES:
        return None
    return (f"check type {short_repr(check_type)} is not supported: provider \"nomad\" runs "
            f"{' and '.join(CHECK_TYPES)} checks only")


def method_problem(method: Any) -> str | None:
    if isinstance(method, str) and method.upper() in HTTP_METHODS:
        return None
    return f"method {short_repr(method)} is not supported in an http check"


def path_problem(path: Any) -> str | None:
    """An http check's path: relative to the service's address, printable, no spaces."""
    if not isinstance(path, str) or not _PRINTABLE_PATH.match(path):
        return f"invalid http check path {short_repr(path)}"
    parts = urlsplit(path)
    if parts.scheme or parts.netloc:
        return "http type must have relative http path"
    return None


def interval_problem(interval: Any) -> str | None:
    return _duration_problem("interval", interval, MIN_CHECK_INTERVAL)


def timeout_problem(timeout: Any) -> str | None:
    return _duration_problem("timeout", timeout, MIN_CHECK_TIMEOUT)


def _duration_problem(name: str, value: Any, minimum: int) -> str | None:
    if value is None:
        return f"missing required value {name}"
    if not _is_int(value) or value < minimum:
        return f"{name} must be at least 1s, got {short_repr(value)}"
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def port_number(label: str) -> int | None:
    """The port a numeric label names (``"8080"``), or None for a label."""
    if label.isdecimal() and label.isascii():
        number = int(label)
        if 0 < number <= 65535:
            return number
    return None


# ---- defaults ------------------------------------------------------------------------------
def fill_services(job: dict[str, Any]) -> None:
    """Fill the defaults of every service and check of ``job`` (already filled otherwise)."""
    job_name = job.get("Name")
    for group in _dicts(job.get("TaskGroups")):
        base = f"{job_name}-{group.get('Name')}"
        _fill_all(group, base, "", {"JOB": job_name, "TASKGROUP": group.get("Name"),
                                    "TASK": "group", "BASE": f"{base}-group"})
        for task in _dicts(group.get("Tasks")):
            task_base = f"{base}-{task.get('Name')}"
            _fill_all(task, task_base, task.get("Name"),
                      {"JOB": job_name, "TASKGROUP": group.get("Name"), "TASK": task.get("Name"),
                       "BASE": task_base})


def _fill_all(owner: dict[str, Any], default_name: str, task: Any,
              replacements: Mapping[str, Any]) -> None:
    services = owner.get("Services")
    if services is None:
        owner["Services"] = None  # Nomad's JSON: null when there are none
        return
    for service in services if isinstance(services, list) else ():
        if isinstance(service, dict):
            _fill_service(service, default_name, task, replacements)


def _fill_service(service: dict[str, Any], default_name: str, task: Any,
                  replacements: Mapping[str, Any]) -> None:
    name = service.get("Name") or default_name
    if isinstance(name, str):
        # As Nomad's server does; other ${...} are left to the client.
        for key, value in replacements.items():
            name = name.replace(f"${{{key}}}", str(value))
    service["Name"] = name
    if task:  # a task's service belongs to it; a group's may name a task or none
        service["TaskName"] = service.get("TaskName") or task
    for key, value in (("TaskName", ""), ("PortLabel", ""), ("AddressMode", "auto")):
        if service.get(key) is None:
            service[key] = value
    for key, factory in (("Tags", list), ("Meta", dict), ("Checks", list)):
        if service.get(key) is None:
            service[key] = factory()
    for check in _dicts(service["Checks"]):
        if check.get("Name") is None:
            check["Name"] = f'service: "{service["Name"]}" check'
        if check.get("Method") is None and check.get("Type") == "http":
            check["Method"] = "GET"
        for key in ("Path", "Method", "PortLabel"):
            if check.get(key) is None:
                check[key] = ""


# ---- the whole job (after fill_services) -----------------------------------------------------
def service_problems(job: Mapping[str, Any]) -> list[str]:
    """Every problem of the job's services, each led by where it stands. Malformed groups
    and tasks are skipped: their own checks report them."""
    problems: list[str] = []
    for group in _dicts(job.get("TaskGroups")):
        group_name = group.get("Name")
        labels = _port_labels(group)
        tasks = {t["Name"] for t in _dicts(group.get("Tasks")) if isinstance(t.get("Name"), str)}
        seen: set[tuple[Any, ...]] = set()
        owners: list[tuple[str, Mapping[str, Any], str | None]] = [
            (f"group {group_name!r}", group, None)]
        owners += [(f"group {group_name!r} task {task.get('Name')!r}", task, task.get("Name"))
                   for task in _dicts(group.get("Tasks"))]
        for where, owner, task in owners:
            services = owner.get("Services")
            if services is None:
                continue
            if not isinstance(services, list):
                problems.append(f"{where}: Services must be a list")
                continue
            for service in services:
                if not isinstance(service, dict):
                    problems.append(f"{where}: each service must be an object")
                    continue
                swhere = f"{where} service {short_repr(service.get('Name'))}"
                problems += [f"{swhere}: {p}" for p in _service(service, labels, tasks, task)]
                key = (service.get("TaskName"), service.get("Name"), service.get("PortLabel"))
                if not all(isinstance(part, str) for part in key):
                    continue  # reported above
                if key in seen:
                    problems.append(f"{swhere}: Services are not unique: "
                                    f"{key[0]}->{key[1]}:{key[2]}")
                seen.add(key)
    return problems


def _service(service: Mapping[str, Any], labels: set[str], tasks: set[Any],
             task: str | None) -> Iterator[str]:
    name = service.get("Name")
    if not isinstance(name, str) or not _SERVICE_NAME.match(_INTERPOLATION.sub("", name)):
        yield (f"service name {short_repr(name)} is not valid: 1 to 63 letters, digits and "
               "dashes, starting and ending with a letter or digit")
    for problem in (provider_problem(service.get("Provider")),
                    address_mode_problem(service.get("AddressMode"))):
        if problem:
            yield problem
    if service.get("Connect") is not None:
        yield "Service with provider nomad cannot include Connect blocks"
    task_name = service.get("TaskName")
    if task is not None and task_name != task:
        yield f"a task's service can only name its own task, not {short_repr(task_name)}"
    elif task is None and task_name and (not isinstance(task_name, str)
                                         or task_name not in tasks):
        yield f"TaskName {short_repr(task_name)} is not a task of the group"
    tags = service.get("Tags")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags):
        yield "Tags must be a list of strings"
    meta = service.get("Meta")
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                             for k, v in meta.items()):
        yield "Meta must be a map of strings"
    port = service.get("PortLabel")
    yield from _port_problems(port, labels, name)
    checks = service.get("Checks")
    if not isinstance(checks, list):
        yield "Checks must be a list"
        return
    for check in checks:
        if not isinstance(check, dict):
            yield "each check must be an object"
            continue
        cwhere = f"check {short_repr(check.get('Name'))}"
        yield from (f"{cwhere}: {p}" for p in _check(check, labels, name, port))


def _check(check: Mapping[str, Any], labels: set[str], service: Any, service_port: Any
           ) -> Iterator[str]:
    if not isinstance(check.get("Name"), str):
        yield f"Name must be a string, got {short_repr(check.get('Name'))}"
    check_type = check.get("Type")
    problems = [check_type_problem(check_type), interval_problem(check.get("Interval")),
                timeout_problem(check.get("Timeout"))]
    if check_type == "http":
        problems += [path_problem(check.get("Path")) if check.get("Path") else
                     "http checks need a path", method_problem(check.get("Method"))]
    yield from (p for p in problems if p)
    port = check.get("PortLabel")
    if port:
        yield from _port_problems(port, labels, service)
    elif not service_port:
        yield (f"check requires a port but neither check nor service {short_repr(service)} "
               "have a port")


def _port_problems(port: Any, labels: set[str], service: Any) -> Iterator[str]:
    if not isinstance(port, str):
        yield f"port must be a string (a port label or number), got {short_repr(port)}"
    elif port and port not in labels and port_number(port) is None:
        yield f"port label {short_repr(port)} referenced by services {service} does not exist"


def _port_labels(group: Mapping[str, Any]) -> set[str]:
    """The labels of the group's network ports (the network checks report bad shapes)."""
    return {port["Label"] for network in _dicts(group.get("Networks"))
            for kind in ("ReservedPorts", "DynamicPorts")
            for port in _dicts(network.get(kind)) if isinstance(port.get("Label"), str)}


def _dicts(value: Any) -> Iterator[dict[str, Any]]:
    """The objects of ``value`` if it is a list (nothing otherwise)."""
    if isinstance(value, list):
        yield from (item for item in value if isinstance(item, dict))
