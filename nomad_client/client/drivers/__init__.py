"""Task drivers: the contract (``base``), ``raw_exec`` and ``mock_driver``.

Importing this package is cheap: concrete drivers are imported by ``builtin_drivers``, so
the raw_exec executor (run as a module of this package) starts without them.
"""

from __future__ import annotations

from nomad_client.durations import parse_duration

from .base import Driver, DriverError, DriverInfo, ExitResult, TaskConfig, TaskHandle

__all__ = [
    "Driver",
    "DriverError",
    "DriverInfo",
    "ExitResult",
    "TaskConfig",
    "TaskHandle",
    "builtin_drivers",
    "parse_duration",
]


def builtin_drivers() -> dict[str, Driver]:
    """A fresh instance of every built-in driver, by name."""
    from .mock import MockDriver
    from .raw_exec import RawExecDriver

    drivers: list[Driver] = [RawExecDriver(), MockDriver()]
    return {d.name: d for d in drivers}
