"""HCL2 source text -> a small tree of blocks and attributes with line numbers.

This module is the only place that talks to python-hcl2, for jobspecs and the
agent config alike. It uses the raw Lark parse tree (not python-hcl2's dict
serialization, which keeps quotes and ``${}`` wrappers and loses line numbers),
turns Lark syntax errors into ``JobspecError`` (the agent config turns those into
its own error) and leaves expressions as Lark trees for ``evaluate`` (jobspecs) or
``plain`` (files of literal values) to interpret. Pure computation: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import attrs
import hcl2
from lark import Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from nomad_client.jobspec.errors import JobspecError
from nomad_client.jobspec.limits import MAX_BLOCK_DEPTH


@attrs.frozen
class Source:
    """The text a tree was parsed from, so expressions can be quoted back verbatim."""

    text: str
    filename: str
    # Added to every line number: fragments parsed out of a heredoc report
    # positions in the enclosing file.
    line_offset: int = 0

    def snippet(self, node: Tree | Token) -> str:
        """The exact source text of ``node``."""
        if isinstance(node, Token):
            return str(node)
        return self.text[node.meta.start_pos : node.meta.end_pos]

    def line_of(self, node: Tree | Token) -> int | None:
        if isinstance(node, Token):
            return None if node.line is None else node.line + self.line_offset
        if node.meta.empty:
            return None
        return node.meta.line + self.line_offset

    def error(self, node: Tree | Token | None, message: str) -> JobspecError:
        line = None if node is None else self.line_of(node)
        return JobspecError(self.filename, line, message)


@attrs.frozen
class Attribute:
    name: str
    expr: Tree
    line: int | None


@attrs.frozen
class Block:
    type: str
    labels: tuple[str, ...]
    body: Body
    line: int | None


@attrs.frozen
class Body:
    attributes: tuple[Attribute, ...]
    blocks: tuple[Block, ...]
    line: int | None = None


# HCL's literal keywords and the values they stand for.
KEYWORD_VALUES = {"true": True, "false": False, "null": None}

# Names shown to users instead of Lark terminal names.
_TOKEN_NAMES = {
    "RBRACE": "'}'",
    "LBRACE": "'{'",
    "RSQB": "']'",
    "LSQB": "'['",
    "RPAR": "')'",
    "LPAR": "'('",
    "COMMA": "','",
    "EQ": "'='",
    "COLON": "':'",
    "QMARK": "'?'",
    "DOT": "'.'",
    "DBLQUOTE": "'\"'",
    "NAME": "a name",
    "NL_OR_COMMENT": "a newline",
    "$END": "end of file",
    "INT_LITERAL": "a number",
    "FLOAT_LITERAL": "a number",
    "INTERP_START": "'${'",
}
# If the parser would accept any of these, it was waiting for a value.
_EXPRESSION_START = {"DBLQUOTE", "LSQB", "INT_LITERAL", "HEREDOC_TEMPLATE"}
_MAX_SHOWN_EXPECTED = 6


def _describe_token(token: Token) -> str:
    if token.type == "$END":
        return "end of file"
    text = str(token)
    if text.startswith(("\n", "\r")) or token.type == "NL_OR_COMMENT":
        return "newline"
    first = text.splitlines()[0] if text.strip() else text
    if len(first) > 20:
        first = first[:20] + "..."
    return repr(first)


def _describe_expected(expected: set[str]) -> str:
    if expected & _EXPRESSION_START:
        return "an expression (a string, number, list, object or reference)"
    names = sorted({_TOKEN_NAMES.get(e, e.lower()) for e in expected})
    if len(names) > _MAX_SHOWN_EXPECTED:
        names = names[:_MAX_SHOWN_EXPECTED] + ["..."]
    return " or ".join(names)


def _syntax_error(
    err: UnexpectedInput, filename: str, line_offset: int, fragment: bool
) -> JobspecError:
    line = err.line + line_offset if isinstance(err.line, int) and err.line > 0 else None
    column = err.column if isinstance(err.column, int) and err.column > 0 else None
    at_end = isinstance(err, UnexpectedToken) and err.token.type == "$END"
    if fragment or at_end:
        column = None  # columns inside a wrapped fragment would mislead; the end has none
    where = f" at column {column}" if column else ""
    if isinstance(err, UnexpectedToken):
        got = _describe_token(err.token)
        msg = f"syntax error{where}: unexpected {got}; expected {_describe_expected(err.expected)}"
        if err.token.type == "$END" and "RBRACE" in err.expected:
            msg += " (a block is not closed)"
    elif isinstance(err, UnexpectedCharacters):
        msg = f"syntax error{where}: unexpected character {err.char!r}"
    elif isinstance(err, UnexpectedEOF):
        msg = "syntax error: unexpected end of file"
    else:  # pragma: no cover - Lark has no other subclasses today
        msg = f"syntax error{where}: {err}"
    return JobspecError(filename, line, msg)


def parse_tree(text: str, filename: str, line_offset: int = 0, fragment: bool = False) -> Tree:
    """Run python-hcl2's parser, converting syntax errors to ``JobspecError``."""
    try:
        return hcl2.parses_to_tree(text)
    except UnexpectedInput as err:
        raise _syntax_error(err, filename, line_offset, fragment) from None


def parse_body(text: str, filename: str) -> tuple[Body, Source]:
    """Parse a whole HCL2 file into a ``Body`` plus the ``Source`` for its expressions."""
    # CRLF files must give the same values (heredoc bodies, positions) as LF ones.
    text = text.replace("\r\n", "\n")
    tree = parse_tree(text, filename)
    # python-hcl2 parses ``text + "\n"``; positions index into the same prefix.
    source = Source(text + "\n", filename)
    body_tree = tree.children[0]
    return _body(body_tree, source), source


def parse_expression(text: str, filename: str, line_offset: int = 0) -> tuple[Tree, Source]:
    """Parse one expression (a heredoc interpolation, a ``-var`` value)."""
    wrapped = f"__value = {text}"
    tree = parse_tree(wrapped, filename, line_offset, fragment=True)
    source = Source(wrapped + "\n", filename, line_offset)
    body = _body(tree.children[0], source)
    if len(body.attributes) != 1 or body.blocks:
        raise JobspecError(
            filename,
            line_offset + 1 if line_offset else None,
            f"expected a single expression, got {text!r}",
        )
    return body.attributes[0].expr, source


def subtrees(node: Tree) -> list[Tree]:
    """Child trees of ``node``, ignoring newlines and comments."""
    return [c for c in node.children if isinstance(c, Tree) and c.data != "new_line_or_comment"]


def object_elements(
    node: Tree, key_of: Callable[[Tree], str], source: Source
) -> Iterator[tuple[Tree, str, Tree]]:
    """``(element, key, value node)`` of an object constructor, its keys read by ``key_of``;
    a key given twice is an error."""
    seen: set[str] = set()
    for elem in subtrees(node):
        key_node, value_node = subtrees(elem)
        key = key_of(key_node)
        if key in seen:
            raise source.error(elem, f"duplicate object key {key!r}")
        seen.add(key)
        yield elem, key, value_node


def _name_of(node: Tree | Token, source: Source) -> str:
    """Attribute names and block types: identifiers, keywords or literals."""
    if isinstance(node, Token):
        return str(node)
    if node.data == "string":
        return string_literal(node, source)
    return str(node.children[0])


def _body(node: Tree, source: Source, depth: int = 0) -> Body:
    if depth > MAX_BLOCK_DEPTH:
        raise source.error(node, f"blocks nested too deeply (more than {MAX_BLOCK_DEPTH} levels)")
    attributes: list[Attribute] = []
    blocks: list[Block] = []
    seen: dict[str, Attribute] = {}
    for child in subtrees(node):
        if child.data == "attribute":
            name = _name_of(child.children[0], source)
            expr = child.children[2]
            attr = Attribute(name, expr, source.line_of(child))
            if name in seen:
                first = seen[name].line
                raise source.error(
                    child, f"attribute {name!r} is set more than once (first at line {first})"
                )
            seen[name] = attr
            attributes.append(attr)
        elif child.data == "block":
            parts = [c for c in child.children if isinstance(c, Tree)]
            head = [p for p in parts if p.data not in ("body", "new_line_or_comment")]
            inner = next(p for p in parts if p.data == "body")
            block_type = _name_of(head[0], source)
            labels = tuple(_name_of(h, source) for h in head[1:])
            body = _body(inner, source, depth + 1)
            blocks.append(Block(block_type, labels, body, source.line_of(child)))
    return Body(tuple(attributes), tuple(blocks), source.line_of(node))


_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", '"': '"', "\\": "\\"}
_ESCAPE_RE = re.compile(r"\\(u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|.)", re.S)


def decode_escapes(raw: str) -> str:
    """Resolve HCL quoted-string escapes (\\n, \\t, \\", \\\\, \\uNNNN, \\UNNNNNNNN)."""

    def repl(m: re.Match[str]) -> str:
        esc = m.group(1)
        if esc[0] in "uU" and len(esc) > 1:
            code = int(esc[1:], 16)
            if code > 0x10FFFF:
                raise ValueError(f"invalid escape sequence '\\{esc}': not a Unicode character")
            return chr(code)
        if esc in _ESCAPES:
            return _ESCAPES[esc]
        raise ValueError(f"invalid escape sequence '\\{esc}'")

    return _ESCAPE_RE.sub(repl, raw)


def string_literal(node: Tree, source: Source, keep_templates: bool = False) -> str:
    """The value of a quoted string that must not contain interpolations (labels).

    With ``keep_templates``, ``${...}`` and ``$${`` are kept as written instead: files of
    plain values (the agent config) interpolate nothing.
    """
    out: list[str] = []
    for part in node.children:
        if isinstance(part, Token) and part.type == "DBLQUOTE":
            continue
        content = part.children[0] if isinstance(part, Tree) else part
        if isinstance(content, Token) and content.type == "STRING_CHARS":
            try:
                out.append(decode_escapes(str(content)))
            except ValueError as err:
                raise source.error(node, str(err)) from None
        elif keep_templates:
            out.append(source.snippet(part))
        elif isinstance(content, Token) and content.type in (
            "ESCAPED_INTERPOLATION",
            "ESCAPED_DIRECTIVE",
        ):
            out.append(str(content)[1:])
        else:
            raise source.error(node, "a label must be a literal string without ${...}")
    return "".join(out)


_HEREDOC_HEAD = re.compile(r"<<-?([A-Za-z][A-Za-z0-9._-]*)\r?\n")


def heredoc_text(token: Token | Tree, source: Source, trim: bool) -> str:
    """The text of a heredoc, templates left as written; ``trim`` (the ``<<-`` form) strips
    the indentation common to its non-blank lines."""
    raw = str(token)
    head = _HEREDOC_HEAD.match(raw)
    if head is None:  # the grammar guarantees the form; be defensive anyway
        raise source.error(token, "malformed heredoc")
    marker = head.group(1)
    body = re.sub(r"[ \t]*" + re.escape(marker) + r"\r?\n\Z", "", raw[head.end() :])
    return _dedent(body) if trim else body


def _dedent(body: str) -> str:
    lines = body.split("\n")
    widths = [len(ln) - len(ln.lstrip(" \t")) for ln in lines if ln.strip()]
    cut = min(widths, default=0)
    return "\n".join(ln[cut:] if ln.strip() else ln.lstrip(" \t") for ln in lines)
