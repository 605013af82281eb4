"""Client addresses behind trusted proxies, and the optional country table."""

from __future__ import annotations

from ipaddress import ip_network
from pathlib import Path

import pytest

from nudge_ingest.domain.network import CountryTable, client_ip, forwarded_scheme

PROXIES = [ip_network("10.0.0.0/8"), ip_network("fd00::/8")]
FIXTURE = Path(__file__).parent / "fixtures" / "countries.csv"


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "real_ip", "expected"),
    [
        # a direct client: its headers are ignored, whatever they say
        ("203.0.113.9", "1.2.3.4", "5.6.7.8", "203.0.113.9"),
        # behind one trusted proxy
        ("10.0.0.2", "203.0.113.9", None, "203.0.113.9"),
        # a client that forges X-Forwarded-For gets the address the proxy saw
        ("10.0.0.2", "1.2.3.4, 203.0.113.9", None, "203.0.113.9"),
        # two trusted hops
        ("10.0.0.2", "203.0.113.9, 10.1.1.1", None, "203.0.113.9"),
        # only X-Real-IP
        ("10.0.0.2", None, "203.0.113.10", "203.0.113.10"),
        # garbage in the header: the proxy's own address
        ("10.0.0.2", "not-an-ip", None, "10.0.0.2"),
        # ports and IPv6
        ("fd00::1", "[2001:db8::5]:443", None, "2001:db8::5"),
        ("10.0.0.2", "203.0.113.9:5555", None, "203.0.113.9"),
        # every hop trusted: the leftmost
        ("10.0.0.2", "10.0.0.3, 10.0.0.4", None, "10.0.0.3"),
    ],
)
def test_forwarding_headers_are_believed_only_from_trusted_proxies(
    peer: str, forwarded_for: str | None, real_ip: str | None, expected: str
) -> None:
    assert (
        client_ip(peer, forwarded_for=forwarded_for, real_ip=real_ip, trusted_proxies=PROXIES)
        == expected
    )


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_ip("10.0.0.2", forwarded_for="1.2.3.4", real_ip=None, trusted_proxies=[]) == (
        "10.0.0.2"
    )
    assert client_ip(None, forwarded_for="1.2.3.4", real_ip=None, trusted_proxies=PROXIES) is None


def test_forwarded_scheme_only_from_a_trusted_proxy() -> None:
    assert forwarded_scheme("10.0.0.2", forwarded_proto="https", trusted_proxies=PROXIES) == "https"
    assert forwarded_scheme("1.2.3.4", forwarded_proto="https", trusted_proxies=PROXIES) is None
    assert forwarded_scheme("10.0.0.2", forwarded_proto="gopher", trusted_proxies=PROXIES) is None


def test_country_table_looks_up_v4_and_v6_ranges() -> None:
    table = CountryTable.from_csv_lines(FIXTURE.read_text().splitlines())
    assert table.country("203.0.113.0") == "FR"
    assert table.country("203.0.113.127") == "FR"
    assert table.country("203.0.113.128") == "DE"
    assert table.country("198.51.100.7") == "NL"
    assert table.country("2001:db8::10") == "JP"
    assert table.country("192.0.2.1") is None
    assert table.country("2001:db9::") is None
    assert table.country("garbage") is None
    assert table.country(None) is None


def test_country_table_refuses_bad_rows() -> None:
    with pytest.raises(ValueError, match="bad IP range"):
        CountryTable([("10.0.0.9", "10.0.0.1", "FR")])
    with pytest.raises(ValueError, match="expected first_ip"):
        CountryTable.from_csv_lines(["10.0.0.1,FR"])
