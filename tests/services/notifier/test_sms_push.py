"""SMS through the Twilio-style API and push through FCM HTTP v1 and Web Push, each on a
local HTTP server reached with the notifier's real httpx clients."""

from __future__ import annotations

import base64
import uuid

import http_ece
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from nudge_common.codec import loads
from tests.services.notifier.conftest import Notifier
from tests.services.notifier.fakes import FakeProviders


def workspace() -> str:
    return f"ws-{uuid.uuid4().hex[:10]}"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def subscribe_sms(notifier: Notifier, ws: str, phone: str) -> None:
    answer = await notifier.client.put(
        f"/api/v1/workspaces/{ws}/consents/sms/{phone}/all", json={"status": "subscribed"}
    )
    assert answer.status_code == 200, answer.text


async def test_sms_needs_consent_is_normalised_to_e164_and_retries_a_503(
    notifier: Notifier, providers: FakeProviders
) -> None:
    ws = workspace()
    template = await notifier.template(ws, "sms", text="Hi {{ contact.traits.name }}, 20% off")
    traits = {"phone": "(415) 555-2671", "name": "Ada"}
    before = await notifier.request(ws, template, traits, channel="sms")
    rows = await notifier.settled([before])
    assert (rows[before].status, rows[before].reason) == ("skipped", "no sms consent for marketing")

    await subscribe_sms(notifier, ws, "+14155552671")
    providers.script["+14155552671"] = [503]
    key = await notifier.request(ws, template, traits, channel="sms")
    rows = await notifier.settled([key])
    assert rows[key].status == "sent"
    assert rows[key].recipient == "+14155552671"
    sent = [c for c in providers.accepted if c.form.get("To") == "+14155552671"]
    assert len(sent) == 1
    assert sent[0].form["Body"] == "Hi Ada, 20% off"
    assert rows[key].provider_message_id.startswith("SM")


async def test_an_sms_stop_reply_unsubscribes_the_number(
    notifier: Notifier, providers: FakeProviders
) -> None:
    ws = workspace()
    phone = "+14155550123"
    await subscribe_sms(notifier, ws, phone)
    answer = await notifier.client.post(
        f"/webhooks/{ws}/sms/inbound",
        content="From=%2B14155550123&To=%2B15005550006&Body=+stop+",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.status_code == 200
    assert "<Response>" in answer.text
    template = await notifier.template(ws, "sms", text="Sale!")
    key = await notifier.request(ws, template, {"phone": phone}, channel="sms")
    rows = await notifier.settled([key])
    assert (rows[key].status, rows[key].reason) == ("skipped", "unsubscribed from all")
    assert not [c for c in providers.calls if c.form.get("To") == phone]


async def test_a_number_the_provider_refuses_fails_without_retry(
    notifier: Notifier, providers: FakeProviders
) -> None:
    ws = workspace()
    phone = "+14155550188"
    await subscribe_sms(notifier, ws, phone)
    providers.script[phone] = [400, 400, 400]
    key = await notifier.request(
        ws, await notifier.template(ws, "sms", text="x"), {"phone": phone}, channel="sms"
    )
    rows = await notifier.settled([key])
    assert rows[key].status == "failed"
    assert "HTTP 400" in (rows[key].reason or "")
    assert len([c for c in providers.calls if c.form.get("To") == phone]) == 1


async def test_fcm_push_has_title_and_body_and_an_unregistered_token_is_suppressed(
    notifier: Notifier, providers: FakeProviders
) -> None:
    ws = workspace()
    template = await notifier.template(
        ws,
        "push",
        subject="Back in stock",
        text="{{ contact.traits.name | default('Hi') }}, it is back",
    )
    ok = await notifier.request(
        ws, template, {"fcm_token": "device-1", "name": "Ada"}, channel="push"
    )
    gone = await notifier.request(ws, template, {"fcm_token": "unregistered-2"}, channel="push")
    rows = await notifier.settled([ok, gone])
    assert rows[ok].status == "sent"
    assert rows[ok].provider_message_id.startswith("projects/demo/messages/")
    (call,) = [c for c in providers.accepted if c.json and c.json["message"]["token"] == "device-1"]
    assert call.headers["authorization"] == "Bearer fcm-token"
    assert call.json["message"]["notification"] == {
        "title": "Back in stock",
        "body": "Ada, it is back",
    }
    assert rows[gone].status == "bounced"
    again = await notifier.request(ws, template, {"fcm_token": "unregistered-2"}, channel="push")
    rows = await notifier.settled([again])
    assert rows[again].reason == "suppressed: hard_bounce"


async def test_web_push_is_encrypted_for_the_subscription_and_signed_with_vapid(
    notifier: Notifier, providers: FakeProviders
) -> None:
    ws = workspace()
    browser = ec.generate_private_key(ec.SECP256R1())
    auth = b"0123456789abcdef"
    endpoint_id = f"sub-{uuid.uuid4().hex[:8]}"
    subscription = {
        "endpoint": f"{providers.url}/push/{endpoint_id}",
        "keys": {
            "p256dh": b64(
                browser.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
            ),
            "auth": b64(auth),
        },
    }
    template = await notifier.template(ws, "push", subject="Hi", text="Your cart misses you")
    key = await notifier.request(ws, template, {"web_push": subscription}, channel="push")
    rows = await notifier.settled([key])
    assert rows[key].status == "sent"
    (call,) = [c for c in providers.accepted if c.path == f"/push/{endpoint_id}"]
    assert call.headers["content-encoding"] == "aes128gcm"
    assert call.headers["authorization"].startswith("vapid t=")
    plain = http_ece.decrypt(call.body, private_key=browser, auth_secret=auth, version="aes128gcm")
    assert loads(plain) == {"title": "Hi", "body": "Your cart misses you", "idempotency_key": key}
