"""Local stand-ins for the outside world, speaking the real protocols: a scripted SMTP
server (aiosmtpd) and an HTTP server with the Twilio, FCM HTTP v1 (with Google's OAuth2
token endpoint) and Web Push shapes. The notifier reaches them with its real clients
(aiosmtplib, httpx)."""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from nudge_common.codec import loads
from nudge_devtools.pipeline import eventually
from nudge_devtools.services import free_port
from nudge_devtools.smtp_sink import advertise_pipelining


class ScriptedSmtp:
    """An SMTP server that keeps what it accepts and answers RCPT/DATA from a script:
    ``rcpt_replies["x@y"] = ["451 4.3.0 try later", "550 5.1.1 no such user"]`` answers
    the first RCPT to x@y with 451, the second with 550, then accepts. ``data_delay_s``
    slows every DATA down (to be killed mid-send). ``pipelining`` advertises PIPELINING
    in the EHLO reply, as real MTAs do (aiosmtpd serves it without saying so)."""

    def __init__(
        self,
        *,
        data_delay_s: float = 0.0,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        credentials: tuple[str, str] | None = None,
        pipelining: bool = False,
    ) -> None:
        self.port = free_port()
        self.pipelining = pipelining
        self.messages: list[EmailMessage] = []
        self.sessions: list[dict[str, Any]] = []
        self.rcpt_replies: dict[str, list[str]] = defaultdict(list)
        self.data_delay_s = data_delay_s
        self.lock = threading.Lock()
        self.credentials = credentials
        kwargs: dict[str, Any] = {}
        if tls_context is not None:
            kwargs.update(tls_context=tls_context, require_starttls=require_starttls)
        if credentials is not None:
            kwargs.update(authenticator=self._authenticate, auth_require_tls=True)
        self.controller = Controller(self, hostname="127.0.0.1", port=self.port, **kwargs)

    def _authenticate(
        self, server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = isinstance(auth_data, LoginPassword) and self.credentials == (
            auth_data.login.decode(),
            auth_data.password.decode(),
        )
        return AuthResult(success=ok)

    async def handle_EHLO(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        if self.pipelining:
            return advertise_pipelining(session, hostname, responses)
        session.host_name = hostname
        return responses

    async def handle_RCPT(  # noqa: N802 - aiosmtpd's hook name
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        with self.lock:
            script = self.rcpt_replies.get(address)
            reply = script.pop(0) if script else None
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:  # noqa: N802
        if self.data_delay_s:
            await asyncio.sleep(self.data_delay_s)
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        with self.lock:
            self.messages.append(message)
            self.sessions.append(
                {"tls": session.ssl is not None, "authenticated": session.authenticated}
            )
        return "250 Message accepted for delivery"

    def received(self, to: str | None = None) -> list[EmailMessage]:
        with self.lock:
            return [m for m in self.messages if to is None or m["To"] == to]

    def start(self) -> None:
        self.controller.start()

    def stop(self) -> None:
        self.controller.stop()


@dataclass
class ProviderCall:
    path: str
    headers: dict[str, str]
    body: bytes
    form: dict[str, str] = field(default_factory=dict)
    json: Any = None


FCM_SCOPE = "https://www.googleapis.com/auth/firebase.messaging"


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def verify_assertion(assertion: str, key: rsa.RSAPublicKey, audience: str) -> dict[str, Any]:
    """The claims of a service account's JWT assertion, or ValueError saying what is wrong:
    an RS256 signature by ``key``, the FCM scope, this token endpoint as audience, issued
    now and valid for an hour."""
    header_b64, claims_b64, signature_b64 = assertion.split(".")
    header = loads(_b64decode(header_b64))
    if header.get("alg") != "RS256" or header.get("typ") != "JWT":
        raise ValueError(f"header {header}")
    try:
        key.verify(
            _b64decode(signature_b64),
            f"{header_b64}.{claims_b64}".encode(),
            padding.PKCS1v15(),
            hashes.SHA256(),
        )
    except InvalidSignature as error:
        raise ValueError("bad signature") from error
    claims: dict[str, Any] = loads(_b64decode(claims_b64))
    if claims.get("scope") != FCM_SCOPE or claims.get("aud") != audience:
        raise ValueError(f"claims {claims}")
    if abs(claims["iat"] - time.time()) > 60 or claims["exp"] != claims["iat"] + 3600:
        raise ValueError(f"times {claims}")
    return claims


class FakeProviders:
    """Twilio, FCM and Web Push in one local HTTP server. ``script[recipient] = [503, 429]``
    answers the first two calls for that recipient with those statuses, then succeeds.

    ``POST /token`` is Google's OAuth2 token endpoint for service accounts whose public
    keys are in ``service_accounts`` (by client_email): it verifies the assertion, records
    its claims in ``token_requests`` and mints a token FCM then accepts (unless
    ``fcm_accepts_minted`` is off), valid for ``token_expires_in`` seconds."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls: list[ProviderCall] = []
        self.script: dict[str, list[int]] = defaultdict(list)
        self.accepted: list[ProviderCall] = []
        self.service_accounts: dict[str, rsa.RSAPublicKey] = {}
        self.token_requests: list[dict[str, Any]] = []
        self.token_expires_in = 3600
        self.fcm_accepts_minted = True
        self.fcm_tokens = {"fcm-token"}
        self.app = self._build()
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.task: asyncio.Task[None] | None = None

    def _next(self, recipient: str) -> int | None:
        script = self.script.get(recipient)
        return script.pop(0) if script else None

    def _build(self) -> FastAPI:
        app = FastAPI()

        @app.post("/2010-04-01/Accounts/{sid}/Messages.json")
        async def twilio(sid: str, request: Request) -> Response:
            body = await request.body()
            form = dict(parse_qsl(body.decode()))
            call = ProviderCall(request.url.path, dict(request.headers), body, form=form)
            self.calls.append(call)
            expected = "Basic " + base64.b64encode(f"{sid}:secret-token".encode()).decode()
            if request.headers.get("authorization") != expected:
                return JSONResponse({"code": 20003, "message": "Authenticate"}, 401)
            if not form.get("To", "").startswith("+"):
                return JSONResponse({"code": 21211, "message": "Invalid 'To'"}, 400)
            if (status := self._next(form["To"])) is not None:
                return JSONResponse({"code": 20429, "message": "scripted"}, status)
            self.accepted.append(call)
            return JSONResponse({"sid": f"SM{len(self.accepted):032d}", "status": "queued"}, 201)

        @app.post("/v1/projects/{project}/messages:send")
        async def fcm(project: str, request: Request) -> Response:
            body = await request.body()
            payload = await request.json()
            call = ProviderCall(request.url.path, dict(request.headers), body, json=payload)
            self.calls.append(call)
            bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
            if bearer not in self.fcm_tokens:
                return JSONResponse({"error": {"status": "UNAUTHENTICATED"}}, 401)
            token = payload["message"]["token"]
            if token.startswith("unregistered"):
                return JSONResponse({"error": {"status": "NOT_FOUND"}}, 404)
            if (status := self._next(token)) is not None:
                return JSONResponse({"error": {"status": "UNAVAILABLE"}}, status)
            self.accepted.append(call)
            return JSONResponse({"name": f"projects/{project}/messages/{len(self.accepted)}"})

        @app.post("/token")
        async def token(request: Request) -> Response:
            form = dict(parse_qsl((await request.body()).decode()))
            if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
                return JSONResponse({"error": "unsupported_grant_type"}, 400)
            assertion = form.get("assertion", "")
            try:
                issuer = loads(_b64decode(assertion.split(".")[1]))["iss"]
                key = self.service_accounts[issuer]
                claims = verify_assertion(assertion, key, f"{self.url}/token")
            except (ValueError, KeyError, IndexError) as error:
                return JSONResponse(
                    {"error": "invalid_grant", "error_description": str(error)}, 400
                )
            self.token_requests.append(claims)
            minted = f"ya29.minted-{len(self.token_requests)}"
            if self.fcm_accepts_minted:
                self.fcm_tokens.add(minted)
            return JSONResponse(
                {
                    "access_token": minted,
                    "expires_in": self.token_expires_in,
                    "token_type": "Bearer",
                }
            )

        @app.post("/push/{subscription}")
        async def web_push(subscription: str, request: Request) -> Response:
            call = ProviderCall(request.url.path, dict(request.headers), await request.body())
            self.calls.append(call)
            if subscription.startswith("gone"):
                return Response(status_code=410)
            if (status := self._next(subscription)) is not None:
                return Response(status_code=status)
            self.accepted.append(call)
            return Response(
                status_code=201, headers={"Location": f"{self.url}/m/{len(self.accepted)}"}
            )

        return app

    async def start(self) -> None:
        self.task = asyncio.create_task(self.server.serve())
        await eventually(self._started, deadline_s=10, what="fake providers started")

    async def _started(self) -> bool:
        return bool(self.server.started)

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task
