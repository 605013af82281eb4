"""Local stand-ins for the outside world, speaking the real protocols: a scripted SMTP
server (aiosmtpd) and an HTTP server with the Twilio, FCM HTTP v1 and Web Push shapes. The
notifier reaches them with its real clients (aiosmtplib, httpx)."""

from __future__ import annotations

import asyncio
import base64
import ssl
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any
from urllib.parse import parse_qsl

import uvicorn
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from nudge_devtools.pipeline import eventually
from nudge_devtools.services import free_port


class ScriptedSmtp:
    """An SMTP server that keeps what it accepts and answers RCPT/DATA from a script:
    ``rcpt_replies["x@y"] = ["451 4.3.0 try later", "550 5.1.1 no such user"]`` answers
    the first RCPT to x@y with 451, the second with 550, then accepts. ``data_delay_s``
    slows every DATA down (to be killed mid-send)."""

    def __init__(
        self,
        *,
        data_delay_s: float = 0.0,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        credentials: tuple[str, str] | None = None,
    ) -> None:
        self.port = free_port()
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


class FakeProviders:
    """Twilio, FCM and Web Push in one local HTTP server. ``script[recipient] = [503, 429]``
    answers the first two calls for that recipient with those statuses, then succeeds."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.calls: list[ProviderCall] = []
        self.script: dict[str, list[int]] = defaultdict(list)
        self.accepted: list[ProviderCall] = []
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
            if request.headers.get("authorization") != "Bearer fcm-token":
                return JSONResponse({"error": {"status": "UNAUTHENTICATED"}}, 401)
            token = payload["message"]["token"]
            if token.startswith("unregistered"):
                return JSONResponse({"error": {"status": "NOT_FOUND"}}, 404)
            if (status := self._next(token)) is not None:
                return JSONResponse({"error": {"status": "UNAVAILABLE"}}, status)
            self.accepted.append(call)
            return JSONResponse({"name": f"projects/{project}/messages/{len(self.accepted)}"})

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
