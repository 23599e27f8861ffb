"""HCL files that hold only values (the agent config), read as plain data with the line
each key is set on.

The data has python-hcl2's dict shape: an attribute is its value, a block type is a list of
bodies (one per block, its labels nesting as keys); each body is a ``PlainBody``, a dict that
also knows its lines. A value must be a literal: a string
(escapes resolved; nothing is interpolated, ``${...}`` stays as written), a number, a bool,
null, or a list or object of literals. Anything else becomes an ``Expression`` holding its
source text, for the caller to refuse by name. Pure computation: no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
from lark import Tree

from nomad_client.jobspec.errors import JobspecError
from nomad_client.jobspec.limits import MAX_EXPR_DEPTH, LimitError, check_int_literal
from nomad_client.jobspec.syntax import (
    KEYWORD_VALUES,
    Attribute,
    Block,
    Body,
    Source,
    heredoc_text,
    object_elements,
    parse_body,
    string_literal,
    subtrees,
)
from nomad_client.jobspec.values import Expression

KeyPath = tuple[str, ...]


class PlainBody(dict[str, Any]):
    """A body's data (the file's, or a block's), which also knows the line of its block and
    the first line each of its keys is set on: repeated blocks share one key path in
    ``PlainDocument.lines``, their bodies tell them apart."""

    __slots__ = ("line", "key_lines")

    def __init__(self, line: int | None = None) -> None:
        super().__init__()
        self.line = line
        self.key_lines: dict[str, int] = {}


@attrs.frozen
class PlainDocument:
    data: PlainBody
    # The line each key path is set on; list elements have no path of their own.
    lines: Mapping[KeyPath, int]


def parse_plain(text: str, filename: str) -> PlainDocument:
    """Read an HCL file of plain values; problems raise ``JobspecError`` with their line."""
    body, source = parse_body(text, filename)
    reader = _PlainReader(source)
    return PlainDocument(reader.body(body, ()), reader.lines)


def _unwrap(node: Tree) -> Tree:
    """The term inside ``expr_term``/``object_elem_key`` wrappers; parentheses stay."""
    while node.data in ("expr_term", "object_elem_key") and len(node.children) == 1:
        (inner,) = node.children
        if not isinstance(inner, Tree):
            break
        node = inner
    return node


class _PlainReader:
    def __init__(self, source: Source) -> None:
        self.source = source
        self.lines: dict[KeyPath, int] = {}

    def _set_line(self, path: KeyPath | None, line: int | None) -> None:
        if path is not None and line is not None:
            self.lines[path] = line

    def body(self, body: Body, path: KeyPath, line: int | None = None) -> PlainBody:
        out = PlainBody(line)
        kinds: dict[str, tuple[type, int | None]] = {}  # first use of each name
        # In source order, so the caller meets problems in the order a reader would.
        items: list[Attribute | Block] = [*body.attributes, *body.blocks]
        for item in sorted(items, key=lambda i: i.line or 0):
            name = item.name if isinstance(item, Attribute) else item.type
            if item.line is not None:
                out.key_lines.setdefault(name, item.line)
            first_kind, first_line = kinds.setdefault(name, (type(item), item.line))
            if first_kind is not type(item):
                raise JobspecError(
                    self.source.filename,
                    item.line,
                    f"{name!r} is set both as an attribute and as a block "
                    f"(first at line {first_line})",
                )
            if isinstance(item, Attribute):
                attr_path = (*path, name)
                self._set_line(attr_path, item.line)
                out[name] = self.value(item.expr, attr_path)
            else:
                out.setdefault(name, []).append(self._block(item, path))
        return out

    def _block(self, block: Block, path: KeyPath) -> Any:
        block_path = (*path, block.type)
        self._set_line(block_path, block.line)
        for label in block.labels:
            block_path = (*block_path, label)
            self._set_line(block_path, block.line)
        value: Any = self.body(block.body, block_path, block.line)
        for label in reversed(block.labels):
            value = {label: value}
        return value

    def value(self, node: Tree, path: KeyPath | None, depth: int = 0) -> Any:
        """The literal ``node`` spells; ``path`` (None inside lists) names it for lines."""
        if depth > MAX_EXPR_DEPTH:
            raise self.source.error(
                node, f"value nested too deeply (more than {MAX_EXPR_DEPTH} levels)"
            )
        term = _unwrap(node)
        kind = term.data
        if kind in ("int_lit", "float_lit"):
            return self._number(term, negative=False)
        if kind == "unary_op" and str(term.children[0]) == "-":
            # To HCL's grammar a negative number is an operator applied to a literal.
            operand = _unwrap(subtrees(term)[0])
            if operand.data in ("int_lit", "float_lit"):
                return self._number(operand, negative=True)
        if kind == "literal_value":
            return KEYWORD_VALUES[str(term.children[0])]
        if kind == "string":
            return string_literal(term, self.source, keep_templates=True)
        if kind in ("heredoc_template", "heredoc_template_trim"):
            return heredoc_text(term.children[0], self.source, trim=kind.endswith("_trim"))
        if kind == "tuple":
            return [self.value(item, None, depth + 1) for item in subtrees(term)]
        if kind == "object":
            return self._object(term, path, depth)
        return Expression(self.source.snippet(node).strip())

    def _number(self, term: Tree, negative: bool) -> int | float:
        text = str(term.children[0])
        if term.data == "float_lit":
            number: int | float = float(text)
        else:
            try:
                check_int_literal(text)
            except LimitError as err:
                raise self.source.error(term, str(err)) from None
            number = int(text)
        return -number if negative else number

    def _object(self, term: Tree, path: KeyPath | None, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for elem, key, value_node in object_elements(term, self._object_key, self.source):
            elem_path = None if path is None else (*path, key)
            self._set_line(elem_path, self.source.line_of(elem))
            out[key] = self.value(value_node, elem_path, depth + 1)
        return out

    def _object_key(self, node: Tree) -> str:
        term = _unwrap(node)
        if term.data in ("identifier", "keyword", "literal_value", "int_lit", "float_lit"):
            return str(term.children[0])
        if term.data == "string":
            return string_literal(term, self.source, keep_templates=True)
        raise self.source.error(
            node,
            f"object key {self.source.snippet(node).strip()!r} must be a name or a string",
        )
