"""What the notifier listens to besides notification requests: engagement reported on
the deliveries topic (opens and clicks, from ingest's tracking routes), which restarts an
address's silence and lifts its sunset, and templates announced on the config topic
(``template.defined``, from the orchestrator's marketer API), which it stores."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.ext.asyncio import AsyncSession

from nudge_common.consumer import BatchFirstHandler
from nudge_common.events import DELIVERY_REPORTED, TEMPLATE_DEFINED, Envelope
from nudge_common.kafka import OutgoingMessage
from nudge_notifier import feedback, store
from nudge_notifier.domain.templates import Template

ENGAGEMENT = frozenset({"opened", "clicked"})


class EngagementHandler(BatchFirstHandler):
    """An open or a click of a delivery, not by a bot or a prefetch, engages the address
    it was sent to (looked up in the ledger by its idempotency key). Every other report
    on the topic (the notifier's own) is passed over."""

    message_types = frozenset({DELIVERY_REPORTED.name})  # not consent.changed

    async def handle_batch(
        self, session: AsyncSession, envelopes: Sequence[Envelope]
    ) -> Sequence[OutgoingMessage]:
        wanted = []
        for envelope in envelopes:
            # a look at the status before validating: most reports are not engagement
            if envelope.payload.get("status") not in ENGAGEMENT:
                continue
            report = DELIVERY_REPORTED.parse(envelope)
            if report.detail.get("bot") is True:
                continue
            wanted.append((envelope.workspace_id, report.idempotency_key, envelope.occurred_at))
        if not wanted:
            return []
        sent_to = await store.recipients(session, [(w, k) for w, k, _ in wanted])
        engagements = [
            store.Engaged(workspace, *sent_to[(workspace, key)], at)
            for workspace, key, at in wanted
            if (workspace, key) in sent_to
        ]
        return await feedback.engaged(session, engagements)


class TemplateHandler:
    """``template.defined``: the template is created, replaced or deleted (the config topic
    is compacted by template id, so a replay from the start ends with the latest)."""

    async def __call__(
        self, session: AsyncSession, envelope: Envelope
    ) -> Sequence[OutgoingMessage]:
        if envelope.type != TEMPLATE_DEFINED.name:
            return []
        defined = TEMPLATE_DEFINED.parse(envelope)
        if defined.deleted:
            await store.delete_template(
                session, workspace_id=envelope.workspace_id, template_id=defined.template_id
            )
        else:
            await store.put_template(
                session,
                workspace_id=envelope.workspace_id,
                template=Template(
                    defined.template_id,
                    defined.name,
                    defined.channel,
                    defined.subject,
                    defined.html,
                    defined.text,
                    defined.topic,
                ),
            )
        return []
