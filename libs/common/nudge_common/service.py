"""What every service process is made of: a :class:`Runtime` (settings, database, producer)
opened in the FastAPI lifespan, its consumer runners as background tasks, and the
``/healthz``, ``/readyz`` and ``/metrics`` routes."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

import asyncpg
import sqlalchemy as sa
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError, KafkaError
from fastapi import APIRouter, Depends, FastAPI, Request
from sqlalchemy.ext.asyncio import AsyncEngine

from nudge_common.consumer import ConsumerRunner, is_transient
from nudge_common.db import SessionMaker, create_engine, create_sessionmaker
from nudge_common.http import JsonResponse
from nudge_common.kafka import create_producer
from nudge_common.logging import configure_logging
from nudge_common.metrics import HttpMetricsMiddleware, metrics_router
from nudge_common.retention import processed_messages_trimmer
from nudge_common.settings import NudgeSettings

log = structlog.get_logger(__name__)

READINESS_TIMEOUT_S = 2.0
SHUTDOWN_TIMEOUT_S = 30.0


class Worker(Protocol):
    """A long-running task of a service: a :class:`ConsumerRunner`, or other work (timers)
    that starts with ``run()`` and finishes what it holds when asked to ``stop()``."""

    @property
    def name(self) -> str: ...

    async def run(self) -> None: ...

    def stop(self) -> None: ...


@dataclass
class Runtime:
    settings: NudgeSettings
    engine: AsyncEngine
    sessionmaker: SessionMaker
    producer: AIOKafkaProducer
    runners: list[Worker] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]

ConsumersFactory = Callable[[Runtime], Sequence[Worker]]


def create_service_app(
    *,
    settings: NudgeSettings,
    routers: Sequence[APIRouter] = (),
    consumers: ConsumersFactory | None = None,
    title: str | None = None,
) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        configure_logging(
            service=settings.service_name, level=settings.log_level, json=settings.log_json
        )
        engine = create_engine(settings)
        producer = create_producer(settings)
        await start_producer(producer)
        runtime = Runtime(settings, engine, create_sessionmaker(engine), producer)
        app.state.runtime = runtime
        try:
            freeze_startup_heap(settings.gc_young_threshold)
            runtime.runners = list(consumers(runtime)) if consumers else []
            runtime.runners.extend(
                processed_messages_trimmer(settings, runtime.sessionmaker, table)
                for table in {
                    runner.processed_messages
                    for runner in runtime.runners
                    if isinstance(runner, ConsumerRunner)
                }
            )
            for runner in runtime.runners:
                task = asyncio.create_task(runner.run(), name=runner.name)
                task.add_done_callback(_terminate_process_if_crashed)
                runtime.tasks.append(task)
            log.info("service started", port=settings.http_port)
            yield
        finally:
            for runner in runtime.runners:
                runner.stop()
            if runtime.tasks:
                await asyncio.wait(runtime.tasks, timeout=SHUTDOWN_TIMEOUT_S)
            await producer.stop()
            await engine.dispose()
            log.info("service stopped")

    app = FastAPI(
        title=title or f"Nudge {settings.service_name}",
        lifespan=lifespan,
    )
    app.add_middleware(HttpMetricsMiddleware)
    # connecting to a database that is down raises asyncpg's or the socket's own errors
    for error in (sa.exc.DBAPIError, asyncpg.PostgresError, OSError):
        app.add_exception_handler(error, dependency_unavailable)
    app.include_router(health_router)
    app.include_router(metrics_router)
    for router in routers:
        app.include_router(router)
    return app


async def dependency_unavailable(request: Request, error: Exception) -> JsonResponse:
    """503 while PostgreSQL is down, restarting or busy (a deadlock), or a connection fails,
    so a client retries; any other database error is a bug, and stays a 500. Pooled
    connections are not pinged before use (``nudge_common.db.create_engine``): the first
    request on a connection the server closed ends here, and the pool replaces its
    connections."""
    if not is_transient(error):
        raise error
    return JsonResponse(
        {"detail": "a service this request needs (the database) is unavailable, retry later"},
        status_code=503,
        headers={"Retry-After": "1"},
    )


def freeze_startup_heap(
    young_threshold: int = NudgeSettings.model_fields["gc_young_threshold"].default,
) -> None:
    """Move what the process built so far (modules, models, routes, clients) out of the
    garbage collector's sight, and collect the young generation less often. Under load,
    full collections came every few dozen batches or requests and each walked that whole
    heap: about 40% of the CPU of an ingest batch request and of a segmenter batch before
    the freeze. After it, young collections at the default threshold still took 4-14% of
    each consumer's CPU (measured with ``gc.callbacks`` in ``make bench-e2e`` at 600
    events/s): every 700 allocations they walked the batch in hand, which is alive until
    the batch ends and is freed by reference counting, not by the collector. At
    50,000 (``NudgeSettings.gc_young_threshold``) they took 0-3%. The benches' load
    generators call this too before they measure: a collection of their heap stalled them
    for ~150 ms."""
    gc.collect()
    gc.freeze()
    _, middle, old = gc.get_threshold()
    gc.set_threshold(young_threshold, middle, old)


async def start_producer(producer: AIOKafkaProducer, *, deadline_s: float = 60.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        try:
            await producer.start()
            return
        except KafkaConnectionError:
            if loop.time() > deadline:
                raise
            log.warning("kafka not reachable yet, retrying")
            await asyncio.sleep(1.0)


def _terminate_process_if_crashed(task: asyncio.Task[None]) -> None:
    if task.cancelled() or task.exception() is None:
        return
    log.error(
        "consumer crashed, stopping the service",
        consumer=task.get_name(),
        error=repr(task.exception()),
    )
    os.kill(os.getpid(), signal.SIGTERM)


health_router = APIRouter(tags=["health"])


@health_router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@health_router.get("/readyz")
async def readyz(runtime: RuntimeDep) -> JsonResponse:
    """PostgreSQL and Kafka answer, and every consumer is running."""
    checks: dict[str, Any] = {
        "database": await _check(_ping_database(runtime.engine)),
        "kafka": await _check(_ping_kafka(runtime.producer)),
        "consumers": all(not task.done() for task in runtime.tasks),
    }
    ready = all(value is True for value in checks.values())
    return JsonResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)


async def _check(probe: Awaitable[None]) -> bool | str:
    try:
        await asyncio.wait_for(probe, READINESS_TIMEOUT_S)
    except (TimeoutError, OSError, KafkaError, sa.exc.SQLAlchemyError) as error:
        return repr(error)
    return True


async def _ping_database(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        await connection.execute(sa.text("SELECT 1"))


async def _ping_kafka(producer: AIOKafkaProducer) -> None:
    await producer.client.fetch_all_metadata()
