"""The stand-in's payments at the provider: real objects on the provider server, created through its API.

Each seeded outcome is made the way it happens at a real provider: a captured payment is an intent
confirmed with a card, never captured is an intent left without a payment method (or canceled), a
refund is a refund of a captured intent, an amount mismatch is a capture of another amount.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from enum import StrEnum
from typing import Any

import stripe

from config import Settings

CARD = {"number": "4242424242424242", "exp_month": 12, "exp_year": 2035, "cvc": "123"}


class ProviderOutcome(StrEnum):
    """What happened to a payment at the provider."""

    CAPTURED = "captured"
    UNPAID = "unpaid"
    REFUNDED = "refunded"
    AMOUNT_MISMATCH = "amount_mismatch"


class ProviderSeeder:
    """Creates payments at the provider for seeded sessions (bounded concurrency)."""

    def __init__(self, client: stripe.StripeClient, concurrency: int = 8) -> None:
        self._client = client
        self._gate = asyncio.Semaphore(concurrency)
        self._method: str | None = None

    async def create(
        self, outcome: ProviderOutcome, session_id: str, amount: int, currency: str, variant: int = 0
    ) -> str:
        """A provider payment for ``session_id`` ending in ``outcome``; returns its id (the provider_ref)."""
        async with self._gate:
            return await self._create(outcome, session_id, amount, currency.lower(), variant)

    async def create_many(self, items: list[tuple[ProviderOutcome, str, int, str, int]]) -> list[str]:
        """``create`` for each (outcome, session, amount, currency, variant), concurrently."""
        await self._card()
        return list(await asyncio.gather(*(self.create(*item) for item in items)))

    async def _card(self) -> str:
        if self._method is None:
            params: Any = {"type": "card", "card": CARD}
            method = await self._client.v1.payment_methods.create_async(params=params)
            self._method = method.id
        return self._method

    async def _create(
        self, outcome: ProviderOutcome, session_id: str, amount: int, currency: str, variant: int
    ) -> str:
        intents = self._client.v1.payment_intents
        metadata = {"payment_session_id": session_id}
        if outcome is ProviderOutcome.UNPAID:
            intent = await intents.create_async(
                params={"amount": amount, "currency": currency, "metadata": metadata}
            )
            if variant % 2:
                await intents.cancel_async(intent.id)
            return intent.id
        charged = (
            amount + (1_000 if variant % 2 else -1_000)
            if outcome is ProviderOutcome.AMOUNT_MISMATCH
            else amount
        )
        intent = await intents.create_async(
            params={
                "amount": charged,
                "currency": currency,
                "payment_method": await self._card(),
                "confirm": True,
                "metadata": metadata,
            }
        )
        if outcome is ProviderOutcome.REFUNDED:  # odd variants partially
            await self._client.v1.refunds.create_async(
                params={"payment_intent": intent.id, "amount": amount // 2}
                if variant % 2
                else {"payment_intent": intent.id}
            )
        return intent.id

    async def refund(self, intent_id: str, amount: int | None = None) -> None:
        """Refund a captured payment at the provider (in full, or ``amount``), as a customer's bank would see."""
        params: dict[str, object] = {"payment_intent": intent_id}
        if amount is not None:
            params["amount"] = amount
        await self._client.v1.refunds.create_async(params=params)  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def provider_seeder(base_url: str, api_key: str) -> AsyncIterator[ProviderSeeder]:
    """A seeder on the official SDK for the provider at ``base_url``; its connections closed on exit."""
    http = stripe.HTTPXClient()
    try:
        yield ProviderSeeder(stripe.StripeClient(api_key, base_addresses={"api": base_url}, http_client=http))
    finally:
        await http.close_async()  # type: ignore[no-untyped-call]


def seeder_for(settings: Settings) -> contextlib.AbstractAsyncContextManager[ProviderSeeder]:
    """``provider_seeder`` for the provider the settings name (the embedded one by default)."""
    return provider_seeder(
        settings.resolved_payment_provider_url(), settings.payment_provider_api_key.get_secret_value()
    )
