"""``make demo``'s run against the test fleet: its sample events go through all five
services and the chain it prints shows each stage (a topic carrying a new event type once
broke the printing)."""

from __future__ import annotations

import uuid

import pytest

from nudge_devtools.demo import PEOPLE, address, demonstrate
from nudge_devtools.seed import PRICING_POINTS, QUALIFIED_SCORE, SeededWorkspace
from nudge_devtools.services import Fleet
from nudge_devtools.smtp_sink import SmtpSink
from tests.conftest import StackHandle


async def test_the_demo_prints_scores_entries_requests_deliveries_and_emails(
    stack: StackHandle,
    fleet: Fleet,
    smtp_sink: SmtpSink,
    workspace: SeededWorkspace,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run = uuid.uuid4().hex[:8]
    await demonstrate(stack.settings, fleet, smtp_sink, workspace, run)
    printed = capsys.readouterr().out
    sections = printed.split("\n== ")
    titles = [section.splitlines()[0] for section in sections[1:]]
    assert titles == [
        "scoring: contacts and lead scores (topic contacts)",
        "segmenter: segment entries and exits (topic memberships)",
        "orchestrator: notification requests (topic notifications)",
        "notifier: deliveries (topic deliveries)",
        "SMTP sink: emails received",
    ]
    scores, entries, requests, deliveries, emails = (
        section.splitlines()[1:] for section in sections[1:]
    )
    qualified = [person for person in PEOPLE if person[3] * PRICING_POINTS >= QUALIFIED_SCORE]
    qualified_emails = sorted(address(email, run) for _, _, email, _ in qualified)
    assert sorted(line.split() for line in scores) == sorted(
        [*name.split(), address(email, run), "lead", "score", str(views * PRICING_POINTS)]
        for _, name, email, views in PEOPLE
    )
    assert sorted(entries) == sorted(
        f"  {name:<14} entered 'Qualified leads'" for _, name, _, _ in qualified
    )
    assert len(requests) == len(qualified)
    assert sorted(line.split()[0] for line in deliveries) == qualified_emails
    assert all(line.split()[1] == "sent" for line in deliveries)
    assert sorted(line.split()[1] for line in emails) == qualified_emails
