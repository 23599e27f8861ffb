"""Entry point: HCL2 jobspec text -> job dict in Nomad's API JSON shape.

Ties the steps together: syntax (python-hcl2), variables, locals, then the
job block decoder. The result matches what ``/v1/jobs/parse`` returns without
canonicalization (unset fields are ``None``). Pure computation: callers read
files themselves and pass the text in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nomad_client.jobspec.decode import decode_job
from nomad_client.jobspec.errors import JobspecError
from nomad_client.jobspec.evaluate import Evaluator, Scope
from nomad_client.jobspec.syntax import Block, Source, parse_body
from nomad_client.jobspec.variables import declare_variables, resolve_variables

_TOP_LEVEL_BLOCKS = ("job", "variable", "locals")


def parse_jobspec(
    text: str,
    filename: str = "<jobspec>",
    variables: Mapping[str, str] | None = None,
    var_files_text: str | None = None,
) -> dict[str, Any]:
    """Parse an HCL2 jobspec into a job dict (Go-style keys, unset fields ``None``).

    ``variables`` are command-line style ``NAME -> value`` strings and win over
    ``var_files_text`` (the text of an HCL variables file), which wins over the
    defaults in ``variable`` blocks. Raises ``JobspecError`` naming the file,
    line and problem.
    """
    if not text.strip():
        raise JobspecError(filename, None, "jobspec is empty")
    body, source = parse_body(text, filename)
    if body.attributes:
        attr = body.attributes[0]
        raise JobspecError(
            filename,
            attr.line,
            f"unexpected attribute {attr.name!r} at top level "
            "(expected job, variable or locals blocks)",
        )
    for block in body.blocks:
        if block.type not in _TOP_LEVEL_BLOCKS:
            raise JobspecError(
                filename,
                block.line,
                f"unknown top-level block {block.type!r} (expected job, variable or locals)",
            )
    jobs = [b for b in body.blocks if b.type == "job"]
    if not jobs:
        raise JobspecError(filename, None, 'no job block found: expected job "<id>" { ... }')
    if len(jobs) > 1:
        raise JobspecError(
            filename,
            jobs[1].line,
            f"only one job block is allowed per file (first at line {jobs[0].line})",
        )

    decls = declare_variables([b for b in body.blocks if b.type == "variable"], source)
    values = resolve_variables(decls, filename, variables, var_files_text)
    scope = Scope(values, _local_exprs([b for b in body.blocks if b.type == "locals"], source))
    # Evaluate every local once even if unused, so mistakes in them surface now.
    for name in scope.local_exprs:
        expr, _ = scope.local_exprs[name]
        scope.lookup("local", name, source, expr)
    return decode_job(jobs[0], filename, Evaluator(source, scope))


def _local_exprs(blocks: list[Block], source: Source) -> dict[str, Any]:
    exprs: dict[str, Any] = {}
    lines: dict[str, int | None] = {}
    for block in blocks:
        if block.labels:
            raise JobspecError(source.filename, block.line, "a locals block takes no label")
        if block.body.blocks:
            inner = block.body.blocks[0]
            raise JobspecError(
                source.filename,
                inner.line,
                f"locals: unexpected block {inner.type!r} (only NAME = value is allowed)",
            )
        for attr in block.body.attributes:
            if attr.name in exprs:
                raise JobspecError(
                    source.filename,
                    attr.line,
                    f"local value {attr.name!r} is defined more than once "
                    f"(first at line {lines[attr.name]})",
                )
            exprs[attr.name] = (attr.expr, source)
            lines[attr.name] = attr.line
    return exprs
