"""Tests for node-level placement constraint checks."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nomad_client.server import constraints
from nomad_client.server.constraints import (
    ConstraintResult,
    check_constraint,
    check_constraints,
    resolve_target,
)
from nomad_client.structs.node_properties import NODE_FIELDS

NODE: dict[str, Any] = {
    "ID": "5d2c-node-id",
    "Name": "worker-7",
    "Datacenter": "dc1",
    "NodeClass": "compute",
    "NodePool": "gpu",
    "Attributes": {
        "kernel.name": "linux",
        "nomad.region": "eu-west",
        "cpu.numcores": "8",
        "unique.hostname": "worker-7.local",
        "driver.docker.version": "24.0.7",
        "nomad.version": "1.7.2-beta.1",
        "os.version": "22.04",
        "memory.totalbytes": "16000000000",
    },
    "Meta": {"rack": "r10", "zones": "a, b,c", "empty": "", "tier": "gold"},
}


def c(ltarget: str, operand: str, rtarget: str = "") -> dict[str, str]:
    return {"LTarget": ltarget, "RTarget": rtarget, "Operand": operand}


def ok(ltarget: str, operand: str, rtarget: str = "", node: dict[str, Any] = NODE) -> bool:
    result = check_constraint(c(ltarget, operand, rtarget), node)
    assert result.ok or result.reason  # a failure always says why
    return result.ok


# ---------------------------------------------------------------------------------------------
# Targets


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("${attr.kernel.name}", ("linux", True)),
        ("${attr.unique.hostname}", ("worker-7.local", True)),
        ("${attr.nope}", (None, False)),
        ("${meta.rack}", ("r10", True)),
        ("${meta.empty}", ("", True)),
        ("${meta.nope}", (None, False)),
        ("${node.unique.id}", ("5d2c-node-id", True)),
        ("${node.unique.name}", ("worker-7", True)),
        ("${node.datacenter}", ("dc1", True)),
        ("${node.class}", ("compute", True)),
        ("${node.pool}", ("gpu", True)),
        ("${node.region}", ("eu-west", True)),
        ("${node.bogus}", (None, False)),
        ("${unknown}", (None, False)),
        ("linux", ("linux", True)),
        ("", ("", True)),
        ("prefix-${meta.rack}", ("prefix-${meta.rack}", True)),  # not wholly ${...}: literal
    ],
)
def test_resolve_target(target: str, expected: tuple[str | None, bool]) -> None:
    assert resolve_target(target, NODE) == expected


def test_resolve_target_on_sparse_node() -> None:
    sparse = {"ID": "n1", "Attributes": None}
    assert resolve_target("${node.region}", sparse) == (None, False)
    assert resolve_target("${attr.kernel.name}", sparse) == (None, False)
    assert resolve_target("${meta.rack}", sparse) == (None, False)
    assert resolve_target("${node.class}", sparse) == (None, False)
    assert resolve_target("${node.unique.id}", sparse) == ("n1", True)


def test_every_node_field_property_reads_its_field() -> None:
    for name, field in NODE_FIELDS.items():
        assert resolve_target("${" + name + "}", {field: "v"}) == ("v", True), name


def test_resolve_target_stringifies_scalars() -> None:
    node = {"Attributes": {"n": 3, "b": True}}
    assert resolve_target("${attr.n}", node) == ("3", True)
    assert resolve_target("${attr.b}", node) == ("true", True)


def test_resolve_target_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="target"):
        resolve_target(3, NODE)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# Equality


@pytest.mark.parametrize("operand", ["=", "==", "is"])
def test_equality_operands(operand: str) -> None:
    assert ok("${attr.kernel.name}", operand, "linux")
    assert not ok("${attr.kernel.name}", operand, "windows")
    assert ok("${node.pool}", operand, "gpu")
    assert ok("linux", operand, "${attr.kernel.name}")  # either side may be a reference
    assert ok("${node.unique.name}", operand, "${attr.unique.hostname}") is False


def test_equality_reasons() -> None:
    result = check_constraint(c("${attr.kernel.name}", "=", "windows"), NODE)
    assert result == ConstraintResult(False, 'constraint "${attr.kernel.name} = windows" not met')
    result = check_constraint(c("${meta.nope}", "=", "r1"), NODE)
    assert result == ConstraintResult(False, "attribute ${meta.nope} is not set")
    result = check_constraint(c("${attr.kernel.name}", "=", "${meta.nope}"), NODE)
    assert result == ConstraintResult(False, "attribute ${meta.nope} is not set")


def test_empty_operand_means_equality() -> None:
    assert ok("${meta.rack}", "", "r10")
    assert not ok("${meta.rack}", "", "r11")
    assert check_constraint({"LTarget": "${meta.rack}", "RTarget": "r10"}, NODE).ok


@pytest.mark.parametrize("operand", ["!=", "not"])
def test_inequality_operands(operand: str) -> None:
    assert ok("${attr.kernel.name}", operand, "windows")
    assert not ok("${attr.kernel.name}", operand, "linux")
    assert ok("${meta.nope}", operand, "r10")  # unset counts as not equal
    assert ok("${meta.rack}", operand, "${meta.nope}")
    assert ok("${meta.nope}", operand, "${meta.other}")  # two unset sides are not "equal"
    reason = check_constraint(c("${meta.rack}", operand, "r10"), NODE).reason
    assert reason == f'constraint "${{meta.rack}} {operand} r10" not met'


# ---------------------------------------------------------------------------------------------
# Ordering


@pytest.mark.parametrize(
    ("ltarget", "operand", "rtarget", "expected"),
    [
        ("${attr.cpu.numcores}", ">=", "4", True),
        ("${attr.cpu.numcores}", ">", "8", False),
        ("${attr.cpu.numcores}", ">=", "8", True),
        ("${attr.cpu.numcores}", "<", "10", True),  # numeric: 8 < 10 (lexically "8" > "10")
        ("${attr.cpu.numcores}", "<=", "7", False),
        ("${attr.memory.totalbytes}", ">", "8000000000", True),
        ("${attr.os.version}", ">", "9.10", True),  # floats compare numerically
        ("${attr.os.version}", "<", "22.10", True),
        ("2.5", "<", "10", True),
        ("-3", "<", "-2", True),
        ("${meta.rack}", ">", "r1", True),  # lexical when either side is not a number
        ("${meta.rack}", "<", "r2", True),  # "r10" < "r2" lexically
        ("${meta.tier}", ">=", "gold", True),
        ("${meta.tier}", "<", "gold", False),
        ("abc", "<", "10", False),  # mixed: lexical, "a" > "1"
    ],
)
def test_ordering(ltarget: str, operand: str, rtarget: str, expected: bool) -> None:
    assert ok(ltarget, operand, rtarget) is expected


@pytest.mark.parametrize("operand", ["<", "<=", ">", ">="])
def test_ordering_on_unset_attribute(operand: str) -> None:
    result = check_constraint(c("${attr.nope}", operand, "3"), NODE)
    assert result == ConstraintResult(False, "attribute ${attr.nope} is not set")


@settings(max_examples=200, deadline=None)
@given(st.integers(-(10**12), 10**12), st.integers(-(10**12), 10**12))
def test_integer_ordering_agrees_with_python(a: int, b: int) -> None:
    node = {"Meta": {"n": str(a)}}
    assert ok("${meta.n}", "<", str(b), node) is (a < b)
    assert ok("${meta.n}", "<=", str(b), node) is (a <= b)
    assert ok("${meta.n}", ">", str(b), node) is (a > b)
    assert ok("${meta.n}", ">=", str(b), node) is (a >= b)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="abcXYZ-_", max_size=6), st.text(alphabet="abcXYZ-_", max_size=6))
def test_lexical_ordering_agrees_with_python(a: str, b: str) -> None:
    node = {"Meta": {"s": a}}
    assert ok("${meta.s}", "<", b, node) is (a < b)
    assert ok("${meta.s}", ">=", b, node) is (a >= b)


# ---------------------------------------------------------------------------------------------
# is_set / is_not_set / regexp / sets


def test_is_set_and_is_not_set() -> None:
    assert ok("${meta.rack}", "is_set")
    assert ok("${meta.empty}", "is_set")  # present but empty is still set
    assert check_constraint(c("${meta.nope}", "is_set"), NODE) == ConstraintResult(
        False, "attribute ${meta.nope} is not set"
    )
    assert ok("${meta.nope}", "is_not_set")
    assert check_constraint(c("${meta.rack}", "is_not_set"), NODE) == ConstraintResult(
        False, 'constraint "${meta.rack} is_not_set" not met'
    )


@pytest.mark.parametrize(
    ("ltarget", "pattern", "expected"),
    [
        ("${attr.kernel.name}", "^lin", True),
        ("${attr.kernel.name}", "nux$", True),
        ("${attr.kernel.name}", "in", True),  # unanchored search
        ("${attr.kernel.name}", "^windows$", False),
        ("${attr.unique.hostname}", r"worker-\d+\.local", True),
        ("${node.unique.name}", "^worker-[0-6]$", False),
        # Read as Go's regexp reads them.
        ("${attr.os.version}", r"^22\.[0-9]+$", True),
        ("${attr.driver.docker.version}", r"^2[0-9]\.\d+\.\d+$", True),
        ("${attr.kernel.name}", "(?i)LINUX", True),
        ("${attr.kernel.name}", "^Linux$", False),
    ],
)
def test_regexp(ltarget: str, pattern: str, expected: bool) -> None:
    assert ok(ltarget, "regexp", pattern) is expected


def test_regexp_bad_pattern_and_unset_attribute() -> None:
    result = check_constraint(c("${attr.kernel.name}", "regexp", "(unclosed"), NODE)
    assert not result.ok
    assert result.reason.startswith('invalid regular expression "(unclosed"')
    result = check_constraint(c("${attr.nope}", "regexp", ".*"), NODE)
    assert result == ConstraintResult(False, "attribute ${attr.nope} is not set")


@pytest.mark.parametrize(
    ("operand", "rtarget", "expected"),
    [
        ("set_contains", "a", True),
        ("set_contains", "a,c", True),
        ("set_contains", " c , b ", True),
        ("set_contains", "a,d", False),
        ("set_contains", "d", False),
        ("set_contains_all", "a,b,c", True),
        ("set_contains_all", "a,b,c,d", False),
        ("set_contains_any", "d,c", True),
        ("set_contains_any", "d,e", False),
        ("set_contains_any", "b", True),
    ],
)
def test_set_operands(operand: str, rtarget: str, expected: bool) -> None:
    assert ok("${meta.zones}", operand, rtarget) is expected


def test_set_operands_need_the_attribute() -> None:
    for operand in ("set_contains", "set_contains_any"):
        result = check_constraint(c("${meta.nope}", operand, "a"), NODE)
        assert result == ConstraintResult(False, "attribute ${meta.nope} is not set")


@settings(max_examples=200, deadline=None)
@given(
    st.sets(st.sampled_from("abcdefg"), max_size=5),
    st.sets(st.sampled_from("abcdefg"), min_size=1, max_size=4),
)
def test_set_operands_agree_with_python(have: set[str], want: set[str]) -> None:
    node = {"Meta": {"s": ",".join(sorted(have))}}
    wanted = ",".join(sorted(want))
    assert ok("${meta.s}", "set_contains", wanted, node) is (want <= have)
    assert ok("${meta.s}", "set_contains_any", wanted, node) is bool(want & have)


# ---------------------------------------------------------------------------------------------
# Versions


@pytest.mark.parametrize("operand", ["version", "semver"])
@pytest.mark.parametrize(
    ("version", "constraint", "expected"),
    [
        ("1.2.3", "= 1.2.3", True),
        ("1.2.3", "1.2.3", True),  # no operator means equality
        ("1.2.3", "!= 1.2.3", False),
        ("1.2.3", ">= 1.2, < 2.0", True),
        ("2.0.0", ">= 1.2, < 2.0", False),
        ("1.1.9", ">= 1.2, < 2.0", False),
        ("1.2", "= 1.2.0", True),  # missing segments are zero
        ("1.10.0", "> 1.9", True),  # numeric, not lexical
        ("1.2.3", "> 1.2.3", False),
        ("1.2.3", "<= 1.2.3", True),
        ("1.2.3", "<1.2.4", True),
        ("v1.2.3", ">= 1.2.3", True),
        ("1.2.3+build.7", "= 1.2.3", True),  # build metadata is ignored
        ("24.0.7", ">= 20.10", True),
        # pessimistic operator
        ("1.2.0", "~> 1.2", True),
        ("1.9.9", "~> 1.2", True),
        ("2.0.0", "~> 1.2", False),
        ("1.1.0", "~> 1.2", False),
        ("1.2.3", "~> 1.2.3", True),
        ("1.2.9", "~> 1.2.3", True),
        ("1.3.0", "~> 1.2.3", False),
        ("1.2.2", "~> 1.2.3", False),
        ("1.9", "~> 1", True),
        ("2.0", "~> 1", False),
        ("1.2.5", "~> 1.2.3, != 1.2.5", False),
    ],
)
def test_version_ranges(operand: str, version: str, constraint: str, expected: bool) -> None:
    node = {"Attributes": {"v": version}}
    assert ok("${attr.v}", operand, constraint, node) is expected


@pytest.mark.parametrize(
    ("version", "constraint", "version_ok", "semver_ok"),
    [
        # ``semver`` orders pre-releases below their release, as Semantic Versioning does.
        ("1.7.2-beta.1", "< 1.7.2", False, True),
        ("1.7.2-beta.1", ">= 1.7.0", False, True),
        # ``version`` lets a pre-release match only terms naming a pre-release of itself.
        ("1.7.2-beta.1", ">= 1.7.2-alpha", True, True),
        ("1.7.2-beta.1", ">= 1.7.2-beta.2", False, False),
        ("1.7.2-beta.1", ">= 1.7.1-beta", False, True),
        ("1.7.2", ">= 1.7.2-beta", True, True),
        ("1.0.0-alpha.1", "> 1.0.0-alpha", True, True),
        ("1.0.0-alpha.beta", "> 1.0.0-alpha.1", True, True),  # alphanumeric > numeric
        ("1.0.0-alpha.-x", "> 1.0.0-alpha.1", True, True),  # even when "-" sorts before digits
        ("1.0.0-rc.1", "> 1.0.0-beta.11", True, True),
        ("1.0.0-beta.11", "> 1.0.0-beta.2", True, True),  # numeric identifiers numerically
    ],
)
def test_prerelease_handling(
    version: str, constraint: str, version_ok: bool, semver_ok: bool
) -> None:
    node = {"Attributes": {"v": version}}
    assert ok("${attr.v}", "version", constraint, node) is version_ok
    assert ok("${attr.v}", "semver", constraint, node) is semver_ok


@pytest.mark.parametrize("operand", ["version", "semver"])
def test_version_errors_have_reasons(operand: str) -> None:
    node = {"Attributes": {"v": "not-a-version", "good": "1.2.3"}}
    result = check_constraint(c("${attr.v}", operand, ">= 1.0"), node)
    assert not result.ok
    assert '"not-a-version" is not a valid version' in result.reason
    for bad in ("", ">= ", ">= 1.x", "=> 1.0", ">= 1.0,", "1.0 2.0"):
        result = check_constraint(c("${attr.good}", operand, bad), node)
        assert not result.ok
        assert "invalid version constraint" in result.reason, bad
    result = check_constraint(c("${attr.missing}", operand, ">= 1.0"), node)
    assert result == ConstraintResult(False, "attribute ${attr.missing} is not set")
    result = check_constraint(c("${attr.good}", operand, ">= 2.0"), node)
    assert result == ConstraintResult(
        False, f'constraint "${{attr.good}} {operand} >= 2.0" not met'
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 30), min_size=3, max_size=3),
    st.lists(st.integers(0, 30), min_size=3, max_size=3),
)
def test_version_order_agrees_with_tuple_order(a: list[int], b: list[int]) -> None:
    node = {"Attributes": {"v": ".".join(map(str, a))}}
    bound = ".".join(map(str, b))
    assert ok("${attr.v}", "version", f">= {bound}", node) is (a >= b)
    assert ok("${attr.v}", "semver", f"< {bound}", node) is (a < b)
    pessimistic = a >= b and a[:2] == b[:2]
    assert ok("${attr.v}", "version", f"~> {bound}", node) is pessimistic


# ---------------------------------------------------------------------------------------------
# Scheduler-only and unknown operands, bad input, lists


@pytest.mark.parametrize("operand", ["distinct_hosts", "distinct_property"])
def test_scheduler_operands_always_pass_on_a_node(operand: str) -> None:
    assert check_constraint(c("", operand, "true"), NODE) == ConstraintResult(True, "")
    assert check_constraint(c("${meta.nope}", operand, "2"), NODE).ok


def test_unknown_operand() -> None:
    result = check_constraint(c("${meta.rack}", "~=", "r10"), NODE)
    assert result == ConstraintResult(False, 'unknown constraint operand "~="')


def test_malformed_constraints_raise() -> None:
    with pytest.raises(ValueError, match="LTarget"):
        check_constraint({"LTarget": 5, "RTarget": "x", "Operand": "="}, NODE)
    with pytest.raises(ValueError, match="Operand"):
        check_constraint({"LTarget": "a", "RTarget": "x", "Operand": ["="]}, NODE)
    with pytest.raises(TypeError, match="mapping"):
        check_constraint(["${meta.rack}", "=", "r10"], NODE)  # type: ignore[arg-type]


def test_check_constraints_first_failure_wins() -> None:
    constraints = [
        c("${attr.kernel.name}", "=", "linux"),
        c("${meta.rack}", "=", "r1"),
        c("${attr.cpu.numcores}", ">", "100"),
    ]
    result = check_constraints(constraints, NODE)
    assert result == ConstraintResult(False, 'constraint "${meta.rack} = r1" not met')
    assert check_constraints(constraints[:1], NODE) == ConstraintResult(True, "")
    assert check_constraints([], NODE) == ConstraintResult(True, "")
    assert check_constraints(iter(constraints[2:]), NODE).reason == (
        'constraint "${attr.cpu.numcores} > 100" not met'
    )


# ---------------------------------------------------------------------------------------------
# Untrusted input: a check never raises for string targets and never runs away

UUID = "8f2c6b1e-3d4a-4c5b-9e8f-0a1b2c3d4e5f"
SLOW_NODE: dict[str, Any] = {**NODE, "ID": UUID, "Meta": {"s": "a" * 100_000 + "!"}}


def timed_check(ltarget: str, operand: str, rtarget: str) -> tuple[ConstraintResult, float]:
    start = time.monotonic()
    result = check_constraint(c(ltarget, operand, rtarget), SLOW_NODE)
    return result, time.monotonic() - start


@pytest.mark.timeout(10)
def test_the_reported_catastrophic_regexp_is_fast() -> None:
    result, seconds = timed_check("${node.unique.id}", "regexp", "^(.+)+!$")
    assert result == ConstraintResult(
        False, 'constraint "${node.unique.id} regexp ^(.+)+!$" not met'
    )
    assert seconds < 1


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("pattern", "expected"),
    [("^(a|a)*$", False), (r"^(\w|\w)*$", False), ("(.*){1,1000}[bc]", False), ("(a+)+$", False),
     ("^(a|a)*!$", True), (r"^(\w|\w)*\W$", True)],
)  # fmt: skip
def test_catastrophic_regexps_are_decided_quickly(pattern: str, expected: bool) -> None:
    # RE2 never backtracks: a right answer on a 100,000-character value, not a timeout.
    result, seconds = timed_check("${meta.s}", "regexp", pattern)
    assert result == (
        ConstraintResult(True, "")
        if expected
        else ConstraintResult(False, f'constraint "${{meta.s}} regexp {pattern}" not met')
    )
    assert seconds < 1


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("a{1001}", "invalid repeat count"),
        ("(?:a{1000}){1000}", "invalid repeat count"),
        (r"\pL{1000}", "expression too large"),
        ("a" * 1025, "the limit is 1024"),
        ("(?R)", "invalid or unsupported Perl syntax"),
        (r"(a)\1", "invalid escape sequence"),  # backreferences are not Go syntax
        ("a(?=b)", "invalid or unsupported Perl syntax"),  # nor is lookaround
    ],
)
def test_costly_or_unsupported_regexps_are_not_met_with_a_reason(
    pattern: str, message: str
) -> None:
    result = check_constraint(c("${attr.kernel.name}", "regexp", pattern), NODE)
    assert not result.ok
    assert message in result.reason


@pytest.mark.parametrize(
    ("left", "op", "right", "expected"),
    [
        ("2" * 5000, ">", "1" * 5000, True),  # int() refused 5000 digits: a ValueError
        ("1" * 5000, ">", "2" * 5000, False),
        ("9" * 5000, "<", "10", False),  # too long for a number: compared as text
        ("٣", ">", "10", True),  # Arabic-Indic 3 is not a number in Go: text order
        ("3", ">", "10", False),  # ASCII digits still compare as numbers
        ("1e999", ">", "5", True),
    ],
)
def test_order_with_huge_or_non_ascii_numbers(
    left: str, op: str, right: str, expected: bool
) -> None:
    node = {**NODE, "Meta": {"x": left}}
    assert ok("${meta.x}", op, right, node) is expected


@pytest.mark.parametrize(
    ("value", "constraint", "expected"),
    [
        ("1." + "9" * 5000, ">= 1.0", False),  # int() refused it: a ValueError
        ("1.0", ">= 1." + "9" * 5000, False),
        ("1.0", ">= 9223372036854775808", False),  # above 2^63-1, as in Go
        ("9223372036854775807.0", ">= 1.0", True),
        ("1.0.0-" + "9" * 5000, "> 1.0.0-" + "9" * 4999, True),  # numeric pre-release
        ("1.0.0-" + "9" * 4999, "> 1.0.0-" + "9" * 5000, False),
        ("1.0.0-01", "= 1.0.0-1", True),
        ("١.٠", ">= 0.1", False),  # Arabic-Indic digits are not a version
    ],
)
def test_versions_with_huge_or_non_ascii_numbers(
    value: str, constraint: str, expected: bool
) -> None:
    node = {**NODE, "Attributes": {"v": value}}
    for operand in ("version", "semver"):
        assert ok("${attr.v}", operand, constraint, node) is expected


def test_huge_version_segments_say_why() -> None:
    node = {**NODE, "Attributes": {"v": "1." + "9" * 5000}}
    result = check_constraint(c("${attr.v}", "semver", ">= 1.0"), node)
    assert not result.ok
    assert "is not a valid version: a segment is above 2^63-1" in result.reason


@pytest.mark.timeout(10)
def test_version_constraint_with_long_whitespace_is_fast() -> None:
    # Two adjacent \s* in the constraint regex backtracked quadratically: seconds here.
    result, seconds = timed_check("${attr.nomad.version}", "version", " " * 20_000 + "1 2")
    assert not result.ok
    assert "invalid version constraint" in result.reason
    assert seconds < 0.5


def test_unforeseen_value_errors_become_not_met(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("something odd")

    monkeypatch.setattr(constraints, "_check_order", boom)
    result = check_constraint(c("${meta.rack}", "<", "r2"), NODE)
    assert result == ConstraintResult(
        False, 'constraint "${meta.rack} < r2" could not be checked: something odd'
    )


_TARGET = st.one_of(
    st.text(max_size=20),
    st.text("0123456789.-+~>=<!, eEvx٣²", max_size=40),
    st.integers(0, 6000).map(lambda n: "9" * n),
    st.sampled_from(["${attr.cpu.numcores}", "${meta.rack}", "${attr.nomad.version}", "^(.+)+!$",
                     "a{4294967296}", "(?:a{1000}){1000}", "[z-a]", "(?R)"]),
)  # fmt: skip
_OPERAND = st.one_of(
    st.sampled_from(["=", "!=", "<", "<=", ">", ">=", "regexp", "version", "semver",
                     "set_contains", "set_contains_any", "is_set", "is_not_set", ""]),
    st.text(max_size=10),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(_TARGET, _OPERAND, _TARGET)
def test_check_never_raises_for_string_input(ltarget: str, operand: str, rtarget: str) -> None:
    result = check_constraint(c(ltarget, operand, rtarget), NODE)
    assert isinstance(result, ConstraintResult)
    assert result.ok or result.reason
