"""Boolean filter expressions in the go-bexpr dialect used by the ``?filter=`` query parameter.

An expression is compiled once into a tree of small closures and can then be evaluated
cheaply against many JSON-like objects (dicts with Go-style keys, lists, str, int, float,
bool, None). This module is pure: it touches no files, sockets or global state.

Grammar (precedence low to high): ``or`` < ``and`` < ``not`` < parentheses / match /
collection expression::

    expr       := and ("or" and)*
    and        := not ("and" not)*
    not        := "not" not | primary
    primary    := "(" expr ")" | collection | match
    collection := ("any" | "all") selector "as" name ["," name] "{" expr "}"
    match      := selector ("==" | "!=" | "contains" | "not contains"
                            | "matches" | "not matches") value
                | selector "is" ["not"] ("empty" | "nil")
                | value ("in" | "not in") selector
    selector   := ident ("." ident | "." digits | "[" string "]")* | '"' json-pointer '"'
    value      := selector-text | '"' go-string '"' | '`' raw '`' | number

Evaluation rules:

* The first segment of a selector names a field of the top-level object (a Go struct field):
  if the object lacks it, evaluation fails with :class:`FilterEvalError`. Deeper segments
  follow map semantics: a missing key (or ``null`` parent, or out-of-range list index) is
  "missing", which makes ``==``/``in``/``matches``/``is not empty``/``is not nil`` false and
  their negations true.
* Literals are strings until compared: they are converted to the type of the value they meet
  (bool, int, float), the way go-bexpr coerces to the field's Go type.
* ``any``/``all`` iterate lists (one name binds the element, two bind index and element) and
  maps (one name binds the key, two bind key and value); ``_`` discards a binding. A missing or
  null collection is empty, so ``any`` is false and ``all`` is true.
* ``matches`` searches with :mod:`nomad_client.untrusted_regex` (RE2, read as Go reads it;
  patterns are compiled at compile time, and a bad or too large pattern is a syntax error).

Cost limits, because expressions come from API callers: ``any``/``all`` may be nested at most
:data:`MAX_COLLECTION_NESTING` deep, and one :meth:`Filter.matches` call may take at most
:data:`MAX_EVAL_STEPS` steps (collection elements visited, list elements compared, regex
searches) and spend at most :data:`MAX_REGEX_SECONDS` in regex searches in all: each RE2
search is linear in its text, but a slow pattern over many values still adds up.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from nomad_client.goflags import parse_go_bool
from nomad_client.untrusted_regex import UntrustedPattern, UntrustedRegexError, compile_untrusted

__all__ = [
    "Filter",
    "FilterError",
    "FilterEvalError",
    "FilterSyntaxError",
    "MAX_COLLECTION_NESTING",
    "MAX_EVAL_STEPS",
    "MAX_REGEX_SECONDS",
    "compile_filter",
]

MAX_COLLECTION_NESTING = 3  # each level multiplies the work by the size of a collection
MAX_EVAL_STEPS = 100_000
MAX_REGEX_SECONDS = 0.05  # checked between searches: RE2 cannot be stopped mid-search


class FilterError(Exception):
    """Base class for every filter-expression failure."""


class FilterSyntaxError(FilterError):
    """The expression text is malformed; carries the offending position."""

    def __init__(self, expression: str, position: int, message: str) -> None:
        self.expression = expression
        self.position = position
        self.line = expression.count("\n", 0, position) + 1
        self.column = position - (expression.rfind("\n", 0, position) + 1) + 1
        self.reason = message
        super().__init__(
            f"filter syntax error at line {self.line}, column {self.column}: {message}"
        )


class FilterEvalError(FilterError):
    """The expression is well formed but cannot be evaluated against this object."""


# ---------------------------------------------------------------------------------------------
# Evaluation primitives

_MISSING: Any = object()
_Scope = Mapping[str, Any]
_Pred = Callable[[Mapping[str, Any], _Scope], bool]
_Getter = Callable[[Mapping[str, Any], _Scope], Any]

# Longest digit strings read as numbers: enough for any 64-bit value and well below the length
# at which Python refuses int() or takes long over float().
_MAX_INT_CHARS = 64
_MAX_FLOAT_CHARS = 400
_MAX_INDEX_DIGITS = 18  # a longer list index is out of range of any list

# The scope key holding the _Budget of the current matches() call; the space keeps it apart
# from every name a collection expression can bind.
_BUDGET = " budget"


@attrs.define
class _Budget:
    """Work one :meth:`Filter.matches` call may still do, shared through the scope."""

    steps: int = MAX_EVAL_STEPS
    regex_seconds: float = MAX_REGEX_SECONDS

    def spend(self, steps: int) -> None:
        self.steps -= steps
        if self.steps < 0:
            raise FilterEvalError(
                f"filter too expensive: evaluation needs more than {MAX_EVAL_STEPS} steps"
            )

    def search(self, pattern: UntrustedPattern, text: str) -> bool:
        """Run ``pattern`` on ``text`` if this call has regex time left."""
        self.spend(1)
        if self.regex_seconds <= 0:
            raise FilterEvalError(
                f"filter too expensive: regular expressions ran longer than {MAX_REGEX_SECONDS:g}s"
            )
        start = time.monotonic()
        try:
            return pattern.search(text)
        finally:
            self.regex_seconds -= time.monotonic() - start


def _kind(value: Any) -> str:
    """A Go-flavoured type name for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "map"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


def _parse_go_int(text: str) -> int | None:
    """Integer literal with Go's base-0 rules (0x.., 0o.., 0b.., leading-0 octal)."""
    # int() also takes non-ASCII digits and surrounding spaces, which Go does not.
    if len(text) > _MAX_INT_CHARS or not text.isascii() or text != text.strip():
        return None
    body = text[1:] if text[:1] in "+-" else text
    lowered = body.lower()
    try:
        if lowered.startswith("0x"):
            value = int(body[2:], 16)
        elif lowered.startswith("0o"):
            value = int(body[2:], 8)
        elif lowered.startswith("0b"):
            value = int(body[2:], 2)
        elif len(body) > 1 and body.startswith("0"):
            value = int(body[1:], 8)
        else:
            if not body[:1].isdigit():
                return None
            value = int(body, 10)
    except ValueError:
        return None
    return -value if text.startswith("-") else value


def _parse_go_float(text: str) -> float | None:
    if not text or len(text) > _MAX_FLOAT_CHARS or not text.isascii() or text != text.strip():
        return None
    try:
        return float(text)
    except ValueError:
        return None


@attrs.frozen
class _Literal:
    """A literal from the expression, pre-converted to every type it may be compared with."""

    text: str
    as_bool: bool | None
    as_number: int | float | None

    @classmethod
    def of(cls, text: str) -> _Literal:
        as_bool = parse_go_bool(text)
        number: int | float | None = _parse_go_int(text)
        if number is None:
            number = _parse_go_float(text)
        return cls(text, as_bool, number)


def _equal(value: Any, lit: _Literal, where: str) -> bool:
    """``value == lit`` after converting the literal to the value's type."""
    if isinstance(value, str):
        return value == lit.text
    if isinstance(value, bool):
        if lit.as_bool is None:
            raise FilterEvalError(f"cannot compare {where} (bool) with {lit.text!r}: not a bool")
        return value is lit.as_bool
    if isinstance(value, int | float):
        if lit.as_number is None:
            raise FilterEvalError(
                f"cannot compare {where} ({_kind(value)}) with {lit.text!r}: not a number"
            )
        return value == lit.as_number
    raise FilterEvalError(f"cannot compare {where} with {lit.text!r}: value is a {_kind(value)}")


def _step(value: Any, segment: str, where: str) -> Any:
    """Descend one selector segment with map semantics."""
    if isinstance(value, Mapping):
        return value.get(segment, _MISSING)
    if value is None:
        return _MISSING
    if isinstance(value, list | tuple):
        # isdigit() alone admits "²" and other digits int() refuses.
        if not (segment.isascii() and segment.isdigit()):
            raise FilterEvalError(f"cannot index list with {segment!r} in {where}")
        digits = segment.lstrip("0") or "0"
        if len(digits) > _MAX_INDEX_DIGITS:
            return _MISSING
        index = int(digits)
        return value[index] if index < len(value) else _MISSING
    raise FilterEvalError(f"cannot select {segment!r} in {where}: value is a {_kind(value)}")


@attrs.frozen
class _Selector:
    path: tuple[str, ...]
    text: str  # human-readable form for error messages
    position: int


def _make_getter(sel: _Selector, bound: frozenset[str]) -> _Getter:
    """Compile a selector into a function returning the value or ``_MISSING``."""
    head, rest, where = sel.path[0], sel.path[1:], sel.text

    if head in bound:

        def root(obj: Mapping[str, Any], scope: _Scope) -> Any:
            return scope[head]

    else:

        def root(obj: Mapping[str, Any], scope: _Scope) -> Any:
            try:
                return obj[head]
            except KeyError:
                raise FilterEvalError(f"unknown field {head!r}") from None

    if not rest:
        return root

    def getter(obj: Mapping[str, Any], scope: _Scope) -> Any:
        value = root(obj, scope)
        for segment in rest:
            value = _step(value, segment, where)
            if value is _MISSING:
                break
        return value

    return getter


def _op_on_value(get: _Getter, negate: bool, test: Callable[[Any, _Scope], bool]) -> _Pred:
    """``test`` on the selected value; a missing or null value fails it (its negation holds)."""

    def pred(obj: Mapping[str, Any], scope: _Scope) -> bool:
        value = get(obj, scope)
        if value is _MISSING or value is None:
            return negate
        return test(value, scope) is not negate

    return pred


def _op_equal(get: _Getter, lit: _Literal, where: str, negate: bool) -> _Pred:
    return _op_on_value(get, negate, lambda value, scope: _equal(value, lit, where))


def _op_in(get: _Getter, lit: _Literal, where: str, negate: bool) -> _Pred:
    def contains(value: Any, scope: _Scope) -> bool:
        if isinstance(value, str | Mapping):
            return lit.text in value
        if isinstance(value, list | tuple):
            scope[_BUDGET].spend(len(value))
            return any(_equal(item, lit, f"element of {where}") for item in value)
        raise FilterEvalError(
            f"cannot test membership of {lit.text!r} in {where}: value is a {_kind(value)}"
        )

    return _op_on_value(get, negate, contains)


def _op_matches(get: _Getter, pattern: UntrustedPattern, where: str, negate: bool) -> _Pred:
    def matches(value: Any, scope: _Scope) -> bool:
        if not isinstance(value, str):
            raise FilterEvalError(
                f"cannot match {where} against a regex: value is a {_kind(value)}"
            )
        return scope[_BUDGET].search(pattern, value)

    return _op_on_value(get, negate, matches)


def _op_empty(get: _Getter, where: str, negate: bool) -> _Pred:
    def pred(obj: Mapping[str, Any], scope: _Scope) -> bool:
        value = get(obj, scope)
        if value is _MISSING or value is None:
            return not negate
        if isinstance(value, str | Mapping | list | tuple):
            return (len(value) == 0) is not negate
        raise FilterEvalError(f"cannot test {where} for emptiness: value is a {_kind(value)}")

    return pred


def _op_nil(get: _Getter, negate: bool) -> _Pred:
    def pred(obj: Mapping[str, Any], scope: _Scope) -> bool:
        value = get(obj, scope)
        return (value is _MISSING or value is None) is not negate

    return pred


def _op_not(inner: _Pred) -> _Pred:
    def pred(obj: Mapping[str, Any], scope: _Scope) -> bool:
        return not inner(obj, scope)

    return pred


def _op_and(preds: list[_Pred]) -> _Pred:
    return _short_circuit(preds, decided_by=False)


def _op_or(preds: list[_Pred]) -> _Pred:
    return _short_circuit(preds, decided_by=True)


def _short_circuit(preds: list[_Pred], decided_by: bool) -> _Pred:
    """``preds`` in order until one returns ``decided_by``, the result then (``and``: False,
    ``or``: True); otherwise ``not decided_by``."""
    if len(preds) == 2:
        left, right = preds

        # The common ``a and b`` / ``a or b``, without a loop.
        def pred2(obj: Mapping[str, Any], scope: _Scope) -> bool:
            if left(obj, scope) is decided_by:
                return decided_by
            return right(obj, scope)

        return pred2
    items = tuple(preds)

    def pred(obj: Mapping[str, Any], scope: _Scope) -> bool:
        for p in items:
            if p(obj, scope) is decided_by:
                return decided_by
        return not decided_by

    return pred


def _op_collection(
    get: _Getter,
    where: str,
    is_any: bool,
    first: str | None,
    second: str | None,
    two_names: bool,
    body: _Pred,
) -> _Pred:
    def bindings(key: Any, item: Any, is_map: bool) -> dict[str, Any]:
        pairs: tuple[tuple[str | None, Any], ...]
        if two_names:
            pairs = ((first, key), (second, item))
        else:
            # One name: a map yields its keys, a list its elements.
            pairs = ((first, key if is_map else item),)
        return {name: val for name, val in pairs if name is not None}

    def pred(obj: Mapping[str, Any], scope: _Scope) -> bool:
        value = get(obj, scope)
        if value is _MISSING or value is None:
            return not is_any
        if isinstance(value, Mapping):
            entries: Any = value.items()
            is_map = True
        elif isinstance(value, list | tuple):
            entries = enumerate(value)
            is_map = False
        else:
            raise FilterEvalError(f"cannot iterate over {where}: value is a {_kind(value)}")
        budget = scope[_BUDGET]
        for key, item in entries:
            budget.spend(1)
            inner = {**scope, **bindings(key, item, is_map)}
            if body(obj, inner) is is_any:
                return is_any
        return not is_any

    return pred


# ---------------------------------------------------------------------------------------------
# Parser

_IDENT_RE = re.compile(r"[A-Za-z][A-Za-z0-9_/]*")
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*|_(?![A-Za-z0-9_])")
_DIGITS_RE = re.compile(r"[0-9]+")
_NUMBER_RE = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")
_POINTER_RE = re.compile(r"(?:/[\w\-.~|:]+)+")
_WS = " \t\r\n"
_MAX_DEPTH = 100
_SIMPLE_ESCAPES = {
    "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
    "\\": "\\", '"': '"',
}  # fmt: skip
_MATCH_OPERATOR_WORDS = frozenset({"in", "not", "is", "contains", "matches"})


@attrs.frozen
class _Operand:
    """The left side of a match before the operator tells whether it is a selector or value."""

    selector: _Selector | None
    text: str  # the value it stands for when used as a literal
    position: int
    kind: str  # "selector", "string", "raw" or "number"


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0
        self.collections = 0  # any/all bodies currently open

    # -- low-level helpers ------------------------------------------------------------------

    def error(self, message: str, position: int | None = None) -> FilterSyntaxError:
        return FilterSyntaxError(self.text, self.pos if position is None else position, message)

    def loc(self, position: int) -> str:
        """Where ``position`` is, for messages that point back at an opening bracket."""
        err = FilterSyntaxError(self.text, position, "")
        return (
            f"line {err.line}, column {err.column}" if "\n" in self.text else f"column {err.column}"
        )

    def found(self) -> str:
        if self.pos >= len(self.text):
            return "end of input"
        return repr(self.text[self.pos : self.pos + 12])

    def skip_ws(self) -> bool:
        start = self.pos
        while self.pos < len(self.text) and self.text[self.pos] in _WS:
            self.pos += 1
        return self.pos > start

    def peek(self) -> str:
        return self.text[self.pos : self.pos + 1]

    def peek_word(self) -> str | None:
        m = _IDENT_RE.match(self.text, self.pos)
        return m.group() if m else None

    def take_word(self, word: str) -> bool:
        if self.peek_word() == word:
            self.pos += len(word)
            return True
        return False

    def expect_char(self, char: str, message: str, position: int | None = None) -> None:
        if self.peek() != char:
            raise self.error(f"{message}, found {self.found()}", position)
        self.pos += 1

    def enter(self) -> None:
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.error(f"expression nested more than {_MAX_DEPTH} levels deep")

    # -- grammar ----------------------------------------------------------------------------

    def parse(self) -> _Pred:
        pred = self.parse_or(frozenset())
        self.skip_ws()
        if self.pos < len(self.text):
            if self.peek() == ")":
                raise self.error("unmatched ')'")
            raise self.error(f"expected 'and', 'or' or end of input, found {self.found()}")
        return pred

    def parse_or(self, bound: frozenset[str]) -> _Pred:
        preds = [self.parse_and(bound)]
        while self.take_keyword("or"):
            preds.append(self.parse_and(bound))
        return preds[0] if len(preds) == 1 else _op_or(preds)

    def parse_and(self, bound: frozenset[str]) -> _Pred:
        preds = [self.parse_not(bound)]
        while self.take_keyword("and"):
            preds.append(self.parse_not(bound))
        return preds[0] if len(preds) == 1 else _op_and(preds)

    def take_keyword(self, word: str) -> bool:
        """Consume whitespace + ``word`` if that is what comes next; otherwise consume nothing."""
        start = self.pos
        self.skip_ws()
        if self.take_word(word):
            return True
        self.pos = start
        return False

    def parse_not(self, bound: frozenset[str]) -> _Pred:
        self.skip_ws()
        start = self.pos
        if self.take_word("not"):
            if self.peek() == "(" or self.skip_ws():
                # ``not == x`` compares a field called "not"; anything else negates.
                if self.text.startswith(("==", "!="), self.pos):
                    self.pos = start
                else:
                    self.enter()
                    inner = self.parse_not(bound)
                    self.depth -= 1
                    return _op_not(inner)
            else:
                self.pos = start
        return self.parse_primary(bound)

    def parse_primary(self, bound: frozenset[str]) -> _Pred:
        self.skip_ws()
        start = self.pos
        if self.peek() == "(":
            self.pos += 1
            self.enter()
            pred = self.parse_or(bound)
            self.skip_ws()
            self.expect_char(")", f"expected ')' to close the '(' at {self.loc(start)}")
            self.depth -= 1
            return pred
        word = self.peek_word()
        if word in ("any", "all") and self.is_collection_start(len(word)):
            return self.parse_collection(bound)
        return self.parse_match(bound)

    def is_collection_start(self, word_len: int) -> bool:
        """``any``/``all`` start a collection unless they are a field name in a match."""
        after = self.pos + word_len
        rest = self.text[after:]
        stripped = rest.lstrip(_WS)
        if len(stripped) == len(rest) or not stripped:
            return False
        if stripped.startswith(("==", "!=")):
            return False
        m = _IDENT_RE.match(stripped)
        return not (m and m.group() in _MATCH_OPERATOR_WORDS)

    def parse_collection(self, bound: frozenset[str]) -> _Pred:
        start = self.pos
        quantifier = self.peek_word()
        assert quantifier is not None
        if self.collections >= MAX_COLLECTION_NESTING:
            raise self.error(
                f"'{quantifier}' nested more than {MAX_COLLECTION_NESTING} deep: "
                f"at most {MAX_COLLECTION_NESTING} any/all expressions may be nested"
            )
        self.pos += len(quantifier)
        self.skip_ws()
        sel = self.parse_selector("the collection to iterate")
        if not (self.skip_ws() and self.take_word("as")):
            raise self.error(f"expected 'as' after {quantifier} {sel.text}, found {self.found()}")
        if not self.skip_ws():
            raise self.error(f"expected whitespace after 'as', found {self.found()}")
        names = [self.parse_binding_name()]
        self.skip_ws()
        if self.peek() == ",":
            self.pos += 1
            self.skip_ws()
            names.append(self.parse_binding_name())
            self.skip_ws()
        real = [n for n in names if n != "_"]
        if len(real) != len(set(real)):
            raise self.error(f"the names bound by '{quantifier}' must differ", start)
        self.expect_char("{", f"expected '{{' to start the body of '{quantifier}'")
        self.enter()
        self.collections += 1
        body = self.parse_or(bound | frozenset(real))
        self.collections -= 1
        self.skip_ws()
        self.expect_char(
            "}", f"expected '}}' to close the body of the '{quantifier}' at {self.loc(start)}"
        )
        self.depth -= 1
        first = None if names[0] == "_" else names[0]
        second = None if len(names) < 2 or names[1] == "_" else names[1]
        getter = _make_getter(sel, bound)
        return _op_collection(
            getter, sel.text, quantifier == "any", first, second, len(names) == 2, body
        )

    def parse_binding_name(self) -> str:
        m = _NAME_RE.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected a variable name or '_', found {self.found()}")
        self.pos = m.end()
        return m.group()

    def parse_match(self, bound: frozenset[str]) -> _Pred:
        left = self.parse_operand()
        self.skip_ws()
        op_pos = self.pos
        op = self.parse_operator(left)
        if op in ("in", "not in"):
            self.skip_ws()
            sel = self.parse_selector(f"a selector after '{op}'")
            lit = _Literal.of(left.text)
            return _op_in(_make_getter(sel, bound), lit, sel.text, op == "not in")
        sel = self.as_selector(left, op, op_pos)
        getter = _make_getter(sel, bound)
        if op in ("is empty", "is not empty"):
            return _op_empty(getter, sel.text, op == "is not empty")
        if op in ("is nil", "is not nil"):
            return _op_nil(getter, op == "is not nil")
        self.skip_ws()
        value_pos = self.pos
        value = self.parse_value(op)
        if op in ("==", "!="):
            return _op_equal(getter, _Literal.of(value), sel.text, op == "!=")
        if op in ("contains", "not contains"):
            return _op_in(getter, _Literal.of(value), sel.text, op == "not contains")
        try:
            pattern = compile_untrusted(value)
        except UntrustedRegexError as exc:
            raise self.error(str(exc), value_pos) from None
        return _op_matches(getter, pattern, sel.text, op == "not matches")

    def parse_operator(self, left: _Operand) -> str:
        text = self.text
        if text.startswith(("==", "!="), self.pos):
            op = text[self.pos : self.pos + 2]
            self.pos += 2
            return op
        start = self.pos
        word = self.peek_word()
        if word in ("in", "contains", "matches"):
            self.pos += len(word)
            return word
        if word == "not":
            self.pos += 3
            self.skip_ws()
            nxt = self.peek_word()
            if nxt in ("in", "contains", "matches"):
                self.pos += len(nxt)
                return f"not {nxt}"
            raise self.error(
                f"expected 'in', 'contains' or 'matches' after 'not', found {self.found()}"
            )
        if word == "is":
            self.pos += 2
            self.skip_ws()
            negated = self.take_word("not")
            self.skip_ws()
            for what in ("empty", "nil"):
                if self.take_word(what):
                    return f"is not {what}" if negated else f"is {what}"
            raise self.error(
                "expected 'empty', 'not empty', 'nil' or 'not nil' after 'is', "
                f"found {self.found()}"
            )
        self.pos = start
        raise self.error(
            "expected an operator (==, !=, in, not in, contains, not contains, matches, "
            f"not matches, is empty, is not empty, is nil, is not nil) after {left.text!r}, "
            f"found {self.found()}"
        )

    def as_selector(self, left: _Operand, op: str, op_pos: int) -> _Selector:
        if left.selector is not None:
            return left.selector
        if left.kind == "string":
            hint = 'a quoted selector must be a JSON pointer such as "/Meta/rack"'
        else:
            hint = f"found a {left.kind} literal"
        raise self.error(f"'{op}' needs a selector on its left; {hint}", left.position)

    def parse_operand(self) -> _Operand:
        start = self.pos
        ch = self.peek()
        if ch and (ch.isascii() and ch.isalpha()):
            sel = self.parse_selector("a selector")
            return _Operand(sel, sel.text, start, "selector")
        if ch == '"':
            value = self.parse_double_quoted()
            return _Operand(self.pointer_selector(value, start), value, start, "string")
        if ch == "`":
            return _Operand(None, self.parse_raw(), start, "raw")
        if ch == "-" or ch.isdigit():
            return _Operand(None, self.parse_number(), start, "number")
        raise self.error(
            f"expected a selector, a value, 'not', 'any', 'all' or '(', found {self.found()}"
        )

    def parse_value(self, op: str) -> str:
        ch = self.peek()
        if ch and ch.isascii() and ch.isalpha():
            # A bare identifier/selector is the literal string it spells (``Status == ready``).
            return self.parse_selector("a value").text
        if ch == '"':
            return self.parse_double_quoted()
        if ch == "`":
            return self.parse_raw()
        if ch == "-" or ch.isdigit():
            return self.parse_number()
        raise self.error(f"expected a value after '{op}', found {self.found()}")

    def parse_selector(self, what: str) -> _Selector:
        start = self.pos
        if self.peek() == '"':
            value = self.parse_double_quoted()
            sel = self.pointer_selector(value, start)
            if sel is None:
                raise self.error(
                    f"expected {what}; a quoted selector must be a JSON pointer "
                    'such as "/Meta/rack"',
                    start,
                )
            return sel
        m = _IDENT_RE.match(self.text, self.pos)
        if not m:
            raise self.error(f"expected {what}, found {self.found()}")
        path = [m.group()]
        self.pos = m.end()
        while True:
            ch = self.peek()
            if ch == ".":
                self.pos += 1
                m = _IDENT_RE.match(self.text, self.pos) or _DIGITS_RE.match(self.text, self.pos)
                if not m:
                    raise self.error(
                        f"expected a field name or index after '.', found {self.found()}"
                    )
                path.append(m.group())
                self.pos = m.end()
            elif ch == "[":
                bracket = self.pos
                self.pos += 1
                self.skip_ws()
                if self.peek() == '"':
                    path.append(self.parse_double_quoted())
                elif self.peek() == "`":
                    path.append(self.parse_raw())
                else:
                    raise self.error(
                        f"invalid index: expected a quoted string, found {self.found()}"
                    )
                self.skip_ws()
                self.expect_char("]", f"unclosed index expression opened at {self.loc(bracket)}")
            else:
                break
        return _Selector(tuple(path), ".".join(path), start)

    @staticmethod
    def pointer_selector(value: str, position: int) -> _Selector | None:
        if not _POINTER_RE.fullmatch(value):
            return None
        parts = tuple(seg.replace("~1", "/").replace("~0", "~") for seg in value[1:].split("/"))
        return _Selector(parts, value, position)

    def parse_number(self) -> str:
        start = self.pos
        m = _NUMBER_RE.match(self.text, self.pos)
        end = m.end() if m else start
        nxt = self.text[end : end + 1]
        if not m or (nxt and nxt not in _WS and nxt not in ")}"):
            raise self.error("invalid number literal", start)
        self.pos = end
        return m.group()

    def parse_raw(self) -> str:
        start = self.pos
        end = self.text.find("`", start + 1)
        if end < 0:
            raise self.error("unterminated raw string literal", start)
        self.pos = end + 1
        return self.text[start + 1 : end]

    def parse_double_quoted(self) -> str:
        """A Go-syntax double-quoted string with escapes; returns its decoded value."""
        text, start = self.text, self.pos
        out = bytearray()
        i = start + 1
        while True:
            if i >= len(text):
                raise self.error("unterminated string literal", start)
            ch = text[i]
            if ch == '"':
                break
            if ch == "\n":
                raise self.error("newline in string literal", i)
            if ch != "\\":
                out += ch.encode("utf-8", "surrogatepass")
                i += 1
                continue
            esc = text[i + 1 : i + 2]
            if esc in _SIMPLE_ESCAPES:
                out += _SIMPLE_ESCAPES[esc].encode()
                i += 2
            elif esc in ("x", "u", "U"):
                width = {"x": 2, "u": 4, "U": 8}[esc]
                digits = text[i + 2 : i + 2 + width]
                if len(digits) != width or any(c not in "0123456789abcdefABCDEF" for c in digits):
                    raise self.error(f"invalid \\{esc} escape: expected {width} hex digits", i)
                code = int(digits, 16)
                if esc == "x":
                    out.append(code)
                elif code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                    raise self.error(f"invalid \\{esc} escape: U+{code:X} is not a character", i)
                else:
                    out += chr(code).encode()
                i += 2 + width
            elif esc and esc in "01234567":
                digits = text[i + 1 : i + 4]
                if len(digits) != 3 or any(c not in "01234567" for c in digits):
                    raise self.error("invalid octal escape: expected 3 octal digits", i)
                code = int(digits, 8)
                if code > 0xFF:
                    raise self.error("invalid octal escape: value above \\377", i)
                out.append(code)
                i += 4
            else:
                shown = repr(esc) if esc else "end of input"
                raise self.error(f"invalid escape sequence: backslash followed by {shown}", i)
        self.pos = i + 1
        try:
            return out.decode("utf-8")
        except UnicodeDecodeError:
            raise self.error("string literal is not valid UTF-8", start) from None


# ---------------------------------------------------------------------------------------------
# Public API


@attrs.frozen
class Filter:
    """A compiled filter expression; immutable and safe to reuse across objects and threads."""

    expression: str
    _predicate: _Pred = attrs.field(repr=False, eq=False)

    def matches(self, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` satisfies the expression; raises :class:`FilterEvalError`."""
        if not isinstance(obj, Mapping):
            raise FilterEvalError(f"filters apply to objects, not to a {_kind(obj)}")
        try:
            return self._predicate(obj, {_BUDGET: _Budget()})
        except (ValueError, OverflowError, RecursionError) as exc:
            # A safety net: bad input must be a filter error (a 400), never a crash (a 500).
            raise FilterEvalError(f"cannot evaluate filter: {exc}") from None


def compile_filter(expression: str) -> Filter:
    """Parse ``expression``; raises :class:`FilterSyntaxError` if it is malformed."""
    if not isinstance(expression, str):
        raise TypeError(f"filter expression must be a str, not {type(expression).__name__}")
    try:
        return Filter(expression, _Parser(expression).parse())
    except (ValueError, OverflowError, RecursionError) as exc:
        # A safety net, as in Filter.matches.
        raise FilterSyntaxError(expression, 0, f"cannot compile filter: {exc}") from None
