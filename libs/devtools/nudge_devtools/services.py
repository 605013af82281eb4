"""The five services as separate processes, as in production."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from nudge_common import migrations
from nudge_common.cli import ServiceSpec
from nudge_common.settings import NudgeSettings
from nudge_ingest.spec import SPEC as INGEST
from nudge_notifier.spec import SPEC as NOTIFIER
from nudge_orchestrator.spec import SPEC as ORCHESTRATOR
from nudge_scoring.spec import SPEC as SCORING
from nudge_segmenter.spec import SPEC as SEGMENTER

SPECS: tuple[ServiceSpec, ...] = (INGEST, SCORING, SEGMENTER, ORCHESTRATOR, NOTIFIER)


def migrate_all(settings: NudgeSettings) -> None:
    for spec in SPECS:
        migrations.upgrade(settings, schema=spec.schema, script_location=spec.migrations)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class ServiceProcess:
    name: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        env = {**os.environ, **self.env, "NUDGE_HTTP_PORT": str(self.port)}
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                [sys.executable, "-m", f"nudge_{self.name}", "run"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    async def wait_ready(self, deadline_s: float = 60.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + deadline_s
        async with httpx.AsyncClient(timeout=2.0) as client:
            while True:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited early:\n{self.log_tail()}")
                try:
                    if (await client.get(f"{self.url}/readyz")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if loop.time() > deadline:
                    raise TimeoutError(
                        f"{self.name} not ready in {deadline_s}s:\n{self.log_tail()}"
                    )
                await asyncio.sleep(0.1)

    def signal(self, signum: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    async def wait_exit(self, deadline_s: float = 45.0) -> int:
        assert self.process is not None
        process = self.process
        return await asyncio.wait_for(asyncio.to_thread(process.wait), deadline_s)

    async def stop(self) -> int | None:
        if self.process is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return await self.wait_exit()
        except TimeoutError:
            self.signal(signal.SIGKILL)
            return await self.wait_exit()

    def log_tail(self, lines: int = 40) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Fleet:
    """All five services, each on a free port, sharing one environment."""

    def __init__(self, env: Mapping[str, str], log_dir: Path) -> None:
        self.services = {
            spec.name: ServiceProcess(
                spec.name, free_port(), dict(env), log_dir / f"{spec.name}.log"
            )
            for spec in SPECS
        }
        # The orchestrator fronts the owners' APIs and reads segment members for broadcasts.
        self.services["orchestrator"].env.update(
            {
                f"NUDGE_{owner.upper()}_URL": self.services[owner].url
                for owner in ("scoring", "segmenter", "notifier")
            }
        )

    def __getitem__(self, name: str) -> ServiceProcess:
        return self.services[name]

    async def start(self) -> None:
        for service in self.services.values():
            service.start()
        await asyncio.gather(*(service.wait_ready() for service in self.services.values()))

    async def stop(self) -> None:
        await asyncio.gather(*(service.stop() for service in self.services.values()))
