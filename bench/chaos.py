"""``make chaos`` and ``make chaos-cluster``: faults under load, each followed by the
invariant checks (docs/proof.md).

Everything runs on a private stack (``scripts/stack`` with its own data folder and free
ports), never the shared dev stack: the run stops and restarts its Kafka and PostgreSQL.

``make chaos`` (one broker): kill -9 each service in turn and restart it; stop and restart
Kafka; stop and restart PostgreSQL.

``make chaos-cluster`` (``--brokers 3``): a three-broker KRaft cluster with every event
topic at replication factor 3 and ``min.insync.replicas=2``, and two replicas of each
consumer service in one consumer group. kill -9 one broker under load (restarted after the
phase); kill -9 one replica of each consumer service in turn (the other takes over).

While a fault lasts, the load generator retries 503s and lost connections with the same
messageIds, as an SDK would; only a 200 acknowledges an event. After each fault the load
finishes, the pipeline drains, and the invariants are checked over everything sent so far.
The table of faults and invariants is printed, then one JSON line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import (
    Contact,
    Invariants,
    PrivateStack,
    check_invariants,
    contacts_for,
    new_workspace,
    run_load,
    sandbox,
)
from nudge_devtools.pipeline import wait_until_idle
from nudge_devtools.services import Fleet, ServiceProcess, free_port
from nudge_devtools.smtp_sink import SmtpSink

REPO = Path(__file__).resolve().parents[1]
CONSUMER_SERVICES = ("scoring", "segmenter", "orchestrator", "notifier")
RECOVERY_DEADLINE_S = 120.0
DRAIN_DEADLINE_S = 120.0


@dataclass
class Row:
    fault: str
    outage_s: float
    answers: Counter[str]
    recovered: bool
    invariants: Invariants | None
    note: str = ""


@dataclass
class Fault:
    name: str
    inject: Callable[[], Awaitable[None]]
    recover: Callable[[], Awaitable[None]]
    hold_s: float = 0.0
    """How long the fault lasts before ``recover``."""


class Chaos:
    def __init__(self, stack: PrivateStack, fleet: Fleet, replicas: dict[str, ServiceProcess]):
        self.stack = stack
        self.fleet = fleet
        self.replicas = replicas

    def processes(self) -> list[ServiceProcess]:
        return [*self.fleet.services.values(), *self.replicas.values()]

    async def all_ready(self) -> None:
        await asyncio.gather(*(p.wait_ready(RECOVERY_DEADLINE_S) for p in self.processes()))

    def kill_service(self, process: ServiceProcess) -> Fault:
        async def inject() -> None:
            process.signal(signal.SIGKILL)
            await process.wait_exit()

        async def recover() -> None:
            process.start()
            await process.wait_ready(RECOVERY_DEADLINE_S)

        return Fault(f"kill -9 {process.log_path.stem}, restart", inject, recover)

    def kill_replica(self, process: ServiceProcess) -> Fault:
        """The replica stays down for the phase: its twin must take its partitions over."""

        async def inject() -> None:
            process.signal(signal.SIGKILL)
            await process.wait_exit()

        async def recover() -> None:
            pass

        return Fault(f"kill -9 {process.log_path.stem} (twin takes over)", inject, recover)

    def stop_component(self, component: str, hold_s: float) -> Fault:
        async def inject() -> None:
            await self.stack.run("down", component)

        async def recover() -> None:
            await self.stack.run("up", component)
            await self.all_ready()

        return Fault(f"stop {component} {hold_s:.0f} s, start", inject, recover, hold_s)

    def kill_broker(self, node: int, hold_s: float) -> Fault:
        async def inject() -> None:
            os.kill(self.stack.broker_pid(node), signal.SIGKILL)

        async def recover() -> None:
            await self.stack.run("up", "kafka")
            await self.all_ready()

        return Fault(f"kill -9 broker {node} for {hold_s:.0f} s", inject, recover, hold_s)


async def run_phase(
    chaos: Chaos,
    fault: Fault,
    *,
    ingest_url: str,
    workspace: Any,
    sink: SmtpSink,
    settings: Any,
    everyone: list[Contact],
    rate: float,
    phase_s: float,
    index: int,
) -> Row:
    contacts = contacts_for(rate, phase_s, f"f{index}")
    everyone.extend(contacts)
    load = asyncio.create_task(run_load(ingest_url, workspace, contacts, rate=rate))
    await asyncio.sleep(phase_s * 0.3)
    started = time.monotonic()
    recovered, note = True, ""
    try:
        await fault.inject()
        await asyncio.sleep(fault.hold_s)
        await fault.recover()
    except (TimeoutError, RuntimeError) as error:
        recovered, note = False, str(error).splitlines()[0][:200]
    outage = time.monotonic() - started
    report = await load
    failures = [at for at, outcome in report.timeline if outcome != "200"]
    if failures:
        note = note or (
            f"non-200 answers from +{failures[0] - started:.1f}s to +{failures[-1] - started:.1f}s"
            f" after the fault (recovered at +{outage:.1f}s)"
        )
    expected = {c.email for c in everyone if c.last_ack is not None}
    try:
        await sink.wait_for(len(expected), to=expected, deadline_s=DRAIN_DEADLINE_S)
        await wait_until_idle(settings, deadline_s=DRAIN_DEADLINE_S)
    except TimeoutError as error:
        note = note or f"pipeline did not drain: {error}"
    with sink.lock:
        emails = [to for _, to in sink.arrivals]
    invariants = await check_invariants(settings, workspace.workspace_id, everyone, emails)
    return Row(fault.name, outage, report.statuses, recovered, invariants, note)


def print_table(rows: list[Row]) -> None:
    checks = list(rows[0].invariants.holds()) if rows and rows[0].invariants else []
    print()
    print(f"{'#':>2}  {'fault injected':<44} {'outage':>7}  {'answers during the phase':<34}")
    for i, row in enumerate(rows, 1):
        answers = ", ".join(f"{k}x{v}" for k, v in sorted(row.answers.items()))
        print(f"{i:>2}  {row.fault:<44} {row.outage_s:>6.1f}s  {answers:<34}")
        if not row.recovered or row.note:
            print(f"    !! {'did not recover: ' if not row.recovered else ''}{row.note}")
    print()
    print(
        f"{'invariant (after each fault, over all events so far)':<52} "
        + " ".join(f"{i:>3}" for i in range(1, len(rows) + 1))
    )
    for check in checks:
        marks = " ".join(
            f"{'ok' if row.invariants and row.invariants.holds()[check] else 'NO':>3}"
            for row in rows
        )
        print(f"{check:<52} {marks}")
    print()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    started = time.monotonic()
    data_dir = Path(tempfile.mkdtemp(prefix="nudge-chaos-", dir=args.data_root))
    stack = PrivateStack(data_dir, brokers=args.brokers)
    print(f"private stack in {data_dir}: {stack.env}", flush=True)
    rows: list[Row] = []
    try:
        await stack.run("up")
        async with sandbox(
            stack.settings,
            "chaos",
            replication_factor=3 if args.brokers > 1 else 1,
            min_insync_replicas=2 if args.brokers > 1 else None,
        ) as box:
            sink = SmtpSink(port=free_port())
            sink.start()
            env = {**box.env, "NUDGE_SMTP_PORT": str(sink.port)}
            log_dir = data_dir / "service-logs"
            fleet = Fleet(env, log_dir)
            replicas = (
                {
                    f"{name}-2": ServiceProcess(
                        name, free_port(), dict(env), log_dir / f"{name}-2.log"
                    )
                    for name in CONSUMER_SERVICES
                }
                if args.brokers > 1
                else {}
            )
            chaos = Chaos(stack, fleet, replicas)
            try:
                for process in chaos.processes():
                    process.start()
                await chaos.all_ready()
                print(f"services up ({time.monotonic() - started:.0f}s)", flush=True)
                if args.brokers > 1:
                    faults = [chaos.kill_broker(args.brokers, args.hold)] + [
                        chaos.kill_replica(fleet[name]) for name in CONSUMER_SERVICES
                    ]
                else:
                    faults = [chaos.kill_service(p) for p in fleet.services.values()] + [
                        chaos.stop_component("kafka", args.hold),
                        chaos.stop_component("postgres", args.hold),
                    ]
                if args.only:
                    faults = [f for f in faults if any(word in f.name for word in args.only)]
                workspace = await new_workspace(box.settings, "chaos")
                everyone: list[Contact] = []
                for index, fault in enumerate(faults, 1):
                    print(f"fault {index}/{len(faults)}: {fault.name}", flush=True)
                    row = await run_phase(
                        chaos,
                        fault,
                        ingest_url=fleet["ingest"].url,
                        workspace=workspace,
                        sink=sink,
                        settings=box.settings,
                        everyone=everyone,
                        rate=args.rate,
                        phase_s=args.phase,
                        index=index,
                    )
                    rows.append(row)
                    held = row.invariants.holds() if row.invariants else {}
                    failed = [name for name, ok in held.items() if not ok]
                    verdict = "all hold" if not failed else "FAILED " + ", ".join(failed)
                    print(f"  invariants: {verdict}", flush=True)
            finally:
                await asyncio.gather(*(p.stop() for p in chaos.processes()))
                sink.stop()
    finally:
        if args.keep:
            print(f"kept {data_dir}; 'NUDGE_DATA_DIR={data_dir} scripts/stack down' stops it")
        else:
            await stack.destroy()
    print_table(rows)
    last = rows[-1].invariants if rows and rows[-1].invariants else None
    return {
        "mode": f"{args.brokers} broker(s)"
        + (", 2 replicas per consumer" if args.brokers > 1 else ""),
        "faults_injected": len(rows),
        "faults_recovered": sum(row.recovered for row in rows),
        "events_acked": last.events_acked if last else 0,
        "events_lost": last.events_lost if last else None,
        "events_stored_twice": last.events_stored_twice if last else None,
        "scores_wrong": last.scores_wrong if last else None,
        "emails_expected": last.emails_expected if last else 0,
        "emails_sent": last.emails_sent if last else 0,
        "emails_missing": last.emails_missing if last else None,
        "emails_duplicated": last.emails_duplicated if last else None,
        "dead_letters": last.dead_letters if last else None,
        "dead_letters_without_reason": last.dead_letters_without_reason if last else None,
        "answers": dict(sum((row.answers for row in rows), Counter())),
        "all_invariants_hold": bool(rows)
        and all(
            row.recovered and row.invariants and all(row.invariants.holds().values())
            for row in rows
        ),
        "wall_s": round(time.monotonic() - started, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--brokers", type=int, choices=[1, 3], default=1)
    parser.add_argument("--rate", type=float, default=15.0, help="events/s during each fault")
    parser.add_argument("--phase", type=float, default=12.0, help="seconds of load per fault")
    parser.add_argument("--hold", type=float, default=5.0, help="seconds Kafka/PG stay down")
    parser.add_argument("--only", nargs="*", help="only the faults whose name has one of these")
    parser.add_argument("--keep", action="store_true", help="keep the private stack running")
    parser.add_argument("--data-root", default=str(REPO / ".data"), help="parent of its folder")
    args = parser.parse_args()
    Path(args.data_root).mkdir(parents=True, exist_ok=True)
    results = asyncio.run(main_async(args))
    print(json.dumps(results, separators=(",", ":")))


if __name__ == "__main__":
    main()
