"""Entry point: HCL2 jobspec text -> job dict in Nomad's API JSON shape.

Ties the steps together: syntax (python-hcl2), variables, locals, then the
job block decoder. The result matches what ``/v1/jobs/parse`` returns without
canonicalization (unset fields are ``None``). Pure computation: callers read
files themselves and pass the text in.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from lark import Tree

from nomad_client.jobspec.decode import decode_job
from nomad_client.jobspec.errors import JobspecError, type_name
from nomad_client.jobspec.evaluate import Evaluator, Scope
from nomad_client.jobspec.limits import Meter
from nomad_client.jobspec.syntax import Block, Source, parse_body
from nomad_client.jobspec.variables import VAR_FILE_NAME, declare_variables, resolve_variables

_TOP_LEVEL_BLOCKS = ("job", "variable", "locals")
# Finds what look like references to locals, in code, strings and heredocs alike.
_LOCAL_REFERENCE = re.compile(r"\blocal\.([A-Za-z_][A-Za-z0-9_-]*)")


def parse_jobspec(
    text: str,
    filename: str = "<jobspec>",
    variables: Mapping[str, str] | None = None,
    var_files_text: str | None = None,
    var_files: Sequence[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """Parse an HCL2 jobspec into a job dict (Go-style keys, unset fields ``None``).

    ``variables`` are command-line style ``NAME -> value`` strings and win over
    the variables files, which win over the defaults in ``variable`` blocks.
    ``var_files`` are ``(name, text)`` pairs of HCL variables files, applied in
    order so a later file wins; errors in one name it and its own line.
    ``var_files_text`` is the text of one unnamed variables file (reported as
    ``<var-file>``), applied before ``var_files``. Raises ``JobspecError``
    naming the file, line and problem.
    """
    if not isinstance(text, str):
        raise JobspecError(filename, None, f"the jobspec must be text, got {type_name(text)}")
    files = _var_files(var_files_text, var_files)
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

    # One meter for the whole parse: the limits bound all of its work together.
    meter = Meter()
    decls = declare_variables([b for b in body.blocks if b.type == "variable"], source, meter)
    values = resolve_variables(decls, filename, variables, files, meter)
    local_exprs = _local_exprs([b for b in body.blocks if b.type == "locals"], source)
    scope = Scope(values, local_exprs, meter=meter)
    # Evaluate every local once even if unused, so mistakes in them surface now.
    # Dependencies go first, so a long chain of locals never recurses deeply.
    for name in _evaluation_order(local_exprs):
        expr, _ = local_exprs[name]
        scope.lookup("local", name, source, expr)
    return decode_job(jobs[0], filename, Evaluator(source, scope))


def _var_files(
    var_files_text: str | None, var_files: Sequence[tuple[str, str]] | None
) -> list[tuple[str, str]]:
    files: list[tuple[str, str]] = []
    if var_files_text is not None:
        if not isinstance(var_files_text, str):
            raise JobspecError(VAR_FILE_NAME, None, "the variables file must be text")
        files.append((VAR_FILE_NAME, var_files_text))
    for item in var_files or ():
        if (
            not isinstance(item, tuple)
            or len(item) != 2
            or not all(isinstance(part, str) for part in item)
        ):
            raise JobspecError(
                VAR_FILE_NAME, None, "each variables file must be a (name, text) pair of strings"
            )
        files.append(item)
    return files


def _evaluation_order(exprs: Mapping[str, tuple[Tree, Source]]) -> list[str]:
    """Local names with (apparent) dependencies before their users.

    The dependencies are guessed from the source text, so a cycle here may be
    a false one: it is only skipped, and real cycles are reported when the
    locals are evaluated.
    """
    deps = {
        name: [d for d in _LOCAL_REFERENCE.findall(src.snippet(expr)) if d in exprs]
        for name, (expr, src) in exprs.items()
    }
    order: list[str] = []
    seen: set[str] = set()
    for root in exprs:
        if root in seen:
            continue
        seen.add(root)
        stack: list[tuple[str, Iterator[str]]] = [(root, iter(deps[root]))]
        while stack:
            name, pending = stack[-1]
            for dep in pending:
                if dep not in seen:
                    seen.add(dep)
                    stack.append((dep, iter(deps[dep])))
                    break
            else:
                stack.pop()
                order.append(name)
    return order


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
