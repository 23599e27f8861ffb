"""Nomad HCL2 jobspecs: parse them into API-shaped job dicts and canonicalize those.

Public surface of the package; the modules behind it are pure (no I/O). Its HCL front-end
(``syntax``, with ``plain`` for files of literal values) also reads the agent's config files.
"""

from nomad_client.durations import DurationError, format_duration, parse_duration_ns
from nomad_client.jobspec.canonical import canonicalize_job
from nomad_client.jobspec.errors import JobspecError, JobValidationError
from nomad_client.jobspec.parser import parse_jobspec
from nomad_client.jobspec.variables import parse_var_assignments

__all__ = [
    "DurationError",
    "JobValidationError",
    "JobspecError",
    "canonicalize_job",
    "format_duration",
    "parse_duration_ns",
    "parse_jobspec",
    "parse_var_assignments",
]
