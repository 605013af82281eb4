"""FCM HTTP v1 with access tokens minted from a service account: the provider alone, without
Kafka, against the local FCM and OAuth2 token endpoints, which verify the signed assertion
with the public half of a key pair made here."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from pydantic import SecretStr, ValidationError

from nudge_notifier.domain.templates import Rendered
from nudge_notifier.providers.base import Outbound, PermanentFailure
from nudge_notifier.providers.fcm_auth import REFRESH_MARGIN_S
from nudge_notifier.providers.push import FcmPushProvider
from nudge_notifier.settings import NotifierSettings
from tests.services.notifier.fakes import FakeProviders

RENDERED = Rendered("Back in stock", "", "It is back")


def pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def service_account(providers: FakeProviders, key: rsa.RSAPrivateKey) -> dict[str, Any]:
    return {
        "type": "service_account",
        "project_id": "sa-project",
        "private_key_id": "key-1",
        "private_key": pem(key),
        "client_email": f"nudge-{uuid.uuid4().hex[:8]}@sa-project.iam.gserviceaccount.com",
        "token_uri": f"{providers.url}/token",
    }


@dataclass
class Fcm:
    provider: FcmPushProvider
    email: str
    providers: FakeProviders

    def mints(self) -> list[dict[str, Any]]:
        return [c for c in self.providers.token_requests if c["iss"] == self.email]

    def bearers(self, device: str) -> list[str]:
        return [
            c.headers["authorization"]
            for c in self.providers.calls
            if c.json and c.json["message"]["token"] == device
        ]

    async def send(self, device: str) -> str:
        return await self.provider.send(Outbound("push", device, RENDERED, f"k-{device}"))


@pytest.fixture(autouse=True)
def reset(providers: FakeProviders) -> Iterator[None]:
    yield
    providers.token_expires_in = 3600
    providers.fcm_accepts_minted = True


@pytest.fixture
async def fcm(providers: FakeProviders, tmp_path: Path) -> AsyncIterator[Fcm]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = service_account(providers, key)
    providers.service_accounts[account["client_email"]] = key.public_key()
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(account))
    settings = NotifierSettings(fcm_api_url=providers.url, fcm_service_account_file=path)
    provider = FcmPushProvider(settings)
    yield Fcm(provider, account["client_email"], providers)
    await provider.close()


def device() -> str:
    return f"device-{uuid.uuid4().hex[:8]}"


async def test_a_minted_token_is_sent_as_bearer_and_reused(fcm: Fcm) -> None:
    first, second = device(), device()
    name = await fcm.send(first)
    assert name.startswith("projects/sa-project/messages/"), "project_id from the account"
    (claims,) = fcm.mints()
    assert claims["aud"] == f"{fcm.providers.url}/token"
    (bearer,) = fcm.bearers(first)
    assert bearer.startswith("Bearer ya29.minted-")

    await fcm.send(second)
    assert len(fcm.mints()) == 1, "the cached token served the second push"
    assert fcm.bearers(second) == [bearer]


async def test_concurrent_sends_mint_one_token(fcm: Fcm) -> None:
    devices = [device() for _ in range(8)]
    await asyncio.gather(*(fcm.send(d) for d in devices))
    assert len(fcm.mints()) == 1
    assert len({b for d in devices for b in fcm.bearers(d)}) == 1


async def test_a_401_refreshes_once_and_the_push_is_retried(fcm: Fcm) -> None:
    first = device()
    await fcm.send(first)
    (bearer,) = fcm.bearers(first)
    old = bearer.removeprefix("Bearer ")
    fcm.providers.fcm_tokens.discard(old)  # revoked, or expired before its time

    devices = [device() for _ in range(4)]
    names = await asyncio.gather(*(fcm.send(d) for d in devices))
    assert all(n.startswith("projects/sa-project/messages/") for n in names)
    assert len(fcm.mints()) == 2, "four refused pushes, one refresh"
    for d in devices:
        refused, accepted = fcm.bearers(d)
        assert refused == f"Bearer {old}"
        assert accepted != refused


async def test_a_token_refused_again_after_the_refresh_fails_the_push(fcm: Fcm) -> None:
    fcm.providers.fcm_accepts_minted = False
    target = device()
    with pytest.raises(PermanentFailure) as failure:
        await fcm.send(target)
    assert failure.value.status == 401
    assert not failure.value.hard_bounce
    assert len(fcm.mints()) == 2, "the first token and exactly one refresh"
    assert len(fcm.bearers(target)) == 2


async def test_a_token_about_to_expire_is_replaced_before_use(fcm: Fcm) -> None:
    fcm.providers.token_expires_in = int(REFRESH_MARGIN_S)
    await fcm.send(device())
    await fcm.send(device())
    assert len(fcm.mints()) == 2


async def test_an_assertion_the_token_endpoint_refuses_fails_without_a_bounce(
    providers: FakeProviders,
) -> None:
    signer = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = service_account(providers, signer)
    providers.service_accounts[account["client_email"]] = other.public_key()
    settings = NotifierSettings(
        fcm_api_url=providers.url, fcm_service_account=SecretStr(json.dumps(account))
    )
    provider = FcmPushProvider(settings)
    try:
        with pytest.raises(PermanentFailure, match=r"FCM token endpoint.*bad signature") as failure:
            await provider.send(Outbound("push", device(), RENDERED, "k"))
        assert not failure.value.hard_bounce
    finally:
        await provider.close()


def test_the_service_account_comes_from_the_environment_and_is_checked(
    providers: FakeProviders, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    account = service_account(providers, key)
    monkeypatch.setenv("NUDGE_FCM_SERVICE_ACCOUNT", json.dumps(account))
    settings = NotifierSettings()
    assert settings.fcm_account is not None
    assert settings.fcm_account.client_email == account["client_email"]
    assert settings.fcm_project == "sa-project"
    monkeypatch.setenv("NUDGE_FCM_PROJECT_ID", "explicit")
    assert NotifierSettings().fcm_project == "explicit"

    path = tmp_path / "sa.json"
    path.write_text("{}")
    monkeypatch.setenv("NUDGE_FCM_SERVICE_ACCOUNT_FILE", str(path))
    with pytest.raises(ValidationError, match="not both"):
        NotifierSettings()
    monkeypatch.delenv("NUDGE_FCM_SERVICE_ACCOUNT")
    with pytest.raises(ValidationError, match="client_email: Field required"):
        NotifierSettings()

    not_rsa = pem(ec.generate_private_key(ec.SECP256R1()))
    path.write_text(json.dumps({**account, "private_key": not_rsa}))
    with pytest.raises(ValidationError, match="not an RSA key") as refused:
        NotifierSettings()
    assert not_rsa.splitlines()[1] not in str(refused.value), "the key is not echoed"
