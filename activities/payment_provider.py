"""The payment provider, through Stripe's official SDK: look a payment up, find its success event.

The interface is deliberately small (``PaymentProvider``): one payment by the session's
``provider_ref``, and which of a set of payments have a success event. Another provider fits behind
the same two calls; the verdict rules (``judge``) only read ``ProviderPayment``.

Assumption, documented in docs/operations.md: a session's ``provider_ref`` is the provider's payment
id (a Stripe PaymentIntent ``pi_...``), its amount is integer minor units in the org's currency.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol, TypeVar

import stripe

from contracts.models import PaymentVerdict, ProviderPayment

T = TypeVar("T")
NEVER_CAPTURED = frozenset(
    {"requires_payment_method", "requires_confirmation", "requires_action", "canceled"}
)
MAX_RETRY_AFTER_SECONDS = 30.0
MAX_EVENT_PAGES = 100  # 10,000 events: the success events of the window a reconcile looks at


class ProviderUnreachable(Exception):
    """The provider did not answer (connection, 5xx or 429 after retries, refused key)."""


class PaymentProvider(Protocol):
    """What remediation needs from a payment provider."""

    async def payment(self, ref: str) -> ProviderPayment:
        """The provider's figures for payment ``ref`` (``found=False`` when it does not know it)."""
        ...

    async def succeeded_events(
        self, refs: set[str], wanted: Callable[[set[str]], Awaitable[bool]] | None = None
    ) -> dict[str, str]:
        """For the payments in ``refs`` that have one, the id of their success event. With ``wanted``,
        asked before each page with the refs found so far, paging stops when it answers False."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def judge(amount_minor: int, currency: str, payment: ProviderPayment) -> tuple[PaymentVerdict, str]:
    """The verdict on a session of ``amount_minor`` ``currency`` given the provider's answer."""
    if not payment.found:
        return PaymentVerdict.INVESTIGATE, f"the provider does not know payment {payment.ref}"
    figures = f"{payment.captured_minor} {payment.currency} captured, status {payment.status}"
    if payment.disputed:
        return PaymentVerdict.INVESTIGATE, f"disputed at the provider ({figures})"
    if payment.refunded_minor:
        how = "fully" if payment.refunded_minor >= payment.captured_minor else "partially"
        return (
            PaymentVerdict.INVESTIGATE,
            f"{how} refunded at the provider: {payment.refunded_minor} of {figures}",
        )
    if payment.status in NEVER_CAPTURED or (payment.status != "succeeded" and not payment.captured_minor):
        return PaymentVerdict.NOT_CAPTURED, f"never captured at the provider (status {payment.status})"
    if (payment.currency or "").lower() != currency.lower():
        return PaymentVerdict.INVESTIGATE, f"currency differs: session {currency.lower()}, provider {figures}"
    if payment.captured_minor != amount_minor:
        return PaymentVerdict.INVESTIGATE, f"amount differs: session {amount_minor}, provider {figures}"
    if payment.status != "succeeded":
        return PaymentVerdict.INVESTIGATE, f"not settled at the provider ({figures})"
    return PaymentVerdict.CAPTURED, f"captured at the provider: {figures}"


class StripePaymentProvider:
    """``PaymentProvider`` over Stripe's API (or localstripe) with the official SDK's async client."""

    def __init__(self, base_url: str, api_key: str, *, retries: int = 3, timeout: float = 10.0) -> None:
        self._http = stripe.HTTPXClient(timeout=timeout)
        # The SDK retries connection errors, 409 and 5xx with backoff; 429 is retried below.
        self._client = stripe.StripeClient(
            api_key, base_addresses={"api": base_url}, http_client=self._http, max_network_retries=retries
        )
        self._retries = retries

    @property
    def client(self) -> stripe.StripeClient:
        """The SDK client (the stand-in's seeder creates payments through it)."""
        return self._client

    async def aclose(self) -> None:
        """Close the HTTP connections."""
        await self._http.close_async()  # type: ignore[no-untyped-call]

    async def payment(self, ref: str) -> ProviderPayment:
        """Retrieve the PaymentIntent ``ref`` with its latest charge."""
        if not ref.strip():
            return ProviderPayment(ref=ref, found=False)
        try:
            intent = await self._call(
                lambda: self._client.v1.payment_intents.retrieve_async(
                    ref, params={"expand": ["latest_charge"]}
                )
            )
        except stripe.InvalidRequestError:
            # 404 (unknown) or 400 (not an id it accepts): asking again will not change the answer, so
            # the session is investigated rather than waited on.
            return ProviderPayment(ref=ref, found=False)
        data = intent.to_dict()
        latest = data.get("latest_charge")
        if isinstance(latest, str):  # not expanded by this server
            charge_id: str = latest
            latest = (await self._call(lambda: self._client.v1.charges.retrieve_async(charge_id))).to_dict()
        charge: dict[str, Any] = latest if isinstance(latest, dict) else {}
        captured = data.get("amount_received")
        if captured is None:  # servers that omit it: what the succeeded, captured charge took
            ok = charge.get("status") == "succeeded" and charge.get("captured")
            captured = int(charge.get("amount") or 0) if ok else 0
        return ProviderPayment(
            ref=ref,
            found=True,
            status=data.get("status"),
            amount_minor=data.get("amount"),
            captured_minor=int(captured),
            currency=(data.get("currency") or "").lower() or None,
            refunded_minor=int(charge.get("amount_refunded") or 0),
            disputed=bool(charge.get("disputed")),
        )

    async def succeeded_events(
        self, refs: set[str], wanted: Callable[[set[str]], Awaitable[bool]] | None = None
    ) -> dict[str, str]:
        """Page through ``payment_intent.succeeded`` events (newest first) until every ref is found, or
        until ``wanted`` says no ref still wanted is missing."""
        found: dict[str, str] = {}
        params: Any = {"type": "payment_intent.succeeded", "limit": 100}
        for _ in range(MAX_EVENT_PAGES):
            if wanted is not None and not await wanted(set(found)):
                break
            page_params: Any = dict(params)
            page = await self._call(partial(self._client.v1.events.list_async, params=page_params))
            for event in page.data:
                obj = event.to_dict().get("data", {}).get("object", {})
                if obj.get("id") in refs:
                    found.setdefault(obj["id"], event.id)
            if not page.has_more or not page.data or (wanted is None and len(found) == len(refs)):
                break
            params["starting_after"] = page.data[-1].id
        return found

    async def _call(self, request: Callable[[], Awaitable[T]]) -> T:
        """One API call: 429s wait for Retry-After (bounded); no answer becomes ProviderUnreachable."""
        for attempt in range(self._retries + 1):
            try:
                return await request()
            except stripe.RateLimitError as exc:
                if attempt == self._retries:
                    raise ProviderUnreachable("provider rate limit: still 429 after retries") from None
                await asyncio.sleep(_retry_after(exc, attempt))
            except stripe.AuthenticationError:
                raise ProviderUnreachable("provider refused the API key (PAYMENT_PROVIDER_API_KEY)") from None
            except (stripe.APIConnectionError, stripe.APIError) as exc:
                raise ProviderUnreachable(f"provider unreachable: {type(exc).__name__}") from None
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


def _retry_after(exc: stripe.RateLimitError, attempt: int) -> float:
    """Seconds to wait after a 429: the server's Retry-After when it sends one, else backoff."""
    headers = exc.headers or {}
    value = str(headers.get("retry-after") or headers.get("Retry-After") or "")
    try:
        seconds: float = min(float(value), MAX_RETRY_AFTER_SECONDS)
        return seconds
    except ValueError:
        return min(0.5 * 2.0**attempt, MAX_RETRY_AFTER_SECONDS)
