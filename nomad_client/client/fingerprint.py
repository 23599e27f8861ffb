"""The node fingerprint: host attributes, resources and driver health.

Reads host facts only (platform, psutil, ``/etc/os-release``, ``/proc/cpuinfo``) and asks
each driver for its fingerprint; changes nothing. Synchronous and cheap; called once at
start (in a thread).
"""

from __future__ import annotations

import ipaddress
import os
import platform
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from nomad_client.client.drivers.base import Driver
from nomad_client.structs.models import DriverInfo
from nomad_client.structs.network import NODE_ADDRESS_ATTRIBUTE

__all__ = ["NOMAD_VERSION", "fingerprint_node", "network_address", "rfc3339_nano"]

NOMAD_VERSION = "0.1.0"
# When the host will not tell its CPU speed (common in containers), assume this per core.
DEFAULT_CPU_MHZ = 1000
# kernel.arch is the machine name; cpu.arch uses Go's architecture names.
_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "armv7l": "arm",
}


def rfc3339_nano(when: datetime) -> str:
    """``2026-01-02T03:04:05.123456000Z``: UTC with nanosecond digits, as the API encodes time."""
    when = when.astimezone(UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond:06d}000Z"


def _os_release(path: Path = Path("/etc/os-release")) -> tuple[str, str]:
    values: dict[str, str] = {}
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "", ""
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip('"').strip("'")
    return values.get("ID", ""), values.get("VERSION_ID", "")


def _cpu_mhz() -> int:
    try:
        freq = psutil.cpu_freq()
    except (OSError, NotImplementedError, RuntimeError):
        freq = None
    if freq is not None:
        mhz = freq.max or freq.current
        if mhz and mhz > 0:
            return int(mhz)
    # Fall back to the fastest "cpu MHz" line the kernel reports.
    best = 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("cpu mhz"):
                try:
                    best = max(best, float(line.split(":", 1)[1]))
                except (IndexError, ValueError):
                    continue
    except OSError:
        pass
    return int(best) if best > 0 else DEFAULT_CPU_MHZ


def network_address(bind_host: str) -> str:
    """The address this host is reached at when the agent is bound to ``bind_host``: that
    address itself, or for a wildcard (``0.0.0.0``, ``::``) the host's first private address
    of that family (as Nomad's advertise default), else loopback."""
    try:
        addr = ipaddress.ip_address(bind_host)
    except ValueError:  # a name, not an address (the agent's own bind is always one)
        return "127.0.0.1"
    if not addr.is_unspecified:
        return str(addr)
    family = socket.AF_INET if addr.version == 4 else socket.AF_INET6
    for addresses in psutil.net_if_addrs().values():
        for entry in addresses:
            if entry.family != family:
                continue
            candidate = ipaddress.ip_address(entry.address.split("%", 1)[0])
            if candidate.is_private and not (candidate.is_loopback or candidate.is_link_local):
                return str(candidate)
    return "127.0.0.1" if addr.version == 4 else "::1"


def _driver_entry(driver: Driver, now: str) -> dict[str, Any]:
    try:
        info = driver.fingerprint()
    except Exception as exc:  # one broken driver must not hide the node
        info = DriverInfo(False, False, f"fingerprint failed: {exc}")
    return {
        "Detected": info.detected,
        "Healthy": info.healthy,
        "HealthDescription": info.health_description,
        "Attributes": dict(info.attributes),
        "UpdateTime": now,
    }


def fingerprint_node(
    drivers: Mapping[str, Driver],
    *,
    name: str,
    datacenter: str,
    region: str,
    storage_dir: str | os.PathLike[str] | None = None,
    bind_addr: str | None = None,
) -> dict[str, Any]:
    """Describe this host as a partial Node object.

    Returns ``{"Name", "Datacenter", "Attributes", "Drivers", "NodeResources"}``; every
    attribute value is a string. ``storage_dir`` is where allocations live (the
    ``unique.storage.*`` attributes describe its filesystem); default ``/``. ``bind_addr``
    is the address the agent is bound to: its ``network_address`` is where allocations'
    ports are reached (``unique.network.ip-address``; loopback when not given).
    """
    now = rfc3339_nano(datetime.now(UTC))
    cores = psutil.cpu_count(logical=True) or os.cpu_count() or 1
    mhz = _cpu_mhz()
    total_compute = cores * mhz
    memory = psutil.virtual_memory().total
    os_name, os_version = _os_release()
    machine = platform.machine()
    storage_path = str(storage_dir) if storage_dir is not None else "/"
    try:
        disk = psutil.disk_usage(storage_path)
        storage = {
            "unique.storage.volume": storage_path,
            "unique.storage.bytestotal": str(disk.total),
            "unique.storage.bytesfree": str(disk.free),
        }
    except OSError:
        storage = {}

    attributes: dict[str, str] = {
        "kernel.name": platform.system().lower(),
        "kernel.version": platform.release(),
        "kernel.arch": machine,
        "os.name": os_name,
        "os.version": os_version,
        "cpu.arch": _GOARCH.get(machine.lower(), machine.lower()),
        "cpu.numcores": str(cores),
        "cpu.frequency": str(mhz),
        "cpu.totalcompute": str(total_compute),
        "memory.totalbytes": str(memory),
        "unique.hostname": socket.gethostname(),
        NODE_ADDRESS_ATTRIBUTE: network_address(bind_addr or "127.0.0.1"),
        "nomad.version": NOMAD_VERSION,
        "nomad.region": region,
        **storage,
    }
    attributes = {k: v for k, v in attributes.items() if v}  # unknown facts are left out
    driver_entries = {key: _driver_entry(drv, now) for key, drv in drivers.items()}
    for key, entry in driver_entries.items():
        if entry["Detected"]:
            attributes[f"driver.{key}"] = "1"
    return {
        "Name": name,
        "Datacenter": datacenter,
        "Attributes": attributes,
        "Drivers": driver_entries,
        "NodeResources": {
            "Cpu": {"CpuShares": total_compute},
            "Memory": {"MemoryMB": memory // (1024 * 1024)},
        },
    }
