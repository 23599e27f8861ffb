"""How many of Nomad's HTTP route templates this agent serves.

Nomad registers its API on a Go ``ServeMux`` in ``registerHandlers`` (``command/agent/http.go``)
and, in the community edition, the enterprise-only stubs in ``registerEnterpriseHandlers``
(``command/agent/http_ce.go``). A pattern ending in ``/`` is a prefix whose handler dispatches
the rest of the path itself (``/v1/job/`` serves ``/v1/job/:id``, ``/v1/job/:id/versions`` and
eighteen more), so each prefix is expanded into the route templates its handler
dispatches, from ``SUB_TEMPLATES`` below. That table was written by reading Nomad's handlers;
it is checked against the checkout on every run (every mux prefix has an entry, every entry
is a mux prefix, every literal segment of a tabled template still appears in a string literal
of that prefix's handler, and every literal the handler dispatches on is in some tabled
template), and the script stops with the list of problems when it has rotted.
Templates are counted without methods (a path served for GET and PUT counts once). The UI
(``/``, ``/ui/``) and the ``-enable-debug`` pprof patterns are left out.

Our side is read from the real registrations: every endpoint module is registered on a
recording router, exactly as the agent does it. A Nomad template counts as served only if we
register that very template (placeholders match placeholders, whatever their names; a
literal segment matches only itself).

Usage: ``python scripts/route_coverage.py /path/to/nomad-checkout [-v]``
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from nomad_client.http.endpoints import register_all  # noqa: E402
from nomad_client.http.router import Router  # noqa: E402
from nomad_client.http.services import Services  # noqa: E402

# A mux registration: s.mux.HandleFunc("/v1/jobs", s.wrap(s.JobsRequest)),
# s.mux.Handle(structs.JWKSPath, ...), s.mux.Handle("/v1/var/", wrapCORS...(s.wrap(s.X), ...)).
_REGISTRATION = re.compile(
    r'\bmux\.Handle(?:Func)?\(\s*("([^"]*)"|[A-Za-z_][\w.]*)\s*,\s*([^\n]*)')
_HANDLER = re.compile(r"\bs\.wrap\w*\(\s*s\.(\w+)\s*\)")
_GO_STRING = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
# The string literals a handler dispatches on: strings.HasSuffix(path, "/plan"),
# strings.HasPrefix(path, "fail/"), case "stop":, case "create", "":, tokens[1] == "detach".
_DISPATCH = re.compile(r'\bstrings\.Has(?:Suffix|Prefix)\([^,()]+,\s*"([^"]*)"\)'
                       r'|\bcase\s+("[^"\n]*"(?:\s*,\s*"[^"\n]*")*)\s*:'
                       r'|[!=]=\s*"([^"]*)"')
_NOT_API = re.compile(r"^/$|^/ui/|^/debug/")
# Our placeholders ({job_id}, {path*}) and Nomad's (:id) both become ":" for matching.
_OUR_PLACEHOLDER = re.compile(r"^\{[^}]*\}$")

# What each of Nomad's prefix handlers dispatches, relative to the prefix.
SUB_TEMPLATES: dict[str, tuple[str, ...]] = {
    "/v1/job/": (
        ":id", ":id/evaluate", ":id/allocations", ":id/evaluations", ":id/periodic/force",
        ":id/plan", ":id/summary", ":id/dispatch", ":id/dispatch/payload", ":id/versions",
        ":id/revert", ":id/deployments", ":id/deployment", ":id/stable", ":id/scale",
        ":id/services", ":id/submission", ":id/actions", ":id/action",
        ":id/versions/:name/tag",
    ),
    "/v1/node/": (
        ":id", ":id/evaluate", ":id/allocations", ":id/drain", ":id/eligibility", ":id/purge",
    ),
    "/v1/node/pool/": (":name", ":name/nodes", ":name/jobs"),
    "/v1/allocation/": (":id", ":id/checks", ":id/stop", ":id/services"),
    "/v1/evaluation/": (":id", ":id/allocations"),
    "/v1/deployment/": (
        ":id", "allocations/:id", "fail/:id", "pause/:id", "promote/:id",
        "allocation-health/:id", "unblock/:id",
    ),
    "/v1/volume/csi/": (":id", ":id/create", ":id/detach", ":id/delete"),
    "/v1/plugin/csi/": (":id",),
    "/v1/volume/host/": ("create", "register", ":id"),
    "/v1/volumes/claim/": (":id",),
    "/v1/acl/policy/": ("self", ":name"),
    "/v1/acl/token/": ("self", ":accessor"),
    "/v1/acl/role/": (":id", "name/:name"),
    "/v1/acl/auth-method/": (":name",),
    "/v1/acl/binding-rule/": (":id",),
    "/v1/client/fs/": (
        "ls/:alloc", "stat/:alloc", "readat/:alloc", "cat/:alloc", "stream/:alloc", "logs/:alloc",
    ),
    "/v1/client/allocation/": (
        ":id/checks", ":id/stats", ":id/exec", ":id/snapshot", ":id/restart", ":id/gc",
        ":id/signal", ":id/pause",
    ),
    "/v1/agent/keyring/": ("list", "install", "use", "remove"),
    "/v1/agent/pprof/": ("cmdline", "profile", "trace", ":profile"),
    "/v1/service/": (":name", ":name/:id"),
    "/v1/scaling/policy/": (":id",),
    "/v1/operator/raft/": ("configuration", "peer", "transfer-leadership"),
    "/v1/operator/keyring/": ("keys", "key/:id", "rotate"),
    "/v1/operator/upgrade-check/": ("vault-workload-identity",),
    "/v1/namespace/": (":name",),
    "/v1/var/": (":path",),
    # Enterprise prefixes: the community handler is a stub, so only placeholders here.
    "/v1/sentinel/policy/": (":name",),
    "/v1/quota/": (":name",),
    "/v1/recommendation/": (":id",),
}

# Why a Nomad template is not served: (reason, templates); a template ending in "*" stands
# for every template starting with the rest.
REASONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("one in-process server: gossip/raft/autopilot/snapshot", (
        "/v1/agent/join", "/v1/agent/force-leave", "/v1/agent/keyring/*",
        "/v1/operator/raft/*", "/v1/operator/autopilot/*", "/v1/operator/snapshot",
    )),
    ("scheduler configuration and workers not exposed (one fixed in-process scheduler)", (
        "/v1/agent/schedulers*", "/v1/operator/scheduler/configuration",
    )),
    ("deployments not built", (
        "/v1/deployments", "/v1/deployment/*", "/v1/job/:id/deployment*",
    )),
    ("CSI/host volumes and plugins not built", (
        "/v1/volume*", "/v1/plugin*",
    )),
    ("search not built", ("/v1/search*",)),
    ("ACL login methods (auth methods, binding rules, OIDC, one-time tokens) not built", (
        "/v1/acl/token/onetime*", "/v1/acl/auth-method*", "/v1/acl/binding-rule*",
        "/v1/acl/oidc/*", "/v1/acl/login",
    )),
    ("node identities (client introduction tokens, identity renewal) not built", (
        "/v1/acl/identity/client-introduction-token", "/v1/client/identity*",
    )),
    ("agent operations (monitor, pprof, host, utilization…) not built", (
        "/v1/agent/host", "/v1/agent/reload", "/v1/agent/monitor*", "/v1/agent/pprof/*",
        "/v1/operator/upgrade-check/*", "/v1/operator/utilization",
    )),
    ("task actions and pause not built", (
        "/v1/job/:id/actions", "/v1/job/:id/action", "/v1/client/allocation/:id/pause",
    )),
    ("alloc snapshots (migration of ephemeral disks between clients) not built", (
        "/v1/client/allocation/:id/snapshot",
    )),
    ("smaller endpoints not built yet (nothing in the design stands in their way)", (
        "/v1/jobs/statuses", "/v1/evaluations/count", "/v1/system/reconcile/summaries",
        "/v1/job/:id/versions/:name/tag", "/v1/job/:id/stable", "/v1/job/:id/dispatch/payload",
        "/v1/node/:id/evaluate", "/v1/node/:id/purge", "/v1/node/pool/:name/jobs",
        "/v1/client/allocation/:id/checks", "/v1/client/allocation/:id/gc",
        "/v1/operator/keyring/key/:id",
    )),
    ("enterprise", (
        "/v1/operator/license", "/v1/sentinel/*", "/v1/quota*", "/v1/recommendation*",
    )),
)


class RouteTable(NamedTuple):
    community: list[str]
    enterprise: list[str]
    prefixes: list[str]  # every mux prefix pattern, community and enterprise


class TableRotError(Exception):
    """SUB_TEMPLATES no longer agrees with the checkout's handlers."""


def _function_body(source: str, name: str) -> str:
    start = source.index(f") {name}(")
    end = source.index("\n}\n", start)
    return source[start:end]


def _resolve_constant(checkout: Path, expression: str) -> str:
    """``structs.JWKSPath`` -> its string value, from the package's Go files."""
    package, _, constant = expression.rpartition(".")
    for go_file in sorted((checkout / "nomad" / package).glob("*.go")):
        found = re.search(rf'\b{re.escape(constant)}\s*=\s*"([^"]*)"', go_file.read_text())
        if found:
            return found.group(1)
    raise SystemExit(f"cannot resolve the route constant {expression}")


def mux_patterns(checkout: Path, file: str, function: str) -> dict[str, str]:
    """Nomad's mux patterns in ``function`` -> the name of the handler each is wired to."""
    body = _function_body((checkout / "command" / "agent" / file).read_text(), function)
    patterns: dict[str, str] = {}
    for match in _REGISTRATION.finditer(body):
        pattern = match.group(2) if match.group(2) is not None else \
            _resolve_constant(checkout, match.group(1))
        pattern = pattern.split(" ", 1)[-1]  # Go 1.22 "GET /v1/volumes" -> the path
        handler = _HANDLER.search(match.group(3))
        if not _NOT_API.search(pattern) and pattern not in patterns:
            patterns[pattern] = handler.group(1) if handler else ""
    return patterns


def handler_source(checkout: Path, handler: str) -> str:
    """The body of ``func (s *HTTPServer) <handler>(`` in the checkout's command/agent."""
    for go_file in sorted((checkout / "command" / "agent").glob("*.go")):
        if go_file.name.endswith("_test.go"):
            continue
        source = go_file.read_text()
        if f") {handler}(" in source:
            return _function_body(source, handler)
    raise TableRotError(f"handler {handler} not found in command/agent")


def literal_segments(source: str) -> set[str]:
    """Every path segment of every Go string literal in ``source``."""
    return {segment for literal in _GO_STRING.findall(source)
            for segment in literal.split("/") if segment}


def dispatch_segments(source: str) -> set[str]:
    """The path segments ``source`` dispatches on (see ``_DISPATCH``)."""
    literals: list[str] = []
    for has, cases, compared in _DISPATCH.findall(source):
        literals += [has, compared, *_GO_STRING.findall(cases)]
    return {segment for literal in literals for segment in literal.split("/") if segment}


def check_table(checkout: Path, patterns: dict[str, str],
                table: dict[str, tuple[str, ...]]) -> list[str]:
    """Problems between ``table`` and the checkout's mux prefixes and handlers (empty: none)."""
    problems = []
    prefixes = [pattern for pattern in patterns if pattern.endswith("/")]
    problems += [f"{prefix}: mux prefix without a SUB_TEMPLATES entry"
                 for prefix in prefixes if prefix not in table]
    problems += [f"{prefix}: SUB_TEMPLATES entry for a prefix the mux no longer registers"
                 for prefix in table if prefix not in patterns]
    for prefix in prefixes:
        if prefix not in table:
            continue
        handler = patterns[prefix]
        if not handler:
            problems.append(f"{prefix}: cannot tell which handler serves it")
            continue
        try:
            source = handler_source(checkout, handler)
        except TableRotError as exc:
            problems.append(f"{prefix}: {exc}")
            continue
        known = literal_segments(source)
        tabled = {segment for suffix in table[prefix] for segment in suffix.split("/")}
        for suffix in table[prefix]:
            missing = [segment for segment in suffix.split("/")
                       if not segment.startswith(":") and segment not in known]
            if missing:
                problems.append(f"{prefix}{suffix}: {', '.join(missing)} no longer appears "
                                f"in {handler}")
        # The other way round: a route the handler grew since the table was written.
        untabled = sorted(dispatch_segments(source) - tabled - set(prefix.split("/")))
        if untabled:
            problems.append(f"{prefix}: {handler} dispatches on {', '.join(untabled)}, "
                            f"which no tabled template has")
    return problems


def expand(patterns: Iterable[str], table: dict[str, tuple[str, ...]]) -> list[str]:
    """Mux patterns -> route templates: each prefix replaced by its tabled sub-templates."""
    templates: list[str] = []
    for pattern in patterns:
        for template in ([pattern + suffix for suffix in table[pattern]]
                         if pattern.endswith("/") else [pattern]):
            if template not in templates:
                templates.append(template)
    return templates


def nomad_routes(checkout: Path, table: dict[str, tuple[str, ...]]) -> RouteTable:
    community = mux_patterns(checkout, "http.go", "registerHandlers")
    enterprise = {pattern: handler for pattern, handler in
                  mux_patterns(checkout, "http_ce.go", "registerEnterpriseHandlers").items()
                  if pattern not in community}
    problems = check_table(checkout, {**community, **enterprise}, table)
    if problems:
        raise TableRotError("SUB_TEMPLATES is out of date with the checkout:\n  "
                            + "\n  ".join(problems))
    prefixes = [pattern for pattern in {**community, **enterprise} if pattern.endswith("/")]
    return RouteTable(expand(community, table), expand(enterprise, table), prefixes)


def route_key(path: str) -> str:
    """Both sides' spelling -> one comparable key: every placeholder becomes ":"."""
    return "/".join(":" if segment.startswith(":") or _OUR_PLACEHOLDER.match(segment)
                    else segment for segment in path.split("/"))


def served(templates: Sequence[str], ours: Sequence[str]) -> list[str]:
    keys = {route_key(path) for path in ours}
    return [template for template in templates if route_key(template) in keys]


def matching(path: str, templates: Sequence[str]) -> list[str]:
    key = route_key(path)
    return [template for template in templates if route_key(template) == key]


def is_prefix_fallback(path: str, prefixes: Sequence[str]) -> bool:
    """Ours that answer the rest of a Nomad prefix with Nomad's errors: an empty last
    segment (``/v1/var/``, ``/v1/acl/role/name/``) or a catch-all
    (``/v1/operator/keyring/{rest*}``) under a prefix."""
    return any(path.startswith(prefix) and (path.endswith("/") or path.endswith("*}"))
               for prefix in prefixes)


def reason_for(template: str, reasons: Sequence[tuple[str, Sequence[str]]] = REASONS) -> str:
    for reason, patterns in reasons:
        for pattern in patterns:
            if template == pattern or (pattern.endswith("*")
                                       and template.startswith(pattern[:-1])):
                return reason
    return "unclassified"


def by_reason(templates: Iterable[str]) -> dict[str, list[str]]:
    """Templates grouped by reason, in the order of ``REASONS``; "unclassified" last."""
    grouped: dict[str, list[str]] = {reason: [] for reason, _ in REASONS}
    grouped["unclassified"] = []
    for template in templates:
        grouped[reason_for(template)].append(template)
    return {reason: members for reason, members in grouped.items() if members}


class _RecordingRouter(Router):
    def __init__(self) -> None:
        super().__init__(server=None)  # type: ignore[arg-type]  # nothing is dispatched
        self.paths: list[str] = []

    def add(self, methods: Any, path: str, handler: Any, need: Any = None) -> None:
        if path not in self.paths:
            self.paths.append(path)


def our_paths() -> list[str]:
    router = _RecordingRouter()
    register_all(router, Services(server=None, client=None,  # type: ignore[arg-type]
                                  agent_config={}, member={}))
    return router.paths


def _print_grouped(title: str, templates: Iterable[str]) -> None:
    grouped = by_reason(templates)
    if not grouped:
        return
    print(f"\n{title}")
    for reason, members in grouped.items():
        print(f"  {reason} ({len(members)}):")
        for template in members:
            print(f"    {template}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a checkout of hashicorp/nomad")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="also list the served templates and our routes serving each")
    args = parser.parse_args()
    try:
        nomad = nomad_routes(args.checkout, SUB_TEMPLATES)
    except TableRotError as exc:
        print(exc, file=sys.stderr)
        return 2
    ours = our_paths()
    served_community = served(nomad.community, ours)
    total = len(nomad.community)
    print(f"Nomad route templates (registerHandlers with prefixes expanded, "
          f"without UI and pprof): {total}")
    print(f"Nomad enterprise-only templates (registerEnterpriseHandlers): "
          f"{len(nomad.enterprise)}")
    print(f"Our route registrations: {len(ours)}")
    print(f"Nomad templates we serve: {len(served_community)} of {total} "
          f"({100 * len(served_community) / max(total, 1):.0f}%)")
    if args.verbose:
        print("\nServed:")
        for template in served_community:
            print(f"  {template:45} {', '.join(p for p in ours if matching(p, [template]))}")
    _print_grouped("Not served, by reason:",
                   [t for t in nomad.community if t not in served_community])
    _print_grouped("Enterprise-only, not served:",
                   [t for t in nomad.enterprise if t not in served(nomad.enterprise, ours)])
    everything = nomad.community + nomad.enterprise
    unmatched = [path for path in ours if not matching(path, everything)]
    fallbacks = [path for path in unmatched if is_prefix_fallback(path, nomad.prefixes)]
    if fallbacks and args.verbose:
        print("\nOurs answering the rest of a Nomad prefix with Nomad's errors:")
        for path in fallbacks:
            print(f"  {path}")
    extra = [path for path in unmatched if path not in fallbacks]
    if extra:
        print("\nOurs, under no Nomad template:")
        for path in extra:
            print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
