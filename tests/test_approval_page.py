"""The approval page in real headless Chromium (issue 16): the approver makes a key in the browser,
registers its public key, opens the plan and signs; a second approver signs with the CLI's code path;
the run applies and verifies. A stale plan is refused with its reason, a rejection ends a run unchanged,
and the page is closed to readers without the token and to cross-site posts."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import pytest
from playwright.async_api import Page, async_playwright
from temporalio.testing import WorkflowEnvironment

from approval_page.serve import running_approvals
from config import Settings
from config.settings import Approver
from contracts.models import Phase, RemediationResult, format_money
from devstack.processes import free_port
from tests.conftest import make_world
from tests.helpers import approve, decision, incident_in, ledger_state, request_for, start, wait_phase
from worker.main import build_worker, resources

pytestmark = pytest.mark.asyncio(loop_scope="session")
TOKEN = "approvals-test-token"
DOCS = Path(__file__).parents[1] / "docs"


def chromium() -> str:
    found = shutil.which("chromium")
    assert found, "chromium not found: `make test` installs Debian's chromium (apt-get)"
    return found


async def shot(page: Page, tmp: Path, name: str) -> None:
    """A screenshot for the docs (kept when SAVE_DOCS_SCREENSHOTS=1), always checked to be an image."""
    target = DOCS / name if os.environ.get("SAVE_DOCS_SCREENSHOTS") == "1" else tmp / name
    await page.screenshot(path=str(target), full_page=True)
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


async def test_approve_in_the_browser_refusals_and_rejection(
    pg_settings: Settings,
    template_db: str,
    state_root: Path,
    temporal_env: WorkflowEnvironment,
    tmp_path: Path,
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    async for world in make_world(
        pg_settings,
        template_db,
        state_root,
        temporal_env.client,
        in_process_worker=False,
        APPROVALS_TOKEN=TOKEN,
    ):
        async with (
            running_approvals(world.settings, client=world.client, port=port),
            async_playwright() as pw,
        ):
            browser = await pw.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
            page = await (await browser.new_context(viewport={"width": 1280, "height": 900})).new_page()

            # Without the token nothing is shown; the link with it signs in (and leaves the address bar).
            await page.goto(f"{base}/")
            assert await page.locator("h1").inner_text() == "Sign in needed"
            await page.goto(f"{base}/?token={TOKEN}")
            assert page.url == f"{base}/"
            assert "No remediation is waiting" in await page.locator("main").inner_text()

            # The approver's key is made in the browser; its public key is what APPROVERS registers.
            await page.goto(f"{base}/keys")
            await page.fill("#key-name", "erin")
            await page.click("#make-key")
            await page.wait_for_selector("#key-result:not([hidden])")
            public_key = (await page.locator("#public-key").inner_text()).strip()
            assert len(public_key) == 44 and public_key.endswith("=")
            erin = Approver(name="erin", role="finance-lead", tier=1, public_key=public_key)
            settings = world.settings.model_copy(update={"approvers": [*world.settings.approvers, erin]})

            async with resources(settings) as res, build_worker(world.client, settings, res):
                incident = await incident_in(world, "worker-crash", "ap")
                handle = await start(world, request_for(incident, requested_by="ic-dana"))
                view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
                assert view.plan is not None and view.approvals_needed == 2

                # A customer with a long name: the name wraps, its amounts stay in view at desktop width.
                long_org = await world.db.fetchval(
                    "SELECT org_id FROM remediation.plan_customers WHERE plan_id = $1 ORDER BY org_id LIMIT 1",
                    view.plan.plan_id,
                )
                await world.db.execute(
                    "UPDATE billing.orgs SET name = $2 WHERE id = $1",
                    long_org,
                    "Extremely Long Organisation Name Holdings International GPU Research Cooperative Limited",
                )
                await page.goto(f"{base}/")
                await page.click(f"text={handle.id}")
                await page.wait_for_selector("#decision-form")
                text = await page.locator("main").inner_text()
                assert view.plan.plan_hash in text and "Customers affected" in text
                # Totals carry their currency and two decimals; drift shows even when no check warns of it.
                currency = await world.db.fetchval(
                    "SELECT currency FROM billing.orgs WHERE id = $1", long_org
                )
                totals = await page.locator("#plan dl").inner_text()
                assert format_money(view.plan.debit_total_minor, currency) in totals, totals
                assert format_money(view.plan.credit_total_minor, currency) in totals, totals
                assert " 0.0 " not in totals and await page.locator("#drift").count() == 1
                row = page.locator("tr", has_text="Extremely Long Organisation")
                for cell in await row.locator("td.amount").all():
                    box = await cell.bounding_box()
                    assert box is not None and box["x"] + box["width"] <= 1280, box
                assert "0 of 2 needed" in text
                assert (
                    "captured" in await page.locator("table.actions").inner_text()
                )  # the provider's evidence
                await shot(page, tmp_path, "approval-plan.png")
                await page.set_viewport_size({"width": 390, "height": 844})
                await shot(page, tmp_path, "approval-plan-phone.png")
                await page.set_viewport_size({"width": 1280, "height": 900})

                # A page opened on an earlier plan: the workflow refuses it, the page says why.
                await page.evaluate("document.getElementById('plan').dataset.planHash = '0'.repeat(64)")
                await page.fill("#approver", "erin")
                await page.click("#approve")
                status = page.locator("#decision-status")
                await status.filter(has_text="Not accepted").wait_for()
                assert "stale plan" in await status.inner_text()
                refused = await world.db.fetchrow(
                    "SELECT refusal_reason, via, plan_hash FROM remediation.approvals"
                    " WHERE approver = 'erin' AND NOT accepted"
                )
                assert refused is not None and "stale plan" in refused["refusal_reason"]
                # Audited with what the page signed and where it came from.
                assert refused["plan_hash"] == "0" * 64 and refused["via"] == "update from approval page"

                # Signed in the browser, verified by the workflow's validator (the CLI's code path).
                await page.reload()
                await page.fill("#approver", "erin")
                await page.fill("#comment", "matches the incident <b>findings</b>")
                await page.click("#approve")
                await status.filter(has_text="Recorded").wait_for()
                assert "1/2" in await status.inner_text()
                # The second approver signs with the CLI's key file: the run applies and verifies.
                await approve(handle, decision(await wait_phase(handle, {Phase.AWAITING_APPROVAL}), "bob"))
                result: RemediationResult = await handle.result()
                assert result.outcome is Phase.COMPLETED
                assert set(result.approvers) == {"erin", "bob"}

                # A rejection in the browser ends a run with the ledger unchanged.
                dispute = await incident_in(world, "user-dispute", "aq")
                before = await ledger_state(world)
                second = await start(world, request_for(dispute, requested_by="ic-dana"))
                await wait_phase(second, {Phase.AWAITING_APPROVAL})
                await page.goto(f"{base}/")
                await shot(page, tmp_path, "approval-list.png")
                await page.click(f"text={second.id}")
                await page.fill("#approver", "erin")
                await page.fill("#comment", "not this one")
                await page.click("#reject")
                await status.filter(has_text="Recorded").wait_for()
                assert (await second.result()).outcome is Phase.REJECTED
                assert await ledger_state(world) == before

            # Cross-site posts are refused even with the session cookie; so is a missing CSRF token.
            cookies = {c["name"]: c["value"] for c in await page.context.cookies()}
            async with httpx.AsyncClient(base_url=base, cookies=cookies) as http:
                answer = await http.post(
                    f"/runs/{second.id}/decision", json={}, headers={"Origin": "https://evil.example"}
                )
                assert answer.status_code == 403
                answer = await http.post(f"/runs/{second.id}/decision", json={})
                assert answer.status_code == 403
                # Every page carries the strict policy (no inline script anywhere).
                listing = await http.get("/")
                assert listing.headers["content-security-policy"].startswith(
                    "default-src 'none'; script-src 'self'"
                )
                assert "<script>" not in listing.text and TOKEN not in listing.text
            await browser.close()
