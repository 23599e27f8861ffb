"""Task drivers: the contract (``base``), ``raw_exec``, ``exec`` and ``mock_driver``.

Importing this package is cheap: concrete drivers are imported by ``builtin_drivers``, so
the raw_exec executor (run as a module of this package) starts without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from nomad_client.durations import parse_duration

from .base import (
    Driver,
    DriverError,
    DriverInfo,
    ExecTarget,
    ExitResult,
    TaskConfig,
    TaskHandle,
)

if TYPE_CHECKING:
    from .exec import ExecDriverConfig

__all__ = [
    "Driver",
    "DriverError",
    "DriverInfo",
    "ExecTarget",
    "ExitResult",
    "TaskConfig",
    "TaskHandle",
    "builtin_drivers",
    "parse_duration",
]


def builtin_drivers(exec_config: ExecDriverConfig | None = None) -> dict[str, Driver]:
    """A fresh instance of every built-in driver, by name (``exec`` with the client's
    options, or its defaults)."""
    from .exec import ExecDriver
    from .mock import MockDriver
    from .raw_exec import RawExecDriver

    drivers: list[Driver] = [RawExecDriver(), ExecDriver(exec_config), MockDriver()]
    return {d.name: d for d in drivers}
