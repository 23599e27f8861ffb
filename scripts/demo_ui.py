"""``make demo-ui``: the web UI served by a task, over HTTPS, through its Task API socket.

Starts a dev agent with ACLs on (temporary data dir, a free port), bootstraps them, runs
``testdata/jobs/ui-proxy.nomad.hcl`` with this interpreter as the task's Python, waits until
the proxy answers, then prints the URL to open and the management token to paste on the
UI's token page. The certificate is self-signed (made at the task's start), so the browser
asks to accept it once. Runs until Ctrl-C, then stops the job and the agent.

It lives in the repository, not the package: it reads the job from ``testdata/``, which only
a checkout has. Run it from anywhere: ``python scripts/demo_ui.py``.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

# The sibling demo script (this directory is first on sys.path when a script runs).
from demo import _wait_for_address

REPO = Path(__file__).resolve().parent.parent
JOB = "testdata/jobs/ui-proxy.nomad.hcl"  # relative to REPO
JOB_ID = "ui-proxy"


def main() -> int:
    agent = subprocess.Popen(
        [sys.executable, "-m", "nomad_client", "agent", "-dev", "-acl-enabled",
         "-http-port", "0", "-log-level", "WARN"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        # Its own session: Ctrl-C in the terminal reaches this script only, which then stops
        # the job before the agent.
        start_new_session=True)
    try:
        address = _wait_for_address(agent)
        print(f"==> dev agent at {address}", flush=True)
        token = str(_api(address, "POST", "/v1/acl/bootstrap")["SecretID"])
        if not _run_job(address, token):
            return 1
        url = _wait_for_proxy(address, token)
        if url is None:
            return 1
        print("==> the UI, served by the task over HTTPS:", flush=True)
        print(f"    {url}", flush=True)
        print("    (a self-signed certificate: accept it in the browser once)", flush=True)
        print(f"==> management token (paste it on the UI's Token page): {token}", flush=True)
        print("==> Ctrl-C to stop", flush=True)
        _wait_for_interrupt(agent)
        print("\n==> stopping", flush=True)
        _cli(address, token, "job", "stop", "-purge", JOB_ID)
        return 0
    finally:
        agent.send_signal(signal.SIGINT)
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait()


def _run_job(address: str, token: str) -> bool:
    print(f"==> {JOB}", flush=True)
    result = _cli(address, token, "job", "run", "-detach", "-var", f"python={sys.executable}",
                  JOB)
    print(result.stdout + result.stderr, end="", flush=True)
    return result.returncode == 0


def _wait_for_proxy(address: str, token: str) -> str | None:
    """The proxy's UI URL once it answers over HTTPS; None if it does not within a minute."""
    deadline = time.monotonic() + 60
    url = None
    while time.monotonic() < deadline:
        if url is None:
            url = _proxy_url(address, token)
        if url is not None and _answers(url):
            return url
        time.sleep(0.5)
    print("the proxy did not come up within a minute; its task's state:", file=sys.stderr)
    for alloc in _api(address, "GET", f"/v1/job/{JOB_ID}/allocations", token):
        print(json.dumps(alloc.get("TaskStates"), indent=2), file=sys.stderr)
    return None


def _proxy_url(address: str, token: str) -> str | None:
    for stub in _api(address, "GET", f"/v1/job/{JOB_ID}/allocations", token):
        if stub.get("ClientStatus") != "running":
            continue
        alloc = _api(address, "GET", f"/v1/allocation/{stub['ID']}", token)
        shared = (alloc.get("AllocatedResources") or {}).get("Shared") or {}
        for port in shared.get("Ports") or ():
            if port.get("Label") == "https":
                host = port.get("HostIP") or "127.0.0.1"
                host = f"[{host}]" if ":" in host else host
                return f"https://{host}:{port['Value']}/ui/"
    return None


def _answers(url: str) -> bool:
    # Only to see that it is up: the certificate is self-signed, so no verification here.
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, timeout=5, context=context) as reply:
            return bool(reply.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def _api(address: str, method: str, path: str, token: str | None = None) -> Any:
    request = urllib.request.Request(f"{address}{path}", method=method,
                                     data=b"" if method != "GET" else None)
    if token:
        request.add_header("X-Nomad-Token", token)
    with urllib.request.urlopen(request, timeout=10) as reply:
        return json.load(reply)


def _cli(address: str, token: str, *args: str) -> subprocess.CompletedProcess[str]:
    # The token travels in the environment, never on a command line others could read.
    env = {**os.environ, "NOMAD_ADDR": address, "NOMAD_TOKEN": token}
    print(f"$ nomad-client {' '.join(args)}", flush=True)
    return subprocess.run([sys.executable, "-m", "nomad_client", *args], env=env, cwd=REPO,
                          text=True, capture_output=True, timeout=120)


def _wait_for_interrupt(agent: subprocess.Popen[str]) -> None:
    """Until Ctrl-C (or SIGTERM), or the agent exits by itself."""
    stop = threading.Event()
    # Set explicitly: a shell's background job starts with SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        if agent.poll() is not None:
            print("the agent exited", file=sys.stderr)
            return


if __name__ == "__main__":
    raise SystemExit(main())
