"""The embedded stack's approver inbox: a real SMTP server (aiosmtpd) and a webhook endpoint that keep
every page Alertmanager delivers as a file, so `make demo` can show the page an approver got.

    python -m devstack.approver_inbox --smtp-port 8494 --http-port 8495 --dir STATE/approver-inbox
"""

from __future__ import annotations

import argparse
import asyncio
import email
import email.policy
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from config import Settings
from devstack.component import Component
from devstack.processes import spawn, wait_for_port

LINK = re.compile(r"https?://[^\s\"<>]+/runs/[^\s\"<>]+")


class _Keep:
    """aiosmtpd handler: each message as a file, its envelope recipients in an X-Envelope-To header."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        stamp = f"{time.time_ns()}"
        header = f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n".encode()
        (self.folder / f"mail-{stamp}.eml").write_bytes(header + envelope.content)
        return "250 Message accepted for delivery"


@dataclass
class Page:
    """One delivered page: to whom, its subject, and the approval page link in it."""

    to: str
    subject: str
    link: str | None
    resolved: bool


def read_pages(folder: Path) -> list[Page]:
    """The pages the inbox received by email, oldest first."""
    pages = []
    for path in sorted(folder.glob("mail-*.eml")):
        message = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
        body = "".join(
            part.get_content()
            for part in message.walk()
            if part.get_content_type() in ("text/plain", "text/html")
        )
        subject = str(message["Subject"] or "")
        found = LINK.search(body.replace("&#x2F;", "/").replace("&amp;", "&"))
        pages.append(
            Page(
                str(message["X-Envelope-To"] or ""),
                subject,
                found.group(0) if found else None,
                "RESOLVED" in subject,
            )
        )
    return pages


async def serve(smtp_port: int, http_port: int, folder: Path) -> None:
    """Run the SMTP server and the webhook endpoint until killed."""
    import uvicorn
    from aiosmtpd.controller import Controller
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    smtp = Controller(_Keep(folder), hostname="127.0.0.1", port=smtp_port)
    smtp.start()

    async def hook(request: Request) -> JSONResponse:
        (folder / f"webhook-{time.time_ns()}.json").write_text(json.dumps(await request.json()))
        return JSONResponse({"kept": True})

    app = Starlette(routes=[Route("/pages", hook, methods=["POST"])])
    try:
        await uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=http_port, log_level="warning")
        ).serve()
    finally:
        smtp.stop()


class ApproverInbox(Component):
    """Where the embedded Alertmanager delivers approver pages (email and webhook), kept as files."""

    name = "approver-inbox"

    @property
    def port(self) -> int:
        return self.settings.approver_inbox_smtp_port

    @property
    def folder(self) -> Path:
        """Where the pages are kept."""
        return self.state_dir / "approver-inbox"

    def _port_env(self) -> str:
        return "APPROVER_INBOX_SMTP_PORT"

    def _launch(self) -> None:
        pid = spawn(
            [sys.executable, "-m", "devstack.approver_inbox", "--smtp-port", str(self.port),
             "--http-port", str(self.settings.approver_inbox_http_port), "--dir", str(self.folder)],
            pid_file=self.pid_file,
            log_file=self.log_file,
        )  # fmt: skip
        wait_for_port(self.port, timeout=30, name=self.name, log_file=self.log_file, pid=pid)


def inbox_folder(settings: Settings) -> Path:
    """Where the embedded approver inbox keeps pages."""
    return ApproverInbox(settings).folder


def main() -> None:
    """Entry point of ``python -m devstack.approver_inbox``."""
    parser = argparse.ArgumentParser(prog="python -m devstack.approver_inbox")
    parser.add_argument("--smtp-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    parser.add_argument("--dir", type=Path, required=True)
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    asyncio.run(serve(args.smtp_port, args.http_port, args.dir))


if __name__ == "__main__":
    main()
