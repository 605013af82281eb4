from __future__ import annotations

import uuid

import pytest

from nudge_common.events import ContactSnapshot, NotificationRequested
from nudge_notifier.domain.templates import Template, TemplateRenderError, render, variables


def template(subject: str = "Hi", html: str = "<p>x</p>", text: str = "x") -> Template:
    return Template(uuid.uuid4(), "t", "email", subject, html, text)


def test_html_is_autoescaped_and_text_is_not() -> None:
    rendered = render(
        template(html="<p>{{ name }}</p>", text="{{ name }}"), {"name": "<b>Ada</b> & co"}
    )
    assert rendered.html == "<p>&lt;b&gt;Ada&lt;/b&gt; &amp; co</p>"
    assert rendered.text == "<b>Ada</b> & co"


def test_missing_data_fails_unless_the_template_gives_a_fallback() -> None:
    with pytest.raises(TemplateRenderError):
        render(template(subject="Hi {{ contact.traits.name }}"), {"contact": {"traits": {}}})
    fallback = template(subject='Hi {{ contact.traits.name | default("there") }}')
    assert render(fallback, {"contact": {"traits": {}}}).subject == "Hi there"


def test_the_sandbox_refuses_unsafe_attribute_access() -> None:
    with pytest.raises(TemplateRenderError):
        render(template(text="{{ ''.__class__.__mro__ }}"), {})


def test_a_block_depends_on_the_contacts_segments() -> None:
    segmented = template(text='{% if "VIP" in segments %}VIP block{% else %}intro block{% endif %}')

    def request(segments: list[str]) -> NotificationRequested:
        return NotificationRequested(
            idempotency_key="k",
            channel="email",
            template_id=segmented.id,
            contact=ContactSnapshot(contact_id=uuid.uuid4(), segments=segments),
        )

    assert render(segmented, variables(request(["VIP", "Newsletter"]), "")).text == "VIP block"
    assert render(segmented, variables(request(["Newsletter"]), "")).text == "intro block"
    assert render(segmented, variables(request([]), "")).text == "intro block"
