"""Node-level checks of job placement constraints (``constraint { ... }`` blocks).

A constraint is ``{"LTarget": ..., "RTarget": ..., "Operand": ...}``; each target is either a
``${...}`` reference to a node property (``attr.*``, ``meta.*``, ``node.unique.id``, ... as
listed in :mod:`nomad_client.structs.node_properties`) or a literal. The node is its API JSON.
This module is pure: no I/O, no global state beyond a small cache of parsed version
constraints.

Targets come from job submitters, so a check never raises for any string targets or operand:
bad input (an invalid or too costly regular expression, a malformed version, an absurdly
long number) makes the constraint not met, with the reason. ``regexp`` patterns run through
:mod:`nomad_client.untrusted_regex`.

``distinct_hosts`` and ``distinct_property`` depend on other allocations, so the scheduler
decides them; at the node level they always pass.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs

from nomad_client.structs.node_properties import (
    ATTR_PREFIX,
    META_PREFIX,
    NODE_FIELDS,
    NODE_REGION,
    REGION_ATTRIBUTE,
)
from nomad_client.untrusted_regex import UntrustedRegexError, compile_untrusted

__all__ = ["ConstraintResult", "check_constraint", "check_constraints", "resolve_target"]


@attrs.frozen
class ConstraintResult:
    ok: bool
    reason: str


_OK = ConstraintResult(True, "")

def _as_text(value: Any) -> str:
    """Node attributes are strings on the wire; tolerate JSON scalars without surprises."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value if isinstance(value, str) else str(value)


def _lookup(mapping: Any, key: str) -> tuple[str | None, bool]:
    if isinstance(mapping, Mapping) and key in mapping and mapping[key] is not None:
        return _as_text(mapping[key]), True
    return None, False


def resolve_target(target: str, node: Mapping[str, Any]) -> tuple[str | None, bool]:
    """Resolve a constraint target against ``node``: ``(value, found)``.

    A target that is not wholly ``${...}`` is a literal and is always found; an unknown
    ``${...}`` name is not found.
    """
    if not isinstance(target, str):
        raise TypeError(f"constraint target must be a string, not {type(target).__name__}")
    if not (target.startswith("${") and target.endswith("}")):
        return target, True
    name = target[2:-1]
    if name in NODE_FIELDS:
        return _lookup(node, NODE_FIELDS[name])
    if name == NODE_REGION:
        return _lookup(node.get("Attributes"), REGION_ATTRIBUTE)
    if name.startswith(ATTR_PREFIX):
        return _lookup(node.get("Attributes"), name[len(ATTR_PREFIX) :])
    if name.startswith(META_PREFIX):
        return _lookup(node.get("Meta"), name[len(META_PREFIX) :])
    return None, False


# ---------------------------------------------------------------------------------------------
# Ordering


# ASCII digits only: ``\d`` and int() also accept other scripts' digits, which Go does not.
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT_RE = re.compile(r"[+-]?[0-9]+")
# Longer text compares lexically; it also keeps int() clear of Python's 4300-digit limit.
_MAX_NUMBER_CHARS = 400


def _as_number(text: str) -> int | float | None:
    if len(text) > _MAX_NUMBER_CHARS:
        return None
    if _INT_RE.fullmatch(text):
        return int(text)
    if _NUMBER_RE.fullmatch(text):
        return float(text)
    return None


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _check_order(op: str, left: str, right: str) -> bool:
    """Numeric comparison when both sides are numbers, lexical otherwise."""
    lnum, rnum = _as_number(left), _as_number(right)
    if lnum is not None and rnum is not None:
        return _ORDER[op](lnum, rnum)
    return _ORDER[op](left, right)


# ---------------------------------------------------------------------------------------------
# Versions


class _VersionError(ValueError):
    pass


_VERSION_RE = re.compile(
    r"v?(?P<nums>[0-9]+(?:\.[0-9]+)*)(?:-(?P<pre>[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?"
    r"(?:\+[0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*)?"
)
# One ``\s*`` before the operator-or-version: two adjacent ones would backtrack
# quadratically over a long run of spaces.
_CONSTRAINT_RE = re.compile(r"\s*(?:(?P<op>~>|>=|<=|!=|=|>|<)\s*)?(?P<ver>\S+)\s*")
_MAX_SEGMENT = 2**63 - 1  # version segments are 64-bit integers, as in Go


@attrs.frozen
class _Version:
    segments: tuple[int, ...]
    prerelease: tuple[str, ...]  # empty for a release

    @classmethod
    def parse(cls, text: str) -> _Version:
        m = _VERSION_RE.fullmatch(text.strip())
        if not m:
            raise _VersionError(f'"{text}" is not a valid version')
        segments = tuple(_segment(n, text) for n in m.group("nums").split("."))
        pre = tuple(m.group("pre").split(".")) if m.group("pre") else ()
        return cls(segments, pre)

    def compare(self, other: _Version) -> int:
        """-1, 0 or 1; missing numeric segments count as zero, build metadata is ignored."""
        width = max(len(self.segments), len(other.segments))
        mine = self.segments + (0,) * (width - len(self.segments))
        theirs = other.segments + (0,) * (width - len(other.segments))
        if mine != theirs:
            return -1 if mine < theirs else 1
        return _compare_prerelease(self.prerelease, other.prerelease)


def _segment(digits: str, text: str) -> int:
    """One numeric version segment; checks the length before int() so it stays cheap."""
    significant = digits.lstrip("0") or "0"
    if len(significant) > len(str(_MAX_SEGMENT)) or int(significant) > _MAX_SEGMENT:
        raise _VersionError(f'"{text}" is not a valid version: a segment is above 2^63-1')
    return int(significant)


def _compare_numeric(x: str, y: str) -> int:
    """Compare two ASCII digit strings as numbers without int(), which caps their length."""
    x, y = x.lstrip("0"), y.lstrip("0")
    if (len(x), x) == (len(y), y):
        return 0
    return -1 if (len(x), x) < (len(y), y) else 1


def _compare_prerelease(a: tuple[str, ...], b: tuple[str, ...]) -> int:
    # A release sorts after any of its pre-releases.
    if a == b:
        return 0
    if not a:
        return 1
    if not b:
        return -1
    for x, y in zip(a, b, strict=False):
        if x == y:
            continue
        # Numeric identifiers compare numerically and sort before alphanumeric ones.
        xn, yn = x.isdigit(), y.isdigit()
        if xn and yn:
            cmp = _compare_numeric(x, y)
            if cmp:
                return cmp
            continue
        if xn != yn:
            return -1 if xn else 1
        return -1 if x < y else 1
    if len(a) == len(b):  # equal but for leading zeros in numeric identifiers
        return 0
    return -1 if len(a) < len(b) else 1


def _satisfies(version: _Version, op: str, bound: _Version, pessimistic_segments: int) -> bool:
    cmp = version.compare(bound)
    if op == "=":
        return cmp == 0
    if op == "!=":
        return cmp != 0
    if op == "~>":
        # ``~> 1.2`` allows 1.x from 1.2 up; ``~> 1.2.3`` allows 1.2.x from 1.2.3 up.
        keep = max(pessimistic_segments - 1, 1)
        prefix = version.segments[:keep] + (0,) * (keep - len(version.segments[:keep]))
        want = bound.segments[:keep] + (0,) * (keep - len(bound.segments[:keep]))
        return cmp >= 0 and prefix == want
    return _ORDER[op](cmp, 0)


@functools.lru_cache(maxsize=256)
def _parse_version_constraint(text: str) -> tuple[tuple[str, _Version, int], ...]:
    parts = []
    for piece in text.split(","):
        m = _CONSTRAINT_RE.fullmatch(piece)
        if not m:
            raise _VersionError(f'invalid version constraint "{text}"')
        try:
            bound = _Version.parse(m.group("ver"))
        except _VersionError as exc:
            raise _VersionError(f'invalid version constraint "{text}": {exc}') from None
        parts.append((m.group("op") or "=", bound, len(bound.segments)))
    return tuple(parts)


def _check_version(value: str, constraint: str, strict_prerelease: bool) -> str | None:
    """``None`` when ``value`` satisfies ``constraint``, else why not."""
    try:
        terms = _parse_version_constraint(constraint)
        version = _Version.parse(value)
    except _VersionError as exc:
        return str(exc)
    for op, bound, nsegs in terms:
        if strict_prerelease and version.prerelease:
            # ``version`` semantics: a pre-release only satisfies terms naming a pre-release
            # of the same numeric version, so ``>= 1.0`` does not admit ``1.5.0-beta``.
            if not bound.prerelease or bound.segments != version.segments:
                return ""
        if not _satisfies(version, op, bound, nsegs):
            return ""
    return None


# ---------------------------------------------------------------------------------------------
# Sets


def _split_set(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


# ---------------------------------------------------------------------------------------------
# Public API

_EQUAL_OPS = frozenset({"=", "==", "is"})
_NOT_EQUAL_OPS = frozenset({"!=", "not"})
_SCHEDULER_OPS = frozenset({"distinct_hosts", "distinct_property"})
_SET_OPS = frozenset({"set_contains", "set_contains_all", "set_contains_any"})


def _field(constraint: Mapping[str, Any], name: str) -> str:
    value = constraint.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"constraint {name} must be a string, not {type(value).__name__}")
    return value


def check_constraint(constraint: Mapping[str, Any], node: Mapping[str, Any]) -> ConstraintResult:
    """Check one constraint against a node (API JSON).

    Raises only for a malformed constraint (not a mapping, a target that is not a string);
    for any string targets and operand it returns a result.
    """
    if not isinstance(constraint, Mapping):
        raise TypeError(f"constraint must be a mapping, not {type(constraint).__name__}")
    ltarget = _field(constraint, "LTarget")
    rtarget = _field(constraint, "RTarget")
    operand = _field(constraint, "Operand") or "="  # an empty operand means equality
    try:
        return _check(ltarget, operand, rtarget, node)
    except (ValueError, OverflowError, RecursionError) as exc:
        # A safety net: input the checks below did not foresee must not fail the caller.
        shown = " ".join(part for part in (ltarget, operand, rtarget) if part)
        return ConstraintResult(False, f'constraint "{shown}" could not be checked: {exc}')


def _check(ltarget: str, operand: str, rtarget: str, node: Mapping[str, Any]) -> ConstraintResult:
    if operand in _SCHEDULER_OPS:
        return _OK

    shown = " ".join(part for part in (ltarget, operand, rtarget) if part)
    not_met = ConstraintResult(False, f'constraint "{shown}" not met')
    lval, lfound = resolve_target(ltarget, node)

    if operand == "is_set":
        return _OK if lfound else ConstraintResult(False, f"attribute {ltarget} is not set")
    if operand == "is_not_set":
        return not_met if lfound else _OK

    rval, rfound = resolve_target(rtarget, node)
    if operand in _NOT_EQUAL_OPS:
        # An unset attribute cannot equal anything.
        return _OK if not (lfound and rfound) or lval != rval else not_met

    known = _EQUAL_OPS | _ORDER.keys() | _SET_OPS | {"regexp", "version", "semver"}
    if operand not in known:
        return ConstraintResult(False, f'unknown constraint operand "{operand}"')
    if not lfound:
        return ConstraintResult(False, f"attribute {ltarget} is not set")
    if not rfound:
        return ConstraintResult(False, f"attribute {rtarget} is not set")
    assert lval is not None and rval is not None

    if operand in _EQUAL_OPS:
        met = lval == rval
    elif operand in _ORDER:
        met = _check_order(operand, lval, rval)
    elif operand == "regexp":
        try:
            met = compile_untrusted(rval).search(lval)
        except UntrustedRegexError as exc:
            return ConstraintResult(False, str(exc))
    elif operand in ("version", "semver"):
        why = _check_version(lval, rval, strict_prerelease=operand == "version")
        if why:
            return ConstraintResult(False, f'constraint "{shown}" not met: {why}')
        met = why is None
    elif operand == "set_contains_any":
        have = set(_split_set(lval))
        met = any(item in have for item in _split_set(rval))
    else:  # set_contains / set_contains_all
        have = set(_split_set(lval))
        met = all(item in have for item in _split_set(rval))
    return _OK if met else not_met


def check_constraints(
    constraints: Iterable[Mapping[str, Any]], node: Mapping[str, Any]
) -> ConstraintResult:
    """Check constraints in order; the first one not met decides the result."""
    for constraint in constraints:
        result = check_constraint(constraint, node)
        if not result.ok:
            return result
    return _OK
