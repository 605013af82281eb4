"""Is the Kafka broker really up? Standard library only (used by scripts/stack).

Sends ApiVersions (v0) and then Metadata (v4) over the Kafka wire protocol and succeeds
only when the broker answers with itself in the broker list and a known controller,
i.e. it has joined the KRaft quorum and serves client requests.

    python3 deploy/kafka/probe.py 127.0.0.1:19092 [--timeout 3]

Exit 0: ready (prints one summary line). Exit 1: not ready (reason on stderr).
"""

from __future__ import annotations

import argparse
import socket
import struct
import sys

API_METADATA = 3
API_VERSIONS = 18
METADATA_VERSION = 4  # non-flexible encoding; supported by 2.x, 3.x and 4.x brokers


class Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, fmt: str) -> int:
        (value,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str | None:
        length = self.take(">h")
        if length < 0:
            return None
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ConnectionError("broker closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def _call(
    sock: socket.socket, api_key: int, version: int, correlation_id: int, body: bytes
) -> Reader:
    client_id = b"nudge-stack-probe"
    header = struct.pack(">hhih", api_key, version, correlation_id, len(client_id)) + client_id
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    reader = Reader(_recv_exact(sock, size))
    if reader.take(">i") != correlation_id:
        raise ConnectionError("correlation id mismatch")
    return reader


def probe(host: str, port: int, timeout: float) -> str:
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.settimeout(timeout)

        versions = _call(sock, API_VERSIONS, 0, 1, b"")
        error = versions.take(">h")
        if error:
            raise RuntimeError(f"ApiVersions error code {error}")
        ranges = {}
        for _ in range(versions.take(">i")):
            key, low, high = versions.take(">h"), versions.take(">h"), versions.take(">h")
            ranges[key] = (low, high)
        low, high = ranges.get(API_METADATA, (1, 0))
        if not low <= METADATA_VERSION <= high:
            raise RuntimeError(
                f"broker does not support Metadata v{METADATA_VERSION} ({low}-{high})"
            )

        # topics: empty array (brokers only), allow_auto_topic_creation: false
        meta = _call(sock, API_METADATA, METADATA_VERSION, 2, struct.pack(">ib", 0, 0))
        meta.take(">i")  # throttle_time_ms
        brokers = []
        for _ in range(meta.take(">i")):
            node_id = meta.take(">i")
            broker_host = meta.string()
            broker_port = meta.take(">i")
            meta.string()  # rack
            brokers.append(f"{node_id}@{broker_host}:{broker_port}")
        cluster_id = meta.string()
        controller_id = meta.take(">i")
        if not brokers:
            raise RuntimeError("metadata lists no brokers yet")
        if controller_id < 0:
            raise RuntimeError("no active controller yet")
        return (
            f"cluster_id={cluster_id} controller={controller_id} brokers={','.join(brokers)} "
            f"metadata_versions={low}-{high}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bootstrap", help="host:port")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()
    host, _, port = args.bootstrap.rpartition(":")
    try:
        print(probe(host or "127.0.0.1", int(port), args.timeout))
    except (OSError, RuntimeError, struct.error, UnicodeDecodeError) as exc:
        print(f"kafka not ready: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
