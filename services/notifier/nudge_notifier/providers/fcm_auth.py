"""OAuth2 access tokens for FCM HTTP v1 minted from a Google service account the way Google's
client libraries do it: an RS256-signed JWT assertion exchanged at the account's token_uri
(the RFC 7523 jwt-bearer grant), cached until shortly before it expires."""

from __future__ import annotations

import asyncio
import base64
import time

import httpx
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from nudge_common import codec
from nudge_notifier.providers.base import PermanentFailure
from nudge_notifier.providers.http import post
from nudge_notifier.settings import ServiceAccount

FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ASSERTION_LIFETIME_S = 3600
REFRESH_MARGIN_S = 300.0
"""A token this close to its expiry is replaced before use (clock skew, slow sends)."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class ServiceAccountTokens:
    """The current access token of one service account. At most one mint runs at a time:
    callers that find the token stale (or refused) while another mints wait for its token."""

    def __init__(self, account: ServiceAccount, client: httpx.AsyncClient) -> None:
        self.account = account
        self.key = account.signing_key()
        self.client = client
        self._token: str | None = None
        self._refresh_at = 0.0
        self._lock = asyncio.Lock()

    def assertion(self, issued_at: int) -> str:
        header = {"alg": "RS256", "typ": "JWT"}
        if self.account.private_key_id:
            header["kid"] = self.account.private_key_id
        claims = {
            "iss": self.account.client_email,
            "scope": FCM_SCOPE,
            "aud": self.account.token_uri,
            "iat": issued_at,
            "exp": issued_at + ASSERTION_LIFETIME_S,
        }
        signing_input = f"{_b64url(codec.dumps(header))}.{_b64url(codec.dumps(claims))}"
        signature = self.key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def _fresh(self) -> bool:
        return self._token is not None and time.monotonic() < self._refresh_at

    async def token(self) -> str:
        if self._token is not None and self._fresh():
            return self._token
        return await self.refresh(stale=self._token)

    async def refresh(self, *, stale: str | None) -> str:
        """A new token in place of ``stale`` (expired or refused), unless another caller
        already replaced it while this one waited for the lock."""
        async with self._lock:
            if self._token is not None and self._token != stale and self._fresh():
                return self._token
            self._token, self._refresh_at = await self._mint()
            return self._token

    async def _mint(self) -> tuple[str, float]:
        started = time.monotonic()
        form = {"grant_type": JWT_BEARER_GRANT, "assertion": self.assertion(int(time.time()))}
        try:
            response = await post(self.client, self.account.token_uri, data=form)
        except PermanentFailure as failure:
            # Not the device token's fault: never a hard bounce, whatever the status.
            raise PermanentFailure(f"FCM token endpoint: {failure}") from failure
        answer = response.json()
        token = answer.get("access_token") if isinstance(answer, dict) else None
        if not isinstance(token, str) or not token:
            raise PermanentFailure(f"FCM token endpoint answered without a token: {answer!r}")
        expires_in = answer.get("expires_in", ASSERTION_LIFETIME_S)
        if not isinstance(expires_in, int | float):
            raise PermanentFailure(f"FCM token endpoint answered a bad expires_in: {answer!r}")
        return token, started + float(expires_in) - REFRESH_MARGIN_S
