"""Who sent a request: the client address behind trusted reverse proxies, and the country
of an address from an optional local table of IP ranges. Pure: no I/O beyond reading the
table's lines handed in."""

from __future__ import annotations

import bisect
import csv
import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address

IPAddress = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network


@functools.lru_cache(maxsize=4096)  # every request parses its peer's address
def _parse(value: str | None) -> IPAddress | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("[") and "]" in value:  # [v6]:port
        value = value[1 : value.index("]")]
    elif value.count(":") == 1:  # v4:port
        value = value.partition(":")[0]
    try:
        return ip_address(value)
    except ValueError:
        return None


def _trusted(address: IPAddress, networks: Sequence[Network]) -> bool:
    return any(address.version == network.version and address in network for network in networks)


def client_ip(
    peer: str | None,
    *,
    forwarded_for: str | None,
    real_ip: str | None,
    trusted_proxies: Sequence[Network],
) -> str | None:
    """The client's address. Forwarding headers are believed only when the peer is a
    trusted proxy; ``X-Forwarded-For`` is then read from the right (the nearest hop),
    skipping trusted proxies, so a client cannot choose its address by sending the header
    itself."""
    peer_address = _parse(peer)
    if peer_address is None:
        return peer
    if not trusted_proxies or not _trusted(peer_address, trusted_proxies):
        return str(peer_address)
    if forwarded_for:
        hops = [_parse(hop) for hop in forwarded_for.split(",")]
        for hop in reversed(hops):
            if hop is None:
                break  # a malformed hop: trust nothing further left
            if not _trusted(hop, trusted_proxies):
                return str(hop)
        valid = [hop for hop in hops if hop is not None]
        if valid and len(valid) == len(hops):
            return str(valid[0])  # every hop is a trusted proxy: the first one is the origin
    real = _parse(real_ip)
    return str(real) if real else str(peer_address)


def forwarded_scheme(
    peer: str | None, *, forwarded_proto: str | None, trusted_proxies: Sequence[Network]
) -> str | None:
    """``X-Forwarded-Proto`` from a trusted proxy (``http`` or ``https``), else ``None``."""
    peer_address = _parse(peer)
    if peer_address is None or not _trusted(peer_address, trusted_proxies):
        return None
    proto = (forwarded_proto or "").split(",")[0].strip().lower()
    return proto if proto in {"http", "https"} else None


@dataclass(frozen=True)
class _Ranges:
    starts: list[int]
    ends: list[int]
    countries: list[str]


class CountryTable:
    """IP ranges to ISO country codes, looked up by binary search."""

    def __init__(self, rows: Iterable[tuple[str, str, str]]) -> None:
        by_version: dict[int, list[tuple[int, int, str]]] = {4: [], 6: []}
        for first, last, country in rows:
            start, end = ip_address(first.strip()), ip_address(last.strip())
            if start.version != end.version or int(end) < int(start):
                raise ValueError(f"bad IP range {first}-{last}")
            by_version[start.version].append((int(start), int(end), country.strip().upper()))
        self._ranges = {}
        for version, ranges in by_version.items():
            ranges.sort()
            self._ranges[version] = _Ranges(
                [r[0] for r in ranges], [r[1] for r in ranges], [r[2] for r in ranges]
            )

    @classmethod
    def from_csv_lines(cls, lines: Iterable[str]) -> CountryTable:
        """Rows of ``first_ip,last_ip,country``; blank lines and ``#`` comments skipped."""
        rows = []
        for row in csv.reader(line for line in lines if line.strip() and line[0] != "#"):
            if len(row) < 3:
                raise ValueError(f"expected first_ip,last_ip,country, got {row!r}")
            rows.append((row[0], row[1], row[2]))
        return cls(rows)

    def country(self, address: str | None) -> str | None:
        parsed = _parse(address)
        if parsed is None:
            return None
        ranges = self._ranges[parsed.version]
        value = int(parsed)
        index = bisect.bisect_right(ranges.starts, value) - 1
        if index >= 0 and value <= ranges.ends[index]:
            return ranges.countries[index]
        return None
