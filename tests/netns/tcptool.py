"""A small TCP/UDP peer for namespace tests: `serve` accepts one connection, `connect` opens one.

Both sides send a deterministic byte stream (seeded), half-close, read to the end and print one JSON line with
what they received, so a test compares sha256 digests instead of trusting byte counts.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import socket
import sys
import time


def payload(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def digest(size: int, seed: int) -> str:
    return hashlib.sha256(payload(size, seed)).hexdigest()


def exchange(sock: socket.socket, size: int, seed: int, pause: float, first: str) -> dict[str, object]:
    """Send `size` bytes then half-close (or read first, for a server that answers after the request)."""
    got = hashlib.sha256()
    total = 0

    def read_all() -> None:
        nonlocal total
        while True:
            chunk = sock.recv(1 << 20)
            if not chunk:
                return
            if pause and total == 0:
                time.sleep(pause)  # a reader that stalls: the sender sees a zero window
            got.update(chunk)
            total += len(chunk)

    def send_all() -> None:
        if size:
            sock.sendall(payload(size, seed))
        sock.shutdown(socket.SHUT_WR)

    if first == "read":
        read_all()
        send_all()
    else:
        send_all()
        read_all()
    return {"rx_len": total, "rx_sha": got.hexdigest()}


def udp_echo(host: str, port: int, count: int, timeout: float) -> dict[str, object]:
    """Echo `count` datagrams back to their sender; report the peers seen."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, port))
    sock.settimeout(timeout)
    print("ready", flush=True)
    peers: set[str] = set()
    n = 0
    for _ in range(count):
        data, peer = sock.recvfrom(65535)
        peers.add(f"{peer[0]}:{peer[1]}")
        sock.sendto(data, peer)
        n += 1
    return {"echoed": n, "peers": sorted(peers)}


def udp_client(host: str, port: int, count: int, size: int, seed: int, timeout: float) -> dict[str, object]:
    """Send `count` datagrams one at a time, each waiting for its echo: on a local path none may be lost."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.settimeout(min(timeout, 5.0))
    ok = 0
    rng = random.Random(seed)
    for i in range(count):
        data = i.to_bytes(4, "big") + rng.randbytes(max(0, size - 4))
        sock.send(data)
        try:
            if sock.recv(65535) == data:
                ok += 1
        except TimeoutError:
            pass
    return {"ok": ok, "sport": sock.getsockname()[1]}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["serve", "connect", "udp-echo", "udp-client"])
    p.add_argument("--count", type=int, default=1)
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--size", type=int, default=0, help="bytes to send")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--pause", type=float, default=0.0, help="stall this long after the first chunk read")
    p.add_argument("--first", choices=["send", "read"], default="send")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--peer", action="store_true", help="also print the peer's address")
    args = p.parse_args()
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    if args.mode == "udp-echo":
        print(json.dumps(udp_echo(args.host, args.port, args.count, args.timeout)), flush=True)
        return 0
    if args.mode == "udp-client":
        result = udp_client(args.host, args.port, args.count, args.size, args.seed, args.timeout)
        print(json.dumps(result), flush=True)
        return 0
    if args.mode == "serve":
        srv = socket.socket(family, socket.SOCK_STREAM)
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind((args.host, args.port))
        srv.listen(1)
        srv.settimeout(args.timeout)
        print("ready", flush=True)
        conn, peer = srv.accept()
        conn.settimeout(args.timeout)
        result = exchange(conn, args.size, args.seed, args.pause, args.first)
        if args.peer:
            result["peer"] = peer[0]
        conn.close()
    else:
        conn = socket.create_connection((args.host, args.port), timeout=args.timeout)
        try:
            result = exchange(conn, args.size, args.seed, args.pause, args.first)
        except ConnectionResetError:
            result = {"error": "ECONNRESET"}
        conn.close()
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
