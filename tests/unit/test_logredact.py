"""The log redaction filter, and the listeners' rate-limited error log."""

from __future__ import annotations

import io
import logging
import uuid
from collections.abc import Iterator

import pytest

from nomad_client import logredact
from nomad_client.http.listeners import ErrorLog
from nomad_client.logredact import REDACTED, RedactingFilter, redact
from tests.integration.harness import eventually

JWT = ("eyJhbGciOiJSUzI1NiIsImtpZCI6ImsxIn0.eyJub21hZF9hbGxvY2F0aW9uX2lkIjoiYSJ9."
       "c2lnbmF0dXJlLXNpZ25hdHVyZS1zaWduYXR1cmU")
SECRET = str(uuid.uuid4())


@pytest.mark.parametrize("text", [
    f"token {JWT} refused",
    f"b'GET /v1/agent/health?token={JWT} HTTP/9.9'",
    f"X-Nomad-Token: {SECRET}",
    f"b'X-Nomad-Token: {SECRET}\\x01'",
    f"x-nomad-token={SECRET}&pretty=1",
    f"Authorization: Bearer {SECRET}",
    f"{{'Authorization': 'Bearer {SECRET}'}}",
    f"<CIMultiDictProxy('Host': 'x', 'X-Nomad-Token': '{SECRET}')>",
    f"{{b'X-Nomad-Token': b'{SECRET}'}}",
    f"ACLToken(accessor_id='{uuid.uuid4()}', secret_id='{SECRET}', name='ops')",
    f'{{"SecretID": "{SECRET}"}}',
    f"GET /v1/x?token={SECRET}",
    "-----BEGIN PRIVATE KEY-----\nMIIEvQ" + SECRET + "\n-----END PRIVATE KEY-----",
])
def test_secrets_are_redacted(text: str) -> None:
    clean = redact(text)
    assert JWT not in clean and SECRET not in clean, clean
    assert REDACTED in clean


@pytest.mark.parametrize("text", [
    "HTTP API listening on http://127.0.0.1:4646",
    f"alloc {uuid.uuid4()} started",  # IDs that are not secrets stay readable
    f"ACL token {uuid.uuid4()} expired",
    "authorization failed",
])
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redact(text) is text


def test_redacted_header_keeps_its_name() -> None:
    assert redact(f"Authorization: Bearer {SECRET}") == f"Authorization: Bearer {REDACTED}"
    assert redact(f"token={SECRET}") == f"token={REDACTED}"


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A root-like logger with one stream handler carrying the filter, as the agent sets up."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.Logger("test-root")
    root.addHandler(handler)
    logredact.install(root)
    logredact.install(root)  # idempotent
    assert sum(isinstance(f, RedactingFilter) for f in handler.filters) == 1
    yield root, stream
    handler.close()


def test_filter_redacts_arguments_and_tracebacks(
        captured: tuple[logging.Logger, io.StringIO]) -> None:
    root, stream = captured
    child = logging.Logger("aiohttp.server")
    child.parent = root  # records reach the handler by propagation, as in the agent
    child.warning("request with %s", f"X-Nomad-Token: {SECRET}")
    try:
        raise ValueError(f"Invalid header: b'Authorization: Bearer {JWT}'")
    except ValueError:
        child.exception("Error handling request")
    child.info("100%% %s", "harmless")
    out = stream.getvalue()
    assert SECRET not in out and JWT not in out, out
    assert "X-Nomad-Token: " + REDACTED in out
    assert "ValueError: Invalid header: b'Authorization: Bearer " + REDACTED in out
    assert "100% harmless" in out


async def test_error_log_is_rate_limited_and_reports_what_it_suppressed(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="nomad_client.http.listeners")
    errors = ErrorLog("test listener", lines=3, window=0.3)
    for i in range(50):
        errors.report("refused request %d", i)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [f"test listener: refused request {i}" for i in range(3)]

    await eventually(lambda: any("suppressed" in r.getMessage() for r in caplog.records),
                     timeout=10, interval=0.05, message="the suppressed-lines summary")
    assert caplog.records[-1].getMessage() == (
        "test listener: suppressed 47 more refused requests or connections")
    # A new window logs again.
    errors.report("refused request %d", 99)
    assert caplog.records[-1].getMessage() == "test listener: refused request 99"
    errors.close()
