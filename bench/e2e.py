"""``make bench-e2e``: end-to-end latency, from the 200 that acknowledged a contact's third
"Viewed Pricing" at ingest to the welcome email accepted by the SMTP sink, at fixed rates
(100 and 1,000 events/s) and then at the highest rate the machine sustains.

The five services run as processes (``nudge_devtools.services.Fleet``) on the local stack's
Kafka and PostgreSQL, in a fresh database and topic prefix; the SMTP sink runs in this
process, so both ends of a latency are read on one clock. Method and the definition of
"sustained": docs/proof.md. The last line printed is one JSON object."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

import httpx
import uvloop
from aiokafka.structs import ConsumerRecord

from bench.harness import (
    LoadReport,
    contacts_for,
    new_workspace,
    percentile,
    process_tree_cpu_s,
    run_load,
    sandbox,
    stack_pids,
)
from nudge_common import codec
from nudge_common.events import Topic
from nudge_common.service import freeze_startup_heap
from nudge_common.settings import NudgeSettings
from nudge_devtools.pipeline import read_topic
from nudge_devtools.services import Fleet, free_port
from nudge_devtools.smtp_sink import SmtpSink

REPO = Path(__file__).resolve().parents[1]

LOG_ROOT = REPO / ".data" / "bench-e2e-logs"
SUSTAINED_RATE_SHARE = 0.95
SUSTAINED_P99_S = 1.0
DRAIN_DEADLINE_S = 60.0
OVERLOAD_S = 10.0
MIN_RATE = 5.0
WARMUP_RATE = 20.0
WARMUP_S = 3.0


@dataclass
class Step:
    rate: float
    load: LoadReport
    latencies_s: list[float]
    emails_missing: int
    """Expected emails that had not arrived when the step gave up waiting; their latency
    counts as the time waited (a lower bound)."""
    aborted: bool
    notifier_histogram: dict[str, float]
    cpu_ms_per_event: dict[str, float]
    hops_ms: dict[str, dict[str, float]]
    """Where each contact's latency went, hop by hop (docs/proof.md)."""
    consumers: dict[str, dict[str, float]]
    """Per consumer: batches applied during the step, their mean size and duration."""
    """CPU time each process (with its children) spent per acknowledged event during the
    step, the stack and this load generator included: the machine's budget at a rate R is
    nproc * 1000 / R ms per event."""

    @property
    def sustained(self) -> bool:
        """At least 95% of the target rate acknowledged, every event acknowledged, every
        email arrived, and p99 within the sub-second promise (docs/proof.md)."""
        return (
            not self.aborted
            and self.load.achieved_rate >= SUSTAINED_RATE_SHARE * self.rate
            and self.load.events_acked == self.load.events_sent
            and self.emails_missing == 0
            and percentile(self.latencies_s, 99) <= SUSTAINED_P99_S
        )

    def summary(self) -> dict[str, Any]:
        def ms(value: float) -> float | None:
            return None if math.isnan(value) else round(value * 1000, 1)

        return {
            "target_rate": self.rate,
            "achieved_rate": round(self.load.achieved_rate, 1),
            "events": self.load.events_sent,
            "events_acked": self.load.events_acked,
            "emails_missing": self.emails_missing,
            "p50_ms": ms(percentile(self.latencies_s, 50)),
            "p99_ms": ms(percentile(self.latencies_s, 99)),
            "max_ms": ms(max(self.latencies_s, default=math.nan)),
            "non_200_answers": sum(v for k, v in self.load.statuses.items() if k != "200"),
            "answers": dict(self.load.statuses),
            "generator_late_max_ms": round(self.load.send_lag_max_s * 1000, 1),
            "aborted_overloaded": self.aborted,
            "notifier_histogram": self.notifier_histogram,
            "cpu_ms_per_event": self.cpu_ms_per_event,
            "hops_ms": self.hops_ms,
            "consumers": self.consumers,
            "sustained": self.sustained,
        }


async def histogram(notifier_url: str) -> dict[str, float]:
    """The notifier's nudge_end_to_end_latency_seconds (email) buckets, count and sum."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{notifier_url}/metrics")).text
    found: dict[str, float] = {}
    pattern = re.compile(
        r"^nudge_end_to_end_latency_seconds_(bucket|count|sum)\{([^}]*)\} ([0-9.e+-]+|\+Inf)$"
    )
    for line in text.splitlines():
        match = pattern.match(line)
        if match and 'channel="email"' in match[2]:
            le = re.search(r'le="([^"]+)"', match[2])
            found[f"le_{le[1]}" if le else match[1]] = float(match[3])
    return found


def histogram_summary(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """This step's share of the notifier's histogram: count, mean, and the bucket bound
    under which 99% fell (the notifier measures from ingest's receivedAt to SMTP OK)."""
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    count = delta.get("count", 0.0)
    if not count:
        return {"count": 0}
    buckets = sorted(
        (math.inf if k == "le_+Inf" else float(k[3:]), v)
        for k, v in delta.items()
        if k.startswith("le_")
    )
    p99_bound = next((bound for bound, n in buckets if n >= 0.99 * count), math.inf)
    return {
        "count": count,
        "mean_ms": round(delta["sum"] / count * 1000, 1),
        "p99_le_ms": p99_bound * 1000 if math.isfinite(p99_bound) else -1,
    }


CONSUMER_SERIES = re.compile(
    r'^nudge_consumer_batch_(size|duration_seconds)_(sum|count)\{consumer="([^"]+)"\} (\S+)$'
)


async def consumer_totals(fleet: Fleet) -> dict[tuple[str, str, str], float]:
    """(consumer, size|duration_seconds, sum|count) of every service's batch histograms."""
    found: dict[tuple[str, str, str], float] = {}
    async with httpx.AsyncClient(timeout=5) as client:
        for service in fleet.services.values():
            text = (await client.get(f"{service.url}/metrics")).text
            for line in text.splitlines():
                if match := CONSUMER_SERIES.match(line):
                    found[(match[3], match[1], match[2])] = float(match[4])
    return found


def consumer_summary(
    before: dict[tuple[str, str, str], float], after: dict[tuple[str, str, str], float]
) -> dict[str, dict[str, float]]:
    def delta(key: tuple[str, str, str]) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    summary = {}
    for consumer in sorted({key[0] for key in after}):
        batches = delta((consumer, "size", "count"))
        if batches:
            summary[consumer] = {
                "batches": batches,
                "mean_size": round(delta((consumer, "size", "sum")) / batches, 1),
                "mean_ms": round(delta((consumer, "duration_seconds", "sum")) / batches * 1000, 1),
            }
    return summary


HOPS = (
    ("scoring", Topic.EVENTS, Topic.CONTACTS),
    ("segmenter", Topic.CONTACTS, Topic.MEMBERSHIPS),
    ("orchestrator", Topic.MEMBERSHIPS, Topic.NOTIFICATIONS),
)


async def hop_latencies(
    settings: NudgeSettings, workspace_id: str, smtp_epoch_s: dict[str, float]
) -> dict[str, dict[str, float]]:
    """p50/p99 of each hop of the contacts' path, from the records' timestamps (when each
    service handed its output to the producer): ingest's third event -> scoring's last
    ``contact.updated`` -> the segment entry -> the notification request -> the email at
    the sink (``smtp_epoch_s``: arrival per user id)."""
    last_seen: dict[Topic, dict[str, float]] = {}
    for topic in (Topic.EVENTS, Topic.CONTACTS, Topic.MEMBERSHIPS, Topic.NOTIFICATIONS):
        seen: dict[str, float] = {}
        for record in await read_topic(settings, topic, deadline_s=60):
            envelope = codec.loads(record.value or b"{}")
            if envelope.get("workspace_id") != workspace_id:
                continue
            payload = envelope.get("payload") or {}
            contact = payload.get("contact") or payload
            user = contact.get("user_id") or contact.get("userId")
            if isinstance(user, str):
                timestamp_ms = cast(ConsumerRecord[bytes, bytes], record).timestamp
                seen[user] = max(seen.get(user, 0.0), timestamp_ms / 1000)
        last_seen[topic] = seen

    def spread(pairs: list[tuple[float, float]]) -> dict[str, float]:
        gaps = [max(later - earlier, 0.0) for earlier, later in pairs]
        return {
            "p50": round(percentile(gaps, 50) * 1000, 1),
            "p99": round(percentile(gaps, 99) * 1000, 1),
            "count": len(gaps),
        }

    result = {
        name: spread(
            [
                (last_seen[source][user], last_seen[target][user])
                for user in smtp_epoch_s
                if user in last_seen[source] and user in last_seen[target]
            ]
        )
        for name, source, target in HOPS
    }
    notified = last_seen[Topic.NOTIFICATIONS]
    result["notifier"] = spread(
        [(notified[user], at) for user, at in smtp_epoch_s.items() if user in notified]
    )
    return result


async def measure(base: NudgeSettings, rate: float, duration_s: float) -> Step:
    """One rate on a fresh sandbox and a fresh fleet, so a backlog left by an overloaded
    rate cannot slow the next one down."""
    async with sandbox(base, "bench") as box:
        sink = SmtpSink(port=free_port())
        sink.start()
        log_dir = LOG_ROOT / datetime.now(UTC).strftime("%Y%m%d%H%M%S") / f"rate-{int(rate)}"
        fleet = Fleet({**box.env, "NUDGE_SMTP_PORT": str(sink.port)}, log_dir)
        try:
            await fleet.start()
            warm = await new_workspace(box.settings, "warmup")
            warm_contacts = contacts_for(WARMUP_RATE, WARMUP_S, "warmup")
            await run_load(fleet["ingest"].url, warm, warm_contacts, rate=WARMUP_RATE)
            await sink.wait_for(len(warm_contacts), deadline_s=DRAIN_DEADLINE_S)
            return await _measure(fleet, sink, box.settings, rate, duration_s)
        finally:
            await fleet.stop()
            sink.stop()


async def _measure(
    fleet: Fleet, sink: SmtpSink, settings: NudgeSettings, rate: float, duration_s: float
) -> Step:
    workspace = await new_workspace(settings, f"e2e{int(rate)}")
    contacts = contacts_for(rate, duration_s, f"r{int(rate)}")
    freeze_startup_heap()
    by_email = {c.email: c for c in contacts}
    arrivals: dict[str, float] = {}
    seen = 0

    def collect() -> None:
        nonlocal seen
        with sink.lock:
            fresh = sink.arrivals[seen:]
            seen = len(sink.arrivals)
        for arrived, to in fresh:
            if to in by_email:
                arrivals.setdefault(to, arrived)

    stop = asyncio.Event()

    async def watch_overload() -> None:
        """Stop sending once the pipeline is more than OVERLOAD_S behind: the rate is
        clearly not sustained, and a longer backlog only wastes the shared machine."""
        while not stop.is_set():
            await asyncio.sleep(0.5)
            collect()
            now = time.monotonic()
            if any(
                c.last_ack is not None and c.email not in arrivals and now - c.last_ack > OVERLOAD_S
                for c in contacts
            ):
                stop.set()

    before = await histogram(fleet["notifier"].url)
    pids = {
        **{
            name: service.process.pid for name, service in fleet.services.items() if service.process
        },
        **stack_pids(Path(os.environ.get("NUDGE_DATA_DIR", REPO / ".data"))),
    }
    cpu_before = {name: process_tree_cpu_s(pid) for name, pid in pids.items()}
    generator_before = time.process_time()
    batches_before = await consumer_totals(fleet)
    watcher = asyncio.create_task(watch_overload())
    load = await run_load(fleet["ingest"].url, workspace, contacts, rate=rate, stop=stop)
    aborted = stop.is_set()
    stop.set()
    await watcher
    expected = [c for c in load.contacts if c.last_ack is not None]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + (OVERLOAD_S if aborted else DRAIN_DEADLINE_S)
    while loop.time() < deadline:
        collect()
        if all(c.email in arrivals for c in expected):
            break
        await asyncio.sleep(0.05)
    collect()
    waited_until = time.monotonic()
    latencies, censored = [], 0
    for contact in expected:
        assert contact.last_ack is not None
        if contact.email in arrivals:
            latencies.append(max(arrivals[contact.email] - contact.last_ack, 0.0))
        else:  # not arrived yet: its latency is at least this long
            latencies.append(waited_until - contact.last_ack)
            censored += 1
    acked = max(load.events_acked, 1)
    cpu_ms = {
        name: round((process_tree_cpu_s(pid) - cpu_before[name]) * 1000 / acked, 3)
        for name, pid in pids.items()
    }
    # this process alone: the services are its children
    cpu_ms["load_generator"] = round((time.process_time() - generator_before) * 1000 / acked, 3)
    cpu_ms["total"] = round(sum(cpu_ms.values()), 3)
    to_epoch = time.time() - time.monotonic()
    smtp_epoch_s = {
        contact.user_id: arrivals[contact.email] + to_epoch
        for contact in expected
        if contact.email in arrivals
    }
    consumers = consumer_summary(batches_before, await consumer_totals(fleet))
    hops = await hop_latencies(settings, workspace.workspace_id, smtp_epoch_s)
    after = await histogram(fleet["notifier"].url)
    step = Step(
        rate,
        load,
        latencies,
        emails_missing=censored + len(load.contacts) - len(expected),
        aborted=aborted,
        notifier_histogram=histogram_summary(before, after),
        cpu_ms_per_event=cpu_ms,
        hops_ms=hops,
        consumers=consumers,
    )
    s = step.summary()
    print(
        f"rate {rate:>6.0f}/s: achieved {s['achieved_rate']:>7.1f}/s, {s['events_acked']}/"
        f"{s['events']} acked, {s['emails_missing']} emails missing, "
        f"p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms, max {s['max_ms']} ms, "
        f"non-200 {s['non_200_answers']}, aborted {aborted}, sustained {s['sustained']}, "
        f"CPU ms/event {cpu_ms}, hops (ms) {hops}, consumers {consumers}",
        flush=True,
    )
    return step


def next_rate(tested: dict[float, Step]) -> float | None:
    """The next rate to try: double above the best sustained one until one fails, halve
    below the lowest failed one until one holds, then bisect down to a 15% gap."""
    ok = [rate for rate, step in tested.items() if step.sustained]
    bad = [rate for rate, step in tested.items() if not step.sustained]
    if not ok:
        lowest = min(bad)
        return lowest / 2 if lowest / 2 >= MIN_RATE else None
    best = max(ok)
    above = min((r for r in bad if r > best), default=None)
    if above is None:
        return best * 2
    if above - best <= max(MIN_RATE, best * 0.15):
        return None
    grain = 50 if best >= 200 else 5
    candidate = float(round((best + above) / 2 / grain) * grain)
    return candidate if best < candidate < above else None


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "memory_gib": round(mem_kib / 1024 / 1024, 1),
        "load_avg_at_start": os.getloadavg()[0],
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    base = NudgeSettings()
    started = time.monotonic()
    results: dict[str, Any] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "duration_s_per_rate": args.duration,
    }
    tested: dict[float, Step] = {}
    for rate in args.rates:
        tested[rate] = await measure(base, rate, args.duration)
        results[f"rate_{int(rate)}"] = tested[rate].summary()
    for _ in range(args.search_steps):
        rate = next_rate(tested)
        if rate is None or rate > args.max_rate:
            break
        tested[rate] = await measure(base, rate, args.duration)
    best = max((rate for rate, step in tested.items() if step.sustained), default=None)
    results["rates_tested"] = {str(int(r)): s.summary() for r, s in sorted(tested.items())}
    results["rate_max"] = tested[best].summary() if best is not None else None
    results["max_sustained_rate"] = best
    results["sustained_means"] = (
        f"achieved >= {SUSTAINED_RATE_SHARE:.0%} of target, every event acknowledged, every "
        f"email received, p99 <= {SUSTAINED_P99_S * 1000:.0f} ms, never {OVERLOAD_S:.0f} s behind"
    )
    results["wall_s"] = round(time.monotonic() - started, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per rate")
    parser.add_argument("--rates", type=float, nargs="+", default=[100.0, 1000.0])
    parser.add_argument("--search-steps", type=int, default=4)
    parser.add_argument("--max-rate", type=float, default=8000.0)
    args = parser.parse_args()
    results = uvloop.run(main_async(args))  # the generator shares the machine it measures
    print(json.dumps(results, separators=(",", ":")))


if __name__ == "__main__":
    main()
