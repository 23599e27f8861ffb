"""The operator's endpoint rules for the Task API: ``client { task_api { allowed_endpoints,
denied_endpoints } }``, each rule ``"METHOD /path/glob"``.

``METHOD`` is an HTTP method or ``*`` (any); a ``GET`` rule covers ``HEAD`` too (the same
read without a body). The path starts with ``/``; each ``*`` in it matches any run of
characters, ``/`` included, as in Nomad's ACL path globs. Rules match the path the router
routes (``Router.route_key``: percent-decoded, without the query string, with the surplus
leading and trailing slashes the router ignores removed), so no other spelling of a request
reaches a handler a rule refuses. Denied rules win; when any allowed rule exists, a request
must match one.

Globs are matched by finding their literal pieces in order (``str.find``), never with a
backtracking regex: a long hostile path costs time linear in its length per rule.
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from nomad_client.logredact import redact

# What a rule may name; anything else is a typo the operator should hear about.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
ANY_METHOD = "*"
ALLOWED_SETTING = "client.task_api.allowed_endpoints"
DENIED_SETTING = "client.task_api.denied_endpoints"
# Characters a rule's path may not hold: a query or fragment is never matched, a
# percent-escape would never match the decoded path, and whitespace would split the rule.
_FORBIDDEN_PATH_CHARS = {"?": "a query string", "#": "a fragment",
                         "%": "a percent-escape (write the path decoded)"}


@attrs.frozen
class EndpointRule:
    """One parsed rule. ``text`` is as the operator wrote it (quoted in refusals)."""

    text: str
    methods: frozenset[str] | None  # None: any method
    pieces: tuple[str, ...]  # the path split at each "*"; one piece: an exact path

    @property
    def exact(self) -> bool:
        return len(self.pieces) == 1

    def matches(self, method: str, path: str) -> bool:
        if self.methods is not None and method not in self.methods:
            return False
        return _glob_match(self.pieces, path)


def parse_endpoint_rule(text: str) -> EndpointRule:
    """``"METHOD /path/glob"`` to a rule; a ``ValueError`` saying what is wrong otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"endpoint rule must be a string like \"GET /v1/agent/health\", "
                         f"got {type(text).__name__}")
    words = text.split()
    if len(words) != 2:
        raise ValueError(f"endpoint rule {text!r} must be \"METHOD /path\" (a method or *, "
                         "one space, then the path)")
    method, path = words
    method = method.upper()
    if method != ANY_METHOD and method not in HTTP_METHODS:
        raise ValueError(f"endpoint rule {text!r}: unknown method {words[0]!r} (one of "
                         f"{', '.join(sorted(HTTP_METHODS))}, or *)")
    if not path.startswith("/"):
        raise ValueError(f"endpoint rule {text!r}: the path must start with /")
    for char, what in _FORBIDDEN_PATH_CHARS.items():
        if char in path:
            raise ValueError(f"endpoint rule {text!r}: the path may not hold {what}")
    if not path.isprintable():
        raise ValueError(f"endpoint rule {text!r}: the path holds a control character")
    methods = None
    if method != ANY_METHOD:
        methods = frozenset({"GET", "HEAD"}) if method == "GET" else frozenset({method})
    return EndpointRule(text=text, methods=methods, pieces=tuple(path.split("*")))


def _glob_match(pieces: tuple[str, ...], path: str) -> bool:
    """Whether ``path`` is ``pieces`` joined by runs of any characters. Leftmost placement
    of each middle piece is always right for ``*``-only globs."""
    first = pieces[0]
    if len(pieces) == 1:
        return path == first
    last = pieces[-1]
    if len(path) < len(first) + len(last) or not path.startswith(first) \
            or not path.endswith(last):
        return False
    at, end = len(first), len(path) - len(last)
    for piece in pieces[1:-1]:
        found = path.find(piece, at, end)
        if found < 0:
            return False
        at = found + len(piece)
    return True


class RuleList:
    """One setting's rules, compiled: exact paths in a dict, globs in order."""

    __slots__ = ("_exact", "_globs", "rules")

    def __init__(self, rules: Iterable[EndpointRule]) -> None:
        self.rules = tuple(rules)
        self._exact: dict[str, list[EndpointRule]] = {}
        for rule in self.rules:
            if rule.exact:
                self._exact.setdefault(rule.pieces[0], []).append(rule)
        self._globs = tuple(rule for rule in self.rules if not rule.exact)

    def __bool__(self) -> bool:
        return bool(self.rules)

    def first_match(self, method: str, path: str) -> EndpointRule | None:
        for rule in self._exact.get(path, ()):
            if rule.methods is None or method in rule.methods:
                return rule
        for rule in self._globs:
            if rule.matches(method, path):
                return rule
        return None


class EndpointRules:
    """The allowed and denied rules of one Task API config, compiled once."""

    __slots__ = ("allowed", "denied")

    def __init__(self, allowed: Iterable[str] = (), denied: Iterable[str] = ()) -> None:
        self.allowed = RuleList(parse_endpoint_rule(text) for text in allowed)
        self.denied = RuleList(parse_endpoint_rule(text) for text in denied)

    def __bool__(self) -> bool:
        return bool(self.allowed) or bool(self.denied)

    def refusal(self, method: str, path: str) -> str | None:
        """Why ``method path`` is refused (a 403's text), or None if it may go on."""
        denied = self.denied.first_match(method, path)
        if denied is not None:
            return f'Permission denied: "{denied.text}" is in {DENIED_SETTING}'
        if self.allowed and self.allowed.first_match(method, path) is None:
            return (f'Permission denied: "{method} {_shorten(path)}" matches no rule of '
                    f"{ALLOWED_SETTING}")
        return None


def _shorten(path: str, limit: int = 200) -> str:
    # The caller's own path, echoed back in a refusal: kept short, and a token someone put
    # in it is not repeated.
    return redact(path if len(path) <= limit else path[:limit] + "...")


NO_RULES = EndpointRules()
