"""The ACL policy language: parsing HCL and JSON rules, coarse-policy expansion, validation
errors (Nomad's texts, with lines) and the RulesJSON view."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nomad_client.acl import (
    LabeledRule,
    NamespaceRule,
    Policy,
    PolicyError,
    VariablesPathRule,
    parse_policy,
    policy_to_rules_json,
)

NS_READ = {
    "list-jobs", "parse-job", "read-job", "csi-list-volume", "csi-read-volume",
    "read-job-scaling", "list-scaling-policies", "read-scaling-policy", "host-volume-read",
}
NS_WRITE = NS_READ | {
    "scale-job", "submit-job", "dispatch-job", "read-logs", "read-fs", "alloc-exec",
    "alloc-lifecycle", "csi-mount-volume", "csi-write-volume", "submit-recommendation",
    "host-volume-create",
}
NS_SCALE = {
    "list-scaling-policies", "read-scaling-policy", "read-job-scaling", "scale-job",
    "read-job", "submit-recommendation",
}
ALL_NAMESPACE_CAPABILITIES = [
    "deny", "list-jobs", "parse-job", "read-job", "submit-job", "dispatch-job", "read-logs",
    "read-fs", "alloc-exec", "alloc-node-exec", "alloc-lifecycle", "register-job",
    "revert-job", "deregister-job", "purge-job", "evaluate-job", "plan-job",
    "tag-job-version", "stable-job", "fail-deployment", "pause-deployment",
    "promote-deployment", "unblock-deployment", "cancel-deployment",
    "set-alloc-health-deployment", "gc-allocation", "pause-allocation", "force-periodic-job",
    "delete-service-registration", "scale-job", "read-job-scaling", "list-scaling-policies",
    "read-scaling-policy", "csi-register-plugin", "csi-write-volume", "csi-read-volume",
    "csi-list-volume", "csi-mount-volume", "host-volume-create", "host-volume-register",
    "host-volume-read", "host-volume-write", "host-volume-delete", "sentinel-override",
    "submit-recommendation",
]
OPERATOR_WRITE = {"snapshot-save", "license-read", "keyring-rotate", "keyring-read",
                  "keyring-delete"}


def parse_error(rules: str, *, strict: bool = True) -> PolicyError:
    with pytest.raises(PolicyError) as caught:
        parse_policy(rules, strict=strict)
    return caught.value


# ---------------------------------------------------------------------------------------
# Coarse policies expand per block


@pytest.mark.parametrize(
    ("level", "expected"),
    [("deny", {"deny"}), ("read", NS_READ), ("write", NS_WRITE), ("scale", NS_SCALE)],
)
def test_namespace_policy_expands(level: str, expected: set[str]) -> None:
    (rule,) = parse_policy(f'namespace "default" {{ policy = "{level}" }}').namespaces
    assert rule == NamespaceRule("default", level, frozenset(expected))


def test_write_leaves_out_the_fine_grained_capabilities() -> None:
    assert len(ALL_NAMESPACE_CAPABILITIES) == 45
    left_out = set(ALL_NAMESPACE_CAPABILITIES) - NS_WRITE
    for cap in ("alloc-node-exec", "csi-register-plugin", "host-volume-register",
                "host-volume-write", "host-volume-delete", "sentinel-override",
                "register-job", "gc-allocation", "force-periodic-job",
                "delete-service-registration"):
        assert cap in left_out


@pytest.mark.parametrize("capability", ALL_NAMESPACE_CAPABILITIES)
def test_every_namespace_capability_is_accepted(capability: str) -> None:
    (rule,) = parse_policy(f'namespace "a" {{ capabilities = ["{capability}"] }}').namespaces
    assert capability in rule.capabilities


@pytest.mark.parametrize(
    ("capabilities", "policy", "expected"),
    [
        (["host-volume-write"], "", {"host-volume-write", "host-volume-register",
                                     "host-volume-create", "host-volume-delete",
                                     "host-volume-read"}),
        (["host-volume-register"], "", {"host-volume-register", "host-volume-create",
                                        "host-volume-read"}),
        (["host-volume-create"], "", {"host-volume-create", "host-volume-read"}),
        (["host-volume-delete"], "", {"host-volume-delete"}),
        (["submit-job"], "read", NS_READ | {"submit-job"}),
        (["alloc-node-exec"], "write", NS_WRITE | {"alloc-node-exec"}),
        ([], "", set()),
    ],
)
def test_namespace_capabilities_add_to_the_policy_and_imply_others(
    capabilities: list[str], policy: str, expected: set[str]
) -> None:
    rules = (f'namespace "a" {{\n  policy = "{policy}"\n'
             f'  capabilities = {json.dumps(capabilities)}\n}}')
    (rule,) = parse_policy(rules).namespaces
    assert rule.capabilities == expected


@pytest.mark.parametrize(
    ("block", "level", "expected"),
    [
        ("node_pool", "deny", {"deny"}),
        ("node_pool", "read", {"read"}),
        ("node_pool", "write", {"delete", "read", "write"}),
        ("node_pool", "scale", set()),
        ("host_volume", "deny", {"deny"}),
        ("host_volume", "read", {"mount-readonly"}),
        ("host_volume", "write", {"mount-readonly", "mount-readwrite"}),
        ("host_volume", "scale", set()),
    ],
)
def test_labelled_block_policy_expands(block: str, level: str, expected: set[str]) -> None:
    policy = parse_policy(f'{block} "a" {{ policy = "{level}" }}')
    rules = policy.node_pools if block == "node_pool" else policy.host_volumes
    assert rules == (LabeledRule("a", level, frozenset(expected)),)


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("deny", {"deny"}),
        ("read", {"license-read", "keyring-read"}),
        ("write", OPERATOR_WRITE),
        ("scale", set()),
    ],
)
def test_operator_policy_expands_to_a_level_and_capabilities(
    level: str, expected: set[str]
) -> None:
    policy = parse_policy(f'operator {{ policy = "{level}" }}')
    assert (policy.operator, policy.operator_capabilities) == (level, expected)


@pytest.mark.parametrize(
    ("level", "expected"),
    [
        ("deny", {"deny"}),
        ("read", {"sentinel-read"}),
        ("write", {"sentinel-read", "sentinel-submit", "sentinel-delete"}),
    ],
)
def test_sentinel_policy_expands(level: str, expected: set[str]) -> None:
    policy = parse_policy(f'sentinel {{ policy = "{level}" }}')
    assert (policy.sentinel, policy.sentinel_capabilities) == (level, expected)


@pytest.mark.parametrize(
    ("block", "levels"),
    [
        ("agent", ["deny", "read", "write", "scale"]),
        ("node", ["deny", "read", "write", "scale"]),
        ("quota", ["deny", "read", "write", "scale"]),
        ("plugin", ["deny", "read", "list", "write"]),
    ],
)
def test_level_only_blocks_keep_their_level(block: str, levels: list[str]) -> None:
    for level in levels:
        assert getattr(parse_policy(f'{block} {{ policy = "{level}" }}'), block) == level


def test_operator_capabilities_without_a_policy() -> None:
    policy = parse_policy('operator { capabilities = ["snapshot-save", "keyring-read"] }')
    assert (policy.operator, policy.operator_capabilities) == (
        "", {"snapshot-save", "keyring-read"})


@pytest.mark.parametrize(
    ("capabilities", "expected"),
    [
        (["read"], {"read", "list"}),
        (["list"], {"list"}),
        (["write"], {"write"}),
        (["destroy"], {"destroy"}),
        (["write", "read", "destroy"], {"write", "read", "list", "destroy"}),
        (["deny"], {"deny"}),
        (["read", "write", "deny"], {"deny"}),
        ([], set()),
    ],
)
def test_variables_path_capabilities_expand(capabilities: list[str], expected: set[str]) -> None:
    rules = (f'namespace "a" {{ variables {{ path "p/*" '
             f'{{ capabilities = {json.dumps(capabilities)} }} }} }}')
    (rule,) = parse_policy(rules).namespaces
    assert rule.variables == (VariablesPathRule("p/*", frozenset(expected)),)


def test_variables_never_come_from_the_namespace_policy() -> None:
    (rule,) = parse_policy('namespace "a" { policy = "write" }').namespaces
    assert rule.variables == ()


def test_repeated_blocks_stay_separate_in_order() -> None:
    policy = parse_policy(
        'namespace "a" { policy = "read" }\n'
        'namespace "b" { policy = "deny" }\n'
        'namespace "a" { capabilities = ["submit-job"] }\n'
        'namespace "c" {\n  variables {\n    path "x" { capabilities = ["read"] }\n'
        '  }\n  variables {\n    path "y" { capabilities = ["write"] }\n  }\n}\n'
    )
    assert [(ns.name, ns.policy) for ns in policy.namespaces] == [
        ("a", "read"), ("b", "deny"), ("a", ""), ("c", "")]
    assert [v.path for v in policy.namespaces[3].variables] == ["x", "y"]


# ---------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize(
    ("block", "label", "valid"),
    [
        ("namespace", "default", True),
        ("namespace", "*", True),
        ("namespace", "prod-*-eu", True),
        ("namespace", "A-9", True),
        ("namespace", "a" * 128, True),
        ("namespace", "a" * 129, False),
        ("namespace", "with_underscore", False),
        ("namespace", "a b", False),
        ("namespace", "a.b", False),
        ("namespace", "", False),
        ("namespace", "ok\n", False),  # a full match: no trailing newline slips through
        ("node_pool", "with_underscore", True),
        ("node_pool", "pool-*", True),
        ("node_pool", "a" * 129, False),
        ("node_pool", "a/b", False),
        ("node_pool", "ok\n", False),
        ("host_volume", "vol-*", True),
        ("host_volume", "with_underscore", False),
        ("host_volume", "", False),
    ],
)
def test_label_rules(block: str, label: str, valid: bool) -> None:
    rules = json.dumps({block: {label: {"policy": "read"}}})
    if valid:
        parse_policy(rules)
    else:
        message = str(parse_error(rules))
        assert message.startswith(("Invalid namespace name", "Invalid node pool name",
                                   "Invalid host volume name"))
        assert label in message or json.dumps(label)[1:-1] in message


# ---------------------------------------------------------------------------------------
# Errors: each of Nomad's, with the line


NS_DUMP = '&acl.NamespacePolicy{Name:"a", Policy:"%s", Capabilities:%s, ' \
          'Variables:(*acl.VariablesPolicy)(nil)}'


@pytest.mark.parametrize(
    ("rules", "message", "line"),
    [
        ('namespace "a b" {\n  policy = "read"\n}',
         'Invalid namespace name: &acl.NamespacePolicy{Name:"a b", Policy:"read", '
         'Capabilities:[]string(nil), Variables:(*acl.VariablesPolicy)(nil)}', 1),
        ('namespace "a" {\n  policy = "admin"\n}',
         "Invalid namespace policy: " + NS_DUMP % ("admin", "[]string(nil)"), 2),
        ('namespace "a" {\n  policy = "list"\n}',
         "Invalid namespace policy: " + NS_DUMP % ("list", "[]string(nil)"), 2),
        ('namespace "a" {\n  capabilities = ["read-job", "fly"]\n}',
         "Invalid namespace capability 'fly': "
         + NS_DUMP % ("", '[]string{"read-job", "fly"}'), 2),
        ('namespace "a" {\n  variables {}\n}',
         "Invalid variable policy: no variable paths in namespace a", 2),
        ('namespace "a" {\n  variables {\n    path { capabilities = ["read"] }\n  }\n}',
         "Invalid missing variable path in namespace a", 3),
        ('namespace "a" {\n  variables {\n    path "/x" { capabilities = ["read"] }\n  }\n}',
         "Invalid variable path \"/x\" in namespace a: cannot start with a leading '/'`", 3),
        ('namespace "a" {\n  variables {\n    path "x" {\n      capabilities = ["read", "own"]'
         '\n    }\n  }\n}',
         "Invalid variable capability 'own' in namespace a", 4),
        ('node_pool "a b" {\n  policy = "read"\n}', "Invalid node pool name 'a b'", 1),
        ('node_pool "a" {\n  policy = "list"\n}', "Invalid node pool policy 'list' for 'a'", 2),
        ('node_pool "a" {\n  capabilities = ["mount"]\n}',
         "Invalid node pool capability 'mount' for 'a'", 2),
        ('host_volume "a_b" {\n  policy = "read"\n}',
         'Invalid host volume name: &acl.HostVolumePolicy{Name:"a_b", Policy:"read", '
         "Capabilities:[]string(nil)}", 1),
        ('host_volume "a" {\n  policy = "mount"\n}',
         'Invalid host volume policy: &acl.HostVolumePolicy{Name:"a", Policy:"mount", '
         "Capabilities:[]string(nil)}", 2),
        ('host_volume "a" {\n  capabilities = ["read"]\n}',
         "Invalid host volume capability 'read': &acl.HostVolumePolicy{Name:\"a\", "
         'Policy:"", Capabilities:[]string{"read"}}', 2),
        ('agent {\n  policy = "list"\n}', 'Invalid agent policy: &acl.AgentPolicy{Policy:"list"}',
         2),
        ("agent {\n}", 'Invalid agent policy: &acl.AgentPolicy{Policy:""}', 1),
        ('node {\n  policy = "admin"\n}', 'Invalid node policy: &acl.NodePolicy{Policy:"admin"}',
         2),
        ("quota {}", 'Invalid quota policy: &acl.QuotaPolicy{Policy:""}', 1),
        ('plugin {\n  policy = "scale"\n}',
         'Invalid plugin policy: &acl.PluginPolicy{Policy:"scale"}', 2),
        ('operator {\n  policy = "list"\n}',
         'Invalid operator policy: &acl.OperatorPolicy{Policy:"list", '
         "Capabilities:[]string(nil)}", 2),
        ('operator {\n  capabilities = ["snapshot-restore"]\n}',
         "Invalid operator capability 'snapshot-restore'", 2),
        ('sentinel {\n  policy = "scale"\n}',
         'Invalid sentinel policy: &acl.SentinelPolicy{Policy:"scale", '
         "Capabilities:[]string(nil)}", 2),
        ('sentinel {\n  capabilities = ["sentinel-override"]\n}',
         "Invalid sentinel capability 'sentinel-override'", 2),
        ('namespace "a" {}\nfoo {}\nbar = 1\n', "Invalid or duplicate policy keys: bar, foo", 2),
        ('node { policy = "read" }\nnode { policy = "write" }\nagent { policy = "read" }\n'
         'agent { policy = "read" }\n', "Invalid or duplicate policy keys: agent, node", 2),
        ("# only a comment\n", "Invalid policy: # only a comment\n", None),
        ("namespace {}", "Failed to parse ACL Policy: invalid acl policy: "
         "namespace block needs a label", 1),
        ('\nnode_pool {\n  policy = "read"\n}',
         "Failed to parse ACL Policy: invalid acl policy: node_pool block needs a label", 2),
        ('namespace "a" {\n  policy = read\n}',
         'Failed to parse ACL Policy: namespace "a": policy: expected a string, '
         "got expression read", 2),
        ('namespace "a" {\n  capabilities = "read-job"\n}',
         'Failed to parse ACL Policy: namespace "a": capabilities: expected a list of '
         "strings, got string", 2),
        ('node "x" {\n  policy = "read"\n}',
         "Failed to parse ACL Policy: node: expected a block without labels", 1),
        ('namespace "a" "b" {\n  policy = "read"\n}',
         'Failed to parse ACL Policy: namespace "a": expected a block with exactly one label',
         1),
        ('namespace = "a"', "Failed to parse ACL Policy: namespace: expected a block, "
         "got string", 1),
    ],
)
def test_invalid_rules(rules: str, message: str, line: int | None) -> None:
    error = parse_error(rules)
    assert (error.message, error.line) == (message, line)
    assert str(error) == message if line is None else f"{message} (line {line})"


@pytest.mark.parametrize(
    ("rules", "message_start", "line"),
    [
        ('namespace "a" {\n  policy =\n}', "Failed to parse ACL Policy: syntax error", 2),
        ('namespace "a" {\n  policy = "read"\n', "Failed to parse ACL Policy: syntax error", 3),
        ('\n\nnamespace "a" { policy = "read" }}', "Failed to parse ACL Policy: syntax error", 3),
        ('node { policy = "${x}" } x', "Failed to parse ACL Policy: syntax error", 1),
        ('{"node": {"policy": "read"},\n "agent": }', "Failed to parse ACL Policy: Expecting", 2),
        ('{"node": {"policy": "read"}}\n{}', "Failed to parse ACL Policy: Extra data", 2),
        ('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}",
         "Failed to parse ACL Policy: JSON nested too deeply", None),
    ],
)
def test_syntax_errors_name_their_line(rules: str, message_start: str, line: int | None) -> None:
    error = parse_error(rules)
    assert error.message.startswith(message_start)
    assert error.line == line


def test_hcl_interpolation_stays_text_and_fails_validation() -> None:
    assert parse_error('node { policy = "${x}" }').message == (
        'Invalid node policy: &acl.NodePolicy{Policy:"${x}"}')


@pytest.mark.parametrize(
    ("rules", "strict_message"),
    [
        ('namespace "a" { policy = "read" }\nfoo { x = 1 }',
         "Invalid or duplicate policy keys: foo"),
        ('namespace "a" { policy = "read" }\nnode { policy = "write" }\nnode { policy = "read" }',
         "Invalid or duplicate policy keys: node"),
        ('{"namespace": {"a": {"policy": "read"}}, "node": {"policy": "write"},'
         ' "node": {"policy": "read"}}', "Invalid or duplicate policy keys: node"),
    ],
)
def test_lenient_mode_ignores_what_strict_mode_refuses(rules: str, strict_message: str) -> None:
    assert parse_error(rules).message == strict_message
    policy = parse_policy(rules, strict=False)
    assert policy.namespaces == (NamespaceRule("a", "read", frozenset(NS_READ)),)
    assert policy.node in ("", "write")  # a repeated singleton: the first one counts


def test_lenient_mode_still_validates_blocks() -> None:
    assert parse_error('namespace "a" { policy = "x" }\nfoo {}', strict=False).message \
        .startswith("Invalid namespace policy")
    assert parse_error("foo {}", strict=False).message == "Invalid policy: foo {}"


def test_unknown_keys_inside_blocks_are_ignored() -> None:
    policy = parse_policy('namespace "a" {\n  policy = "read"\n  polcy = "write"\n}')
    assert policy.namespaces[0].capabilities == NS_READ


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ("", Policy()),
        ("operator {}", Policy()),
        ('namespace "a" {}', Policy(namespaces=(NamespaceRule("a", "", frozenset()),))),
        ('agent { policy = "scale" }', Policy(agent="scale")),
    ],
)
def test_policies_granting_nothing(rules: str, expected: Policy) -> None:
    assert parse_policy(rules) == expected


@pytest.mark.parametrize("rules", ["  ", "\n", "{}", '{"namespace": {}}'])
def test_blank_or_blockless_rules_are_invalid(rules: str) -> None:
    assert parse_error(rules).message == f"Invalid policy: {rules}"


# ---------------------------------------------------------------------------------------
# HCL and JSON give the same Policy


SAME_POLICY: list[tuple[str, str]] = [
    (
        'namespace "default" {\n  policy       = "read"\n  capabilities = ["submit-job"]\n'
        '  variables {\n    path "nomad/jobs/*" { capabilities = ["read"] }\n  }\n}\n'
        'node { policy = "read" }\n',
        '{"namespace": {"default": {"policy": "read", "capabilities": ["submit-job"],\n'
        '   "variables": {"path": {"nomad/jobs/*": {"capabilities": ["read"]}}}}},\n'
        ' "node": {"policy": "read"}}',
    ),
    (
        'namespace "a" { policy = "read" }\nnamespace "b" { policy = "write" }\n',
        '{"namespace": [{"a": {"policy": "read"}}, {"b": {"policy": "write"}}]}',
    ),
    (
        'namespace "a" { policy = "read" }\nnamespace "b" { policy = "write" }\n',
        '{"namespace": {"a": {"policy": "read"}, "b": {"policy": "write"}}}',
    ),
    (
        'namespace "a" { policy = "read" }\nnamespace "a" { policy = "write" }\n',
        '{"namespace": {"a": [{"policy": "read"}, {"policy": "write"}]}}',
    ),
    (
        'node_pool "p-*" { policy = "write" }\nhost_volume "v" { capabilities = ["deny"] }\n'
        'operator { policy = "read" }\nplugin { policy = "list" }\nagent { policy = "deny" }\n'
        'quota { policy = "write" }\n',
        '{"node_pool": [{"p-*": {"policy": "write"}}], "host_volume": {"v": '
        '{"capabilities": ["deny"]}}, "operator": [{"policy": "read"}], "plugin": '
        '{"policy": "list"}, "agent": {"policy": "deny"}, "quota": {"policy": "write"}}',
    ),
    (
        'namespace "x" {\n  variables {\n    path "a" { capabilities = ["read"] }\n'
        '    path "b/*" { capabilities = ["write", "deny"] }\n  }\n}\n',
        '{"namespace": {"x": {"variables": [{"path": [{"a": {"capabilities": ["read"]}},'
        ' {"b/*": {"capabilities": ["write", "deny"]}}]}]}}}',
    ),
]


@pytest.mark.parametrize(("hcl", "json_rules"), SAME_POLICY)
def test_hcl_and_json_forms_give_the_same_policy(hcl: str, json_rules: str) -> None:
    assert parse_policy(hcl) == parse_policy(json_rules)


def test_json_errors_have_no_line_but_name_the_value() -> None:
    error = parse_error('{"namespace": {"a": {"policy": "root"}}}')
    assert error.line is None
    assert '"root"' in error.message


# ---------------------------------------------------------------------------------------
# RulesJSON


def test_rules_json_of_the_reference_example() -> None:
    hcl, _ = SAME_POLICY[0]
    rules_json = policy_to_rules_json(parse_policy(hcl), hcl)
    namespace = rules_json.pop("Namespaces")
    assert rules_json == {
        "NodePools": None, "HostVolumes": None, "Agent": None, "Node": {"Policy": "read"},
        "Operator": None, "Sentinel": None, "Quota": None, "Plugin": None, "Raw": hcl,
        "ExtraKeysHCL": None,
    }
    assert len(namespace) == 1
    assert namespace[0]["Name"] == "default"
    assert namespace[0]["Policy"] == "read"
    assert sorted(namespace[0]["Capabilities"]) == sorted(NS_READ | {"submit-job"})
    assert namespace[0]["Variables"] == {
        "Paths": [{"PathSpec": "nomad/jobs/*", "Capabilities": ["read", "list"]}]}
    json.dumps(rules_json)  # plain JSON types only


def test_rules_json_of_every_block() -> None:
    rules = (
        'namespace "a" {}\nnode_pool "p" { policy = "write" }\n'
        'host_volume "v" { policy = "read" }\nagent { policy = "write" }\n'
        'operator { policy = "read" }\nsentinel { policy = "read" }\n'
        'quota { policy = "read" }\nplugin { policy = "list" }\n'
    )
    expected: dict[str, Any] = {
        "Namespaces": [{"Name": "a", "Policy": "", "Capabilities": None, "Variables": None}],
        "NodePools": [{"Name": "p", "Policy": "write",
                       "Capabilities": ["read", "write", "delete"]}],
        "HostVolumes": [{"Name": "v", "Policy": "read", "Capabilities": ["mount-readonly"]}],
        "Agent": {"Policy": "write"},
        "Node": None,
        "Operator": {"Policy": "read", "Capabilities": ["license-read", "keyring-read"]},
        "Sentinel": {"Policy": "read", "Capabilities": ["sentinel-read"]},
        "Quota": {"Policy": "read"},
        "Plugin": {"Policy": "list"},
        "Raw": rules,
        "ExtraKeysHCL": None,
    }
    assert policy_to_rules_json(parse_policy(rules), rules) == expected


def test_rules_json_of_the_empty_policy() -> None:
    rules_json = policy_to_rules_json(parse_policy(""), "")
    assert rules_json["Raw"] == ""
    assert all(value is None for key, value in rules_json.items() if key != "Raw")
