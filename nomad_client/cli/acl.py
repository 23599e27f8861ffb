"""``acl`` commands: bootstrap, and the ``policy``, ``token`` and ``role`` groups, with
Nomad's flags, output and error messages.

Everything goes through the agent API. Reads a policy or bootstrap-secret file (or stdin)
when one is named; ``-json`` prints the API's JSON as it came.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from nomad_client.api import ApiClient, ApiError
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    CommandError,
    CommandParser,
    command_group,
    out,
    print_formatted,
    reporting,
    run_with_client,
)
from nomad_client.durations import DurationError, format_duration, parse_duration_ns

Command = Callable[[Sequence[str]], int]
Document = Any  # a decoded API answer: a dict, or a list of them
NO_ARGUMENTS = "This command takes no arguments"
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-"
                   r"[0-9a-fA-F]{12}")
_RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")


# ---- parsing -------------------------------------------------------------------------------

class AclParser(CommandParser):
    """A parser for one ``acl`` command: positional arguments land in ``args``, and a wrong
    count of them is refused with Nomad's wording for that command."""

    def __init__(self, name: str, usage: str, description: str, *, low: int = 0,
                 high: int = 0, complaint: str = NO_ARGUMENTS) -> None:
        super().__init__(name, f"{name} {usage}", description)
        self._name = name
        self._count = (low, high)
        self._complaint = complaint
        self.add_argument("args", nargs="*", help=argparse.SUPPRESS)

    def add_json_flag(self, what: str) -> None:
        self.add_format_flags(what)

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        ns = super().parse(argv)
        low, high = self._count
        if not low <= len(ns.args) <= high:
            raise usage_error(self._complaint, self._name)
        return ns


def usage_error(message: str, command: str) -> CommandError:
    """``message`` and, as Nomad adds to usage errors, where to read the command's help."""
    return CommandError(f"{message}\nFor additional help try 'nomad-client {command} -help'")


def _read_source(path: str) -> bytes:
    """The contents of ``path``, or of stdin for ``-``."""
    if path == "-":
        return sys.stdin.buffer.read()
    return Path(path).read_bytes()


def _os_reason(path: str, exc: OSError) -> str:
    """Go's wording for a failed file read: ``open <path>: no such file or directory``."""
    reason = (exc.strerror or str(exc)).lower()
    return reason if path == "-" else f"open {path}: {reason}"


def _is_uuid(text: str) -> bool:
    return _UUID.fullmatch(text) is not None


# ---- output --------------------------------------------------------------------------------

def go_time(value: Any) -> str:
    """An API time (RFC 3339 with nanoseconds) as Go's ``time.Time.String`` prints it:
    ``2026-01-02 03:04:05.123456789 +0000 UTC``; empty for null or the zero time."""
    if not isinstance(value, str) or value.startswith("0001-01-01"):
        return ""
    match = _RFC3339.match(value)
    if match is None:
        return value
    day, clock, fraction, zone = match.groups()
    fraction = (fraction or "").rstrip("0")
    stamp = f"{day} {clock}{'.' + fraction if fraction else ''}"
    if zone == "Z":
        return f"{stamp} +0000 UTC"
    offset = zone.replace(":", "")
    return f"{stamp} {offset} {offset}"


def _expired(value: Any) -> bool:
    when = fmt.from_rfc3339(value)
    return when is not None and when < datetime.now(UTC)


def _show(doc: Document, ns: argparse.Namespace, render: Callable[[Any], str]) -> None:
    # Nomad indents ACL JSON by four spaces and keeps the fields in the API's order.
    if not print_formatted(ns, doc):
        out(render(doc))


def format_token(token: Mapping[str, Any]) -> str:
    """The token block of ``acl bootstrap``, ``acl token create``, ``info``, ``self`` and
    ``update``."""
    pairs: list[tuple[str, Any]] = [
        ("Accessor ID", token.get("AccessorID")),
        ("Secret ID", token.get("SecretID")),
        ("Name", token.get("Name")),
        ("Type", token.get("Type")),
        ("Global", bool(token.get("Global"))),
        ("Create Time", go_time(token.get("CreateTime"))),
        ("Expiry Time", go_time(token.get("ExpirationTime"))),
        ("Create Index", token.get("CreateIndex", 0)),
        ("Modify Index", token.get("ModifyIndex", 0)),
    ]
    if token.get("Type") == "management":
        # A management token holds every permission: policies and roles do not apply.
        return fmt.kv([*pairs, ("Policies", "n/a"), ("Roles", "n/a")])
    # Go prints a string slice as [a b].
    pairs.append(("Policies", f"[{' '.join(token.get('Policies') or [])}]"))
    roles = token.get("Roles") or []
    links = fmt.table(["ID", "Name"], [[r.get("ID"), r.get("Name")] for r in roles]) \
        if roles else fmt.EMPTY
    return f"{fmt.kv(pairs)}\n\nRoles\n{links}"


def format_tokens(tokens: list[dict[str, Any]]) -> str:
    if not tokens:
        return "No tokens found"
    return fmt.table(["Name", "Type", "Global", "Accessor ID", "Expired"],
                     [[t.get("Name"), t.get("Type"), bool(t.get("Global")),
                       t.get("AccessorID"), _expired(t.get("ExpirationTime"))]
                      for t in tokens])


def format_policy(policy: Mapping[str, Any]) -> str:
    text = fmt.kv([("Name", policy.get("Name")), ("Description", policy.get("Description")),
                   ("CreateIndex", policy.get("CreateIndex", 0)),
                   ("ModifyIndex", policy.get("ModifyIndex", 0))])
    job_acl = policy.get("JobACL")
    if job_acl:
        text += "\n\nAssociated Workload\n" + fmt.kv(
            [(key, job_acl.get(key)) for key in ("Namespace", "JobID", "Group", "Task")])
    # The rules can be long: they come last, verbatim.
    return f"{text}\n\nRules\n\n{policy.get('Rules') or ''}"


def format_policies(policies: list[dict[str, Any]]) -> str:
    if not policies:
        return "No policies found"
    return fmt.table(["Name", "Description"],
                     [[p.get("Name"), p.get("Description")] for p in policies])


def _role_policies(role: Mapping[str, Any]) -> str:
    return ",".join(sorted(str(link.get("Name")) for link in role.get("Policies") or []))


def format_role(role: Mapping[str, Any]) -> str:
    return fmt.kv([("ID", role.get("ID")), ("Name", role.get("Name")),
                   ("Description", role.get("Description")),
                   ("Policies", _role_policies(role)),
                   ("Create Index", role.get("CreateIndex", 0)),
                   ("Modify Index", role.get("ModifyIndex", 0))])


def format_roles(roles: list[dict[str, Any]]) -> str:
    if not roles:
        return "No ACL roles found"
    return fmt.table(["ID", "Name", "Description", "Policies"],
                     [[r.get("ID"), r.get("Name"), r.get("Description"), _role_policies(r)]
                      for r in roles])


def _fetch_and_show(ns: argparse.Namespace, failure: str,
                    call: Callable[[ApiClient], Awaitable[Document]],
                    render: Callable[[Any], str]) -> int:
    """Run one API call and print its answer (``render``ed, or as JSON with ``-json``)."""
    async def body(client: ApiClient) -> int:
        with reporting(failure):
            doc = await call(client)
        _show(doc, ns, render)
        return 0

    return run_with_client(ns, body)


def _edit_and_show(ns: argparse.Namespace, what: str,
                   read: Callable[[ApiClient], Awaitable[dict[str, Any]]],
                   edit: Callable[[dict[str, Any]], dict[str, Any]],
                   write: Callable[[ApiClient, dict[str, Any]], Awaitable[Document]],
                   render: Callable[[Any], str], read_failure: str = "") -> int:
    """Read a record, change it with ``edit``, write it back whole and print the answer:
    how Nomad's CLI updates tokens and roles."""
    async def body(client: ApiClient) -> int:
        with reporting(read_failure or f"Error fetching {what}"):
            current = await read(client)
        with reporting(f"Error updating {what}"):
            written = await write(client, edit(current))
        _show(written, ns, render)
        return 0

    return run_with_client(ns, body)


def _act_and_say(ns: argparse.Namespace, failure: str,
                 call: Callable[[ApiClient], Awaitable[None]], done: str) -> int:
    """Run one API write that answers nothing, then print ``done``."""
    async def body(client: ApiClient) -> int:
        with reporting(failure):
            await call(client)
        out(done)
        return 0

    return run_with_client(ns, body)


def _one_argument_parser(name: str, argument: str, description: str) -> AclParser:
    """The parser of a command that takes exactly one ``<argument>``."""
    return AclParser(name, f"[options] <{argument}>", description, low=1, high=1,
                     complaint=f"This command takes one argument: <{argument}>")


def _list_command(group: str, plural: str, description: str,
                  call: Callable[[ApiClient], Awaitable[Document]],
                  render: Callable[[Any], str]) -> Command:
    """``acl <group> list``: print what ``call`` answers."""
    def command(argv: Sequence[str]) -> int:
        p = AclParser(f"acl {group} list", "[options]", description)
        p.add_json_flag(plural)
        return _fetch_and_show(p.parse(argv), f"Error listing ACL {plural}", call, render)

    return command


def _info_command(group: str, argument: str, description: str, failure: str,
                  call: Callable[[ApiClient, str], Awaitable[Document]],
                  render: Callable[[Any], str]) -> Command:
    """``acl <group> info <argument>``: print the object ``call`` answers for it."""
    def command(argv: Sequence[str]) -> int:
        p = _one_argument_parser(f"acl {group} info", argument, description)
        p.add_json_flag(group)
        ns = p.parse(argv)
        return _fetch_and_show(ns, failure, lambda client: call(client, ns.args[0]), render)

    return command


def _delete_command(group: str, argument: str, failure: str,
                    call: Callable[[ApiClient, str], Awaitable[None]], done: str) -> Command:
    """``acl <group> delete <argument>``: delete the object, then print ``done`` with the
    argument in place of ``{}``."""
    def command(argv: Sequence[str]) -> int:
        p = _one_argument_parser(f"acl {group} delete", argument,
                                 f"Delete an ACL {group}. Requires a management token.")
        ns = p.parse(argv)
        ident = ns.args[0]
        return _act_and_say(ns, failure, lambda client: call(client, ident),
                            done.format(ident))

    return command


# ---- bootstrap -----------------------------------------------------------------------------

def bootstrap_cmd(argv: Sequence[str]) -> int:
    p = AclParser("acl bootstrap", "[options] [<path>]",
                  "Bootstrap the ACL system and print the initial management token. A secret "
                  "of your choosing (a UUID) can be read from <path>, or from stdin with '-'.",
                  high=1, complaint="This command takes up to one argument")
    p.add_json_flag("token")
    ns = p.parse(argv)
    secret = ""
    if ns.args and ns.args[0]:
        try:
            secret = _read_source(ns.args[0]).decode("utf-8", errors="replace")
        except OSError as exc:
            raise CommandError("Error reading provided token: "
                               f"{_os_reason(ns.args[0], exc)}") from None
    # A file written by `echo` ends in a newline that is no part of the secret.
    secret = secret.removesuffix("\n")
    return _fetch_and_show(ns, "Error bootstrapping",
                           lambda client: client.acl_bootstrap(secret or None), format_token)


# ---- policy --------------------------------------------------------------------------------

def _job_acl(ns: argparse.Namespace) -> dict[str, str] | None:
    """The workload the policy is attached to, from -namespace/-job/-group/-task."""
    for needed, flag, given in (("-namespace", "-job", ns.job), ("-job", "-group", ns.group),
                                ("-group", "-task", ns.task)):
        if given and not getattr(ns, needed.lstrip("-")):
            raise CommandError(f"{needed} is required if {flag} is set")
    if not ns.namespace:
        return None
    return {"Namespace": ns.namespace, "JobID": ns.job, "Group": ns.group, "Task": ns.task}


def policy_apply_cmd(argv: Sequence[str]) -> int:
    p = AclParser("acl policy apply", "[options] <name> <path>",
                  "Create or update an ACL policy from the rules in <path> (stdin for '-'). "
                  "Requires a management token.",
                  low=2, high=2, complaint="This command takes two arguments: <name> and <path>")
    p.add_flag("description", default="", help="a human readable description of the policy")
    p.add_flag("namespace", default="", help="attach the policy to workloads of this namespace")
    p.add_flag("job", default="", help="attach the policy to this job (needs -namespace)")
    p.add_flag("group", default="", help="attach the policy to this task group (needs -job)")
    p.add_flag("task", default="", help="attach the policy to this task (needs -group)")
    ns = p.parse(argv)
    name, path = ns.args
    try:
        rules = _read_source(path).decode("utf-8", errors="replace")
    except OSError as exc:
        source = "stdin" if path == "-" else "file"
        raise CommandError(f"Failed to read {source}: {_os_reason(path, exc)}") from None
    policy: dict[str, Any] = {"Name": name, "Description": ns.description, "Rules": rules}
    job_acl = _job_acl(ns)
    if job_acl is not None:
        policy["JobACL"] = job_acl
    return _act_and_say(ns, "Error writing ACL policy",
                        lambda client: client.acl_policy_apply(policy),
                        f'Successfully wrote "{name}" ACL policy!')


policy_list_cmd = _list_command(
    "policy", "policies", "List ACL policies (a non-management token sees its own).",
    lambda client: client.acl_policies(), format_policies)
policy_info_cmd = _info_command(
    "policy", "name", "Show an ACL policy and its rules.", "Error fetching info on ACL policy",
    lambda client, name: client.acl_policy(name), format_policy)
policy_delete_cmd = _delete_command(
    "policy", "name", "Error deleting ACL policy",
    lambda client, name: client.acl_policy_delete(name), "Successfully deleted {} policy!")


# ---- token ---------------------------------------------------------------------------------

def _add_link_flags(p: AclParser) -> None:
    p.add_flag("policy", action="append", default=[], metavar="NAME",
               help="a policy for the token (repeatable; client tokens only)")
    p.add_flag("role-name", action="append", default=[], metavar="NAME",
               help="a role for the token, by name (repeatable)")
    p.add_flag("role-id", action="append", default=[], metavar="ID",
               help="a role for the token, by ID (repeatable)")


def _role_links(names: Sequence[str], ids: Sequence[str]) -> list[dict[str, str]]:
    """Role links for a token: by name, then by ID, each given once."""
    return ([{"Name": n} for n in dict.fromkeys(names)]
            + [{"ID": i} for i in dict.fromkeys(ids)])


def token_create_cmd(argv: Sequence[str]) -> int:
    p = AclParser("acl token create", "[options]",
                  "Create an ACL token. Requires a management token.")
    p.add_flag("name", default="", help="a human readable name for the token")
    p.add_flag("type", default="client", help='"client" (default) or "management"')
    p.add_bool_flag("global", dest="global_", help="replicate the token to every region")
    _add_link_flags(p)
    p.add_flag("ttl", default="", metavar="DURATION",
               help='how long the token lives, e.g. "5m" or "1h" (default: forever)')
    p.add_json_flag("token")
    ns = p.parse(argv)
    token: dict[str, Any] = {"Name": ns.name, "Type": ns.type, "Policies": ns.policy,
                             "Roles": _role_links(ns.role_name, ns.role_id),
                             "Global": ns.global_}
    if ns.ttl:
        try:
            token["ExpirationTTL"] = format_duration(parse_duration_ns(ns.ttl))
        except DurationError:
            raise CommandError("Failed to parse TTL as time duration: "
                               f'time: invalid duration "{ns.ttl}"') from None

    async def body(client: ApiClient) -> int:
        with reporting("Error creating token"):
            # The server does not check a token's policy names: warn about any we cannot
            # read, and go on.
            for policy in ns.policy:
                try:
                    await client.acl_policy(policy)
                except ApiError as exc:
                    print(f"Error fetching info on {policy} policy: {exc}", file=sys.stderr)
            created = await client.acl_token_create(token)
        _show(created, ns, format_token)
        return 0

    return run_with_client(ns, body)


token_list_cmd = _list_command(
    "token", "tokens", "List ACL tokens. Requires a management token.",
    lambda client: client.acl_tokens(), format_tokens)
token_info_cmd = _info_command(
    "token", "token_accessor_id", "Show an ACL token.", "Error fetching token",
    lambda client, accessor: client.acl_token(accessor), format_token)


def token_self_cmd(argv: Sequence[str]) -> int:
    p = AclParser("acl token self", "[options]", "Show the ACL token in use.")
    p.add_json_flag("token")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        if not client.token:
            raise CommandError("No token present in the environment or set via the CLI flag")
        if _is_uuid(client.token):
            with reporting("Error fetching self token"):
                token = await client.acl_token_self()
            _show(token, ns, format_token)
            return 0
        # Not an ACL token: a workload identity, which may have policies attached.
        with reporting("Error fetching self policies"):
            try:
                attached = await client.acl_policies_self()
            except ApiError:
                attached = []
        if attached:
            out("No ACL token found but there are ACL policies attached to this workload "
                "identity. You can query them with acl policy self command.")
            return 0
        raise CommandError("No ACL tokens, nor ACL policies attached to a workload identity "
                           "found.")

    return run_with_client(ns, body)


def token_update_cmd(argv: Sequence[str]) -> int:
    p = _one_argument_parser(
        "acl token update", "token_accessor_id",
        "Update an ACL token; flags not given leave their field unchanged, lists given "
        "replace the stored ones. Requires a management token.")
    p.add_flag("name", default="", help="a new name")
    p.add_flag("type", default="", help='a new type: "client" or "management"')
    _add_link_flags(p)
    p.add_json_flag("token")
    ns = p.parse(argv)
    return _edit_and_show(ns, "token", lambda client: client.acl_token(ns.args[0]),
                          lambda current: _updated_token(ns, current),
                          lambda client, token: client.acl_token_update(token), format_token)


def _updated_token(ns: argparse.Namespace, current: Mapping[str, Any]) -> dict[str, Any]:
    """``current`` with the flags given applied; everything else (the secret, global mode,
    expiry) is sent back as it was, which the server requires."""
    token = dict(current)
    token["Name"] = ns.name or token.get("Name", "")
    token["Type"] = ns.type or token.get("Type", "")
    if ns.policy:
        token["Policies"] = ns.policy
    if ns.role_name or ns.role_id:
        token["Roles"] = _role_links(ns.role_name, ns.role_id)
    return token


token_delete_cmd = _delete_command(
    "token", "token_accessor_id", "Error deleting token",
    lambda client, accessor: client.acl_token_delete(accessor), "Token {} successfully deleted")


# ---- role ----------------------------------------------------------------------------------

def _policy_links(names: Sequence[str]) -> list[dict[str, str]]:
    return [{"Name": n} for n in dict.fromkeys(names)]


def _add_role_flags(p: AclParser) -> None:
    p.add_flag("name", default="", help="the role's name (1-128 characters)")
    p.add_flag("description", default="", help="a description of at most 256 characters")
    p.add_flag("policy", action="append", default=[], metavar="NAME",
               help="a policy of the role, by name (repeatable)")
    p.add_json_flag("role")


def _require_name_and_policy(ns: argparse.Namespace) -> None:
    if not ns.name:
        raise CommandError("ACL role name must be specified using the -name flag")
    if not ns.policy:
        raise CommandError("At least one policy name must be specified using the -policy flag")


def role_create_cmd(argv: Sequence[str]) -> int:
    p = AclParser("acl role create", "[options]",
                  "Create an ACL role. Requires a management token.")
    _add_role_flags(p)
    ns = p.parse(argv)
    _require_name_and_policy(ns)
    role = {"Name": ns.name, "Description": ns.description,
            "Policies": _policy_links(ns.policy)}
    return _fetch_and_show(ns, "Error creating ACL role",
                           lambda client: client.acl_role_create(role), format_role)


role_list_cmd = _list_command(
    "role", "roles", "List ACL roles.", lambda client: client.acl_roles(), format_roles)


def role_info_cmd(argv: Sequence[str]) -> int:
    p = _one_argument_parser("acl role info", "acl_role_id", "Show an ACL role.")
    p.add_bool_flag("by-name", help="the argument is the role's name, not its ID")
    p.add_json_flag("role")
    ns = p.parse(argv)
    ident = ns.args[0]

    def call(client: ApiClient) -> Awaitable[dict[str, Any]]:
        return client.acl_role_by_name(ident) if ns.by_name else client.acl_role(ident)

    return _fetch_and_show(ns, "Error reading ACL role", call, format_role)


def _updated_role(ns: argparse.Namespace, current: Mapping[str, Any]) -> dict[str, Any]:
    """The role to write: with -no-merge exactly the flags, else ``current`` with the
    flags given applied (policies are added, never removed)."""
    if ns.no_merge:
        _require_name_and_policy(ns)
        return {"ID": current.get("ID"), "Name": ns.name, "Description": ns.description,
                "Policies": _policy_links(ns.policy)}
    role = dict(current)
    role["Name"] = ns.name or role.get("Name", "")
    role["Description"] = ns.description or role.get("Description", "")
    held = [str(link.get("Name")) for link in current.get("Policies") or []]
    role["Policies"] = _policy_links([*held, *ns.policy])
    return role


def role_update_cmd(argv: Sequence[str]) -> int:
    p = _one_argument_parser(
        "acl role update", "acl_role_id",
        "Update an ACL role: the flags given are merged into it (policies added), or with "
        "-no-merge replace it. Requires a management token.")
    _add_role_flags(p)
    p.add_bool_flag("no-merge", help="replace the role with exactly what the flags say")
    ns = p.parse(argv)
    if not ns.no_merge and not (ns.name or ns.description or ns.policy):
        raise usage_error("Please provide at least one flag to update the ACL role",
                          "acl role update")

    return _edit_and_show(ns, "ACL role", lambda client: client.acl_role(ns.args[0]),
                          lambda current: _updated_role(ns, current),
                          lambda client, role: client.acl_role_update(role), format_role,
                          read_failure="Error when retrieving ACL role")


role_delete_cmd = _delete_command(
    "role", "acl_role_id", "Error deleting ACL role",
    lambda client, role_id: client.acl_role_delete(role_id), "ACL role {} successfully deleted")


# ---- command groups ------------------------------------------------------------------------

COMMANDS: Mapping[str, Command] = {
    "bootstrap": bootstrap_cmd,
    "policy": command_group("acl policy", {"apply": policy_apply_cmd, "list": policy_list_cmd,
                                    "info": policy_info_cmd, "delete": policy_delete_cmd}),
    "token": command_group("acl token", {"create": token_create_cmd, "list": token_list_cmd,
                                  "info": token_info_cmd, "self": token_self_cmd,
                                  "update": token_update_cmd, "delete": token_delete_cmd}),
    "role": command_group("acl role", {"create": role_create_cmd, "list": role_list_cmd,
                                "info": role_info_cmd, "update": role_update_cmd,
                                "delete": role_delete_cmd}),
}
