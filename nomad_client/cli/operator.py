"""``operator root keyring list|rotate``: the server's root keys, with Nomad's flags and
output (a table of key ID, state, create time and publish time; IDs cut to 8 characters
unless ``-verbose``); ``operator metrics``: the agent's metrics (JSON or Prometheus text)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from nomad_client.api import ApiClient
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    CommandError,
    CommandParser,
    formatted,
    out,
    reporting,
    run_with_client,
)
from nomad_client.goflags import UsageError

Command = Callable[[Sequence[str]], int]

USAGE = """\
Usage: nomad-client operator root keyring <subcommand> [options]

Subcommands:
    list      List the root keys
    rotate    Make a new active root key (-full: re-encrypt everything with it)
"""


def render_keys(keys: Sequence[Mapping[str, Any]], verbose: bool) -> str:
    """Nomad's key table, for ``list`` (every key) and ``rotate`` (the new one)."""
    return fmt.table(
        ("Key", "State", "Create Time", "Publish Time"),
        [(fmt.short_id(key.get("KeyID"), verbose), key.get("State"),
          fmt.format_unix_nanos(key.get("CreateTime")),
          fmt.format_unix_nanos(key.get("PublishTime"))) for key in keys])


def _parser(name: str, description: str) -> CommandParser:
    parser = CommandParser(f"operator root keyring {name}",
                           f"operator root keyring {name} [options]", description)
    parser.add_bool_flag("verbose", help="show full key IDs")
    parser.add_positionals("args", 0, 0)
    return parser


def _run(ns: argparse.Namespace, call: Callable[[ApiClient], Awaitable[Any]],
         render: Callable[[Any], str]) -> int:
    async def body(client: ApiClient) -> int:
        with reporting("error"):
            answer = await call(client)
        out(render(answer))
        return 0

    return run_with_client(ns, body)


def keyring_list_cmd(argv: Sequence[str]) -> int:
    parser = _parser("list", "List the server's root keys.")
    parser.add_format_flags("keys")
    ns = parser.parse(argv)
    return _run(ns, lambda client: client.keyring_keys(),
                lambda keys: _keys_text(ns, keys))


def _keys_text(ns: argparse.Namespace, keys: Any) -> str:
    text = formatted(ns, keys)
    return render_keys(keys, ns.verbose) if text is None else text


def keyring_rotate_cmd(argv: Sequence[str]) -> int:
    parser = _parser("rotate", "Make a new active root key. Identities are signed and "
                               "values sealed with it from now on; with -full every value "
                               "already sealed is sealed again with it.")
    parser.add_bool_flag("full", help="re-encrypt every sealed value with the new key")
    ns = parser.parse(argv)
    return _run(ns, lambda client: client.keyring_rotate(full=ns.full),
                lambda answer: render_keys([answer.get("Key") or {}], ns.verbose))


_ROOT_COMMANDS: Mapping[tuple[str, ...], Command] = {
    ("keyring", "list"): keyring_list_cmd,
    ("keyring", "rotate"): keyring_rotate_cmd,
}


def root_cmd(argv: Sequence[str]) -> int:
    """``operator root keyring <list|rotate> …``: two words name the command."""
    command = _ROOT_COMMANDS.get(tuple(argv[:2]))
    if command is None:
        if argv[1:2] and argv[1] in ("-h", "-help", "--help"):
            out(USAGE.rstrip("\n"))
            return 0
        raise UsageError("operator root: expected 'keyring list' or 'keyring rotate'", USAGE)
    return command(argv[2:])


def metrics_cmd(argv: Sequence[str]) -> int:
    parser = CommandParser("operator metrics", "operator metrics [options]",
                           "Show the agent's metrics: JSON by default, or the Prometheus "
                           "text format with -format prometheus.")
    parser.add_flag("format", default="", metavar="FORMAT",
                    help='"prometheus" for the Prometheus text format')
    parser.add_bool_flag("pretty", help="indent the JSON output")
    parser.add_format_flags("metrics")
    parser.add_positionals("args", 0, 0)
    ns = parser.parse(argv)
    if ns.format not in ("", "prometheus"):
        raise CommandError(f'Unsupported format "{ns.format}": only "prometheus" is known')

    def render(answer: Any) -> str:
        if ns.format == "prometheus":
            return str(answer).rstrip("\n")
        text = formatted(ns, answer)
        if text is not None:
            return text
        return json.dumps(answer, indent=4 if ns.pretty else None)

    return _run(ns, lambda client: client.metrics(ns.format or None), render)


COMMANDS: Mapping[str, Command] = {"root": root_cmd, "metrics": metrics_cmd}
