"""Compiled ACLs: folding policies, glob lookups and their precedence, deny, variables
(implicit workload grants and the quirks), singleton levels, the caches and JobACL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nomad_client.acl import (
    ACL,
    DENY_ALL,
    MANAGEMENT,
    ACLCache,
    JobACL,
    WorkloadClaim,
    compile_acl,
    job_acl_matches,
    parse_policy,
    validate_job_acl,
)
from nomad_client.acl import table as table_module
from nomad_client.acl.table import GLOB_CACHE_SIZE, CapabilityTable, glob_distance, glob_match


def acl_of(*rules: str) -> ACL:
    """The ACL of a token holding one policy per ``rules`` text, in that (name) order."""
    return compile_acl([parse_policy(text) for text in rules])


def ns(label: str, body: str) -> str:
    return f'namespace "{label}" {{ {body} }}'


def variables(label: str, path: str, *caps: str) -> str:
    quoted = ", ".join(f'"{c}"' for c in caps)
    path_block = f'path "{path}" {{ capabilities = [{quoted}] }}'
    return f'namespace "{label}" {{ variables {{ {path_block} }} }}'


# ---------------------------------------------------------------------------------------
# Globs


@pytest.mark.parametrize(
    ("pattern", "name", "matches"),
    [
        ("*", "", True),
        ("*", "anything", True),
        ("prod-*", "prod-", True),
        ("prod-*", "prod-api", True),
        ("prod-*", "dev-prod-api", False),
        ("*-api", "prod-api", True),
        ("*-api", "prod-api-2", False),
        ("a*b*c", "abc", True),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "acb", False),
        ("ab*ba", "aba", False),  # the ends may not overlap
        ("ab*ba", "abba", True),
        ("a**", "a", True),
        ("exact", "exact", True),
        ("exact", "exactly", False),
        ("a.b*", "aXb", False),  # only * is special
        ("nomad/jobs/*", "nomad/jobs/web/group", True),
    ],
)
def test_glob_match(pattern: str, name: str, matches: bool) -> None:
    assert glob_match(pattern, name) is matches


@pytest.mark.parametrize(
    ("pattern", "name", "distance"),
    [("*", "prod-api", 8), ("prod-*", "prod-api", 3), ("production-**", "production-web", 3),
     ("production-*", "production-web", 3), ("*-api", "prod-api", 4)],
)
def test_glob_distance(pattern: str, name: str, distance: int) -> None:
    assert glob_distance(pattern, name) == distance


@pytest.mark.parametrize(
    ("rules", "namespace", "expected"),
    [
        # §2.2: the closer glob applies alone; globs never merge.
        ([ns("*", 'policy = "write"'), ns("prod-*", 'policy = "read"')], "prod-api", "read"),
        ([ns("*", 'policy = "write"'), ns("prod-*", 'policy = "read"')], "default", "write"),
        # An exact label wins outright, over any glob and any deny.
        ([ns("*", 'policy = "deny"'), ns("default", 'policy = "write"')], "default", "write"),
        ([ns("*", 'policy = "deny"'), ns("default", 'policy = "write"')], "other", "deny"),
        ([ns("*", 'policy = "write"'), ns("default", 'policy = "read"')], "default", "read"),
        # Ties go to the glob sorting last.
        ([ns("a*", 'policy = "read"'), ns("*a", 'policy = "write"')], "aa", "read"),
        ([ns("*a", 'policy = "write"'), ns("a*", 'policy = "read"')], "aa", "read"),
        ([ns("prod-*", 'policy = "read"'), ns("*-api", 'policy = "write"')], "prod-api", "read"),
        ([ns("prod*", 'policy = "read"'), ns("*api", 'policy = "write"')], "prodapi", "read"),
        ([ns("production-*", 'policy = "read"'), ns("production-**", 'policy = "write"')],
         "production-web", "write"),
        ([ns("prod-*", 'policy = "read"')], "dev", None),
    ],
)
def test_namespace_glob_precedence(rules: list[str], namespace: str, expected: str | None) -> None:
    assert level_in(acl_of(*rules), namespace) == expected


def level_in(acl: ACL, namespace: str) -> str | None:
    """Which coarse policy the entry selected for ``namespace`` came from."""
    for level, probe in (("deny", "deny"), ("write", "submit-job"), ("read", "read-job")):
        if acl.allow_namespace_op(namespace, probe):
            return level
    assert not acl.allow_namespace(namespace)
    return None


def test_a_glob_answer_is_a_dict_lookup_once_resolved(monkeypatch: pytest.MonkeyPatch) -> None:
    acl = acl_of(ns("prod-*", 'policy = "read"'), ns("*", 'policy = "deny"'))
    calls: list[str] = []
    real = table_module.glob_match

    def counting(pattern: str, name: str) -> bool:
        calls.append(pattern)
        return real(pattern, name)

    monkeypatch.setattr(table_module, "glob_match", counting)
    assert acl.allow_namespace_op("prod-api", "read-job")
    assert len(calls) == 2
    for _ in range(3):
        assert acl.allow_namespace_op("prod-api", "read-job")
        assert not acl.allow_namespace_op("prod-api", "submit-job")
    assert len(calls) == 2


def test_the_glob_cache_is_bounded_and_stays_right() -> None:
    table = CapabilityTable({"a-*": frozenset({"read"}), "b": frozenset({"write"})})
    for i in range(3 * GLOB_CACHE_SIZE):
        assert table.lookup(f"a-{i}") == {"read"}
        assert table.lookup(f"x-{i}") == set()
        assert table.lookup("b") == {"write"}
    # Peeking at the private cache: its size is the property under test.
    assert len(table._resolved) <= 1 + GLOB_CACHE_SIZE


# ---------------------------------------------------------------------------------------
# Deny and merging


@pytest.mark.parametrize(
    ("rules", "submit", "read"),
    [
        # Same label: deny wins whatever the order, within a policy or across policies.
        ([ns("a", 'policy = "write"'), ns("a", 'policy = "deny"')], False, False),
        ([ns("a", 'policy = "deny"'), ns("a", 'policy = "write"')], False, False),
        ([ns("a", 'policy = "write"') + "\n" + ns("a", 'policy = "deny"')], False, False),
        ([ns("a", 'capabilities = ["deny", "read-job"]')], False, False),
        # Same label, grants: unioned.
        ([ns("a", 'policy = "read"'), ns("a", 'capabilities = ["submit-job"]')], True, True),
        # Different labels: a glob deny does not touch an exact label.
        ([ns("*", 'policy = "deny"'), ns("a", 'policy = "read"')], False, True),
        ([ns("a*", 'policy = "deny"'), ns("a", 'policy = "write"')], True, True),
    ],
)
def test_deny_precedence(rules: list[str], submit: bool, read: bool) -> None:
    acl = acl_of(*rules)
    assert acl.allow_namespace_op("a", "submit-job") is submit
    assert acl.allow_namespace_op("a", "read-job") is read


def test_a_variables_only_block_shadows_glob_namespace_grants() -> None:
    # [quirk] it creates an empty exact entry for its label.
    acl = acl_of(ns("*", 'policy = "write"'), variables("a", "x", "read"))
    assert not acl.allow_namespace_op("a", "read-job")
    assert not acl.allow_namespace("a")
    assert acl.allow_namespace("b")


@pytest.mark.parametrize(
    ("rules", "op", "any_op", "any_access"),
    [
        ([ns("a", 'policy = "read"')], "read-job", True, True),
        ([ns("a", 'policy = "read"')], "submit-job", False, True),
        ([ns("a", 'policy = "read"'), ns("b*", 'capabilities = ["submit-job"]')],
         "submit-job", True, True),
        ([ns("a", 'policy = "deny"')], "read-job", False, False),
        ([ns("a", "")], "read-job", False, False),
        ([], "read-job", False, False),
    ],
)
def test_the_any_namespace_checks(
    rules: list[str], op: str, any_op: bool, any_access: bool
) -> None:
    acl = acl_of(*rules)
    assert acl.allow_namespace_op("*", op) is any_op
    assert acl.allow_namespace("*") is any_access


@pytest.mark.parametrize(
    ("rules", "pool", "checks"),
    [
        ([ 'node_pool "default" { policy = "read" }'], "default",
         {"read": True, "write": False, "delete": False, "access": True}),
        (['node_pool "*" { policy = "write" }', 'node_pool "gpu-*" { policy = "deny" }'],
         "gpu-a", {"read": False, "write": False, "delete": False, "access": False}),
        (['node_pool "*" { policy = "write" }', 'node_pool "gpu-*" { policy = "deny" }'],
         "cpu", {"read": True, "write": True, "delete": True, "access": True}),
        (['node_pool "p" { capabilities = ["delete"] }', 'node_pool "p" { policy = "read" }'],
         "p", {"read": True, "write": False, "delete": True, "access": True}),
        (['node_pool "p" { policy = "scale" }'], "p",
         {"read": False, "write": False, "delete": False, "access": False}),
    ],
)
def test_node_pools(rules: list[str], pool: str, checks: dict[str, bool]) -> None:
    acl = acl_of(*rules)
    got = {cap: acl.allow_node_pool(pool, cap) for cap in ("read", "write", "delete")}
    got["access"] = acl.allow_node_pool_access(pool)
    assert got == checks


@pytest.mark.parametrize(
    ("rules", "volume", "readonly", "readwrite"),
    [
        (['host_volume "data" { policy = "read" }'], "data", True, False),
        (['host_volume "data-*" { policy = "write" }'], "data-1", True, True),
        (['host_volume "*" { policy = "write" }', 'host_volume "secret" { policy = "deny" }'],
         "secret", False, False),
        (['host_volume "*" { policy = "write" }', 'host_volume "secret" { policy = "deny" }'],
         "other", True, True),
        (['host_volume "data" { policy = "read" }'], "other", False, False),
    ],
)
def test_host_volumes(rules: list[str], volume: str, readonly: bool, readwrite: bool) -> None:
    acl = acl_of(*rules)
    assert acl.allow_host_volume(volume, "mount-readonly") is readonly
    assert acl.allow_host_volume(volume, "mount-readwrite") is readwrite


# ---------------------------------------------------------------------------------------
# Singleton levels


@pytest.mark.parametrize(
    ("levels", "read", "write"),
    [
        ([], False, False),
        (["read"], True, False),
        (["write"], True, True),
        (["read", "write"], True, True),
        (["write", "read"], True, True),
        (["write", "deny"], False, False),
        (["deny", "write"], False, False),
        (["scale"], False, False),
        (["scale", "read"], True, False),
    ],
)
@pytest.mark.parametrize("block", ["agent", "node", "operator", "quota"])
def test_levels_keep_the_strongest(
    block: str, levels: list[str], read: bool, write: bool
) -> None:
    acl = acl_of(*(f'{block} {{ policy = "{level}" }}' for level in levels))
    checks: dict[str, tuple[Callable[[], bool], Callable[[], bool]]] = {
        "agent": (acl.allow_agent_read, acl.allow_agent_write),
        "node": (acl.allow_node_read, acl.allow_node_write),
        "operator": (acl.allow_operator_read, acl.allow_operator_write),
        "quota": (acl.allow_quota_read, acl.allow_quota_write),
    }
    allow_read, allow_write = checks[block]
    assert (allow_read(), allow_write()) == (read, write)


@pytest.mark.parametrize(
    ("levels", "read", "list_"),
    [
        (["read"], True, True),
        (["list"], False, True),
        (["write"], False, False),  # [quirk] write grants neither
        (["read", "write"], False, False),  # merging loses read
        (["list", "read"], True, True),
        (["deny", "read"], False, False),
        ([], False, False),
    ],
)
def test_plugin_levels(levels: list[str], read: bool, list_: bool) -> None:
    acl = acl_of(*(f'plugin {{ policy = "{level}" }}' for level in levels))
    assert (acl.allow_plugin_read(), acl.allow_plugin_list()) == (read, list_)


@pytest.mark.parametrize(
    ("rules", "allowed"),
    [
        (['operator { policy = "read" }'], {"license-read", "keyring-read"}),
        (['operator { policy = "write" }'], {"snapshot-save", "license-read", "keyring-read",
                                             "keyring-rotate", "keyring-delete", "anything"}),
        (['operator { capabilities = ["snapshot-save"] }',
          'operator { capabilities = ["keyring-rotate"] }'], {"snapshot-save", "keyring-rotate"}),
        (['operator { capabilities = ["snapshot-save"] }',
          'operator { capabilities = ["deny"] }',
          'operator { capabilities = ["keyring-read"] }'], set()),
        (['operator { capabilities = ["deny"] }', 'operator { policy = "read" }'], set()),
    ],
)
def test_operator_capabilities(rules: list[str], allowed: set[str]) -> None:
    acl = acl_of(*rules)
    for cap in ("snapshot-save", "license-read", "keyring-read", "keyring-rotate",
                "keyring-delete", "anything"):
        assert acl.allow_operator_capability(cap) is (cap in allowed), cap


# ---------------------------------------------------------------------------------------
# Variables


CLAIM = WorkloadClaim(namespace="default", job_id="web", group="frontend", task="server")


@pytest.mark.parametrize(
    ("rules", "namespace", "path", "ops"),
    [
        # Exact, then glob, over namespace and path together.
        ([variables("default", "app/config", "read")], "default", "app/config",
         {"read", "list"}),
        ([variables("default", "app/*", "write")], "default", "app/config", {"write"}),
        ([variables("default", "app/*", "write")], "other", "app/config", set()),
        ([variables("*", "app/*", "destroy")], "other", "app/x", {"destroy"}),
        ([variables("default", "app/*", "read"), variables("default", "app/config", "write")],
         "default", "app/config", {"write"}),
        ([variables("default", "*", "read"), variables("default", "app/*", "write")],
         "default", "app/config", {"write"}),
        ([variables("*", "app/config", "read"), variables("default", "*", "write")],
         "default", "app/config", {"read", "list"}),  # the namespace counts in the distance
        # [quirk] no deny override: a deny in one policy and read in another allow read.
        ([variables("default", "x", "deny"), variables("default", "x", "read")],
         "default", "x", {"read", "list"}),
        ([variables("default", "x", "deny", "read")], "default", "x", set()),
        # Namespace grants never reach variables.
        ([ns("default", 'policy = "write"')], "default", "x", set()),
    ],
)
def test_variables_rules(rules: list[str], namespace: str, path: str, ops: set[str]) -> None:
    acl = acl_of(*rules)
    for op in ("read", "list", "write", "destroy"):
        assert acl.allow_variable_op(namespace, path, op) is (op in ops), op


@pytest.mark.parametrize(
    ("rules", "namespace", "path", "ops"),
    [
        ([], "default", "nomad/jobs", {"read", "list"}),
        ([], "default", "nomad/jobs/web", {"read", "list"}),
        ([], "default", "nomad/jobs/web/frontend", {"read", "list"}),
        ([], "default", "nomad/jobs/web/frontend/server", {"read", "list"}),
        ([], "default", "nomad/jobs/web/frontend/server/x", set()),
        ([], "default", "nomad/jobs/api", set()),
        ([], "default", "nomad/jobs/web/backend", set()),
        ([], "other", "nomad/jobs/web", set()),
        ([], "default", "nomad/jobs/web/", set()),
        # An exact rule, even deny, overrides the implicit grant; a glob deny does not.
        ([variables("default", "nomad/jobs/web", "deny")], "default", "nomad/jobs/web", set()),
        ([variables("default", "nomad/jobs/web", "write")], "default", "nomad/jobs/web",
         {"write"}),
        ([variables("default", "nomad/jobs/*", "deny")], "default", "nomad/jobs/web",
         {"read", "list"}),
        ([variables("default", "nomad/jobs/*", "write")], "default", "nomad/jobs/web/x",
         {"write"}),
    ],
)
def test_implicit_workload_variables(
    rules: list[str], namespace: str, path: str, ops: set[str]
) -> None:
    acl = acl_of(*rules)
    for op in ("read", "list", "write", "destroy"):
        assert acl.allow_variable_op(namespace, path, op, CLAIM) is (op in ops), op
    # Without a claim nothing is implicit.
    if not rules:
        assert not acl.allow_variable_op(namespace, path, "read")


def test_a_service_identity_gets_no_task_path() -> None:
    claim = WorkloadClaim(namespace="default", job_id="web", group="frontend", task="")
    assert DENY_ALL.allow_variable_op("default", "nomad/jobs/web/frontend", "read", claim)
    assert not DENY_ALL.allow_variable_op("default", "nomad/jobs/web/frontend/", "read", claim)


@pytest.mark.parametrize(
    ("rules", "namespace", "any_rule"),
    [
        ([variables("default", "a", "read")], "default", True),
        ([variables("default", "a/*", "deny")], "default", True),
        ([variables("default", "a", "read")], "other", False),
        ([variables("devops", "a", "read")], "dev", True),  # [quirk] a key prefix
        ([variables("*", "a", "read")], "default", False),  # [quirk] glob namespaces ignored
        ([ns("default", 'policy = "write"')], "default", False),
    ],
)
def test_any_variables(rules: list[str], namespace: str, any_rule: bool) -> None:
    assert acl_of(*rules).allow_any_variables(namespace) is any_rule


# ---------------------------------------------------------------------------------------
# Management, deny-all, the cache


def test_management_allows_everything_and_deny_all_nothing() -> None:
    checks: list[Callable[[ACL], bool]] = [
        lambda a: a.allow_namespace_op("default", "alloc-node-exec"),
        lambda a: a.allow_namespace_op("*", "submit-job"),
        lambda a: a.allow_namespace("x"),
        lambda a: a.allow_node_read(),
        lambda a: a.allow_node_write(),
        lambda a: a.allow_agent_read(),
        lambda a: a.allow_agent_write(),
        lambda a: a.allow_operator_read(),
        lambda a: a.allow_operator_write(),
        lambda a: a.allow_operator_capability("keyring-delete"),
        lambda a: a.allow_quota_read(),
        lambda a: a.allow_plugin_read(),
        lambda a: a.allow_host_volume("v", "mount-readwrite"),
        lambda a: a.allow_node_pool("p", "delete"),
        lambda a: a.allow_variable_op("default", "x", "destroy"),
        lambda a: a.allow_any_variables("default"),
    ]
    assert MANAGEMENT.management and not DENY_ALL.management
    for check in checks:
        assert check(MANAGEMENT)
        assert not check(DENY_ALL)
        assert not check(compile_acl([parse_policy("")]))


def test_the_acl_cache_builds_once_per_key_and_drops_the_least_recently_used() -> None:
    cache = ACLCache(max_entries=2)
    built: list[str] = []

    def build(name: str) -> Callable[[], ACL]:
        def make() -> ACL:
            built.append(name)
            return acl_of(ns(name, 'policy = "read"'))
        return make

    key_a, key_b, key_c = (("a", 10),), (("b", 11),), (("c", 12),)
    first = cache.get(key_a, build("a"))
    assert cache.get(key_a, build("a")) is first
    cache.get(key_b, build("b"))
    cache.get(key_a, build("a"))  # a is now the most recently used
    cache.get(key_c, build("c"))  # drops b
    assert len(cache) == 2
    assert cache.get(key_a, build("a")) is first
    cache.get(key_b, build("b"))
    assert built == ["a", "b", "c", "b"]
    # A changed policy is a new key.
    assert cache.get((("a", 13),), build("a")) is not first


# ---------------------------------------------------------------------------------------
# JobACL


@pytest.mark.parametrize(
    ("job_acl", "matches"),
    [
        (JobACL(namespace="default"), True),
        (JobACL(namespace="default", group="ignored", task="ignored"), True),
        (JobACL(namespace="other"), False),
        (JobACL(namespace="*"), False),
        (JobACL(), False),
        (JobACL(namespace="default", job_id="web"), True),
        (JobACL(namespace="default", job_id="api"), False),
        (JobACL(namespace="default", job_id="web", group="frontend"), True),
        (JobACL(namespace="default", job_id="web", group="backend"), False),
        (JobACL(namespace="default", job_id="web", group="frontend", task="server"), True),
        (JobACL(namespace="default", job_id="web", group="frontend", task="sidecar"), False),
        (JobACL(namespace="default", job_id="web", task="server"), True),
    ],
)
def test_job_acl_matches(job_acl: JobACL, matches: bool) -> None:
    workload = {"namespace": "default", "job_id": "web", "group": "frontend", "task": "server"}
    assert job_acl_matches(job_acl, **workload) is matches


def test_task_scoped_policies_never_match_service_identities() -> None:
    job_acl = JobACL(namespace="default", job_id="web", group="frontend", task="server")
    assert not job_acl_matches(job_acl, namespace="default", job_id="web", group="frontend",
                               task="")
    assert job_acl_matches(JobACL(namespace="default", job_id="web", group="frontend"),
                           namespace="default", job_id="web", group="frontend", task="")


@pytest.mark.parametrize(
    ("job_acl", "problems"),
    [
        (JobACL(), []),
        (JobACL(namespace="default"), []),
        (JobACL(namespace="default", job_id="j", group="g", task="t"), []),
        (JobACL(job_id="j"), ["namespace must be set to set job ID"]),
        (JobACL(namespace="default", group="g"), ["job ID must be set to set group"]),
        (JobACL(namespace="default", job_id="j", task="t"), ["group must be set to set task"]),
        (JobACL(task="t"), ["group must be set to set task"]),
        (JobACL(job_id="j", task="t"),
         ["namespace must be set to set job ID", "group must be set to set task"]),
    ],
)
def test_validate_job_acl(job_acl: JobACL, problems: list[str]) -> None:
    assert validate_job_acl(job_acl) == problems
