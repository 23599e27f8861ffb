"""Node fingerprint: attributes, resources and driver entries."""

from __future__ import annotations

import ipaddress
import platform
import re
from datetime import UTC, datetime
from pathlib import Path

import psutil

from nomad_client.client import fingerprint as fp
from nomad_client.client.drivers import DriverInfo, builtin_drivers

REQUIRED = (
    "kernel.name",
    "kernel.version",
    "kernel.arch",
    "cpu.numcores",
    "cpu.arch",
    "cpu.totalcompute",
    "memory.totalbytes",
    "unique.hostname",
    "unique.storage.bytesfree",
    "nomad.version",
    "nomad.region",
)


class _Undetected:
    name = "docker"

    def fingerprint(self) -> DriverInfo:
        return DriverInfo(False, False, "docker not found", {"driver.docker.version": ""})


class _Broken:
    name = "broken"

    def fingerprint(self) -> DriverInfo:
        raise RuntimeError("probe crashed")


def test_attributes_and_resources() -> None:
    node = fp.fingerprint_node(builtin_drivers(), name="client-1", datacenter="dc1", region="eu")
    attrs_ = node["Attributes"]
    for key in REQUIRED:
        assert key in attrs_, key
    assert all(isinstance(v, str) and v for v in attrs_.values())
    assert attrs_["kernel.name"] == platform.system().lower()
    assert attrs_["cpu.numcores"] == str(psutil.cpu_count(logical=True))
    assert attrs_["memory.totalbytes"] == str(psutil.virtual_memory().total)
    assert attrs_["nomad.version"] == "0.1.0"
    assert attrs_["nomad.region"] == "eu"
    assert attrs_["driver.raw_exec"] == "1" and attrs_["driver.mock_driver"] == "1"
    total = int(attrs_["cpu.totalcompute"])
    assert total == int(attrs_["cpu.numcores"]) * int(attrs_["cpu.frequency"]) > 0
    assert node["NodeResources"] == {
        "Cpu": {"CpuShares": total},
        "Memory": {"MemoryMB": psutil.virtual_memory().total // (1024 * 1024)},
    }
    assert node["Name"] == "client-1" and node["Datacenter"] == "dc1"


def test_driver_entries() -> None:
    drivers = {**builtin_drivers(), "docker": _Undetected(), "broken": _Broken()}
    node = fp.fingerprint_node(drivers, name="n", datacenter="dc1", region="global")  # type: ignore[arg-type]
    entries = node["Drivers"]
    assert entries["raw_exec"]["Detected"] is True and entries["raw_exec"]["Healthy"] is True
    assert entries["raw_exec"]["HealthDescription"] == "Healthy"
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z", entries["raw_exec"]["UpdateTime"]
    )
    assert entries["docker"]["Detected"] is False
    assert "driver.docker" not in node["Attributes"]
    assert entries["broken"] == {
        "Detected": False,
        "Healthy": False,
        "HealthDescription": "fingerprint failed: probe crashed",
        "Attributes": {},
        "UpdateTime": entries["broken"]["UpdateTime"],
    }


def test_storage_dir_is_reported(workdir: Path) -> None:
    node = fp.fingerprint_node({}, name="n", datacenter="dc", region="r", storage_dir=workdir)
    assert node["Attributes"]["unique.storage.volume"] == str(workdir)
    assert int(node["Attributes"]["unique.storage.bytesfree"]) > 0


def test_os_release_parsing(workdir: Path) -> None:
    release = workdir / "os-release"
    release.write_text('NAME="Debian GNU/Linux"\nID=debian\nVERSION_ID="12"\n# comment\n')
    assert fp._os_release(release) == ("debian", "12")
    assert fp._os_release(workdir / "missing") == ("", "")


def test_rfc3339_nano() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)
    assert fp.rfc3339_nano(when) == "2026-01-02T03:04:05.123456000Z"


def test_network_address_is_the_bound_address() -> None:
    node = fp.fingerprint_node({}, name="n", datacenter="dc", region="r", bind_addr="127.0.0.2")
    assert node["Attributes"]["unique.network.ip-address"] == "127.0.0.2"
    # No bind address given: loopback, as a dev agent's.
    bare = fp.fingerprint_node({}, name="n", datacenter="dc", region="r")
    assert bare["Attributes"]["unique.network.ip-address"] == "127.0.0.1"


def test_a_wildcard_bind_stands_for_a_real_address() -> None:
    for wildcard, loopback in (("0.0.0.0", "127.0.0.1"), ("::", "::1")):
        address = ipaddress.ip_address(fp.network_address(wildcard))
        assert not address.is_unspecified
        assert address.is_private and (str(address) == loopback or not address.is_loopback)
    assert fp.network_address("::1") == "::1"
    assert fp.network_address("not-an-address") == "127.0.0.1"
