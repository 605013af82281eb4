"""Message templates rendered in Jinja2's sandbox. Pure.

One template per channel: email uses subject, HTML and text; SMS the text; push the
subject as the title and the text as the body. Templates see ``contact`` (traits and
scores), so blocks can depend on the score (``{% if contact.scores.lead | default(0) >= 50
%}``), ``segments`` (the names of the contact's segments: ``{% if "VIP" in segments %}``),
``unsubscribe_url`` and the request's ``data``.

HTML is autoescaped; a variable that is missing fails the render (StrictUndefined) unless
the template gives a fallback (``{{ contact.traits.name | default("there") }}``), so a
message is never sent half-rendered.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nudge_common.events import CONTACT_SUMMARY_TEMPLATE_ID, Channel, NotificationRequested


class _Environment(ImmutableSandboxedEnvironment):
    def make_globals(self, d: MutableMapping[str, Any] | None) -> MutableMapping[str, Any]:
        """A plain dict rather than Jinja's ChainMap: every render copies its template's
        globals into a new context, and copying a ChainMap took most of a render's time.
        Neither environment's globals change after start."""
        return {**self.globals, **(d or {})}


_html = _Environment(autoescape=True, undefined=jinja2.StrictUndefined)
_text = _Environment(autoescape=False, undefined=jinja2.StrictUndefined)


@dataclass(frozen=True)
class Template:
    id: uuid.UUID
    name: str
    channel: Channel
    subject: str
    html: str
    text: str
    topic: str = "marketing"
    """The subscription topic: unsubscribing from it stops this template's messages."""


@dataclass(frozen=True)
class Rendered:
    subject: str
    html: str
    text: str


class TemplateRenderError(Exception):
    pass


@functools.lru_cache(maxsize=1024)
def _compiled(source: str, *, html: bool) -> jinja2.Template:
    """Compiling is most of a render's cost; a template's source compiles once."""
    return (_html if html else _text).from_string(source)


def variables(request: NotificationRequested, unsubscribe_url: str) -> dict[str, Any]:
    """What a template sees when it renders ``request``."""
    return {
        "contact": request.contact.model_dump(mode="json"),
        "segments": list(request.contact.segments),
        "unsubscribe_url": unsubscribe_url,
        "data": request.data,
    }


def render(template: Template, variables: Mapping[str, Any]) -> Rendered:
    try:
        return Rendered(
            subject=_compiled(template.subject, html=False).render(variables).strip(),
            html=_compiled(template.html, html=True).render(variables),
            text=_compiled(template.text, html=False).render(variables),
        )
    except jinja2.TemplateError as error:
        raise TemplateRenderError(
            f"template {template.name!r} failed to render: {error}"
        ) from error


_SUMMARY_ROWS = [
    ("Email", "email"),
    ("Company", "company"),
    ("Phone", "phone"),
    ("User id", "user_id"),
    ("Note", "note"),
]


def _summary_text() -> str:
    rows = "".join(
        f"{{% if data.{key} is defined and data.{key} %}}{label}: {{{{ data.{key} }}}}\n"
        "{% endif %}"
        for label, key in _SUMMARY_ROWS
    )
    return (
        "{{ data.summary | default('') }}\n\n"
        "Name: {{ data.name | default('?') }}\n"
        + rows
        + "{% set stages = data.stages | default({}) %}"
        "{% for model, score in (data.scores | default({})) | dictsort %}"
        "Score {{ model }}: {{ score }}"
        "{% if stages[model] is defined %} ({{ stages[model] }}){% endif %}\n"
        "{% endfor %}"
        "{% if data.tags is defined and data.tags %}Tags: {{ data.tags | join(', ') }}\n"
        "{% endif %}"
        "{% if data.workflow is defined %}"
        "Workflow: {{ data.workflow.name }} ({{ data.workflow.id }})\n{% endif %}"
        "Contact: {{ contact.contact_id }}\n"
    )


CONTACT_SUMMARY = Template(
    CONTACT_SUMMARY_TEMPLATE_ID,
    "contact summary (built in)",
    "email",
    subject="Lead: {{ data.name | default('a contact') }}"
    "{% if data.company is defined and data.company %} ({{ data.company }}){% endif %}",
    html="<pre>" + _summary_text() + "</pre>",
    text=_summary_text(),
    topic="internal",
)
"""The notify-sales email when the step names no template of its own: the contact's 360
summary from the request's ``data``."""
