"""``make demo``: the Task API page's example, end to end.

Starts a dev agent (temporary data dir, a free port), runs
``testdata/jobs/taskapi-example.nomad.hcl`` — a batch task that uses curl over its
``$NOMAD_SECRETS_DIR/api.sock`` with its workload identity to set dynamic node metadata —
then shows the node found by ``node status -filter 'Meta.example == "Hello World!"'`` and the
node's metadata, using the project's own CLI. Stops the agent afterwards.

It lives in the repository, not the package: it reads the example job from ``testdata/``,
which only a checkout has. Run it from anywhere: ``python scripts/demo.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

REPO = Path(__file__).resolve().parent.parent
JOB = "testdata/jobs/taskapi-example.nomad.hcl"  # relative to REPO


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
        if _cli(address, "job", "run", JOB).returncode != 0:
            return 1
        found = None
        for _ in range(50):  # metadata reaches the server within a second; allow 5 s
            found = _cli(address, "node", "status", "-filter", 'Meta.example == "Hello World!"')
            if found.returncode == 0 and "ready" in found.stdout:
                break
            time.sleep(0.1)
        meta = _cli(address, "node", "meta", "read")
        ok = found is not None and "ready" in found.stdout and \
            "example = Hello World!" in meta.stdout
        print("==> demo " + ("succeeded" if ok else "FAILED"), flush=True)
        return 0 if ok else 1
    finally:
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()


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
