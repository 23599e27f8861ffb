"""``service`` commands: list, info, delete (Nomad's ``nomad service ...``), over the native
service discovery routes. ``-namespace`` (or ``$NOMAD_NAMESPACE``) names the registrations'
namespace; ``list`` and ``info`` take ``*`` for every namespace the caller may read."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nomad_client.api import ApiClient
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    ALL_NAMESPACES,
    CommandParser,
    out,
    print_formatted,
    reporting,
    run_with_client,
)
from nomad_client.structs.network import join_host_port


def _tags(tags: Any) -> str:
    return f"[{','.join(tags or ())}]"


def _services_table(listing: list[dict[str, Any]], every_namespace: bool) -> str:
    rows = [(entry.get("Namespace"), service) for entry in listing
            for service in entry.get("Services") or ()]
    if every_namespace:
        return fmt.table(["Service Name", "Namespace", "Tags"],
                         [[s.get("ServiceName"), ns, _tags(s.get("Tags"))] for ns, s in rows])
    return fmt.table(["Service Name", "Tags"],
                     [[s.get("ServiceName"), _tags(s.get("Tags"))] for _, s in rows])


def list_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("service list", "service list [options]",
                      "List the services registered with provider \"nomad\".",
                      namespaced=True, wildcard_ok=True)
    p.add_positionals("args", 0, 0)
    p.add_format_flags("services")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        with reporting("Error listing service registrations"):
            listing = await client.services_list()
        if print_formatted(ns, listing):
            pass
        elif not any(entry.get("Services") for entry in listing):
            out("No service registrations found")
        else:
            out(_services_table(listing, ns.namespace == ALL_NAMESPACES))
        return 0

    return run_with_client(ns, body)


def _address(registration: dict[str, Any]) -> str:
    return join_host_port(str(registration.get("Address") or ""),
                          int(registration.get("Port") or 0))


def _registrations_table(registrations: list[dict[str, Any]], verbose: bool) -> str:
    if verbose:
        return "\n\n".join(fmt.kv([
            ("ID", r.get("ID")), ("Service Name", r.get("ServiceName")),
            ("Namespace", r.get("Namespace")), ("Job ID", r.get("JobID")),
            ("Alloc ID", r.get("AllocID")), ("Node ID", r.get("NodeID")),
            ("Datacenter", r.get("Datacenter")), ("Address", _address(r)),
            ("Tags", _tags(r.get("Tags")))]) for r in registrations)
    return fmt.table(["Job ID", "Address", "Tags", "Node ID", "Alloc ID"],
                     [[r.get("JobID"), _address(r), _tags(r.get("Tags")),
                       fmt.short_id(r.get("NodeID")), fmt.short_id(r.get("AllocID"))]
                      for r in registrations])


def info_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("service info", "service info [options] <service name>",
                      "Show the registrations of a service.", namespaced=True,
                      wildcard_ok=True)
    p.add_positionals("name", 1, 1)
    p.add_format_flags("registrations")
    p.add_bool_flag("verbose", help="show every field of each registration")
    p.add_flag("filter", metavar="EXPR", default=None,
               help="keep the registrations this expression matches")
    p.add_flag("tag", action="append", default=[], metavar="TAG",
               help="keep the registrations with this tag (repeatable: all of them)")
    ns = p.parse(argv)
    name = ns.name[0]

    async def body(client: ApiClient) -> int:
        with reporting("Error listing service registrations"):
            found = await client.service_registrations(name, tags=ns.tag, filter=ns.filter)
        if print_formatted(ns, found):
            pass
        elif not found:
            out("No service registrations found")
        else:
            out(_registrations_table(found, ns.verbose))
        return 0

    return run_with_client(ns, body)


def delete_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("service delete", "service delete [options] <service name> <service id>",
                      "Delete one registration of a service.", namespaced=True)
    p.add_positionals("args", 2, 2)
    ns = p.parse(argv)
    name, service_id = ns.args

    async def body(client: ApiClient) -> int:
        with reporting("Error deleting service registration"):
            await client.service_delete(name, service_id)
        out("Successfully deleted service registration")
        return 0

    return run_with_client(ns, body)


COMMANDS = {"list": list_cmd, "info": info_cmd, "delete": delete_cmd}
