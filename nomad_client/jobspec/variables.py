"""Input variables of a jobspec: ``variable`` blocks, var files and ``-var`` flags.

Decides the final value of every declared variable (default < var files, later
files winning < command line), converting supplied values to the declared type.
Pure computation: var files arrive as text, never read from disk here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from nomad_client.jobspec.errors import JobspecError, short_repr, type_name
from nomad_client.jobspec.evaluate import Evaluator, Scope
from nomad_client.jobspec.limits import LimitError, Meter
from nomad_client.jobspec.syntax import Block, Source, parse_body, parse_expression
from nomad_client.jobspec.values import as_hcl_bool, as_hcl_string

VAR_FILE_NAME = "<var-file>"
CLI_NAME = "-var"

_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_-]*\Z")  # \Z: `$` accepts a trailing newline
_TYPE_RE = re.compile(r"^(string|number|bool|any|list|set|map|object|tuple)(\(.*\))?$", re.S)
_VARIABLE_ATTRS = {"default", "type", "description", "sensitive", "nullable"}


@attrs.frozen
class VariableDecl:
    """One ``variable "name" {}`` block."""

    name: str
    type: str | None
    default: Any
    has_default: bool
    line: int | None


def parse_var_assignments(pairs: Sequence[str]) -> dict[str, str]:
    """Turn command-line ``-var NAME=VALUE`` strings into a dict (later ones win)."""
    out: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep:
            raise JobspecError(CLI_NAME, None, f"invalid assignment {pair!r}: expected NAME=VALUE")
        if not _NAME_RE.match(name):
            raise JobspecError(
                CLI_NAME, None, f"invalid assignment {pair!r}: {name!r} is not a valid name"
            )
        out[name] = value
    return out


def declare_variables(
    blocks: Sequence[Block], source: Source, meter: Meter | None = None
) -> dict[str, VariableDecl]:
    """Read every top-level ``variable`` block."""
    decls: dict[str, VariableDecl] = {}
    meter = meter if meter is not None else Meter()
    empty = Evaluator(source, Scope({}, meter=meter))
    for block in blocks:
        where = f'variable "{block.labels[0]}"' if block.labels else "variable"
        if len(block.labels) != 1:
            raise JobspecError(
                source.filename, block.line, f"{where}: a variable block needs exactly one label"
            )
        name = block.labels[0]
        if not _NAME_RE.match(name):
            raise JobspecError(source.filename, block.line, f"{where}: invalid variable name")
        if name in decls:
            raise JobspecError(
                source.filename,
                block.line,
                f"{where}: declared more than once (first at line {decls[name].line})",
            )
        if block.body.blocks:
            inner = block.body.blocks[0]
            raise JobspecError(
                source.filename, inner.line, f"{where}: block {inner.type!r} is not supported"
            )
        attrs_by_name = {a.name: a for a in block.body.attributes}
        for attr in block.body.attributes:
            if attr.name not in _VARIABLE_ATTRS:
                raise JobspecError(
                    source.filename,
                    attr.line,
                    f"{where}: unknown attribute {attr.name!r} "
                    f"(expected one of {', '.join(sorted(_VARIABLE_ATTRS))})",
                )
        var_type = None
        if "type" in attrs_by_name:
            t_attr = attrs_by_name["type"]
            var_type = re.sub(r"\s+", "", source.snippet(t_attr.expr))
            if not _TYPE_RE.match(var_type):
                raise JobspecError(
                    source.filename, t_attr.line, f"{where}: unknown type {var_type!r}"
                )
        default: Any = None
        has_default = "default" in attrs_by_name
        if has_default:
            d_attr = attrs_by_name["default"]
            default = _convert(
                empty.constant(d_attr.expr, f"{where}: default"),
                var_type,
                source.filename,
                d_attr.line,
                f"{where}: default",
                meter,
            )
        decls[name] = VariableDecl(name, var_type, default, has_default, block.line)
    return decls


def resolve_variables(
    decls: Mapping[str, VariableDecl],
    filename: str,
    variables: Mapping[str, str] | None,
    var_files: Sequence[tuple[str, str]] = (),
    meter: Meter | None = None,
) -> dict[str, Any]:
    """Final variable values: defaults, overridden by each var file in turn, then by
    ``variables``.

    ``var_files`` are ``(name, text)`` pairs; a later file wins over an earlier one,
    and errors name the file they are in and a line of that file.
    """
    meter = meter if meter is not None else Meter()
    values: dict[str, Any] = {d.name: d.default for d in decls.values() if d.has_default}
    for var_file, text in var_files:
        values.update(_read_var_file(decls, filename, var_file, text, meter))
    for name, raw in (variables or {}).items():
        decl = decls.get(name)
        if decl is None:
            raise JobspecError(
                filename,
                None,
                f"value supplied for undeclared variable {name!r} "
                f'(declare it with a variable "{name}" block)',
            )
        values[name] = _from_cli(name, raw, decl, meter)
    for decl in decls.values():
        if decl.name not in values:
            raise JobspecError(
                filename,
                decl.line,
                f"variable {decl.name!r} has no default and no value was supplied "
                f"(use -var {decl.name}=VALUE or a variables file)",
            )
    return values


def _read_var_file(
    decls: Mapping[str, VariableDecl], filename: str, var_file: str, text: str, meter: Meter
) -> dict[str, Any]:
    """The values one variables file assigns."""
    if not text.strip():
        return {}
    body, vsource = parse_body(text, var_file)
    if body.blocks:
        raise JobspecError(
            var_file,
            body.blocks[0].line,
            f"a variables file may only contain NAME = value assignments, "
            f"found block {body.blocks[0].type!r}",
        )
    evaluator = Evaluator(vsource, Scope({}, meter=meter))
    values: dict[str, Any] = {}
    for attr in body.attributes:
        decl = decls.get(attr.name)
        if decl is None:
            raise JobspecError(
                var_file,
                attr.line,
                f"value for undeclared variable {attr.name!r} "
                f'(the jobspec {filename} has no variable "{attr.name}" block)',
            )
        values[attr.name] = _convert(
            evaluator.constant(attr.expr, attr.name),
            decl.type,
            var_file,
            attr.line,
            attr.name,
            meter,
        )
    return values


def _from_cli(name: str, raw: str, decl: VariableDecl, meter: Meter) -> Any:
    # Like Nomad, a command-line value is a plain string unless the declared
    # type asks for something else, in which case it is read as HCL.
    if decl.type in (None, "string"):
        return raw
    if not isinstance(raw, str):
        raise JobspecError(CLI_NAME, None, f"{name}: value must be a string, got {raw!r}")
    try:
        expr, source = parse_expression(raw, CLI_NAME)
        value = Evaluator(source, Scope({}, meter=meter)).constant(expr, name)
    except JobspecError as err:
        raise JobspecError(
            CLI_NAME, None, f"{name}={raw!r} is not a valid {decl.type} value ({err.message})"
        ) from None
    return _convert(value, decl.type, CLI_NAME, None, name, meter)


def _convert(
    value: Any,
    var_type: str | None,
    filename: str,
    line: int | None,
    where: str,
    meter: Meter,
) -> Any:
    try:
        converted = convert_to_type(value, var_type)
        # Conversion can make new values (a long numeric string becomes a huge number).
        meter.check(converted)
    except (ValueError, LimitError) as err:
        raise JobspecError(filename, line, f"{where}: {err}") from None
    return converted


def _element_type(var_type: str) -> str | None:
    m = re.match(r"^\w+\((.*)\)$", var_type, re.S)
    return m.group(1) if m else None


def convert_to_type(value: Any, var_type: str | None) -> Any:
    """Convert ``value`` to the HCL type constraint ``var_type`` (a normalized string)."""
    if value is None or var_type in (None, "any"):
        return value
    assert var_type is not None
    kind = var_type.split("(", 1)[0]
    if kind == "string":
        as_string = as_hcl_string(value)
        if as_string is not None:
            return as_string
    elif kind == "number":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            for cast in (int, float):
                try:
                    return cast(value)
                except ValueError:
                    pass
    elif kind == "bool":
        as_bool = as_hcl_bool(value)
        if as_bool is not None:
            return as_bool
    elif kind in ("list", "set", "tuple"):
        if isinstance(value, list):
            inner = _element_type(var_type) if kind != "tuple" else None
            return [convert_to_type(v, inner) for v in value]
    elif kind in ("map", "object"):
        if isinstance(value, dict):
            inner = _element_type(var_type) if kind == "map" else None
            return {k: convert_to_type(v, inner) for k, v in value.items()}
    raise ValueError(
        f"expected a value of type {var_type}, got {type_name(value)} {short_repr(value)}"
    )
