"""Worker Deployment Versioning: how workflow code is upgraded under running remediations.

Remediations wait hours for approval, so deploys happen under running workflows. Every worker declares
its deployment (``WORKER_DEPLOYMENT_NAME``) and build id (the package version unless ``WORKER_BUILD_ID``);
remediation workflows are pinned: a run finishes on the version it started on, new runs go to the
deployment's current version. Deploy a new version next to the old one, make it current, and stop the
old workers once no run pinned to them is open. ``workflow.patched`` is only for a hot fix of a version
that is already running.
"""

from __future__ import annotations

import asyncio
import time
from importlib import metadata

from temporalio.api.workflowservice.v1 import SetWorkerDeploymentCurrentVersionRequest
from temporalio.client import Client
from temporalio.common import VersioningBehavior, WorkerDeploymentVersion
from temporalio.service import RPCError
from temporalio.worker import WorkerDeploymentConfig

from config import Settings

PACKAGE = "billing-remediation"


def build_id(settings: Settings) -> str:
    """This worker's build id: ``WORKER_BUILD_ID``, else the installed package's version."""
    return settings.worker_build_id or metadata.version(PACKAGE)


def deployment_version(settings: Settings) -> WorkerDeploymentVersion:
    """The (deployment, build id) this worker serves."""
    return WorkerDeploymentVersion(
        deployment_name=settings.worker_deployment_name, build_id=build_id(settings)
    )


def deployment_config(settings: Settings) -> WorkerDeploymentConfig | None:
    """Versioned and pinned unless ``WORKER_VERSIONING=off`` (then the worker is unversioned)."""
    if settings.worker_versioning == "off":
        return None
    return WorkerDeploymentConfig(
        version=deployment_version(settings),
        use_worker_versioning=True,
        default_versioning_behavior=VersioningBehavior.PINNED,
    )


async def set_current_version(
    client: Client, settings: Settings, build: str | None = None, *, wait_seconds: float = 60
) -> str:
    """Make ``build`` (this package's by default) the version new runs go to; returns the build id.

    The server refuses while the new build's workers do not yet poll every task queue the current
    build serves (its queues would fall back to unversioned): that refusal is waited out for up to
    ``wait_seconds``, then reported.
    """
    build = build or build_id(settings)
    request = SetWorkerDeploymentCurrentVersionRequest(
        namespace=client.namespace,
        deployment_name=settings.worker_deployment_name,
        build_id=build,
        identity="remediate deployment set-current",
        # The first version may be set before its workers poll (dev up starts them after).
        allow_no_pollers=True,
    )
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            await client.workflow_service.set_worker_deployment_current_version(request)
            return build
        except RPCError as err:
            if "missing active task queues" not in err.message or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)
