"""The web UI in a real browser, against real agents with ACLs on: log in with a token, follow
a job to its allocation and watch a log line and a task event arrive, see a node's metadata
set by the Task API example, see nothing of the jobs with a token that may not read them, and
see hostile values (job meta, log lines, node meta) shown as text that never runs.

Each check runs twice: straight at the agent's HTTP listener, and through the UI proxy job
(``testdata/jobs/ui-proxy.nomad.hcl``) over HTTPS with its self-signed certificate, whose
errors the browser context accepts (here only). Screenshots of the main views are written to
$NOMAD_UI_SCREENSHOTS (or the test's temp dir)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import attrs
import pytest

from tests.integration.harness import (
    POLICY_DIR,
    AgentProcess,
    apply_policy,
    assert_no_secrets,
    bootstrap_acls,
    client_token,
    load_job,
    raw_exec_job,
    run_job,
    start_ui_proxy,
    task_dir,
    wait_client_status,
    wait_task_state,
)

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page, ViewportSize

pytestmark = [
    pytest.mark.integration,
    # The first test may wait for apt to install Chromium (bounded in conftest).
    pytest.mark.timeout(360),
]

# How long the page may take to show what the API already says (a blocking query answers
# at once on a change; the logs are re-read every 2 s). Milliseconds, as Playwright counts.
SHOWN_MS = 20_000
VIEWPORT: ViewportSize = {"width": 1100, "height": 700}

SCRIPT_IN_META = "<script>window.__pwned=1</script>"
SCRIPT_IN_LOG = '<script>window.__pwned=2</script><img src=x onerror="window.__pwned=3">'
SCRIPT_IN_NODE_META = '<img src=x onerror="window.__pwned=4"><script>window.__pwned=5</script>'


@attrs.frozen
class Deployment:
    """An agent with ACLs on and where a browser reaches its UI."""

    agent: AgentProcess
    management: str  # the bootstrap token's secret
    base: str  # scheme://host:port the browser opens
    via_proxy: bool


@pytest.fixture(params=["direct", "proxy"])
async def deployment(request: pytest.FixtureRequest,
                     short_agent_factory: Callable[..., AgentProcess]
                     ) -> AsyncIterator[Deployment]:
    # A short data dir: the proxy's socket path must fit sun_path, as must curl's in the
    # Task API example.
    agent = short_agent_factory(acl=True, meta={"rack": "r1"})
    await agent.start()
    token = await bootstrap_acls(agent)
    base = agent.address
    if request.param == "proxy":
        base, _ = await start_ui_proxy(agent, token)
    try:
        yield Deployment(agent, token, base, request.param == "proxy")
    finally:
        await agent.stop()


@attrs.define
class Tab:
    """A browser tab on the UI that records what would betray an unsafe page: uncaught
    errors, Content-Security-Policy violations and requests to any other origin."""

    page: Page
    base: str
    page_errors: list[str] = attrs.Factory(list)
    csp_violations: list[str] = attrs.Factory(list)
    foreign_requests: list[str] = attrs.Factory(list)
    request_urls: list[str] = attrs.Factory(list)

    async def open(self, route: str) -> None:
        """Show ``#/<route>`` (the page is loaded once; later routes only change the hash)."""
        if self.page.url.startswith(self.base + "/ui/"):
            await self.page.evaluate("(r) => { location.hash = '#/' + r; }", route)
        else:
            await self.page.goto(f"{self.base}/ui/#/{route}")

    async def log_in(self, secret: str, shown_as: str) -> None:
        from playwright.async_api import expect

        await self.open("token")
        await self.page.fill("#token-input", secret)
        await self.page.click("#token-save")
        await expect(self.page.locator("#token-status")).to_contain_text(
            shown_as, timeout=SHOWN_MS)
        # The secret is kept in the tab, not in the page or its address.
        assert await self.page.input_value("#token-input") == ""
        assert secret not in self.page.url

    async def screenshot(self, where: Path, name: str) -> None:
        await self.page.screenshot(path=str(where / f"{name}.png"))

    def assert_clean(self, *secrets: str) -> None:
        assert not self.page_errors, self.page_errors
        assert not self.csp_violations, self.csp_violations
        assert not self.foreign_requests, self.foreign_requests
        for url in self.request_urls:
            assert not any(s in url for s in secrets), "a token in a request URL"


@pytest.fixture
async def tab(browser: Browser, deployment: Deployment) -> AsyncIterator[Tab]:
    context = await browser.new_context(
        viewport=VIEWPORT,
        # Only the proxy's self-signed certificate is ever accepted this way, and only here.
        ignore_https_errors=deployment.via_proxy)
    page = await context.new_page()
    opened = Tab(page, deployment.base)
    origin = urlsplit(deployment.base)

    def on_console(message: Any) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            opened.csp_violations.append(message.text)

    def on_request(req: Any) -> None:
        url = urlsplit(req.url)
        opened.request_urls.append(req.url)
        if url.scheme != "data" and (url.scheme, url.netloc) != (origin.scheme, origin.netloc):
            opened.foreign_requests.append(req.url)

    page.on("console", on_console)
    page.on("pageerror", lambda err: opened.page_errors.append(str(err)))
    page.on("request", on_request)
    try:
        yield opened
    finally:
        await context.close()


# ---------------------------------------------------------------------------------------


async def test_log_in_open_a_job_and_watch_its_allocation_live(
        deployment: Deployment, tab: Tab, screenshots: Path) -> None:
    from playwright.async_api import expect

    page, prefix = tab.page, "proxy-" if deployment.via_proxy else ""
    await tab.log_in(deployment.management, "(management)")
    await tab.open("jobs")
    if not deployment.via_proxy:  # (the proxy is a job itself)
        await expect(page.locator("#jobs-empty")).to_be_visible(timeout=SHOWN_MS)

    # A task that says when a file appears in its dir: a log line we cause while watching.
    script = ('echo started; until [ -e "$NOMAD_TASK_DIR/trigger" ]; do sleep 0.2; done; '
              'echo saw-trigger; exec sleep 3600')
    job = raw_exec_job("web", script, kill_timeout_s=2)
    job["Meta"] = {"owner": "team-a"}
    async with deployment.agent.api(deployment.management) as api:
        (stub,) = await run_job(api, job)
        alloc_id = stub["ID"]

        # The list shows the new job without a reload (a blocking query answered).
        row = page.locator('table#jobs tbody tr[data-job-id="web"]')
        await expect(row).to_have_count(1, timeout=SHOWN_MS)
        await expect(page.locator("#jobs-empty")).to_be_hidden()
        if deployment.via_proxy:
            await expect(page.locator('table#jobs tbody tr[data-job-id="ui-proxy"]')
                         ).to_have_count(1)
        # ... and keeps it current: the job's status moves on from pending by itself.
        await wait_task_state(api, alloc_id, "t", "running", timeout=30)
        await expect(row).not_to_contain_text("pending", timeout=SHOWN_MS)
        await tab.screenshot(screenshots, prefix + "jobs")

        await row.locator("a").first.click()
        await expect(page.locator("#job-name")).to_have_text("web", timeout=SHOWN_MS)
        await expect(page.locator("#job-status")).not_to_be_empty(timeout=SHOWN_MS)
        await expect(page.locator("table#job-groups tbody tr")).to_have_count(1)
        await expect(page.locator('table#job-meta tbody tr[data-key="owner"] td.value')
                     ).to_have_text("team-a")
        await expect(page.locator("#job-versions li").first).to_be_visible(timeout=SHOWN_MS)
        await expect(page.locator("#job-evaluations tbody tr").first).to_be_visible(
            timeout=SHOWN_MS)
        alloc_row = page.locator(f'table#job-allocations tbody tr[data-alloc-id="{alloc_id}"]')
        await expect(alloc_row).to_have_count(1, timeout=SHOWN_MS)
        await tab.screenshot(screenshots, prefix + "job")

        await alloc_row.locator("a").first.click()
        await expect(page.locator("#alloc-id")).to_have_text(alloc_id, timeout=SHOWN_MS)
        task = page.locator('section[data-task="t"]')
        await expect(page.locator("#task-state-t")).to_contain_text("running", timeout=SHOWN_MS)
        await expect(task.locator("table.task-events tbody tr td.type").filter(
            has_text="Started")).not_to_have_count(0, timeout=SHOWN_MS)
        stdout = task.locator("pre.log-stdout")
        await expect(stdout).to_contain_text("started", timeout=SHOWN_MS)
        await expect(task.locator(".taskapi-socket")).to_have_text("present", timeout=SHOWN_MS)
        await expect(task.locator("pre.log-stderr")).to_be_attached()

        # From here on the page is not reloaded: what appears arrives live.
        await page.evaluate("() => { window.__sameDocument = true; }")
        (task_dir(deployment.agent, alloc_id, "t") / "local" / "trigger").touch()
        await expect(stdout).to_contain_text("saw-trigger", timeout=SHOWN_MS)

        await api.alloc_restart(alloc_id, "t")
        await expect(task.locator("table.task-events tbody tr td.type").filter(
            has_text="Restarting")).not_to_have_count(0, timeout=SHOWN_MS)
        assert await page.evaluate("() => window.__sameDocument") is True
        await tab.screenshot(screenshots, prefix + "allocation")

    tab.assert_clean(deployment.management)
    # Nor did it reach the agent's log or files (the page sent it in a header only).
    await assert_no_secrets(deployment.agent, [deployment.management])


async def test_node_page_shows_metadata_set_by_the_task_api_example(
        deployment: Deployment, tab: Tab, screenshots: Path) -> None:
    from playwright.async_api import expect

    if shutil.which("curl") is None:
        pytest.skip("the example's task runs the system curl, which is not installed")
    page, prefix = tab.page, "proxy-" if deployment.via_proxy else ""
    async with deployment.agent.api(deployment.management) as api:
        # With ACLs on, the example's workload identity writes node metadata through a
        # policy attached to its job, as Nomad's documentation of the example does.
        await api.acl_policy_apply({
            "Name": "taskapi-example", "Rules": (POLICY_DIR / "node-write.hcl").read_text(),
            "JobACL": {"Namespace": "default", "JobID": "taskapi-example"}})
        (stub,) = await run_job(api, load_job("taskapi-example.nomad.hcl"))
        done = await wait_client_status(api, stub["ID"], "complete", "failed", timeout=30)
        assert done["ClientStatus"] == "complete", done["TaskStates"]
        (node,) = await api.nodes_list()

    await tab.log_in(deployment.management, "(management)")
    await tab.open("nodes")
    row = page.locator(f'table#nodes tbody tr[data-node-id="{node["ID"]}"]')
    await expect(row).to_have_count(1, timeout=SHOWN_MS)
    await tab.screenshot(screenshots, prefix + "nodes")

    await row.locator("a").first.click()
    await expect(page.locator("#node-name")).to_have_text(node["Name"], timeout=SHOWN_MS)
    meta = page.locator("table#node-meta tbody")
    await expect(meta.locator('tr[data-key="example"] td.value')).to_have_text(
        "Hello World!", timeout=SHOWN_MS)
    await expect(meta.locator('tr[data-key="rack"] td.value')).to_have_text("r1")
    # Where the agent runs the node, dynamic and static metadata are told apart.
    await expect(meta.locator('tr[data-key="example"] td.source')).to_have_text("dynamic")
    await expect(meta.locator('tr[data-key="rack"] td.source')).to_have_text("static")
    await expect(page.locator('table#node-attributes tbody tr[data-key="kernel.name"]')
                 ).to_have_count(1)
    await expect(page.locator("#node-drivers")).to_contain_text("raw_exec")
    await expect(page.locator(f'table#node-allocations tbody tr[data-alloc-id="{stub["ID"]}"]')
                 ).to_have_count(1, timeout=SHOWN_MS)
    await tab.screenshot(screenshots, prefix + "node")
    tab.assert_clean(deployment.management)


async def test_token_without_read_job_sees_no_jobs(deployment: Deployment, tab: Tab) -> None:
    from playwright.async_api import expect

    page = tab.page
    async with deployment.agent.api(deployment.management) as api:
        await run_job(api, raw_exec_job("hidden", "exec sleep 3600", kill_timeout_s=2))
        await apply_policy(api, "nodes-only", "node-read")
        limited = await client_token(api, "nodes-reader", "nodes-only")

    await tab.log_in(limited["SecretID"], "nodes-reader (client)")
    await tab.open("jobs")
    await expect(page.locator("#jobs-empty")).to_be_visible(timeout=SHOWN_MS)
    await expect(page.locator("#jobs-empty")).not_to_be_empty()
    await expect(page.locator("table#jobs tbody tr")).to_have_count(0)
    # Hidden, not an error page.
    await expect(page.locator("#error-banner")).to_be_hidden()
    # A job's page by its address shows nothing of it either.
    await tab.open("jobs/default/hidden")
    await expect(page.locator("table#job-allocations tbody tr")).to_have_count(0)
    await expect(page.locator("#error-banner")).to_be_hidden()
    # The token does work for what it may read.
    await tab.open("nodes")
    await expect(page.locator("table#nodes tbody tr")).to_have_count(1, timeout=SHOWN_MS)
    tab.assert_clean(deployment.management, limited["SecretID"])


async def test_injected_script_is_shown_as_text_and_never_runs(
        deployment: Deployment, tab: Tab) -> None:
    from playwright.async_api import expect

    page = tab.page
    job = raw_exec_job("xss", "printf '%s\\n' '" + SCRIPT_IN_LOG + "'; exec sleep 3600",
                       kill_timeout_s=2)
    job["Meta"] = {"x": SCRIPT_IN_META}
    async with deployment.agent.api(deployment.management) as api:
        (stub,) = await run_job(api, job)
        await wait_task_state(api, stub["ID"], "t", "running", timeout=30)
        await api.client_metadata_apply({"evil": SCRIPT_IN_NODE_META})
        (node,) = await api.nodes_list()

    await tab.log_in(deployment.management, "(management)")
    await tab.open("jobs/default/xss")
    await expect(page.locator('table#job-meta tbody tr[data-key="x"] td.value')).to_have_text(
        SCRIPT_IN_META, timeout=SHOWN_MS)

    await tab.open(f"allocations/{stub['ID']}")
    await expect(page.locator('section[data-task="t"] pre.log-stdout')).to_contain_text(
        SCRIPT_IN_LOG, timeout=SHOWN_MS)

    await tab.open(f"nodes/{node['ID']}")
    await expect(page.locator('table#node-meta tbody tr[data-key="evil"] td.value')
                 ).to_have_text(SCRIPT_IN_NODE_META, timeout=SHOWN_MS)

    # Nothing of it became markup, and nothing of it ran.
    assert await page.evaluate("() => typeof window.__pwned") == "undefined"
    assert await page.locator("body img").count() == 0
    assert await page.locator("body script").count() == 0
    tab.assert_clean(deployment.management)
