"""A small subset of Go's text/template, for the CLI's ``-t`` (and ``var``'s ``-template``).

Supported: literal text; ``{{ pipeline }}`` with ``{{-``/``-}}`` trimming; ``{{ if }}``,
``{{ else if }}``, ``{{ else }}``, ``{{ range }}`` (over lists, or maps in key order, with an
optional ``{{ else }}``) and ``{{ end }}``; operands ``.``, ``.Field.Path``, string, number
and ``true``/``false``/``nil`` literals; pipes (``.Items | len``); the functions ``printf``,
``json``, ``len`` and ``index``. Anything else (variables, ``with``, ``define``, comments,
parenthesised calls, sprig functions) is refused with a :class:`TemplateError` that says so,
never guessed at. Values print as Go's ``fmt`` prints them (``<no value>`` for a missing field,
``map[k:v]`` for a map).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from nomad_client.cli.common import CommandError

SUPPORTED = ("field access (.A.B), if/else, range, pipes, and the functions printf, json, "
             "len and index")

_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_TOKEN = re.compile(r'\s*("(?:[^"\\]|\\.)*"|`[^`]*`|\||[^\s|"`]+)')
_FIELD = re.compile(r"(?:\.[A-Za-z_][A-Za-z0-9_]*)+|\.")
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_VERB = re.compile(r"%([-+# 0]*)(\d*)(?:\.(\d+))?([a-zA-Z%])")


class TemplateError(CommandError):
    """A template outside the supported subset, or one that fails to run."""


# ---- values as Go prints them -----------------------------------------------------------------

def go_text(value: Any) -> str:
    """A value as Go's ``fmt`` prints it in a template (maps sorted by key)."""
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Mapping):
        return "map[" + " ".join(f"{k}:{go_text(value[k])}" for k in sorted(value)) + "]"
    if isinstance(value, list):
        return "[" + " ".join(go_text(v) for v in value) + "]"
    return str(value)


def _truthy(value: Any) -> bool:
    # Go's template truth: false, 0, nil and empty strings, lists and maps are false.
    return bool(value)


def _printf(fmt: Any, *args: Any) -> str:
    if not isinstance(fmt, str):
        raise TemplateError("printf: the format must be a string")
    remaining = list(args)

    def one(match: re.Match[str]) -> str:
        flags, width, precision, verb = match.groups()
        if verb == "%":
            return "%"
        if not remaining:
            return f"%!{verb}(MISSING)"
        value = remaining.pop(0)
        if verb in "dxXob" and isinstance(value, (int, float)) and not isinstance(value, bool):
            spec = "d" if verb == "d" else verb
            text = format(int(value), spec)
        elif verb in "feg" and isinstance(value, (int, float)) and not isinstance(value, bool):
            text = format(float(value), f".{precision or 6}{verb}")
        elif verb == "q":
            text = json.dumps(go_text(value) if not isinstance(value, str) else value)
        elif verb in "svt":
            text = go_text(value)
            if precision and verb == "s":
                text = text[:int(precision)]
        else:
            raise TemplateError(f"printf: verb %{verb} is not supported")
        if width:
            pad = "0" if "0" in flags and verb in "dxXobfeg" else " "
            text = text.ljust(int(width)) if "-" in flags else text.rjust(int(width), pad)
        return text

    return _VERB.sub(one, fmt) + "".join(f"%!(EXTRA {go_text(a)})" for a in remaining)


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _len(value: Any) -> int:
    if isinstance(value, (str, list, Mapping)):
        return len(value)
    raise TemplateError(f"len of {go_text(value)} is not defined")


def _index(container: Any, *keys: Any) -> Any:
    value = container
    for key in keys:
        if isinstance(value, Mapping):
            value = value.get(key)
        elif isinstance(value, list) and isinstance(key, int) and 0 <= key < len(value):
            value = value[key]
        elif value is None:
            return None
        else:
            raise TemplateError(f"index: cannot index {go_text(value)} with {go_text(key)}")
    return value


FUNCTIONS: Mapping[str, Callable[..., Any]] = {
    "printf": _printf, "json": _json, "len": _len, "index": _index,
}


# ---- parsing ----------------------------------------------------------------------------------

@attrs.frozen
class _Command:
    """One stage of a pipeline: a function name and its argument tokens, or one operand."""

    function: str | None
    args: tuple[str, ...]


@attrs.frozen
class _Pipeline:
    commands: tuple[_Command, ...]


@attrs.frozen
class _Text:
    text: str


@attrs.frozen
class _Output:
    pipeline: _Pipeline


@attrs.define
class _Branch:
    """``if`` or ``range``: a body, and an ``else`` body (an ``else if`` is a nested if)."""

    keyword: str
    pipeline: _Pipeline
    body: list[Any] = attrs.Factory(list)
    otherwise: list[Any] = attrs.Factory(list)
    in_else: bool = False
    chained: bool = False  # an "else if": closed by the {{ end }} of the if it continues


def _unsupported(action: str) -> TemplateError:
    return TemplateError(f"Unsupported template action {{{{ {action} }}}}: this CLI supports "
                         f"{SUPPORTED} only")


def _parse_pipeline(source: str, action: str) -> _Pipeline:
    tokens: list[str] = []
    pos = 0
    while pos < len(source):
        match = _TOKEN.match(source, pos)
        if match is None:
            break
        tokens.append(match.group(1))
        pos = match.end()
    if source[pos:].strip() or not tokens:
        raise _unsupported(action)
    commands: list[_Command] = []
    stage_tokens: list[list[str]] = [[]]
    for token in tokens:
        if token == "|":
            stage_tokens.append([])
        else:
            stage_tokens[-1].append(token)
    for words in stage_tokens:
        if not words:
            raise _unsupported(action)
        head = words[0]
        if head in FUNCTIONS:
            commands.append(_Command(head, tuple(words[1:])))
        elif len(words) == 1 and _operand_ok(head) and not commands:
            commands.append(_Command(None, (head,)))
        else:
            raise _unsupported(action)
    for word in (w for c in commands for w in c.args):
        if not _operand_ok(word):
            raise _unsupported(action)
    return _Pipeline(tuple(commands))


def _operand_ok(word: str) -> bool:
    return bool(_FIELD.fullmatch(word) or _NUMBER.fullmatch(word)
                or word[0] in '"`' or word in ("true", "false", "nil"))


def _tokens(template: str) -> list[tuple[str, str]]:
    """Split into ("text", t) and ("action", a) pieces, applying the trim markers."""
    pieces: list[tuple[str, str]] = []
    pos = 0
    trim_next = False
    for match in _ACTION.finditer(template):
        text = template[pos:match.start()]
        if trim_next:
            text = text.lstrip()
        if match.group(1):
            text = text.rstrip()
        pieces.append(("text", text))
        pieces.append(("action", match.group(2).strip()))
        pos = match.end()
        trim_next = bool(match.group(3))
    rest = template[pos:]
    if "{{" in rest:
        raise TemplateError("Invalid template: unclosed action")
    pieces.append(("text", rest.lstrip() if trim_next else rest))
    return pieces


def parse(template: str) -> list[Any]:
    """The template's node tree; :class:`TemplateError` for anything outside the subset."""
    root: list[Any] = []
    stack: list[_Branch] = []

    def sink() -> list[Any]:
        if not stack:
            return root
        top = stack[-1]
        return top.otherwise if top.in_else else top.body

    for kind, piece in _tokens(template):
        if kind == "text":
            if piece:
                sink().append(_Text(piece))
            continue
        word, _, rest = piece.partition(" ")
        if word in ("if", "range"):
            branch = _Branch(word, _parse_pipeline(rest, piece))
            sink().append(branch)
            stack.append(branch)
        elif word == "else" and stack and not stack[-1].in_else:
            top = stack[-1]
            top.in_else = True
            if rest.startswith("if "):
                nested = _Branch("if", _parse_pipeline(rest[3:], piece), chained=True)
                top.otherwise.append(nested)
                stack.append(nested)
            elif rest:
                raise _unsupported(piece)
        elif word == "end" and not rest and stack:
            while stack.pop().chained:
                pass
        elif word in ("end", "else"):
            raise TemplateError(f"Invalid template: unexpected {{{{ {piece} }}}}")
        else:
            sink().append(_Output(_parse_pipeline(piece, piece)))
    if stack:
        raise TemplateError(f"Invalid template: unclosed {{{{ {stack[-1].keyword} }}}}")
    return root


# ---- running ----------------------------------------------------------------------------------

def _operand(word: str, dot: Any) -> Any:
    if _FIELD.fullmatch(word):
        value = dot
        for name in (part for part in word.split(".") if part):
            if isinstance(value, Mapping):
                value = value.get(name)
            elif value is None:
                return None
            else:
                raise TemplateError(f"can't evaluate field {name} in {go_text(value)}")
        return value
    if _NUMBER.fullmatch(word):
        return float(word) if "." in word else int(word)
    if word[0] == '"':
        return json.loads(word)
    if word[0] == "`":
        return word[1:-1]
    return {"true": True, "false": False, "nil": None}[word]


def _run_pipeline(pipeline: _Pipeline, dot: Any) -> Any:
    value: Any = None
    for position, command in enumerate(pipeline.commands):
        args = [_operand(word, dot) for word in command.args]
        if command.function is None:
            value = args[0]
            continue
        if position:
            args.append(value)
        try:
            value = FUNCTIONS[command.function](*args)
        except TypeError:
            raise TemplateError(f"wrong number of arguments for {command.function}") from None
    return value


def _render(nodes: list[Any], dot: Any, parts: list[str]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            parts.append(node.text)
        elif isinstance(node, _Output):
            parts.append(go_text(_run_pipeline(node.pipeline, dot)))
        elif node.keyword == "if":
            value = _run_pipeline(node.pipeline, dot)
            _render(node.body if _truthy(value) else node.otherwise, dot, parts)
        else:
            _render_range(node, _run_pipeline(node.pipeline, dot), parts)


def _render_range(node: _Branch, value: Any, parts: list[str]) -> None:
    if isinstance(value, Mapping):
        items = [value[key] for key in sorted(value)]
    elif isinstance(value, list):
        items = value
    elif value is None:
        items = []
    else:
        raise TemplateError(f"range can't iterate over {go_text(value)}")
    if not items:
        _render(node.otherwise, None, parts)
    for item in items:
        _render(node.body, item, parts)


def render(template: str, data: Any) -> str:
    """Render ``template`` against ``data`` (JSON-shaped: dicts, lists, scalars)."""
    parts: list[str] = []
    _render(parse(template), data, parts)
    return "".join(parts)
