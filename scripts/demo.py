"""``make demo``: the Task API page's example, end to end.

Starts a dev agent (temporary data dir, a free port), runs
``testdata/jobs/taskapi-example.nomad.hcl`` — a batch task that uses curl over its
``$NOMAD_SECRETS_DIR/api.sock`` with its workload identity to set dynamic node metadata —
then shows the node found by ``node status -filter 'Meta.example == "Hello World!"'`` and the
node's metadata, using the project's own CLI. Then the same example isolated
(``testdata/jobs/taskapi-exec.nomad.hcl``: the ``exec`` driver, ``network { mode = "none" }``,
so the socket is the task's only way to the agent), after unsetting the metadata; skipped,
with the driver's reason, where the node cannot run exec tasks (e.g. not root). Stops the
agent afterwards.

It lives in the repository, not the package: it reads the example job from ``testdata/``,
which only a checkout has. Run it from anywhere: ``python scripts/demo.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
JOB = "testdata/jobs/taskapi-example.nomad.hcl"  # relative to REPO
EXEC_JOB = "testdata/jobs/taskapi-exec.nomad.hcl"


def _cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NOMAD_ADDR": address}
    env.pop("NOMAD_TOKEN", None)
    print(f"$ nomad-client {' '.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "nomad_client", *args], env=env,
                            cwd=REPO, text=True, capture_output=True, timeout=120)
    print(result.stdout + result.stderr, end="", flush=True)
    return result


def main() -> int:
    if shutil.which("curl") is None:
        print("The demo's task runs the system curl, which is not installed here "
              "(Debian: apt-get install curl).", file=sys.stderr)
        return 1
    agent = subprocess.Popen(
        [sys.executable, "-m", "nomad_client", "agent", "-dev", "-http-port", "0",
         "-log-level", "WARN"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        address = _wait_for_address(agent)
        print(f"==> dev agent at {address}", flush=True)
        ok = _run_example(address, JOB)
        unavailable = _exec_unavailable(address)
        if unavailable:
            print(f"==> skipping {EXEC_JOB}: {unavailable}", flush=True)
        elif ok:
            ok = _cli(address, "node", "meta", "apply", "-unset", "example").returncode == 0 \
                and _run_example(address, EXEC_JOB)
        print("==> demo " + ("succeeded" if ok else "FAILED"), flush=True)
        return 0 if ok else 1
    finally:
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()


def _run_example(address: str, job: str) -> bool:
    """Run ``job`` and tell whether its metadata reached the node."""
    print(f"==> {job}", flush=True)
    if _cli(address, "job", "run", job).returncode != 0:
        return False
    found = None
    for _ in range(50):  # metadata reaches the server within a second; allow 5 s
        found = _cli(address, "node", "status", "-filter", 'Meta.example == "Hello World!"')
        if found.returncode == 0 and "ready" in found.stdout:
            break
        time.sleep(0.1)
    meta = _cli(address, "node", "meta", "read")
    return found is not None and "ready" in found.stdout and \
        "example = Hello World!" in meta.stdout


def _exec_unavailable(address: str) -> str | None:
    """Why this node's exec driver cannot run the isolated example, or None."""
    with urllib.request.urlopen(f"{address}/v1/nodes", timeout=10) as reply:
        (node,) = json.load(reply)
    with urllib.request.urlopen(f"{address}/v1/node/{node['ID']}", timeout=10) as reply:
        driver = (json.load(reply).get("Drivers") or {}).get("exec") or {}
    if driver.get("Healthy"):
        return None
    return str(driver.get("HealthDescription") or "the exec driver is not detected")


def _wait_for_address(agent: subprocess.Popen[str]) -> str:
    assert agent.stdout is not None
    for line in agent.stdout:
        match = re.search(r"HTTP API: (http://\S+)", line)
        if match:
            # Keep draining the agent's output so a full pipe can never stall it.
            threading.Thread(target=_drain, args=(agent.stdout,), daemon=True).start()
            return match.group(1)
        print(line, end="", file=sys.stderr)
    raise SystemExit("the agent exited before it started serving")


def _drain(stream: IO[str]) -> None:
    for line in stream:
        print(line, end="", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
