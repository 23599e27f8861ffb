"""python-nomad's own test suite against this agent, the way python-nomad's CI runs it.

Its CI starts ``nomad agent -dev -node pynomad1 -acl-enabled``, writes ``example.json`` from
``nomad init`` (a docker job: job "example", group "cache", task "redis") and runs
``py.test --runxfail tests/`` with ``NOMAD_IP``, ``NOMAD_PORT`` and ``NOMAD_VERSION`` set
(``test_acl.py`` bootstraps ACLs and hands the token to the other tests). This script does the
same against a dev agent of this project, on a free port, in a temporary directory:

* it copies the checkout given on the command line (the checkout itself is left alone) and
  writes there an ``example.nomad`` and ``example.json`` with the same names whose task runs
  ``raw_exec`` (there is no docker driver here), and turns the docker task of
  ``example_batch_parameterized.json`` into ``raw_exec`` too;
* it runs the test files (all of ``tests/``, or those named after the checkout) with
  ``NOMAD_VERSION`` (default 1.9.5, the newest in python-nomad's CI matrix: the tests skip
  features newer than it) and prints PASS/FAIL/ERROR/SKIP per test, then the totals. When
  the files named leave out ``test_acl.py``, the script bootstraps ACLs itself and exports
  the token as ``NOMAD_TOKEN``.

Needs python-nomad's test dependencies: ``pip install -e '.[test,python-nomad-suite]'``.
Not part of ``make test``. Usage::

    python scripts/python_nomad_suite.py /path/to/python-nomad [tests/test_job.py ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STARTED = re.compile(r"HTTP API: http://([0-9.]+):(\d+)")
# The task of the example job: runs until stopped, like the redis container it replaces, and
# (like redis) survives the SIGUSR1 the signal tests send it.
SERVICE_SCRIPT = "trap '' USR1 USR2 HUP; while :; do sleep 1; done"
# ``nomad init``'s example.nomad without its comments, its ui and migrate blocks and the task's
# shutdown_delay (this agent's jobspec does not know them), run by raw_exec, not docker.
# test_jobs.py parses it; example.json is made from it as ``nomad run -output`` does.
EXAMPLE_HCL = """\
job "example" {
  datacenters = ["*"]
  type = "service"

  update {
    max_parallel      = 1
    min_healthy_time  = "10s"
    healthy_deadline  = "3m"
    progress_deadline = "10m"
    auto_revert       = false
    canary            = 0
  }

  group "cache" {
    count = 1

    network {
      port "db" {
        to = 6379
      }
    }

    service {
      name     = "redis-cache"
      tags     = ["global", "cache"]
      port     = "db"
      provider = "nomad"
    }

    restart {
      attempts = 2
      interval = "30m"
      delay    = "15s"
      mode     = "fail"
    }

    ephemeral_disk {
      size = 300
    }

    task "redis" {
      driver = "raw_exec"

      config {
        command = "/bin/sh"
        args    = ["-c", SERVICE_SCRIPT]
      }

      identity {
        env  = true
        file = true
      }

      resources {
        cpu    = 500
        memory = 256
      }
    }
  }
}
""".replace("SERVICE_SCRIPT", json.dumps(SERVICE_SCRIPT))


def adapt_checkout(source: Path, work: Path) -> Path:
    """A copy of the checkout with the example jobs raw_exec can run."""
    copy = work / "python-nomad"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns(".git", "__pycache__"))
    (copy / "example.nomad").write_text(EXAMPLE_HCL)
    with (copy / "example.json").open("wb") as output:
        subprocess.run([sys.executable, "-m", "nomad_client", "job", "run", "-output",
                        str(copy / "example.nomad")], stdout=output, cwd=REPO, check=True)
    batch = copy / "example_batch_parameterized.json"
    if batch.exists():
        spec = json.loads(batch.read_text())
        for group in spec["Job"]["TaskGroups"]:
            for task in group["Tasks"]:
                args = (task.get("Config") or {}).get("args") or []
                task.update(Driver="raw_exec",
                            Config={"command": "/bin/sleep", "args": args or ["1"]})
        batch.write_text(json.dumps(spec, indent=2))
    return copy


def start_agent(work: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    """A dev agent with ACLs on, its output in ``agent.log``; (process, ip, port)."""
    log = work / "agent.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
    with log.open("wb") as sink:
        agent = subprocess.Popen(
            [sys.executable, "-m", "nomad_client", "agent", "-dev", "-node", "pynomad1",
             "-acl-enabled", "-http-port", "0", "-data-dir", str(work / "data")],
            stdout=sink, stderr=subprocess.STDOUT, cwd=REPO, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and agent.poll() is None:
        found = STARTED.search(log.read_text(errors="replace"))
        if found and _healthy(found.group(1), found.group(2)):
            return agent, found.group(1), found.group(2)
        time.sleep(0.2)
    agent.kill()
    raise SystemExit("the agent did not start:\n" + log.read_text(errors="replace"))


def _healthy(ip: str, port: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/v1/agent/health", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def stop_agent(agent: subprocess.Popen[bytes]) -> None:
    agent.send_signal(signal.SIGINT)
    try:
        agent.wait(timeout=30)
    except subprocess.TimeoutExpired:
        agent.kill()
        agent.wait()


def bootstrap_token(ip: str, port: str) -> str:
    """The management token, for a run without test_acl.py (which bootstraps otherwise)."""
    request = urllib.request.Request(f"http://{ip}:{port}/v1/acl/bootstrap", method="POST")
    with urllib.request.urlopen(request, timeout=10) as answer:
        return str(json.load(answer)["SecretID"])


def run_suite(checkout: Path, ip: str, port: str, version: str, files: list[str],
              report: Path) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOMAD_")}
    env.update(NOMAD_IP=ip, NOMAD_PORT=port, NOMAD_VERSION=version)
    if files and not any(Path(f).name == "test_acl.py" for f in files):
        env["NOMAD_TOKEN"] = bootstrap_token(ip, port)
    command = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--runxfail",
               "-q", "--timeout", "120", f"--junitxml={report}", *(files or ["tests/"])]
    with (report.parent / "pytest.log").open("wb") as log:
        return subprocess.run(command, cwd=checkout, env=env, check=False,
                              stdout=log, stderr=subprocess.STDOUT).returncode


def outcomes(report: Path) -> list[tuple[str, str, str]]:
    """(outcome, test, first line of the reason) for each test case of a JUnit report."""
    results = []
    for case in ET.parse(report).iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        outcome, reason = "PASS", ""
        for kind, label in (("failure", "FAIL"), ("error", "ERROR"), ("skipped", "SKIP")):
            found = case.find(kind)
            if found is not None:
                outcome = label
                lines = (found.get("message") or found.text or "").strip().splitlines()
                reason = lines[0][:160] if lines else ""
                break
        results.append((outcome, name, reason))
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkout", type=Path, help="a python-nomad checkout (with tests/)")
    parser.add_argument("files", nargs="*", help="test files to run (default: tests/)")
    parser.add_argument("--nomad-version", default="1.9.5",
                        help="NOMAD_VERSION for the tests' version gates (default 1.9.5)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    if not (args.checkout / "tests" / "conftest.py").is_file():
        parser.error(f"{args.checkout} is not a python-nomad checkout (no tests/conftest.py)")
    work = Path(tempfile.mkdtemp(prefix="python-nomad-suite-"))
    try:
        checkout = adapt_checkout(args.checkout.resolve(), work)
        agent, ip, port = start_agent(work)
        try:
            run_suite(checkout, ip, port, args.nomad_version, args.files, work / "junit.xml")
        finally:
            stop_agent(agent)
        if not (work / "junit.xml").exists():
            print((work / "pytest.log").read_text(errors="replace"), file=sys.stderr)
            raise SystemExit("pytest did not run the suite (its output is above)")
        results = outcomes(work / "junit.xml")
        for outcome, name, reason in results:
            print(f"{outcome:5} {name}" + (f"  -- {reason}" if reason else ""))
        totals = {label: sum(1 for r in results if r[0] == label)
                  for label in ("PASS", "FAIL", "ERROR", "SKIP")}
        print(f"\n{len(results)} tests: " + ", ".join(f"{v} {k}" for k, v in totals.items()))
        return 0 if totals["FAIL"] == totals["ERROR"] == 0 else 1
    finally:
        if args.keep:
            print(f"work directory kept: {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
