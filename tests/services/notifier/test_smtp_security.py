"""SMTP with STARTTLS and authentication, and DKIM signatures that verify, against a real
aiosmtpd server; the provider alone, without Kafka."""

from __future__ import annotations

import base64
import datetime
import ssl
import uuid
from pathlib import Path

import dkim
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydantic import SecretStr

from nudge_notifier.domain.templates import Rendered
from nudge_notifier.providers.base import Outbound, TransientFailure
from nudge_notifier.providers.email import SmtpEmailProvider
from nudge_notifier.settings import NotifierSettings
from tests.services.notifier.fakes import ScriptedSmtp

RENDERED = Rendered("Grüße", "<p>Hallo</p>", "Hallo")


def tls_context(tmp_path: Path) -> ssl.SSLContext:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


async def test_starttls_and_auth_are_used_and_wrong_credentials_are_not_sent(
    tmp_path: Path,
) -> None:
    server = ScriptedSmtp(
        tls_context=tls_context(tmp_path), require_starttls=True, credentials=("nudge", "s3cret")
    )
    server.start()
    try:
        settings = NotifierSettings(
            smtp_port=server.port,
            smtp_start_tls=True,
            smtp_timeout_s=2.0,
            smtp_validate_certs=False,
            smtp_username="nudge",
            smtp_password=SecretStr("s3cret"),
        )
        provider = SmtpEmailProvider(settings)
        to = f"tls-{uuid.uuid4().hex[:6]}@example.com"
        for _ in range(3):
            await provider.send(Outbound("email", to, RENDERED, "k"))
        assert len(server.received(to)) == 3
        assert server.sessions[-1] == {"tls": True, "authenticated": True}
        assert provider.pool.open == 1, "one pooled connection served all three"
        await provider.close()

        wrong = SmtpEmailProvider(settings.model_copy(update={"smtp_password": SecretStr("nope")}))
        with pytest.raises(TransientFailure):
            await wrong.send(Outbound("email", "x@example.com", RENDERED, "k2"))
        assert server.received("x@example.com") == []
    finally:
        server.stop()


async def test_emails_are_dkim_signed_when_a_key_is_configured() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    public_der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public_der)
    server = ScriptedSmtp()
    server.start()
    try:
        settings = NotifierSettings(
            smtp_port=server.port,
            dkim_domain="nudge.localhost",
            dkim_selector="s1",
            dkim_private_key=SecretStr(private_pem),
        )
        provider = SmtpEmailProvider(settings)
        headers = {"List-Unsubscribe": "<http://n/u/t>", "List-Unsubscribe-Post": "x"}
        await provider.send(Outbound("email", "dkim@example.com", RENDERED, "k", headers))
        await provider.close()
        (message,) = server.received("dkim@example.com")
        assert "d=nudge.localhost" in str(message["DKIM-Signature"])
        raw = message.as_bytes()

        def dns(name: bytes, timeout: int = 5) -> bytes:
            assert name == b"s1._domainkey.nudge.localhost."
            return record

        assert dkim.verify(raw, dnsfunc=dns)
        assert not dkim.verify(raw.replace(b"To: dkim@", b"To: evil@", 1), dnsfunc=dns)
    finally:
        server.stop()


async def test_headers_are_encoded_folded_and_cannot_be_injected() -> None:
    server = ScriptedSmtp()
    server.start()
    try:
        settings = NotifierSettings(
            smtp_port=server.port, email_from="Nüdge Team <news@nudge.localhost>"
        )
        provider = SmtpEmailProvider(settings)
        token = "t" * 700
        headers = {
            "List-Unsubscribe": f"<http://n/u/{token}>, <mailto:u@n?subject={token}>",
            "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
        }
        rendered = Rendered("Hi Ada\r\nBcc: victim@example.com", "<p>Grüße ✓</p>", "Grüße ✓")
        message_id = await provider.send(
            Outbound("email", "inject@example.com", rendered, "k\nX-Evil: 1", headers)
        )
        await provider.close()
        (message,) = server.received("inject@example.com")
        assert message["Subject"] == "Hi Ada Bcc: victim@example.com"
        assert message["Bcc"] is None
        assert message["X-Evil"] is None
        assert message["X-Nudge-Idempotency-Key"] == "k X-Evil: 1"
        assert message["From"] == "Nüdge Team <news@nudge.localhost>"
        assert message["Message-ID"] == message_id
        assert str(message["List-Unsubscribe"]).replace(" ", "") == (
            headers["List-Unsubscribe"].replace(" ", "")
        )
        assert message.get_body(("plain",)).get_content() == "Grüße ✓"  # type: ignore[union-attr]
        assert message.get_body(("html",)).get_content() == "<p>Grüße ✓</p>"  # type: ignore[union-attr]
    finally:
        server.stop()
