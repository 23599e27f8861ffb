"""Evaluate HCL2 expressions from a jobspec at parse time.

Only ``var.*`` and ``local.*`` references (plus literals, operators and a small
function library) are evaluated here. Any other name - ``NOMAD_SECRETS_DIR``,
``attr.kernel.name``, ``node.unique.name``, ``meta.x``, ``env.X`` - is a
runtime reference that the client interpolates at task start, so the smallest
enclosing ``${...}`` (or bare value) is kept verbatim as source text.
Every value produced is measured against the limits in ``limits``, so a small
jobspec cannot make the evaluator build huge values or recurse without end.
Pure computation: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from lark import Token, Tree

from nomad_client.jobspec.errors import JobspecError, short_repr, type_name
from nomad_client.jobspec.functions import FUNCTIONS, FunctionError
from nomad_client.jobspec.limits import (
    MAX_EXPR_DEPTH,
    MAX_INT_DIGITS,
    LimitError,
    Meter,
    check_int_bits,
    check_int_literal,
    check_string_length,
)
from nomad_client.jobspec.syntax import (
    KEYWORD_VALUES,
    Source,
    decode_escapes,
    heredoc_text,
    object_elements,
    parse_expression,
    subtrees,
)
from nomad_client.jobspec.values import as_hcl_bool, as_hcl_string, number_to_string


class Unresolved(Exception):
    """Internal signal: the expression needs runtime values, keep it verbatim."""


@attrs.frozen
class _Namespace:
    """The value of a bare ``var`` or ``local`` before ``.name`` is applied."""

    kind: str


@attrs.define
class Scope:
    """The names expressions may refer to at parse time.

    ``variables`` holds final variable values. Locals are evaluated lazily on
    first use, so they may refer to each other in any order; cycles are errors.
    ``meter`` measures every value against the limits; share one per parse.
    """

    variables: Mapping[str, Any]
    local_exprs: dict[str, tuple[Tree, Source]] = attrs.field(factory=dict)
    meter: Meter = attrs.field(factory=Meter)
    _local_values: dict[str, Any] = attrs.field(factory=dict, init=False)
    _resolving: list[str] = attrs.field(factory=list, init=False)

    def lookup(self, kind: str, name: str, source: Source, node: Tree | Token) -> Any:
        if kind == "var":
            if name not in self.variables:
                raise source.error(node, f"reference to undeclared variable var.{name}")
            return self.variables[name]
        if name in self._local_values:
            return self._local_values[name]
        if name not in self.local_exprs:
            raise source.error(node, f"reference to undefined local value local.{name}")
        if name in self._resolving:
            cycle = " -> ".join(f"local.{n}" for n in [*self._resolving, name])
            raise source.error(node, f"local values refer to each other in a cycle: {cycle}")
        expr, expr_source = self.local_exprs[name]
        self._resolving.append(name)
        try:
            value = Evaluator(expr_source, self).value(expr)
        finally:
            self._resolving.pop()
        self._local_values[name] = value
        return value


def _short_source(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."


def _parse_number(text: str) -> int | float | None:
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return None


_TEMPLATE_MARK = re.compile(r"\$\$\{|%%\{|\$\{|%\{")


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the ``}`` closing an interpolation whose body begins at ``start``."""
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == '"':
            i += 1
            while i < len(text) and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
        elif ch == "{":
            depth += 1
        elif ch == "}":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    return None


_BINARY: dict[str, Callable[[Any, Any], Any]] = {
    "*": lambda a, b: a * b,
    "%": lambda a, b: a % b,
    "+": lambda a, b: a + b,
    "-": lambda a, b: a - b,
    "<": lambda a, b: a < b,
    ">": lambda a, b: a > b,
    "<=": lambda a, b: a <= b,
    ">=": lambda a, b: a >= b,
}


class Evaluator:
    """Evaluates expression trees from one ``Source`` within a ``Scope``."""

    def __init__(self, source: Source, scope: Scope) -> None:
        self.source = source
        self.scope = scope

    # -- entry points -------------------------------------------------------

    def value(self, node: Tree) -> Any:
        """Evaluate ``node``; a runtime reference yields its source as ``"${...}"``."""
        top = self.scope.meter.depth == 0
        try:
            result = self._eval(node)
        except Unresolved:
            return "${" + self.source.snippet(node).strip() + "}"
        result = self._plain(result, node)
        if top:
            self._charge_result(result, node)
        return result

    def constant(self, node: Tree, what: str) -> Any:
        """Evaluate ``node`` where no runtime reference may appear (defaults, var files)."""
        try:
            result = self._eval(node)
        except Unresolved as unresolved:
            raise self.source.error(
                node,
                f"{what}: {self.source.snippet(node).strip()!r} refers to {unresolved}, "
                "which is not known when the jobspec is parsed",
            ) from None
        result = self._plain(result, node)
        self._charge_result(result, node)
        return result

    def _charge_result(self, value: Any, node: Tree) -> None:
        # A value handed to the caller ends up in the job once per use: count
        # its whole size, so referring to one big local many times is bounded.
        meter = self.scope.meter
        try:
            meter.charge(meter.size(value))
        except LimitError as err:
            raise self._limit_error(node, err) from None

    def _limit_error(self, node: Tree | Token, err: LimitError) -> JobspecError:
        return self.source.error(node, f"{_short_source(self.source.snippet(node))}: {err}")

    def _plain(self, value: Any, node: Tree | Token) -> Any:
        if isinstance(value, _Namespace):
            raise self.source.error(
                node, f"{value.kind!r} must be followed by an attribute, e.g. {value.kind}.name"
            )
        return value

    # -- dispatch -----------------------------------------------------------

    def _eval(self, node: Tree | Token) -> Any:
        if isinstance(node, Token):
            raise self.source.error(node, f"unexpected token {str(node)!r}")
        handler = getattr(self, "_x_" + node.data, None)
        if handler is None:
            raise self.source.error(
                node,
                f"expression {self.source.snippet(node).strip()!r} is not supported here "
                f"({node.data.replace('_', ' ')})",
            )
        meter = self.scope.meter
        if meter.depth >= MAX_EXPR_DEPTH:
            raise self.source.error(
                node, f"expression nested too deeply (more than {MAX_EXPR_DEPTH} levels)"
            )
        meter.depth += 1
        try:
            result = handler(node)
            meter.check(result)
        except LimitError as err:
            raise self._limit_error(node, err) from None
        finally:
            meter.depth -= 1
        return result

    def _x_expr_term(self, node: Tree) -> Any:
        inner = subtrees(node)
        if inner:
            return self._eval(inner[0])
        # A lone token child: heredocs are terminals under expr_term in some trees.
        return self._eval(node.children[0])

    def _x_int_lit(self, node: Tree) -> int:
        text = str(node.children[0])
        check_int_literal(text)
        return int(text)

    def _x_float_lit(self, node: Tree) -> float:
        return float(str(node.children[0]))

    def _x_literal_value(self, node: Tree) -> Any:
        return KEYWORD_VALUES[str(node.children[0])]

    def _x_identifier(self, node: Tree) -> Any:
        name = str(node.children[0])
        if name in ("var", "local"):
            return _Namespace(name)
        raise Unresolved(name)

    def _x_get_attr_expr_term(self, node: Tree) -> Any:
        base_node, get_attr = subtrees(node)
        base = self._eval(base_node)
        key_node = subtrees(get_attr)[0]
        key = str(key_node.children[0])
        return self._index(base, key, node)

    def _x_index_expr_term(self, node: Tree) -> Any:
        base_node, index = subtrees(node)
        base = self._eval(base_node)
        if index.data == "short_index":
            digits = str(index.children[-1])
            check_int_literal(digits)
            key: Any = int(digits)
        else:
            key = self._plain(self._eval(subtrees(index)[0]), index)
        return self._index(base, key, node)

    def _index(self, base: Any, key: Any, node: Tree) -> Any:
        if isinstance(base, _Namespace):
            if not isinstance(key, str):
                raise self.source.error(node, f"{base.kind}[...] needs a string name")
            return self.scope.lookup(base.kind, key, self.source, node)
        what = self.source.snippet(node).strip()
        if isinstance(base, dict):
            if isinstance(key, int | float) and not isinstance(key, bool):
                key = number_to_string(key)
            if not isinstance(key, str):
                raise self.source.error(
                    node, f"{what}: an object key must be a string, got {type_name(key)}"
                )
            if key not in base:
                raise self.source.error(node, f"{what}: object has no attribute {key!r}")
            return base[key]
        if isinstance(base, list):
            if isinstance(key, float) and key.is_integer():
                key = int(key)
            if isinstance(key, str):
                digits = key.removeprefix("-")
                # isdigit() alone accepts digits such as "²" that int() rejects.
                if digits.isascii() and digits.isdigit():
                    if len(digits) > MAX_INT_DIGITS:
                        raise self.source.error(node, f"{what}: index out of range")
                    key = int(key)
            if not isinstance(key, int) or isinstance(key, bool):
                raise self.source.error(node, f"{what}: a list index must be a number")
            if not 0 <= key < len(base):
                raise self.source.error(
                    node, f"{what}: index {key} out of range for list of length {len(base)}"
                )
            return base[key]
        raise self.source.error(node, f"{what}: cannot index a {type_name(base)}")

    def _x_tuple(self, node: Tree) -> list[Any]:
        return [self.value(e) for e in subtrees(node)]

    def _x_object(self, node: Tree) -> dict[str, Any]:
        return {
            key: self.value(value_node)
            for _, key, value_node in object_elements(node, self._object_key, self.source)
        }

    def _object_key(self, node: Tree) -> str:
        inner = subtrees(node)[0] if subtrees(node) else node
        if inner.data == "keyword":
            return str(inner.children[0])
        # A bare identifier key is a literal name, not a reference.
        sub = subtrees(inner)
        if (
            inner.data == "expr_term"
            and len(sub) == 1
            and sub[0].data == "identifier"
            and len(inner.children) == 1
        ):
            return str(sub[0].children[0])
        key = self._plain(self._eval(inner), node)
        if isinstance(key, bool) or not isinstance(key, str | int | float):
            raise self.source.error(node, f"object key must be a string, got {type_name(key)}")
        return key if isinstance(key, str) else number_to_string(key)

    # -- strings ------------------------------------------------------------

    def _x_string(self, node: Tree) -> Any:
        parts = [p for p in node.children if isinstance(p, Tree)]
        # A template that is exactly one interpolation yields the raw value.
        if len(parts) == 1 and isinstance(parts[0].children[0], Tree):
            only = parts[0].children[0]
            if only.data == "interpolation":
                try:
                    return self._plain(self._eval(subtrees(only)[0]), only)
                except Unresolved:
                    return self.source.snippet(only)
        out: list[str] = []
        for part in parts:
            content = part.children[0]
            if isinstance(content, Token):
                if content.type == "STRING_CHARS":
                    try:
                        out.append(decode_escapes(str(content)))
                    except ValueError as err:
                        raise self.source.error(part, str(err)) from None
                else:  # $${ and %%{ escapes
                    out.append(str(content)[1:])
            elif content.data == "interpolation":
                out.append(self._interpolate(content))
            else:
                raise self.source.error(
                    part,
                    "template directives (%{ ... }) are not supported; write %%{ for a literal %{",
                )
        return self._join(out)

    def _join(self, parts: list[str]) -> str:
        """Concatenate template parts, refusing before building an oversized string."""
        length = sum(map(len, parts))
        check_string_length(length)
        self.scope.meter.charge(length)
        return "".join(parts)

    def _interpolate(self, node: Tree) -> str:
        expr = subtrees(node)[0]
        try:
            value = self._eval(expr)
        except Unresolved:
            return self.source.snippet(node)
        return self.to_string(self._plain(value, expr), expr)

    def to_string(self, value: Any, node: Tree | Token) -> str:
        text = as_hcl_string(value)
        if text is not None:
            return text
        raise self.source.error(
            node,
            f"cannot insert a {type_name(value)} value into a string: "
            f"{self.source.snippet(node).strip()!r}",
        )

    def _x_heredoc_template(self, node: Tree) -> str:
        return self._heredoc(node.children[0], trim=False)

    def _x_heredoc_template_trim(self, node: Tree) -> str:
        return self._heredoc(node.children[0], trim=True)

    def _heredoc(self, token: Token | Tree, trim: bool) -> str:
        body = heredoc_text(token, self.source, trim)
        first_line = (self.source.line_of(token) or 1) + 1
        return self._template(body, first_line)

    def _template(self, text: str, first_line: int) -> str:
        """Process ``${...}`` in a heredoc body (the grammar leaves it as raw text)."""
        out: list[str] = []
        pos = 0
        for m in _TEMPLATE_MARK.finditer(text):
            if m.start() < pos:
                continue
            out.append(text[pos : m.start()])
            mark = m.group()
            line = first_line + text.count("\n", 0, m.start())
            if mark in ("$${", "%%{"):
                out.append(mark[1:])
                pos = m.end()
                continue
            if mark == "%{":
                raise JobspecError(
                    self.source.filename,
                    line,
                    "template directives (%{ ... }) are not supported; write %%{ for a literal %{",
                )
            end = _closing_brace(text, m.end())
            if end is None:
                raise JobspecError(self.source.filename, line, "unterminated ${ in heredoc")
            inner = text[m.end() : end]
            expr, sub_source = parse_expression(inner, self.source.filename, line - 1)
            sub = Evaluator(sub_source, self.scope)
            try:
                out.append(sub.to_string(sub._plain(sub._eval(expr), expr), expr))
            except Unresolved:
                out.append(text[m.start() : end + 1])
            pos = end + 1
        out.append(text[pos:])
        return self._join(out)

    def _x_template_string(self, node: Tree) -> str:
        raise self.source.error(node, "template directives are not supported")

    # -- operators ----------------------------------------------------------

    def _number(self, value: Any, node: Tree) -> int | float:
        if isinstance(value, bool) or value is None:
            raise self.source.error(node, f"expected a number, got {type_name(value)}")
        if isinstance(value, int | float):
            return value
        if isinstance(value, str):
            number = _parse_number(value)
            if number is not None:
                # A long numeric string can become a number past the limits.
                self.scope.meter.check(number)
                return number
        raise self.source.error(
            node, f"expected a number, got {type_name(value)} {short_repr(value)}"
        )

    def _bool(self, value: Any, node: Tree) -> bool:
        as_bool = as_hcl_bool(value)
        if as_bool is not None:
            return as_bool
        raise self.source.error(
            node, f"expected a bool, got {type_name(value)} {short_repr(value)}"
        )

    def _x_binary_op(self, node: Tree) -> Any:
        lhs_node, term = subtrees(node)
        op_node, rhs_node = subtrees(term)
        op = str(op_node.children[0]).strip()
        lhs = self._plain(self._eval(lhs_node), lhs_node)
        if op in ("&&", "||"):
            left = self._bool(lhs, lhs_node)
            if (op == "&&" and not left) or (op == "||" and left):
                return left
            return self._bool(self._plain(self._eval(rhs_node), rhs_node), rhs_node)
        rhs = self._plain(self._eval(rhs_node), rhs_node)
        if op in ("==", "!="):
            # Comparing costs up to the size of the smaller side.
            meter = self.scope.meter
            meter.charge(min(meter.size(lhs), meter.size(rhs)))
            same = type_name(lhs) == type_name(rhs) and lhs == rhs
            return same if op == "==" else not same
        a, b = self._number(lhs, lhs_node), self._number(rhs, rhs_node)
        if op == "*" and isinstance(a, int) and isinstance(b, int):
            # The product has at least this many bits: refuse before computing it.
            check_int_bits(a.bit_length() + b.bit_length() - 1)
        if op == "/":
            if b == 0:
                raise self.source.error(node, "division by zero")
            q = a / b
            return int(q) if q.is_integer() and isinstance(a, int) and isinstance(b, int) else q
        if op == "%" and b == 0:
            raise self.source.error(node, "division by zero")
        return _BINARY[op](a, b)

    def _x_unary_op(self, node: Tree) -> Any:
        op = str(node.children[0])
        operand_node = subtrees(node)[0]
        value = self._plain(self._eval(operand_node), operand_node)
        if op == "!":
            return not self._bool(value, operand_node)
        return -self._number(value, operand_node)

    def _x_conditional(self, node: Tree) -> Any:
        cond_node, yes, no = subtrees(node)
        cond = self._bool(self._plain(self._eval(cond_node), cond_node), cond_node)
        return self._eval(yes if cond else no)

    def _x_function_call(self, node: Tree) -> Any:
        parts = subtrees(node)
        names = [p for p in parts if p.data == "identifier"]
        if len(names) != 1:
            raise self.source.error(node, "namespaced (provider::) functions are not supported")
        name = str(names[0].children[0])
        args: list[Any] = []
        arg_tree = next((p for p in parts if p.data == "arguments"), None)
        expand = False
        if arg_tree is not None:
            arg_nodes = subtrees(arg_tree)
            args = [self._plain(self._eval(a), a) for a in arg_nodes]
            expand = any(isinstance(t, Token) and t.type == "ELLIPSIS" for t in arg_tree.children)
        if expand:
            if not args or not isinstance(args[-1], list):
                raise self.source.error(
                    node, f"{name}(...): the argument before ... must be a list"
                )
            args = args[:-1] + args[-1]
        func = FUNCTIONS.get(name)
        if func is None:
            raise self.source.error(
                node, f"unknown function {name!r} (available: {', '.join(sorted(FUNCTIONS))})"
            )
        meter = self.scope.meter
        try:
            # A function's work grows with its arguments: count them.
            meter.charge(sum(meter.size(a) for a in args))
            result = func(*args)
            if isinstance(result, str):
                meter.charge(len(result))
            return result
        except (FunctionError, LimitError) as err:
            raise self.source.error(node, f"{name}(): {err}") from None
        except (TypeError, ValueError):
            raise self.source.error(node, f"{name}(): wrong number or kind of arguments") from None
