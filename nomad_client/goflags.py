"""Go-style command-line flags on top of argparse, and Go's spellings of a boolean.

Nomad's tools take long flags with a single dash (``-address=X``, ``-detach``) and boolean
flags that may carry an explicit value (``-purge=false``).  This module adapts argparse to
that convention (a double dash is accepted too) and turns every parse failure into a
:class:`UsageError` instead of printing and exiting, so callers decide how to report it.
:func:`parse_go_bool` is the one reading of a boolean the Go way, shared by flags, query
strings and filter literals.  It touches nothing outside the arguments it is given.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any, NoReturn

# Exactly the spellings Go's strconv.ParseBool accepts.
_GO_BOOLS = {
    **dict.fromkeys(("1", "t", "T", "TRUE", "true", "True"), True),
    **dict.fromkeys(("0", "f", "F", "FALSE", "false", "False"), False),
}


class UsageError(Exception):
    """Bad command-line usage; str() is the message, ``usage`` the command's usage text."""

    def __init__(self, message: str, usage: str = "") -> None:
        super().__init__(message)
        self.usage = usage


class HelpRequested(Exception):
    """Raised when ``-h``/``-help`` is given; carries the full help text."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


def parse_go_bool(text: str) -> bool | None:
    """The boolean ``text`` spells for Go's strconv.ParseBool, or None when it spells none."""
    return _GO_BOOLS.get(text)


def _bool_flag_value(text: str) -> bool:
    value = parse_go_bool(text)
    if value is None:
        raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")
    return value


class _GoHelpFormatter(argparse.HelpFormatter):
    """Shows each flag once, single-dash, and boolean flags without a value placeholder."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings:
            return super()._format_action_invocation(action)
        name = action.option_strings[0] if action.option_strings[0] != "-h" else "-help"
        if action.nargs in (0, "?"):
            return name
        return f"{name}={self._metavar_formatter(action, action.dest.upper())(1)[0]}"


class GoArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser that speaks Go-style flags and raises instead of exiting."""

    def __init__(self, prog: str, description: str = "", **kwargs: Any) -> None:
        # Abbreviations would let "-d" silently mean "-detach"; Go never does that.
        super().__init__(
            prog=prog, description=description, add_help=False, allow_abbrev=False,
            formatter_class=_GoHelpFormatter, **kwargs
        )
        self._bool_flags: set[str] = set()
        super().add_argument("-h", "-help", "--help", action="store_true", dest="_help",
                             help="show this help")

    def add_flag(self, name: str, **kwargs: Any) -> argparse.Action:
        """Add ``-name`` (also ``--name``); dest defaults to name with dashes as underscores."""
        kwargs.setdefault("dest", name.replace("-", "_"))
        return super().add_argument(f"-{name}", f"--{name}", **kwargs)

    def add_bool_flag(self, name: str, *, default: bool | None = False, help: str = "",
                      dest: str | None = None) -> argparse.Action:
        """Add a boolean flag usable as ``-name``, ``-name=true`` or ``-name=false``."""
        self._bool_flags.update({f"-{name}", f"--{name}"})
        return super().add_argument(
            f"-{name}", f"--{name}", dest=dest or name.replace("-", "_"), nargs="?",
            const=True, default=default, type=_bool_flag_value, help=help,
        )

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        # Go's flag package matches a flag's whole name only; argparse would otherwise
        # take "-t" for "-token" or "-v" for "-verbose" even with allow_abbrev off.
        return []

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        """Parse argv; raise HelpRequested or UsageError rather than exiting."""
        # A bare boolean flag must never swallow the next word as its value.
        normalized = [f"{arg}=true" if arg in self._bool_flags else arg for arg in argv]
        ns = self.parse_args(normalized)
        if ns._help:
            raise HelpRequested(self.format_help())
        del ns._help
        return ns

    def error(self, message: str) -> NoReturn:
        raise UsageError(message, self.format_usage())

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        raise UsageError(message or f"exit status {status}", self.format_usage())
