"""Approvers are paged where they already are (issue 28): a plan waiting for approval pages its tier
through the real Alertmanager, which delivers by email to a real SMTP server (aiosmtpd) run here; the
mail's link opens the plan on the approval page; escalation pages the next tier; a decision resolves it."""

from __future__ import annotations

import email
import email.policy
import re
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from aiosmtpd.controller import Controller
from pydantic import SecretStr
from temporalio.testing import WorkflowEnvironment

from approval_page.app import approvals_app
from config import Settings
from contracts.models import Phase
from devstack.alerting import Alertmanager
from devstack.processes import free_port
from tests.conftest import World, make_world
from tests.helpers import approve, decision, eventually, incident_in, request_for, start, wait_phase

TOKEN = "pages-test-token"
PUBLIC = "http://approvals.example.test"
LINK = re.compile(r"https?://[^\s\"<>]+/runs/[A-Za-z0-9._:/\-]+")


@dataclass
class Mail:
    to: list[str]
    subject: str
    body: str

    @property
    def resolved(self) -> bool:
        return "RESOLVED" in self.subject


@dataclass
class Mailbox:
    """A real SMTP server's received messages (aiosmtpd's handler hook)."""

    mails: list[Mail] = field(default_factory=list)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.content, policy=email.policy.default)
        body = "".join(
            part.get_content()
            for part in message.walk()
            if part.get_content_type() in ("text/plain", "text/html")
        )
        self.mails.append(Mail(list(envelope.rcpt_tos), str(message["Subject"]), body))
        return "250 OK"

    def to(self, address: str, workflow_id: str, *, resolved: bool) -> list[Mail]:
        return [
            m
            for m in self.mails
            if address in m.to and workflow_id in m.body + m.subject and m.resolved == resolved
        ]


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box, port = Mailbox(), free_port()
    server = Controller(box, hostname="127.0.0.1", port=port)
    server.start()
    yield box, port
    server.stop()


@pytest_asyncio.fixture(loop_scope="session")
async def paging_world(
    pg_settings: Settings,
    template_db: str,
    state_root: Path,
    temporal_env: WorkflowEnvironment,
    mailbox: tuple[Mailbox, int],
) -> AsyncIterator[World]:
    """A world whose Alertmanager (the shipped routes, dev timings) mails pages to this test's SMTP server."""
    am_settings = Settings(
        REMEDIATION_STATE_DIR=state_root / f"pages-am-{mailbox[1]}",
        ALERTMANAGER_PORT=free_port(),
        ALERTMANAGER_URL=None,  # its own, not the session's (exported for every other world)
        APPROVER_INBOX_SMTP_PORT=mailbox[1],
        APPROVER_INBOX_HTTP_PORT=free_port(),
    )
    server = Alertmanager(am_settings)
    server.start()
    try:
        async for w in make_world(
            pg_settings,
            template_db,
            state_root,
            temporal_env.client,
            ALERTMANAGER_URL=am_settings.resolved_alertmanager_url(),
            APPROVAL_DEADLINE_SECONDS=8,
            APPROVALS_PUBLIC_URL=PUBLIC,
        ):
            yield w
    finally:
        server.stop()


async def _mail(box: Mailbox, address: str, workflow_id: str, *, resolved: bool = False) -> Mail:
    found = await eventually(
        lambda: _first(box.to(address, workflow_id, resolved=resolved)),
        timeout=60,
        what=f"{'a resolution' if resolved else 'a page'} for {workflow_id} to {address}",
    )
    return found


async def _first(mails: list[Mail]) -> Mail | None:
    return mails[0] if mails else None


async def _open_link(world: World, link: str) -> httpx.Response:
    """Follow the mail's link on the approval page (as the approver's browser, signed in by the token)."""
    settings = world.settings.model_copy(update={"approvals_token": SecretStr(TOKEN)})
    app = approvals_app(settings, world.client, world.db)
    path = link.removeprefix(PUBLIC)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://page") as page:
        return await page.get(path, headers={"Authorization": f"Bearer {TOKEN}"})


async def test_a_waiting_plan_pages_tier_1_then_tier_2_and_the_decision_resolves_both(
    paging_world: World, mailbox: tuple[Mailbox, int]
) -> None:
    world, box = paging_world, mailbox[0]
    incident = await incident_in(world, "user-dispute", "pg")
    handle = await start(world, request_for(incident, requested_by="ic-dana"))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    assert view.plan is not None
    page = await _mail(box, "approvers-tier1@example.com", handle.id)
    assert "RemediationAwaitingApproval" in page.subject
    # What an approver acts on, and a link that opens this plan.
    assert "requested by ic-dana" in page.body and "approvals 0 of 1" in page.body
    links = {m.group(0) for m in LINK.finditer(page.body.replace("&#x2F;", "/"))}
    assert f"{PUBLIC}/runs/{handle.id}" in links, links
    opened = await _open_link(world, f"{PUBLIC}/runs/{handle.id}")
    assert opened.status_code == 200 and view.plan.plan_hash in opened.text
    # Nobody answers before the deadline: the page moves to tier 2.
    escalated = await _mail(box, "approvers-tier2@example.com", handle.id)
    assert "Tier 2: carol." in escalated.body and "approvers-tier1@example.com" not in escalated.to
    await approve(handle, decision(await wait_phase(handle, {Phase.AWAITING_APPROVAL}), "alice"))
    result = await handle.result()
    assert result.outcome is Phase.COMPLETED
    # Both tiers are told it is over.
    await _mail(box, "approvers-tier1@example.com", handle.id, resolved=True)
    await _mail(box, "approvers-tier2@example.com", handle.id, resolved=True)


async def test_a_rejected_plan_resolves_its_page(paging_world: World, mailbox: tuple[Mailbox, int]) -> None:
    world, box = paging_world, mailbox[0]
    incident = await incident_in(world, "user-dispute", "pr")
    handle = await start(world, request_for(incident, requested_by="ic-dana"))
    view = await wait_phase(handle, {Phase.AWAITING_APPROVAL})
    await _mail(box, "approvers-tier1@example.com", handle.id)
    await approve(handle, decision(view, "alice", "reject"))
    assert (await handle.result()).outcome is Phase.REJECTED
    await _mail(box, "approvers-tier1@example.com", handle.id, resolved=True)
