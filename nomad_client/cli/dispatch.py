"""``job dispatch [options] <job> [<input>|-]`` and ``job periodic force [options] <job>``,
with Nomad's flags and output: what a parent job launches on request. Only parents are
found by a prefix (parameterized jobs for ``dispatch``, periodic ones for ``force``).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from nomad_client.api import ApiClient
from nomad_client.cli import format as fmt
from nomad_client.cli.common import (
    Command,
    CommandError,
    CommandParser,
    command_group,
    out,
    reporting,
    run_with_client,
)
from nomad_client.cli.job import MONITOR_TIMEOUT, report_or_monitor, resolve_job
from nomad_client.cli.monitor import monitor_evaluation

# The server refuses larger payloads; reading more than this only to be refused is waste.
MAX_INPUT_BYTES = 16 * 1024 + 1


def _is_parameterized(stub: Mapping[str, Any]) -> bool:
    return bool(stub.get("ParameterizedJob")) and not stub.get("ParentID")


def _is_periodic(stub: Mapping[str, Any]) -> bool:
    return bool(stub.get("Periodic"))


def _meta(pairs: Sequence[str]) -> dict[str, str]:
    meta: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise CommandError(f"Error parsing meta value: {pair}")
        meta[key] = value
    return meta


def _read_input(source: str) -> bytes:
    try:
        if source == "-":
            return sys.stdin.buffer.read(MAX_INPUT_BYTES)
        with Path(source).open("rb") as stream:
            return stream.read(MAX_INPUT_BYTES)
    except OSError as exc:
        raise CommandError(f"Error reading input data: {exc.strerror or exc}") from None


def dispatch_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("job dispatch", "job dispatch [options] <parameterized job> [input]",
                      "Dispatch a parameterized job with an optional payload (a file, or - "
                      "for stdin) and meta, and monitor the child's evaluation.",
                      namespaced=True)
    p.add_positionals("args", 1, 2)
    p.add_flag("meta", action="append", default=[], metavar="KEY=VALUE",
               help="dispatch meta (repeatable)")
    p.add_flag("idempotency-token", default="", metavar="TOKEN",
               help="dispatch at most one live child per token")
    p.add_flag("id-prefix-template", default="", metavar="PREFIX",
               help="put PREFIX in the child's ID")
    p.add_bool_flag("detach", help="return right after dispatching, without monitoring")
    p.add_bool_flag("verbose", help="show full IDs")
    ns = p.parse(argv)
    meta = _meta(ns.meta)
    payload = _read_input(ns.args[1]) if len(ns.args) == 2 else None

    async def body(client: ApiClient) -> int:
        with reporting("Failed to dispatch job"):
            job_id = await resolve_job(client, ns.args[0], "parameterized job",
                                       _is_parameterized)
            resp = await client.job_dispatch(job_id, payload, meta,
                                             idempotency_token=ns.idempotency_token,
                                             id_prefix_template=ns.id_prefix_template)
        eval_id = resp.get("EvalID") or ""
        out(fmt.kv([("Dispatched Job ID", resp.get("DispatchedJobID")),
                    *([("Evaluation ID", fmt.short_id(eval_id, ns.verbose))]
                      if eval_id else [])]))
        if ns.detach or not eval_id:
            return 0
        out()
        return await monitor_evaluation(client, eval_id, verbose=ns.verbose,
                                        time_limit=MONITOR_TIMEOUT)

    return run_with_client(ns, body)


def periodic_force_cmd(argv: Sequence[str]) -> int:
    p = CommandParser("job periodic force", "job periodic force [options] <job>",
                      "Launch a child of a periodic job now, whatever its schedule, and "
                      "monitor its evaluation.", namespaced=True)
    p.add_positionals("args", 1, 1)
    p.add_bool_flag("detach", help="return right after launching, without monitoring")
    p.add_bool_flag("verbose", help="show full IDs")
    ns = p.parse(argv)

    async def body(client: ApiClient) -> int:
        with reporting(f'Error forcing periodic job "{ns.args[0]}"'):
            job_id = await resolve_job(client, ns.args[0], "periodic job", _is_periodic)
            resp = await client.job_periodic_force(job_id)
        return await report_or_monitor(client, resp, ns, "Force periodic successful")

    return run_with_client(ns, body)


JOB_COMMANDS: Mapping[str, Command] = {
    "dispatch": dispatch_cmd,
    "periodic": command_group("job periodic", {"force": periodic_force_cmd}),
}
