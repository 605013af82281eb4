"""SMS through a Twilio-style REST API with httpx: ``POST
/2010-04-01/Accounts/{sid}/Messages.json`` with basic auth and a form body."""

from __future__ import annotations

import httpx

from nudge_notifier.providers.base import Outbound, PermanentFailure
from nudge_notifier.providers.http import post
from nudge_notifier.settings import NotifierSettings


class TwilioSmsProvider:
    name = "sms"

    def __init__(self, settings: NotifierSettings) -> None:
        self.settings = settings
        self.client = httpx.AsyncClient(
            base_url=settings.sms_api_url,
            auth=(settings.sms_account_sid, settings.sms_auth_token.get_secret_value()),
            timeout=settings.http_timeout_s,
        )

    async def send(self, message: Outbound) -> str:
        response = await post(
            self.client,
            f"/2010-04-01/Accounts/{self.settings.sms_account_sid}/Messages.json",
            data={"To": message.to, "From": self.settings.sms_from, "Body": message.rendered.text},
        )
        sid = response.json().get("sid")
        if not isinstance(sid, str):
            raise PermanentFailure(f"provider answered without a message sid: {response.text}")
        return sid

    async def close(self) -> None:
        await self.client.aclose()
