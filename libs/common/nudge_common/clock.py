"""What "now" is for timed work (workflow waits, time-driven segments): the system clock,
or, in tests, an instant read from a file that a test moves by hand (so a process started
by the test follows it)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

Clock = Callable[[], datetime]


def system_clock() -> datetime:
    return datetime.now(UTC)


def file_clock(path: Path) -> Clock:
    def now() -> datetime:
        return datetime.fromisoformat(path.read_text().strip())

    return now


def set_file_clock(path: Path, at: datetime) -> None:
    """Move a file clock (atomically: a reader never sees a half-written instant)."""
    temporary = path.with_suffix(".tmp")
    temporary.write_text(at.isoformat())
    temporary.replace(path)


def clock_from(clock_file: Path | None) -> Clock:
    return file_clock(clock_file) if clock_file is not None else system_clock
