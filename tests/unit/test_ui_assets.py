"""The web UI's files: served at /ui/ with their content types and every security header,
any other /ui/ path answered with the page (never another file), / redirected there on the
TCP listener only; and static checks that the page's code keeps to its safe subset."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nomad_client.server.keyring import Keyring
from nomad_client.ui import ASSETS, SECURITY_HEADERS, STATIC_DIR, read_asset
from tests.unit.factories import (
    HttpAnswer,
    InProcessAgent,
    identity_token,
    make_alloc,
    raw_exchange,
    request_bytes,
    seed,
    start_agent,
)

INDEX_HTML = (STATIC_DIR / "index.html").read_text()
APP_JS = (STATIC_DIR / "app.js").read_text()
APP_CSS = (STATIC_DIR / "app.css").read_text()


@pytest.fixture
async def agent(tmp_path: Path, keyring: Keyring) -> AsyncIterator[InProcessAgent]:
    started = await start_agent(tmp_path, keyring, acl=True, with_client=False,
                                task_sock=tmp_path / "api.sock")
    yield started
    await started.stop()


async def tcp_exchange(agent: InProcessAgent, method: str, target: str) -> HttpAnswer:
    """``target`` sent byte for byte (no client library normalizes ``..``) over TCP."""
    host, port = agent.api.tcp
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(request_bytes(method, target))
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        lines = head.decode("latin-1").split("\r\n")
        headers = {name.strip().lower(): value.strip() for name, _, value in
                   (line.partition(":") for line in lines[1:] if line)}
        length = 0 if method == "HEAD" else int(headers.get("content-length", 0))
        body = await asyncio.wait_for(reader.readexactly(length), 15)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
    return HttpAnswer(int(lines[0].split(" ")[1]), body.decode(), headers)


def assert_secured(answer: HttpAnswer) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert answer.headers.get(name.lower()) == value, name


# ---- serving ------------------------------------------------------------------------------
@pytest.mark.parametrize(("target", "content_type", "text"), [
    ("/ui/", "text/html", INDEX_HTML),
    ("/ui/index.html", "text/html", INDEX_HTML),
    ("/ui/app.js", "text/javascript", APP_JS),
    ("/ui/app.css", "text/css", APP_CSS),
])
async def test_assets_are_served_with_their_type_and_every_security_header(
        agent: InProcessAgent, target: str, content_type: str, text: str) -> None:
    answer = await tcp_exchange(agent, "GET", target)
    assert answer.status == 200
    assert answer.headers["content-type"] == f"{content_type}; charset=utf-8"
    assert answer.body == text
    assert_secured(answer)


def test_the_csp_allows_no_inline_script_and_no_other_origin() -> None:
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["script-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert "unsafe" not in csp and "*" not in csp and "http" not in csp


@pytest.mark.parametrize("target", [
    "/ui/jobs", "/ui/jobs/default/web", "/ui/favicon.ico", "/ui/app.js/..", "/ui/app.js/x",
    "/ui/../pyproject.toml", "/ui/%2e%2e/pyproject.toml", "/ui/..%2fpyproject.toml",
    "/ui/%2e%2e%2f%2e%2e%2fpyproject.toml", "/ui/static/app.js", "/ui/__init__.py",
    "/ui//etc/passwd", "/ui/./app.js", "/ui/APP.JS", "/ui/app.js%00",
])
async def test_any_other_ui_path_is_the_page_never_another_file(agent: InProcessAgent,
                                                                 target: str) -> None:
    answer = await tcp_exchange(agent, "GET", target)
    # The page (a deep link), or a plain refusal: never the bytes of any other file.
    assert answer.status in (200, 400, 404), answer
    if answer.status == 200:
        assert answer.body == INDEX_HTML
        assert_secured(answer)


@pytest.mark.parametrize("name", [
    "../pyproject.toml", "/etc/passwd", "static/app.js", "__init__.py", "", ".", "app.js/..",
])
def test_read_asset_knows_only_its_own_names(name: str) -> None:
    assert read_asset(name) is None


def test_every_asset_is_shipped() -> None:
    for name in ASSETS:
        found = read_asset(name)
        assert found is not None and found[0], name


async def test_head_is_answered_without_a_body(agent: InProcessAgent) -> None:
    answer = await tcp_exchange(agent, "HEAD", "/ui/app.js")
    assert answer.status == 200
    assert_secured(answer)


async def test_root_and_bare_ui_redirect_to_the_page_on_tcp(agent: InProcessAgent) -> None:
    for target in ("/", "/ui"):
        answer = await tcp_exchange(agent, "GET", target)
        assert answer.status == 307, target
        assert answer.headers["location"] == "/ui/"
    # Writes are no page: the route answers reads only.
    assert (await tcp_exchange(agent, "POST", "/ui/")).status == 405


async def test_a_task_socket_serves_the_ui_but_not_the_redirect(agent: InProcessAgent) -> None:
    alloc = make_alloc()
    await seed(agent.server, allocs=(alloc,))
    token = identity_token(agent.server.keyring, alloc)
    sock = agent.api.task_sock
    assert sock is not None
    page = await raw_exchange(sock, request_bytes("GET", "/ui/", token))
    assert page.status == 200 and page.body == INDEX_HTML
    assert_secured(page)
    assert (await raw_exchange(sock, request_bytes("GET", "/", token))).status == 404
    # The socket's authentication comes first, for the page too.
    assert (await raw_exchange(sock, request_bytes("GET", "/ui/"))).status == 401


# ---- static checks on the page's code ------------------------------------------------------
FORBIDDEN_IN_JS = ["innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(",
                   "new Function", "javascript:", "console.log", "setAttribute(\"on",
                   "localStorage"]


@pytest.mark.parametrize("needle", FORBIDDEN_IN_JS)
def test_app_js_never_uses_an_unsafe_sink(needle: str) -> None:
    assert needle not in APP_JS


def test_app_js_sets_only_listed_attributes() -> None:
    # Every setAttribute call names a fixed attribute; el() allows only its own list.
    names = re.findall(r"setAttribute\(([^,]+),", APP_JS)
    assert set(names) <= {'"class"', "name"}, names
    listed = re.search(r"const ATTRIBUTES = new Set\(\[(.*?)\]\)", APP_JS, re.S)
    assert listed is not None
    attributes = set(re.findall(r'"([^"]+)"', listed.group(1)))
    assert not {a for a in attributes if a.startswith("on")}
    assert {"style", "src", "srcdoc"}.isdisjoint(attributes)


def test_the_token_stays_in_session_storage_and_out_of_urls() -> None:
    assert 'sessionStorage.getItem(TOKEN_KEY)' in APP_JS
    assert '"X-Nomad-Token"' in APP_JS
    # The stored secret is read in two places: for the request header, and to see
    # whether there is one. It goes nowhere else (no URL, no page text, no log).
    reads = [line.strip() for line in APP_JS.splitlines() if re.search(r"\btoken\(\)", line)]
    assert reads == ["function token() {", "const tokenSecret = token();", "if (!token()) {"]
    uses = [line.strip() for line in APP_JS.splitlines() if "tokenSecret" in line]
    assert uses == ["const tokenSecret = token();", "if (tokenSecret) {",
                    'headers["X-Nomad-Token"] = tokenSecret;']
    assert "token=" not in APP_JS.lower()


@pytest.mark.parametrize("text", [INDEX_HTML, APP_JS, APP_CSS], ids=["html", "js", "css"])
def test_nothing_is_loaded_from_another_host(text: str) -> None:
    assert not re.search(r"https?://", text)
    assert "//" not in re.sub(r"(?m)^\s*//.*$|\s//.*$", "", text).replace("://", "")
    assert "@import" not in text and "url(" not in text


def test_index_html_has_no_inline_script_style_or_handlers() -> None:
    scripts = re.findall(r"<script\b([^>]*)>(.*?)</script>", INDEX_HTML, re.S | re.I)
    assert scripts, "the page loads its script"
    for attrs, body in scripts:
        assert body.strip() == "" and 'src="/ui/app.js"' in attrs
    assert not re.search(r"<style\b", INDEX_HTML, re.I)
    assert not re.search(r"\sstyle\s*=", INDEX_HTML, re.I)
    assert not re.search(r"\son[a-z]+\s*=", INDEX_HTML, re.I)
    assert "javascript:" not in INDEX_HTML.lower()


def test_index_html_has_the_contract_hooks() -> None:
    for nav in ("jobs", "nodes", "variables", "token"):
        assert f'data-nav="{nav}"' in INDEX_HTML
    assert 'id="error-banner"' in INDEX_HTML and 'id="main"' in INDEX_HTML
