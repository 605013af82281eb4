"""Notifier's Kafka wiring: each notification request is checked (address, hygiene,
suppression, consent), rendered, claimed, sent at most once, and reported on the
deliveries topic.

The at-most-once rule: a key is claimed (status ``sending``) and committed before the
provider is called, and its outcome is committed right after. A key found still
``sending`` belongs to a process that died mid-send; whether the provider took the message
cannot be known, so it is recorded as ``unknown`` and never sent again.

A batch is sent concurrently: :meth:`NotificationHandler.prepare` gets the whole batch
from the consumer runner before its transaction opens, plans every request (address,
consent, render: one read for the batch), claims every sendable key in one statement
that also records the skipped requests and the hygiene flags, sends them all at once
(each provider bounded by its own rate limit and concurrency), and records every outcome
in one statement. Those statements are each atomic and run without a transaction around
them (no BEGIN and COMMIT round trips). The runner then takes what ``prepare`` found for
the whole batch (``handle_batch``) in its own transaction, which publishes the reports.

Why the outcomes are committed by ``prepare`` and not in the runner's transaction (which
would save the one round trip of their statement): that transaction is rolled back
whenever the runner replays the batch, and the outcomes would go with it.

- A transient failure of a send makes ``handle_batch`` raise :class:`RetryLater`, which
  rolls the runner's transaction back and replays the batch by design: the key's ``retry``
  status must be committed before, or the replay finds it still ``sending`` and gives it
  up as ``unknown`` (never sent) instead of sending it again.
- Publishing the reports or committing can fail (Kafka or PostgreSQL away: retried with
  back-off, the same batch applied again). The replay would find every sent key still
  ``sending`` and report it ``unknown``: the real outcomes, sent, bounced or refused, would
  be lost, and the suppression of a hard bounce with them. Keeping them in memory across
  replays does not cover a runner stopped during the outage (it leaves the batch to replay
  after the restart) or a crash after the sends.
- A bad message in the batch makes the runner roll back and apply the messages one by
  one in savepoints, so the outcomes would need a second way to be written.

At most once would hold either way (a key is claimed before it is sent; a key left
``sending`` is never resent), but outcomes would be lost for one round trip a batch.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from pydantic import TypeAdapter, ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import ConsumerRunner, MessageHandler
from nudge_common.db import SessionMaker, autocommit, transaction
from nudge_common.errors import InvalidMessage, RetryLater
from nudge_common.events import (
    CONSENT_CHANGED,
    DELIVERY_REPORTED,
    NOTIFICATION_REQUESTED,
    Channel,
    ConsentChanged,
    DeliveryStatus,
    Envelope,
    NotificationRequested,
    Topic,
    derived_envelope,
)
from nudge_common.kafka import OutgoingMessage
from nudge_common.service import Runtime, Worker
from nudge_common.tracking import engagement_event
from nudge_notifier import feedback, listeners, metrics, store, worker
from nudge_notifier.domain import links
from nudge_notifier.domain.consent import decide
from nudge_notifier.domain.hygiene import InvalidPhone, check_email, to_e164
from nudge_notifier.domain.templates import (
    CONTACT_SUMMARY,
    Template,
    TemplateRenderError,
    render,
    variables,
)
from nudge_notifier.providers.base import (
    Limiter,
    Outbound,
    PermanentFailure,
    Provider,
    TransientFailure,
    with_retries,
)
from nudge_notifier.providers.email import SmtpEmailProvider
from nudge_notifier.providers.push import FcmPushProvider, WebPushProvider
from nudge_notifier.providers.sms import TwilioSmsProvider
from nudge_notifier.settings import NotifierSettings

log = structlog.get_logger(__name__)
DELIVERY_STATUS: TypeAdapter[DeliveryStatus] = TypeAdapter(DeliveryStatus)
INTERRUPTED = "interrupted while sending; not resent"


class Providers:
    """Every channel's provider with its own limiter."""

    def __init__(self, settings: NotifierSettings, **overrides: Provider) -> None:
        s = settings
        self.providers: dict[str, Provider] = {
            "smtp": overrides.get("smtp") or SmtpEmailProvider(s),
            "sms": overrides.get("sms") or TwilioSmsProvider(s),
            "fcm": overrides.get("fcm") or FcmPushProvider(s),
            "webpush": overrides.get("webpush") or WebPushProvider(s),
        }
        self.limiters = {
            "smtp": Limiter(rate_per_s=s.smtp_rate_per_s, concurrency=s.smtp_max_connections),
            "sms": Limiter(rate_per_s=s.sms_rate_per_s, concurrency=s.sms_concurrency),
            "fcm": Limiter(rate_per_s=s.push_rate_per_s, concurrency=s.push_concurrency),
            "webpush": Limiter(rate_per_s=s.push_rate_per_s, concurrency=s.push_concurrency),
        }

    async def close(self) -> None:
        for provider in self.providers.values():
            await provider.close()


@dataclass
class Item:
    """One request on its way through a batch."""

    envelope: Envelope
    request: NotificationRequested | None = None
    provider: str | None = None
    outbound: Outbound | None = None
    address: str | None = None
    attempts: int = 0
    outputs: list[OutgoingMessage] = field(default_factory=list)
    error: Exception | None = None
    outcome: store.Outcome | None = None
    hard_bounce: bool = False
    soft_bounce: bool = False

    @property
    def done(self) -> bool:
        return self.error is not None or bool(self.outputs)

    @property
    def internal(self) -> bool:
        """Mail to a named recipient (notify sales), not to the contact: the contact's
        consent and suppression, tracking and address health do not apply."""
        return self.request is not None and self.request.recipient is not None


@dataclass(frozen=True)
class Addressed:
    """Where a request goes (address, provider, provider data), or why it cannot go
    (``problem``); ``note``: the address's hygiene flags to record."""

    address: str | None = None
    provider: str | None = None
    data: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    note: store.HygieneNote | None = None


class NotificationHandler:
    def __init__(
        self, settings: NotifierSettings, sessionmaker: SessionMaker, providers: Providers
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.providers = providers
        self.autocommit = autocommit(sessionmaker)
        self._prepared: dict[uuid.UUID, Item] = {}

    async def prepare(self, envelopes: Sequence[Envelope]) -> None:
        requests = [e for e in envelopes if e.type == NOTIFICATION_REQUESTED.name]
        items = await self._process(requests) if requests else []
        self._prepared = {item.envelope.id: item for item in items}

    async def __call__(
        self, session: AsyncSession, envelope: Envelope
    ) -> Sequence[OutgoingMessage]:
        if envelope.type != NOTIFICATION_REQUESTED.name:
            return []
        item = self._prepared.get(envelope.id)
        if item is None:
            (item,) = await self._process([envelope])
        if item.error is not None:
            raise item.error
        return item.outputs

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        """What :meth:`prepare` found for the whole batch, without a savepoint per
        message. A message that failed raises here, and the runner then goes one by one
        (the prepared items stay until the next batch, so nothing is done twice)."""
        outputs: list[OutgoingMessage] = []
        for envelope in envelopes:
            outputs += await self(session, envelope)
        return outputs

    # --- the batch -----------------------------------------------------------------------

    async def _process(self, envelopes: Sequence[Envelope]) -> list[Item]:
        items = [Item(envelope) for envelope in envelopes]
        rounds: list[list[Item]] = [[]]
        occurrences: dict[str, int] = {}
        for item in items:
            try:
                item.request = NOTIFICATION_REQUESTED.parse(item.envelope)
            except ValidationError as error:
                item.error = InvalidMessage(f"invalid notification request: {error}")
                continue
            if item.request.recipient is not None and item.request.channel != "email":
                item.error = InvalidMessage("recipient: internal messages are email only")
                continue
            # A key requested twice in one batch: the second request waits for the first
            # to settle, then finds it in the ledger and reports its outcome again.
            index = occurrences.get(item.request.idempotency_key, 0)
            occurrences[item.request.idempotency_key] = index + 1
            if index == len(rounds):
                rounds.append([])
            rounds[index].append(item)
        for round_items in rounds:
            await self._round(round_items)
        return items

    async def _round(self, items: list[Item]) -> None:
        """Plan, then claim in one statement committed before any provider is called; then
        send, and commit every outcome."""
        if not items:
            return
        async with self.autocommit() as session:
            skipped, notes = await self._plan(session, items)
            await self._claim(session, items, skipped, notes)
        sendable = [item for item in items if not item.done and item.outbound is not None]
        if sendable:
            await asyncio.gather(*(self._send(item) for item in sendable))
            await self._record(sendable)

    async def _plan(
        self, session: AsyncSession, items: list[Item]
    ) -> tuple[list[store.Skipped], list[store.HygieneNote]]:
        """Address, hygiene, suppression and consent, template, with one read for the
        batch. Returns the requests that must not be sent, with the reason, and the
        hygiene flags of the addresses, for :meth:`_claim` to record."""
        pending = [item for item in items if item.request is not None and item.error is None]
        if not pending:
            return [], []
        addressed: list[tuple[Item, Addressed]] = []
        wanted: set[tuple[str, uuid.UUID]] = set()
        lookups: set[store.Address] = set()
        for item in pending:
            request = item.request
            assert request is not None
            workspace = item.envelope.workspace_id
            if request.template_id != CONTACT_SUMMARY.id:
                wanted.add((workspace, request.template_id))
            found = self._address(item)
            addressed.append((item, found))
            if found.address is not None and not item.internal:
                lookups.add((workspace, request.channel, found.address))
        plan = await store.load_plan(session, templates=list(wanted), addresses=list(lookups))
        skipped: list[tuple[Item, str]] = []
        notes: list[store.HygieneNote] = []
        opt_in_channels = self._opt_in_channels()
        for item, found in addressed:
            request = item.request
            assert request is not None
            workspace = item.envelope.workspace_id
            template = (
                CONTACT_SUMMARY
                if request.template_id == CONTACT_SUMMARY.id
                else plan.templates.get((workspace, request.template_id))
            )
            if template is None:
                item.error = InvalidMessage(f"template {request.template_id} does not exist")
                continue
            if template.channel != request.channel:
                item.error = InvalidMessage(
                    f"template {template.name!r} is for {template.channel}, not {request.channel}"
                )
                continue
            if found.note is not None:
                notes.append(found.note)
            if found.problem is not None:
                skipped.append((item, found.problem))
                continue
            address, provider = found.address, found.provider
            assert address is not None
            assert provider is not None
            item.address, item.provider = address, provider
            ctx = None if item.internal else self._links(item, template, address)
            token = None if ctx is None else links.unsubscribe_token(ctx)
            try:
                rendered = render(template, self._variables(item, ctx, token))
            except TemplateRenderError as error:
                item.error = InvalidMessage(str(error))
                continue
            headers: dict[str, str] = {}
            if request.channel == "email" and ctx is not None and token is not None:
                headers = links.unsubscribe_headers(ctx, token)
                rendered = type(rendered)(
                    rendered.subject,
                    links.track_html(
                        rendered.html,
                        ctx,
                        opens=self.settings.track_opens,
                        clicks=self.settings.track_clicks,
                    ),
                    rendered.text,
                )
            if not item.internal:
                pair = (workspace, request.channel, address)
                decision = decide(
                    channel=request.channel,
                    topic=template.topic,
                    suppression_reason=plan.suppressed.get(pair),
                    consents=plan.consents.get(pair, {}),
                    opt_in_channels=opt_in_channels,
                )
                if not decision.allowed:
                    skipped.append((item, decision.reason or "not allowed"))
                    continue
            item.outbound = Outbound(
                request.channel, address, rendered, request.idempotency_key, headers, found.data
            )
        records = []
        for item, reason in skipped:
            assert item.request is not None
            records.append(
                store.Skipped(
                    item.request.idempotency_key,
                    item.envelope.workspace_id,
                    item.request.channel,
                    item.request.contact.contact_id,
                    reason,
                )
            )
            item.outputs.append(self._report(item, "skipped", reason=reason))
        return records, notes

    def _opt_in_channels(self) -> list[Channel]:
        channels = list(self.settings.opt_in_channels)
        if self.settings.email_double_opt_in and "email" not in channels:
            channels.append("email")
        return channels

    def _address(self, item: Item) -> Addressed:
        """The address, provider and provider data for the request's channel, or why
        not; for an email, the hygiene flags to note."""
        request = item.request
        assert request is not None
        traits = request.contact.traits
        workspace = item.envelope.workspace_id
        if request.recipient is not None:
            check = check_email(request.recipient)
            if not check.valid or check.normalized is None:
                return Addressed(problem=f"invalid recipient address: {check.reason}")
            return Addressed(check.normalized.lower(), "smtp")
        if request.channel == "email":
            raw = traits.get("email")
            if not isinstance(raw, str) or not raw:
                return Addressed(problem="no email address")
            check = check_email(raw)
            if not check.valid or check.normalized is None:
                note = store.HygieneNote(
                    workspace, "email", raw.lower(), invalid=True, suggestion=check.suggestion
                )
                return Addressed(problem=f"invalid email address: {check.reason}", note=note)
            address = check.normalized.lower()
            if check.disposable or check.role or check.suggestion:
                note = store.HygieneNote(
                    workspace,
                    "email",
                    address,
                    disposable=check.disposable,
                    role=check.role,
                    suggestion=check.suggestion,
                )
                return Addressed(address, "smtp", note=note)
            return Addressed(address, "smtp")
        if request.channel == "sms":
            raw = traits.get("phone")
            if not isinstance(raw, str) or not raw:
                return Addressed(problem="no phone number")
            try:
                return Addressed(to_e164(raw, self.settings.sms_default_region), "sms")
            except InvalidPhone as error:
                return Addressed(problem=str(error))
        subscription = traits.get("web_push")
        if isinstance(subscription, dict) and isinstance(subscription.get("endpoint"), str):
            return Addressed(subscription["endpoint"], "webpush", {"subscription": subscription})
        token = traits.get("fcm_token")
        if isinstance(token, str) and token:
            return Addressed(token, "fcm")
        return Addressed(problem="no push subscription or device token")

    def _links(self, item: Item, template: Template, address: str) -> links.LinkContext:
        request = item.request
        assert request is not None
        s = self.settings
        return links.LinkContext(
            secret=s.tracking_secret.get_secret_value(),
            tracking_url=s.tracking_url,
            public_url=s.public_url,
            email_domain=s.email_domain,
            workspace_id=item.envelope.workspace_id,
            contact_id=str(request.contact.contact_id),
            user_id=request.contact.user_id,
            idempotency_key=request.idempotency_key,
            channel=request.channel,
            address=address,
            topic=template.topic,
        )

    def _variables(
        self, item: Item, ctx: links.LinkContext | None, token: str | None
    ) -> dict[str, Any]:
        request = item.request
        assert request is not None
        return variables(
            request,
            "" if ctx is None or token is None else links.unsubscribe_url(ctx, token),
        )

    async def _claim(
        self,
        session: AsyncSession,
        items: list[Item],
        skipped: list[store.Skipped],
        notes: list[store.HygieneNote],
    ) -> None:
        """Claim every sendable key, recording the skipped requests and the hygiene notes
        in the same statement (committed before sending). A key claimed before is not
        sent: its recorded outcome is reported again."""
        candidates = [i for i in items if not i.done and i.outbound is not None]
        claims = []
        for item in candidates:
            assert item.request is not None
            assert item.address is not None
            claims.append(
                store.Claim(
                    item.request.idempotency_key,
                    item.envelope.workspace_id,
                    item.request.channel,
                    item.request.contact.contact_id,
                    item.address,
                )
            )
        claimed = await store.claim_many(session, claims, skipped=skipped, notes=notes)
        earlier = []
        for item in candidates:
            assert item.request is not None
            if item.request.idempotency_key in claimed:
                item.attempts = claimed[item.request.idempotency_key]
            else:
                item.outbound = None
                earlier.append(item)
        if earlier:
            async with transaction(self.sessionmaker) as settling:
                for item in earlier:
                    item.outputs.append(await self._settle_earlier_claim(settling, item))

    async def _send(self, item: Item) -> None:
        assert item.outbound is not None
        assert item.provider is not None
        assert item.request is not None
        provider = self.providers.providers[item.provider]
        limiter = self.providers.limiters[item.provider]
        key = item.request.idempotency_key
        started = time.perf_counter()
        try:
            message_id, attempts = await with_retries(
                lambda: limiter.run(lambda: provider.send(item.outbound)),  # type: ignore[arg-type]
                attempts=self.settings.send_attempts,
                base_s=self.settings.retry_base_delay_s,
                max_s=self.settings.retry_max_delay_s,
            )
        except TransientFailure as error:
            metrics.PROVIDER_CALLS.labels(item.provider, "transient").inc()
            if error.per_recipient and item.attempts >= self.settings.max_batch_attempts:
                item.soft_bounce = True
                reason = f"soft bounce after {item.attempts} batch attempts: {error}"
                item.outcome = store.Outcome(key, "failed", reason=reason)
                item.outputs.append(self._report(item, "failed", reason=reason))
                return
            item.outcome = store.Outcome(key, store.RETRY, reason=str(error))
            item.error = RetryLater(str(error))
            return
        except PermanentFailure as error:
            metrics.PROVIDER_CALLS.labels(item.provider, "permanent").inc()
            item.hard_bounce = error.hard_bounce
            status: DeliveryStatus = "bounced" if error.hard_bounce else "failed"
            item.outcome = store.Outcome(key, status, reason=str(error))
            item.outputs.append(self._report(item, status, reason=str(error)))
            return
        except Exception as error:  # the provider may have taken it: never resend
            metrics.PROVIDER_CALLS.labels(item.provider, "unknown").inc()
            log.exception("send outcome unknown", idempotency_key=key)
            item.outcome = store.Outcome(key, "unknown", reason=repr(error))
            item.outputs.append(self._report(item, "unknown", reason=repr(error)))
            return
        metrics.PROVIDER_CALLS.labels(item.provider, "sent").inc()
        metrics.PROVIDER_ATTEMPTS.labels(item.provider).observe(attempts)
        metrics.SEND_DURATION.labels(item.provider).observe(time.perf_counter() - started)
        item.outcome = store.Outcome(key, "sent", provider_message_id=message_id)
        if item.envelope.origin_received_at:
            latency = datetime.now(UTC) - item.envelope.origin_received_at
            metrics.END_TO_END_LATENCY.labels(item.request.channel).observe(latency.total_seconds())
        item.outputs.append(self._report(item, "sent", message_id=message_id))

    async def _record(self, items: list[Item]) -> None:
        """Every outcome of the batch committed at once, with what follows from it: a
        successful send counts for its address's health, a hard bounce suppresses the
        address, a soft bounce counts towards the sunset. Without bounces (the usual batch)
        that is one statement, with no transaction around it."""
        outcomes = [item.outcome for item in items if item.outcome is not None]
        sent: list[store.SentTo] = []
        bounced: list[Item] = []
        for item in items:
            if item.outcome is None or item.request is None or item.address is None:
                continue
            if item.internal:
                continue
            if item.outcome.status == "sent":
                contact = item.request.contact
                sent.append(
                    store.SentTo(
                        item.envelope.workspace_id,
                        item.request.channel,
                        item.address,
                        contact.contact_id,
                        contact.user_id,
                    )
                )
            elif item.hard_bounce or item.soft_bounce:
                bounced.append(item)
        if not bounced:
            async with self.autocommit() as session:
                await self._record_outcomes(session, outcomes, sent)
            return
        async with transaction(self.sessionmaker) as session:
            for item in bounced:
                await self._bounced(session, item)
            await self._record_outcomes(session, outcomes, sent)

    async def _record_outcomes(
        self, session: AsyncSession, outcomes: list[store.Outcome], sent: list[store.SentTo]
    ) -> None:
        await store.record_outcomes(
            session,
            outcomes,
            sent,
            unengaged_days=self.settings.unengaged_sunset_days,
            min_sends=self.settings.unengaged_sunset_min_sends,
        )

    async def _bounced(self, session: AsyncSession, item: Item) -> None:
        assert item.request is not None
        assert item.address is not None
        assert item.outcome is not None
        workspace = item.envelope.workspace_id
        if item.hard_bounce:
            reason = item.outcome.reason or "hard bounce"
            if await store.suppress(
                session,
                workspace_id=workspace,
                channel=item.request.channel,
                address=item.address,
                reason="hard_bounce",
                detail=reason,
            ):
                item.outputs.append(self._suppressed(item, "hard_bounce"))
                item.outputs.append(bounce_event(item))
        else:
            item.outputs += await feedback.soft_bounce(
                session,
                self.settings,
                workspace,
                channel=item.request.channel,
                address=item.address,
            )

    async def _settle_earlier_claim(self, session: AsyncSession, item: Item) -> OutgoingMessage:
        """The key was claimed before. Report its recorded outcome again (the report of
        the first attempt may not have been published); a claim still ``sending`` is a
        send interrupted by a crash and becomes ``unknown``."""
        request = item.request
        assert request is not None
        delivery = await store.get_delivery(session, idempotency_key=request.idempotency_key)
        status: DeliveryStatus
        reason: str | None
        if delivery.status == store.SENDING:
            status, reason = "unknown", INTERRUPTED
            await store.record_outcome(
                session, idempotency_key=request.idempotency_key, status=status, reason=reason
            )
        else:
            status, reason = DELIVERY_STATUS.validate_python(delivery.status), delivery.reason
        metrics.MESSAGES.labels(request.channel, "duplicate").inc()
        return self._report(
            item,
            status,
            recipient=delivery.recipient,
            message_id=delivery.provider_message_id,
            reason=reason,
        )

    def _report(
        self,
        item: Item,
        status: DeliveryStatus,
        *,
        recipient: str | None = None,
        message_id: str | None = None,
        reason: str | None = None,
    ) -> OutgoingMessage:
        request = item.request
        assert request is not None
        metrics.MESSAGES.labels(request.channel, status).inc()
        contact_id = str(request.contact.contact_id)
        return OutgoingMessage(
            Topic.DELIVERIES,
            key=contact_id,
            envelope=derived_envelope(
                DELIVERY_REPORTED,
                workspace_id=item.envelope.workspace_id,
                payload=report_payload(
                    request,
                    status,
                    contact_id=contact_id,
                    recipient=recipient or item.address,
                    message_id=message_id,
                    reason=reason,
                ),
                occurred_at=datetime.now(UTC),
                caused_by=item.envelope,
            ),
        )

    def _suppressed(self, item: Item, reason: str) -> OutgoingMessage:
        request = item.request
        assert request is not None
        assert item.address is not None
        now = datetime.now(UTC)
        return OutgoingMessage(
            Topic.DELIVERIES,
            key=str(request.contact.contact_id),
            envelope=CONSENT_CHANGED.envelope(
                workspace_id=item.envelope.workspace_id,
                payload=ConsentChanged(
                    channel=request.channel,
                    address=item.address,
                    suppressed=True,
                    reason=reason,
                    contact_id=request.contact.contact_id,
                    at=now,
                ),
                occurred_at=now,
                caused_by=item.envelope,
            ),
        )


def report_payload(
    request: NotificationRequested,
    status: DeliveryStatus,
    *,
    contact_id: str,
    recipient: str | None,
    message_id: str | None,
    reason: str | None,
) -> dict[str, Any]:
    """The :class:`DeliveryReported` of ``request`` in its JSON form, written directly: one
    report per message, and the model's validation and dump cost more than the rest of
    the report. ``tests/services/notifier/test_domain.py`` holds it equal to the model's."""
    return {
        "idempotency_key": request.idempotency_key,
        "channel": request.channel,
        "status": status,
        "contact_id": contact_id,
        "recipient": recipient,
        "provider_message_id": message_id,
        "reason": reason,
        "detail": {},
    }


def bounce_event(item: Item) -> OutgoingMessage:
    """The bounce as a Segment event for scoring and segments."""
    request = item.request
    assert request is not None
    now = datetime.now(UTC)
    return engagement_event(
        workspace_id=item.envelope.workspace_id,
        event="Email Bounced",
        contact_id=str(request.contact.contact_id),
        user_id=request.contact.user_id,
        properties={"idempotency_key": request.idempotency_key, "type": "hard"},
        message_id=f"bounce:{request.idempotency_key}",
        at=now,
    )


def consumers(providers: Providers) -> Callable[[Runtime], list[Worker]]:
    """The notifier's workers: the requests' consumer, sending through ``providers``
    (shared with the API), the engagement and template listeners, and the sunset job."""

    def build(runtime: Runtime) -> list[Worker]:
        settings = runtime.settings
        assert isinstance(settings, NotifierSettings)

        def runner(name: str, topic: Topic, handler: MessageHandler) -> ConsumerRunner:
            return ConsumerRunner(
                name=name,
                topics=[topic],
                handler=handler,
                settings=settings,
                sessionmaker=runtime.sessionmaker,
                producer=runtime.producer,
                processed_messages=store.processed_messages,
            )

        return [
            runner(
                "notifier",
                Topic.NOTIFICATIONS,
                NotificationHandler(settings, runtime.sessionmaker, providers),
            ),
            runner("notifier-engagement", Topic.DELIVERIES, listeners.EngagementHandler()),
            runner("notifier-templates", Topic.CONFIG, listeners.TemplateHandler()),
            worker.sunset_worker(runtime, settings),
        ]

    return build
