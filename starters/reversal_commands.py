"""`remediate reverse`: take back what a finished remediation applied, approved like any plan."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from starters.cli_app import app, cli_client, cli_settings, fail, invalid, run_async


@app.command()
def reverse(
    workflow_id: str,
    reason: Annotated[
        str, typer.Option("--reason", help="why the money goes back (audited, in the evidence)")
    ],
    requested_by: Annotated[str, typer.Option("--as", help="who requests it (audited; may not approve it)")],
    org: Annotated[str | None, typer.Option("--org")] = None,
    project: Annotated[str | None, typer.Option("--project")] = None,
    user: Annotated[str | None, typer.Option("--user")] = None,
    allocation: Annotated[str | None, typer.Option("--allocation")] = None,
    run_id: Annotated[str | None, typer.Option("--run-id", help="a run other than the latest")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run")] = False,
) -> None:
    """Reverse a finished remediation (all of it, or the scope given): exact inverse entries, after approval."""
    from pydantic import ValidationError

    import remediation_client as operations
    from contracts.models import Scope

    try:
        operations.check_workflow_id(workflow_id)
        narrowed = Scope(org_id=org, project_id=project, user_id=user, allocation_id=allocation)
    except operations.OperationError as err:
        fail(str(err))
    except ValidationError as err:
        invalid(err)
    settings = cli_settings()

    async def go() -> Any:
        request = await operations.reversal_request(
            settings,
            workflow_id,
            scope=None if narrowed.is_global else narrowed,
            reason=reason,
            requested_by=requested_by,
            run_id=run_id,
            dry_run=dry_run,
        )
        await operations.preflight(settings, request)
        return await operations.start(await cli_client(settings), settings, request)

    started = run_async(go())
    typer.echo(
        f"workflow id: {started.workflow_id}"
        + (" (attached to the reversal already running)" if started.attached else "")
    )
    typer.echo(f"UI: {started.ui_link}")
    typer.echo(
        f"next: remediate plan {started.workflow_id}  (another approver signs it: `remediate approve`)"
    )
