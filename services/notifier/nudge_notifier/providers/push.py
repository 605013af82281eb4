"""Push notifications: an FCM HTTP v1 style API (a device token; access tokens minted from a
service account, or a fixed one) and Web Push (a browser subscription, payload encrypted with
aes128gcm and signed with VAPID), both over httpx."""

from __future__ import annotations

import base64
import time
from typing import Any
from urllib.parse import urlsplit

import http_ece
import httpx
from cryptography.hazmat.primitives.asymmetric import ec
from py_vapid import Vapid02

from nudge_common import codec
from nudge_notifier.providers.base import Outbound, PermanentFailure
from nudge_notifier.providers.fcm_auth import ServiceAccountTokens
from nudge_notifier.providers.http import post
from nudge_notifier.settings import NotifierSettings

WEB_PUSH_TTL_S = 24 * 3600


class FcmPushProvider:
    name = "fcm"

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.client = httpx.AsyncClient(
            base_url=settings.fcm_api_url, timeout=settings.http_timeout_s
        )
        account = settings.fcm_account
        self.tokens = ServiceAccountTokens(account, self.client) if account else None
        self.path = f"/v1/projects/{settings.fcm_project}/messages:send"

    async def send(self, message: Outbound) -> str:
        body = {
            "message": {
                "token": message.to,
                "notification": {
                    "title": message.rendered.subject,
                    "body": message.rendered.text,
                },
                "data": {"idempotency_key": message.idempotency_key},
            }
        }
        if self.tokens is None:
            response = await self._post(body, self.settings.fcm_access_token.get_secret_value())
        else:
            token = await self.tokens.token()
            try:
                response = await self._post(body, token)
            except PermanentFailure as failure:
                # Expired early or revoked: a 401 left the message unsent, so one retry
                # with a fresh token is safe.
                if failure.status != 401:
                    raise
                response = await self._post(body, await self.tokens.refresh(stale=token))
        name = response.json().get("name")
        if not isinstance(name, str):
            raise PermanentFailure(f"FCM answered without a message name: {response.text}")
        return name

    async def _post(self, body: dict[str, Any], token: str) -> httpx.Response:
        return await post(
            self.client, self.path, json=body, headers={"Authorization": f"Bearer {token}"}
        )

    async def close(self) -> None:
        await self.client.aclose()


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class WebPushProvider:
    name = "webpush"

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.vapid: Vapid02 | None = None
        if settings.vapid_private_key is not None:
            key = settings.vapid_private_key.get_secret_value()
            self.vapid = (
                Vapid02.from_pem(key.encode()) if "BEGIN" in key else Vapid02.from_raw(key.encode())
            )
        self.client = httpx.AsyncClient(timeout=settings.http_timeout_s)

    def encrypt(self, subscription: dict[str, Any], payload: bytes) -> bytes:
        keys = subscription.get("keys") or {}
        try:
            receiver = _b64decode(str(keys["p256dh"]))
            auth = _b64decode(str(keys["auth"]))
        except (KeyError, ValueError) as error:
            raise PermanentFailure(f"malformed web push subscription: {error!r}") from error
        sender = ec.generate_private_key(ec.SECP256R1())
        data: bytes = http_ece.encrypt(
            payload, private_key=sender, dh=receiver, auth_secret=auth, version="aes128gcm"
        )
        return data

    async def send(self, message: Outbound) -> str:
        if self.vapid is None:
            raise PermanentFailure("no VAPID key configured for web push")
        subscription = message.data.get("subscription") or {}
        endpoint = subscription.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("https://", "http://")):
            raise PermanentFailure("web push subscription has no endpoint")
        payload = codec.dumps(
            {
                "title": message.rendered.subject,
                "body": message.rendered.text,
                "idempotency_key": message.idempotency_key,
            }
        )
        parts = urlsplit(endpoint)
        claims = {
            "aud": f"{parts.scheme}://{parts.netloc}",
            "exp": int(time.time()) + 12 * 3600,
            "sub": self.settings.vapid_subject,
        }
        headers = self.vapid.sign(claims)
        headers.update(
            {
                "Content-Encoding": "aes128gcm",
                "Content-Type": "application/octet-stream",
                "TTL": str(WEB_PUSH_TTL_S),
                "Urgency": "normal",
            }
        )
        response = await post(
            self.client, endpoint, content=self.encrypt(subscription, payload), headers=headers
        )
        return response.headers.get("Location") or message.idempotency_key

    async def close(self) -> None:
        await self.client.aclose()
