"""The custom search attributes (names in `config.SEARCH_ATTRIBUTES`) and which scope ids fill them."""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

from contracts.models import Scope

SA_CORRELATION = SearchAttributeKey.for_keyword("CorrelationId")
SA_ORG = SearchAttributeKey.for_keyword("OrgId")
SA_PROJECT = SearchAttributeKey.for_keyword("ProjectId")
SA_USER = SearchAttributeKey.for_keyword("UserId")
SA_ALLOCATION = SearchAttributeKey.for_keyword("AllocationId")
SA_PHASE = SearchAttributeKey.for_keyword("RemediationPhase")
SA_BLAST = SearchAttributeKey.for_keyword("BlastRadius")
SA_TRIGGER = SearchAttributeKey.for_keyword("Trigger")
SA_APPROVAL = SearchAttributeKey.for_keyword("ApprovalState")

ALL = (
    SA_CORRELATION,
    SA_ORG,
    SA_PROJECT,
    SA_USER,
    SA_ALLOCATION,
    SA_PHASE,
    SA_BLAST,
    SA_TRIGGER,
    SA_APPROVAL,
)


def scope_values(
    correlation_id: str, trigger: str, scope: Scope
) -> list[tuple[SearchAttributeKey[str], str]]:
    """Correlation id, trigger and the scope's set ids, as (key, value) pairs."""
    pairs = [(SA_CORRELATION, correlation_id), (SA_TRIGGER, trigger)]
    for key, value in (
        (SA_ORG, scope.org_id),
        (SA_PROJECT, scope.project_id),
        (SA_USER, scope.user_id),
        (SA_ALLOCATION, scope.allocation_id),
    ):
        if value:
            pairs.append((key, value))
    return pairs
