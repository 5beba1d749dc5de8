"""Request validation, approval rules and signatures, payload round trips: pure, property-tested."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from temporalio.contrib.pydantic import pydantic_data_converter

from config.approver_keys import public_key_b64, sign
from contracts.models import (
    ApprovalDecision,
    ApprovalPolicy,
    ApproverInfo,
    BlastRadius,
    PlanSummary,
    RemediationRequest,
    Scope,
)
from contracts.signatures import verify
from workflows.approval import (
    NOT_OPEN,
    ApprovalState,
    apply_decision,
    approvals_required,
    refusal,
    reset_for_plan,
)

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,30}", fullmatch=True)


@given(org=st.one_of(st.none(), ids), user=st.one_of(st.none(), ids), corr=ids)
def test_workflow_id_is_stable_and_scope_derived(org: str | None, user: str | None, corr: str) -> None:
    a = RemediationRequest(correlation_id=corr, requested_by="ic", scope=Scope(org_id=org, user_id=user))
    b = RemediationRequest(
        correlation_id=corr + "x", requested_by="ic2", scope=Scope(org_id=org, user_id=user)
    )
    assert a.workflow_id() == b.workflow_id()
    assert a.workflow_id().startswith("remediation-")


BAD_ID_CHARS = " ;'\"\\/$"
# Built around a forbidden character (filtering random text for one discards most inputs, and
# Hypothesis's health check then fails the run at random).
malformed_ids = (
    st.tuples(st.text(max_size=8), st.sampled_from(BAD_ID_CHARS), st.text(max_size=8))
    .map("".join)
    .filter(lambda s: any(c in s.strip() for c in BAD_ID_CHARS))
)


@given(malformed_ids)
def test_malformed_ids_are_refused(bad: str) -> None:
    with pytest.raises(ValidationError):
        Scope(org_id=bad)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"correlation_id": "", "requested_by": "ic"}, "correlation_id"),
        ({"correlation_id": "c", "requested_by": "ic", "trigger": "bogus"}, "trigger"),
        ({"correlation_id": "c", "requested_by": "ic", "trace_id": "xyz"}, "trace_id"),
        ({"correlation_id": "c", "requested_by": "ic", "trigger": "prepaid_depleted"}, "scope.org_id"),
        ({"correlation_id": "c" * 200, "requested_by": "ic"}, "correlation_id"),
    ],
)
def test_bad_requests_name_the_field(kwargs: dict[str, str], field: str) -> None:
    with pytest.raises(ValidationError) as err:
        RemediationRequest(**kwargs)
    assert field in str(err.value)


T0 = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)

POLICY = ApprovalPolicy(
    approvers=[ApproverInfo(name=n, role="r") for n in ("alice", "bob", "carol")],
    quorum=2,
    money_threshold_minor=1000,
    deadline_seconds=60,
    hard_limit_seconds=600,
)


def plan(money: int = 10, h: str = "a" * 64) -> PlanSummary:
    return PlanSummary(
        plan_id="p",
        plan_hash=h,
        action_count=1,
        debit_total_minor=-money,
        credit_total_minor=0,
        counts_by_kind={},
    )


def dec(who: str, h: str = "a" * 64, what: str = "approve") -> ApprovalDecision:
    return ApprovalDecision(plan_hash=h, approver=who, decision=what)


def test_quorum_and_self_approval_rules() -> None:
    state = ApprovalState()
    reset_for_plan(state, plan(), T0)
    assert approvals_required(POLICY, plan(), BlastRadius.SINGLE) == 1
    assert approvals_required(POLICY, plan(5000), BlastRadius.SINGLE) == 2
    assert approvals_required(POLICY, plan(), BlastRadius.WIDESPREAD) == 2
    assert refusal(state, dec("alice"), POLICY, "alice", BlastRadius.SINGLE, awaiting=True, now=T0) is None
    assert "self-approval" in str(
        refusal(state, dec("alice"), POLICY, "alice", BlastRadius.WIDESPREAD, awaiting=True, now=T0)
    )
    assert "not an approver" in str(refusal(state, dec("zed"), POLICY, "ic", None, awaiting=True, now=T0))
    assert "stale plan" in str(
        refusal(state, dec("bob", "b" * 64), POLICY, "ic", None, awaiting=True, now=T0)
    )
    # A plan that exists but is not open (being opened, or escalating) is a transient refusal.
    assert refusal(state, dec("bob"), POLICY, "ic", None, awaiting=False, now=T0) == NOT_OPEN
    assert "no plan" in str(refusal(ApprovalState(), dec("bob"), POLICY, "ic", None, awaiting=True, now=T0))
    apply_decision(state, dec("bob"), 2)
    assert not state.decided
    assert "already approved" in str(refusal(state, dec("bob"), POLICY, "ic", None, awaiting=True, now=T0))
    apply_decision(state, dec("carol"), 2)
    assert state.decided and state.approved_by == ["bob", "carol"]
    assert "already decided" in str(refusal(state, dec("alice"), POLICY, "ic", None, awaiting=True, now=T0))
    # A changed plan needs fresh approvals.
    reset_for_plan(state, plan(h="c" * 64), T0)
    assert state.approved_by == [] and not state.decided


scopes = st.builds(
    Scope,
    org_id=st.one_of(st.none(), ids),
    project_id=st.one_of(st.none(), ids),
    user_id=st.one_of(st.none(), ids),
    allocation_id=st.one_of(st.none(), ids),
)
requests = st.builds(
    RemediationRequest,
    correlation_id=ids,
    requested_by=ids,
    scope=scopes,
    dry_run=st.booleans(),
    trace_id=st.one_of(st.none(), st.from_regex(r"[0-9a-f]{32}", fullmatch=True)),
)


@given(requests)
def test_requests_survive_the_temporal_payload_round_trip(request: RemediationRequest) -> None:
    converter = pydantic_data_converter.payload_converter
    (payload,) = converter.to_payloads([request])
    (back,) = converter.from_payloads([payload], [RemediationRequest])
    assert back == request
    assert back.workflow_id() == request.workflow_id()


@given(st.text(max_size=80))
def test_plan_hashes_must_be_sha256_hex(text: str) -> None:
    if len(text) == 64 and all(c in "0123456789abcdef" for c in text):
        assert ApprovalDecision(plan_hash=text, approver="alice", decision="approve").plan_hash == text
    else:
        with pytest.raises(ValidationError, match="plan_hash"):
            ApprovalDecision(plan_hash=text, approver="alice", decision="approve")


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alice", "bob", "carol", "mallory", "ic"]),
            st.sampled_from(["approve", "reject"]),
        ),
        max_size=8,
    ),
    st.integers(min_value=0, max_value=5000),
    st.sampled_from([BlastRadius.SINGLE, BlastRadius.WIDESPREAD]),
)
def test_accepted_decisions_obey_the_policy(
    attempts: list[tuple[str, str]], money: int, radius: BlastRadius
) -> None:
    state = ApprovalState()
    p = plan(money)
    reset_for_plan(state, p, T0)
    needed = approvals_required(POLICY, p, radius)
    for who, what in attempts:
        d = dec(who, what=what)
        if refusal(state, d, POLICY, "alice", radius, awaiting=True, now=T0) is None:
            apply_decision(state, d, needed)
    # Only configured approvers, each once; the requester only for small single-scope plans.
    assert set(state.approved_by) <= {"alice", "bob", "carol"}
    assert len(state.approved_by) == len(set(state.approved_by))
    if radius is BlastRadius.WIDESPREAD or money > POLICY.money_threshold_minor:
        assert "alice" not in state.approved_by
    assert state.decided == (state.rejected_by is not None or len(state.approved_by) >= needed)
    assert len(state.approved_by) <= needed


# --- signed approvals -------------------------------------------------------------------------------

KEYS = {n: Ed25519PrivateKey.generate() for n in ("alice", "bob")}
SIGNED_POLICY = POLICY.model_copy(
    update={
        "require_signatures": True,
        "approvers": [ApproverInfo(name=n, role="r", public_key=public_key_b64(k)) for n, k in KEYS.items()]
        + [ApproverInfo(name="carol", role="r")],
    }
)


def signed(who: str, *, key: str | None = None, at: datetime = T0, **fields: str) -> ApprovalDecision:
    body = dec(who).model_copy(update={"plan_id": "p", **fields})
    return sign(body, KEYS[key or who], at=at)


def signed_refusal(d: ApprovalDecision, now: datetime = T0) -> str | None:
    state = ApprovalState()
    reset_for_plan(state, plan(), T0)
    return refusal(state, d, SIGNED_POLICY, "ic", BlastRadius.SINGLE, awaiting=True, now=now)


def test_a_properly_signed_approval_is_accepted() -> None:
    assert signed_refusal(signed("bob")) is None


def test_forged_tampered_replayed_and_misdirected_approvals_are_refused() -> None:
    # Unsigned, or signed with someone else's key (forged).
    assert "unsigned" in str(signed_refusal(dec("bob").model_copy(update={"plan_id": "p"})))
    assert "bad signature" in str(signed_refusal(signed("bob", key="alice")))
    # Tampered after signing: the comment, the decision or the time changed.
    good = signed("bob")
    for change in ({"comment": "edited"}, {"decision": "reject"}, {"signed_at": T0.isoformat() + "x"}):
        assert "bad signature" in str(signed_refusal(good.model_copy(update=change))), change
    # For another plan (a different plan id, even with the same content hash).
    assert "another plan" in str(signed_refusal(signed("bob", plan_id="other-plan")))
    # Replayed: signed before this plan existed (an approval of an earlier pass).
    assert "replayed" in str(signed_refusal(signed("bob", at=T0 - timedelta(hours=1))))
    assert "future" in str(signed_refusal(signed("bob", at=T0 + timedelta(hours=1))))
    # An approver without a configured public key cannot approve at all.
    assert "no public key" in str(signed_refusal(dec("carol").model_copy(update={"plan_id": "p"})))
    assert not verify(public_key_b64(KEYS["bob"]), good.model_copy(update={"signature": "!!notbase64"}))
