"""The ACL policy language: rules text (HCL or JSON) -> a validated ``Policy`` with every
coarse ``policy`` expanded to its capabilities, and the ``RulesJSON`` view of it.

Nomad's parser reads HCL v1, which also reads JSON (a document starting with ``{``); ours
reads HCL through the project's one HCL front-end (``jobspec.plain``) and JSON through
``json``, then decodes both shapes with one decoder. Error texts follow Nomad's (their Go
``%#v`` dumps included) and end with the line when the source knows it. Strict parsing
(policy upsert) refuses unknown top-level keys and repeated singleton blocks; lenient parsing
(evaluating stored policies) ignores them. Pure computation.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import attrs

from nomad_client.acl.capabilities import (
    DENY,
    HOST_VOLUME_CAPABILITIES,
    HOST_VOLUME_EXPANSION,
    NAMESPACE_CAPABILITIES,
    NODE_POOL_CAPABILITIES,
    NODE_POOL_EXPANSION,
    OPERATOR_CAPABILITIES,
    OPERATOR_EXPANSION,
    PLUGIN_POLICY_LEVELS,
    POLICY_LEVELS,
    READ,
    SENTINEL_CAPABILITIES,
    SENTINEL_EXPANSION,
    VARIABLE_CAPABILITIES,
    WRITE,
    expand,
    expand_namespace,
    expand_variables,
    in_order,
)
from nomad_client.jobspec.errors import JobspecError, type_name
from nomad_client.jobspec.plain import PlainBody, parse_plain
from nomad_client.jobspec.values import as_hcl_string

NAMESPACE_NAME = re.compile(r"[a-zA-Z0-9*-]{1,128}")
NODE_POOL_NAME = re.compile(r"[a-zA-Z0-9_*-]{1,128}")
HOST_VOLUME_NAME = re.compile(r"[a-zA-Z0-9*-]{1,128}")

_LABELLED_BLOCKS = ("namespace", "node_pool", "host_volume")
_SINGLETON_BLOCKS = ("agent", "node", "operator", "quota", "plugin", "sentinel")
_SENTINEL_LEVELS = frozenset({DENY, READ, WRITE})
_PARSE_FAILED = "Failed to parse ACL Policy: "


class PolicyError(ValueError):
    """Rules that do not parse or validate; the text is Nomad's, plus the line if known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"{message} (line {line})")
        self.message = message
        self.line = line


@attrs.frozen
class VariablesPathRule:
    path: str
    capabilities: frozenset[str]  # expanded: read brings list, deny stands alone


@attrs.frozen
class NamespaceRule:
    name: str
    policy: str
    capabilities: frozenset[str]  # explicit plus expanded
    variables: tuple[VariablesPathRule, ...] = ()


@attrs.frozen
class LabeledRule:
    """A ``node_pool`` or ``host_volume`` block."""

    name: str
    policy: str
    capabilities: frozenset[str]


@attrs.frozen
class Policy:
    """One policy's rules, validated and expanded; repeated blocks stay separate (the ACL
    compiler merges them)."""

    namespaces: tuple[NamespaceRule, ...] = ()
    node_pools: tuple[LabeledRule, ...] = ()
    host_volumes: tuple[LabeledRule, ...] = ()
    # Singleton levels; "" when the block is absent.
    agent: str = ""
    node: str = ""
    operator: str = ""
    quota: str = ""
    plugin: str = ""
    operator_capabilities: frozenset[str] = frozenset()
    # Enterprise's block, accepted and validated as Nomad CE does.
    sentinel: str = ""
    sentinel_capabilities: frozenset[str] = frozenset()


# --------------------------------------------------------------------------------------
# Reading the text: HCL or JSON -> nested dicts and lists of the same shape


def _read_rules(rules: str) -> tuple[dict[str, Any], bool]:
    """The rules as data, and whether they were HCL (whose bodies know their lines)."""
    if rules.lstrip().startswith("{"):  # how HCL v1 tells JSON apart
        try:
            data = json.loads(rules, object_pairs_hook=_repeat_keys_as_blocks)
        except json.JSONDecodeError as err:
            raise PolicyError(_PARSE_FAILED + err.msg, err.lineno) from None
        except RecursionError:
            raise PolicyError(_PARSE_FAILED + "JSON nested too deeply") from None
        return data, False
    try:
        return parse_plain(rules, "rules").data, True
    except JobspecError as err:
        raise PolicyError(_PARSE_FAILED + err.message, err.line) from None


def _repeat_keys_as_blocks(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A key given twice in one JSON object is a block given twice, as in HCL v1."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        out[key] = [*_as_list(out[key]), *_as_list(value)] if key in out else value
    return out


def _as_list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else [value]


def _line(body: Mapping[str, Any], key: str | None = None) -> int | None:
    """The line of ``key`` in ``body`` (else of the block itself), when the source is HCL."""
    if not isinstance(body, PlainBody):
        return None
    if key is not None and key in body.key_lines:
        return body.key_lines[key]
    return body.line


def _shape_error(where: str, problem: str, line: int | None) -> PolicyError:
    return PolicyError(f"{_PARSE_FAILED}{where}: {problem}", line)


# --------------------------------------------------------------------------------------
# Decoding: data -> blocks as written (nothing validated yet)


@attrs.frozen
class _PathBlock:
    spec: str
    capabilities: tuple[str, ...]
    line: int | None
    capabilities_line: int | None


@attrs.frozen
class _Block:
    """One block as written: its label ("" for singletons), ``policy`` and ``capabilities``,
    with the lines to blame for each."""

    label: str
    policy: str
    capabilities: tuple[str, ...]
    line: int | None
    policy_line: int | None
    capabilities_line: int | None
    variables: tuple[_PathBlock, ...] | None = None  # None: no ``variables`` block
    variables_line: int | None = None


def _text(body: Mapping[str, Any], key: str, where: str) -> str:
    value = body.get(key)
    if value is None:
        return ""
    text = as_hcl_string(value)
    if text is None:
        raise _shape_error(where, f"{key}: expected a string, got {type_name(value)}",
                           _line(body, key))
    return text


def _texts(body: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = body.get(key)
    if value is None:
        return ()
    texts = [as_hcl_string(item) for item in value] if isinstance(value, list) else [None]
    if None in texts:
        raise _shape_error(where, f"{key}: expected a list of strings, got {type_name(value)}",
                           _line(body, key))
    return tuple(t for t in texts if t is not None)


def _bodies(
    value: Any, where: str, hcl: bool, line: int | None
) -> Iterator[Mapping[str, Any]]:
    """The bodies of an unlabelled block given once or repeated (a dict, or a list)."""
    for item in _as_list(value):
        if not isinstance(item, dict):
            raise _shape_error(where, f"expected a block, got {type_name(item)}", line)
        if hcl and not isinstance(item, PlainBody):
            raise _shape_error(where, "expected a block without labels", line)
        yield item


def _labelled(
    value: Any, kind: str, hcl: bool, line: int | None, label_required: bool = True
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """(label, body) of every block of a labelled ``kind``: in HCL, ``kind "label" {}``; in
    JSON ``{"label": {...}}``, a list of those, or a list of bodies per label."""
    for item in _as_list(value):
        if isinstance(item, PlainBody):  # HCL: a block written without its label
            if label_required:
                # Nomad's decoder panics on this; its message says so.
                raise _shape_error("invalid acl policy", f"{kind} block needs a label",
                                   _line(item))
            yield "", item
            continue
        if not isinstance(item, dict):
            raise _shape_error(kind, f"expected a block, got {type_name(item)}", line)
        for label, labelled_value in item.items():
            where = f"{kind} {json.dumps(label)}"
            for body in _as_list(labelled_value):
                if not isinstance(body, dict):
                    raise _shape_error(where, f"expected a block, got {type_name(body)}", line)
                if hcl and not isinstance(body, PlainBody):
                    raise _shape_error(where, "expected a block with exactly one label", line)
                yield label, body


def _block(label: str, body: Mapping[str, Any], where: str) -> _Block:
    return _Block(
        label=label,
        policy=_text(body, "policy", where),
        capabilities=_texts(body, "capabilities", where),
        line=_line(body),
        policy_line=_line(body, "policy"),
        capabilities_line=_line(body, "capabilities"),
    )


def _namespace_block(label: str, body: Mapping[str, Any], hcl: bool) -> _Block:
    where = f"namespace {json.dumps(label)}"
    block = _block(label, body, where)
    if "variables" not in body:
        return block
    paths = []
    for variables in _bodies(body["variables"], f"{where} variables", hcl,
                             _line(body, "variables")):
        for spec, path_body in _labelled(variables.get("path", []), "path", hcl,
                                         _line(variables, "path"), label_required=False):
            path_where = f"{where} variables path {json.dumps(spec)}"
            paths.append(_PathBlock(spec, _texts(path_body, "capabilities", path_where),
                                    _line(path_body), _line(path_body, "capabilities")))
    return attrs.evolve(block, variables=tuple(paths), variables_line=_line(body, "variables"))


@attrs.frozen
class _Document:
    """Every block of the rules, as written."""

    labelled: Mapping[str, list[_Block]]
    singletons: Mapping[str, _Block]
    # Top-level keys strict parsing refuses (unknown, or a singleton repeated), sorted.
    extra_keys: tuple[str, ...]
    extra_keys_line: int | None


def _decode(top: Mapping[str, Any], hcl: bool) -> _Document:
    labelled: dict[str, list[_Block]] = {kind: [] for kind in _LABELLED_BLOCKS}
    singletons: dict[str, _Block] = {}
    extra: dict[str, int | None] = {}
    for key, value in top.items():
        key_line = _line(top, key)
        if key in labelled:
            for label, body in _labelled(value, key, hcl, key_line):
                block = (_namespace_block(label, body, hcl) if key == "namespace"
                         else _block(label, body, f"{key} {json.dumps(label)}"))
                labelled[key].append(block)
        elif key in _SINGLETON_BLOCKS:
            bodies = list(_bodies(value, key, hcl, key_line))
            if bodies:  # a repeated singleton: the first counts when parsing leniently
                singletons[key] = _block("", bodies[0], key)
            if len(bodies) > 1:
                extra[key] = _line(bodies[1])
        else:
            extra[key] = key_line
    lines = [line for line in extra.values() if line is not None]
    return _Document(labelled, singletons, tuple(sorted(extra)), min(lines, default=None))


# --------------------------------------------------------------------------------------
# Validation and expansion (Nomad's order, so the first problem reported is Nomad's)


def _go_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


def _go_strings(items: Sequence[str]) -> str:
    if not items:
        return "[]string(nil)"
    return "[]string{" + ", ".join(_go_string(item) for item in items) + "}"


def _go_dump(go_type: str, block: _Block, *, label: bool = True, caps: bool = True) -> str:
    """The block as Go's ``%#v`` prints Nomad's struct (Nomad's errors embed it)."""
    fields = [f"Name:{_go_string(block.label)}"] if label else []
    fields.append(f"Policy:{_go_string(block.policy)}")
    if caps:
        fields.append(f"Capabilities:{_go_strings(block.capabilities)}")
    if go_type == "NamespacePolicy":
        if block.variables is None:
            fields.append("Variables:(*acl.VariablesPolicy)(nil)")
        else:
            paths = ", ".join(
                f"&acl.VariablesPathPolicy{{PathSpec:{_go_string(p.spec)}, "
                f"Capabilities:{_go_strings(p.capabilities)}}}"
                for p in block.variables
            )
            fields.append(
                f"Variables:&acl.VariablesPolicy{{Paths:[]*acl.VariablesPathPolicy{{{paths}}}}}"
            )
    return f"&acl.{go_type}{{{', '.join(fields)}}}"


@attrs.frozen
class _LabelChecks:
    """How one labelled block kind is validated, and Nomad's texts for its problems."""

    name: re.Pattern[str]
    vocabulary: tuple[str, ...]
    bad_name: Callable[[_Block], str]
    bad_policy: Callable[[_Block], str]
    bad_capability: Callable[[_Block, str], str]

    def check(self, block: _Block) -> None:
        if not self.name.fullmatch(block.label):
            raise PolicyError(self.bad_name(block), block.line)
        if block.policy and block.policy not in POLICY_LEVELS:
            raise PolicyError(self.bad_policy(block), block.policy_line)
        for cap in block.capabilities:
            if cap not in self.vocabulary:
                raise PolicyError(self.bad_capability(block, cap), block.capabilities_line)


def _checks_with_dump(
    name: re.Pattern[str], vocabulary: tuple[str, ...], kind: str, go_type: str
) -> _LabelChecks:
    """Checks whose texts end with the whole block as Go prints it (Nomad's wording for
    namespaces and host volumes)."""
    return _LabelChecks(
        name,
        vocabulary,
        bad_name=lambda block: f"Invalid {kind} name: {_go_dump(go_type, block)}",
        bad_policy=lambda block: f"Invalid {kind} policy: {_go_dump(go_type, block)}",
        bad_capability=lambda block, cap: (
            f"Invalid {kind} capability '{cap}': {_go_dump(go_type, block)}"),
    )


_NAMESPACE_CHECKS = _checks_with_dump(
    NAMESPACE_NAME, NAMESPACE_CAPABILITIES, "namespace", "NamespacePolicy")
_NODE_POOL_CHECKS = _LabelChecks(
    NODE_POOL_NAME,
    NODE_POOL_CAPABILITIES,
    bad_name=lambda block: f"Invalid node pool name '{block.label}'",
    bad_policy=lambda block: f"Invalid node pool policy '{block.policy}' for '{block.label}'",
    bad_capability=lambda block, cap: f"Invalid node pool capability '{cap}' for '{block.label}'",
)
_HOST_VOLUME_CHECKS = _checks_with_dump(
    HOST_VOLUME_NAME, HOST_VOLUME_CAPABILITIES, "host volume", "HostVolumePolicy")


def _namespace_rule(block: _Block) -> NamespaceRule:
    _NAMESPACE_CHECKS.check(block)
    capabilities = expand_namespace(block.policy, block.capabilities)
    if block.variables is None:
        return NamespaceRule(block.label, block.policy, capabilities)
    return NamespaceRule(block.label, block.policy, capabilities,
                         _variables_rules(block.label, block.variables, block.variables_line))


def _variables_rules(
    namespace: str, paths: tuple[_PathBlock, ...], line: int | None
) -> tuple[VariablesPathRule, ...]:
    if not paths:
        raise PolicyError(
            f"Invalid variable policy: no variable paths in namespace {namespace}", line)
    rules = []
    for path in paths:
        if path.spec == "":
            raise PolicyError(f"Invalid missing variable path in namespace {namespace}",
                              path.line)
        if path.spec.startswith("/"):
            # The stray backtick is Nomad's [quirk].
            raise PolicyError(
                f"Invalid variable path {_go_string(path.spec)} in namespace {namespace}: "
                "cannot start with a leading '/'`",
                path.line,
            )
        for cap in path.capabilities:
            if cap not in VARIABLE_CAPABILITIES:
                raise PolicyError(f"Invalid variable capability '{cap}' in namespace {namespace}",
                                  path.capabilities_line)
        rules.append(VariablesPathRule(path.spec, expand_variables(path.capabilities)))
    return tuple(rules)


def _labelled_rule(
    block: _Block, checks: _LabelChecks, expansion: Mapping[str, frozenset[str]]
) -> LabeledRule:
    checks.check(block)
    return LabeledRule(block.label, block.policy,
                       expand(block.policy, block.capabilities, expansion))


def _level(block: _Block | None, name: str, levels: frozenset[str], required: bool) -> str:
    """A singleton's ``policy``, checked against ``levels`` (empty only if not required)."""
    if block is None:
        return ""
    if (required or block.policy) and block.policy not in levels:
        go_type = f"{name.capitalize()}Policy"
        dump = _go_dump(go_type, block, label=False, caps=name in ("operator", "sentinel"))
        raise PolicyError(f"Invalid {name} policy: {dump}", block.policy_line)
    return block.policy


def _level_capabilities(
    block: _Block | None,
    name: str,
    vocabulary: tuple[str, ...],
    expansion: Mapping[str, frozenset[str]],
) -> frozenset[str]:
    if block is None:
        return frozenset()
    for cap in block.capabilities:
        if cap not in vocabulary:
            raise PolicyError(f"Invalid {name} capability '{cap}'", block.capabilities_line)
    return expand(block.policy, block.capabilities, expansion)


def parse_policy(rules: str, *, strict: bool = True) -> Policy:
    """Parse and validate ACL policy rules (HCL or JSON); raises ``PolicyError``."""
    if rules == "":
        return Policy()  # [quirk] Nomad accepts empty rules: a policy granting nothing
    top, hcl = _read_rules(rules)
    document = _decode(top, hcl)
    if strict and document.extra_keys:
        raise PolicyError(
            "Invalid or duplicate policy keys: " + ", ".join(document.extra_keys),
            document.extra_keys_line,
        )
    if not document.singletons and not any(document.labelled.values()):
        raise PolicyError(f"Invalid policy: {rules}")
    namespaces = tuple(_namespace_rule(b) for b in document.labelled["namespace"])
    node_pools = tuple(_labelled_rule(b, _NODE_POOL_CHECKS, NODE_POOL_EXPANSION)
                       for b in document.labelled["node_pool"])
    host_volumes = tuple(_labelled_rule(b, _HOST_VOLUME_CHECKS, HOST_VOLUME_EXPANSION)
                         for b in document.labelled["host_volume"])
    single = document.singletons.get
    agent = _level(single("agent"), "agent", POLICY_LEVELS, required=True)
    node = _level(single("node"), "node", POLICY_LEVELS, required=True)
    operator = _level(single("operator"), "operator", POLICY_LEVELS, required=False)
    operator_caps = _level_capabilities(single("operator"), "operator", OPERATOR_CAPABILITIES,
                                        OPERATOR_EXPANSION)
    quota = _level(single("quota"), "quota", POLICY_LEVELS, required=True)
    plugin = _level(single("plugin"), "plugin", PLUGIN_POLICY_LEVELS, required=True)
    sentinel = _level(single("sentinel"), "sentinel", _SENTINEL_LEVELS, required=False)
    sentinel_caps = _level_capabilities(single("sentinel"), "sentinel", SENTINEL_CAPABILITIES,
                                        SENTINEL_EXPANSION)
    return Policy(
        namespaces=namespaces,
        node_pools=node_pools,
        host_volumes=host_volumes,
        agent=agent,
        node=node,
        operator=operator,
        quota=quota,
        plugin=plugin,
        operator_capabilities=operator_caps,
        sentinel=sentinel,
        sentinel_capabilities=sentinel_caps,
    )


# --------------------------------------------------------------------------------------
# RulesJSON: the parsed policy with Nomad's Go field names


def _go_list(items: list[Any]) -> list[Any] | None:
    return items or None  # a nil Go slice encodes as null


def _labelled_json(rules: Iterable[LabeledRule], vocabulary: tuple[str, ...]
                   ) -> list[dict[str, Any]] | None:
    return _go_list([
        {"Name": r.name, "Policy": r.policy,
         "Capabilities": _go_list(in_order(r.capabilities, vocabulary))}
        for r in rules
    ])


def _namespace_json(rule: NamespaceRule) -> dict[str, Any]:
    variables = None
    if rule.variables:
        variables = {"Paths": [
            {"PathSpec": p.path,
             "Capabilities": _go_list(in_order(p.capabilities, VARIABLE_CAPABILITIES))}
            for p in rule.variables
        ]}
    return {
        "Name": rule.name,
        "Policy": rule.policy,
        "Capabilities": _go_list(in_order(rule.capabilities, NAMESPACE_CAPABILITIES)),
        "Variables": variables,
    }


def _level_json(level: str, capabilities: frozenset[str] | None = None,
                vocabulary: tuple[str, ...] = ()) -> dict[str, Any] | None:
    if capabilities is None:
        return {"Policy": level} if level else None
    if not level and not capabilities:
        return None
    return {"Policy": level, "Capabilities": _go_list(in_order(capabilities, vocabulary))}


def policy_to_rules_json(policy: Policy, raw: str) -> dict[str, Any]:
    """Nomad's ``RulesJSON``: the parsed structure (expanded capabilities, listed in the
    vocabulary's order) with Go field names; ``raw`` is the stored rules text."""
    return {
        "Namespaces": _go_list([_namespace_json(ns) for ns in policy.namespaces]),
        "NodePools": _labelled_json(policy.node_pools, NODE_POOL_CAPABILITIES),
        "HostVolumes": _labelled_json(policy.host_volumes, HOST_VOLUME_CAPABILITIES),
        "Agent": _level_json(policy.agent),
        "Node": _level_json(policy.node),
        "Operator": _level_json(policy.operator, policy.operator_capabilities,
                                OPERATOR_CAPABILITIES),
        "Sentinel": _level_json(policy.sentinel, policy.sentinel_capabilities,
                                SENTINEL_CAPABILITIES),
        "Quota": _level_json(policy.quota),
        "Plugin": _level_json(policy.plugin),
        "Raw": raw,
        "ExtraKeysHCL": None,
    }
