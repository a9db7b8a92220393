"""Small benchmark peers the harness runs inside its namespaces: request/response, connection rate, holding.

Every mode is bounded in count and in time (`--time`), prints exactly one JSON line with its result on stdout
(servers print `ready` first), and exits by itself; the harness still ends it by PID if it does not.

    tcp-server HOST PORT        echo fixed-size messages, one connection after another (for tcp-rr and cps)
    tcp-rr HOST PORT            one connection, COUNT round trips of SIZE bytes: mean, p50, p99 in µs
    cps HOST PORT               connect, SIZE-byte request and response, close, in a loop: connections/s
    udp-server HOST PORT        echo datagrams
    udp-rr HOST PORT            COUNT datagram round trips (lost ones counted, not timed)
    hold-server HOST PORT       accept and keep up to COUNT connections, print `accepted N` when all are in
    hold HOST PORT              open COUNT connections and keep them until stdin closes
"""

from __future__ import annotations

import argparse
import json
import resource
import selectors
import socket
import sys
import time

Result = dict[str, float | int | str]


def emit(line: str) -> None:
    """One line to the harness, flushed at once: it waits on these lines."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def raise_nofile() -> None:
    """10 000 concurrent connections need more descriptors than the usual soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def recv_exact(sock: socket.socket, buf: memoryview) -> bool:
    """Fill `buf` completely; False on EOF."""
    got = 0
    while got < len(buf):
        n = sock.recv_into(buf[got:])
        if n == 0:
            return False
        got += n
    return True


def percentiles(samples_ns: list[int]) -> Result:
    if not samples_ns:
        return {"count": 0}
    s = sorted(samples_ns)
    n = len(s)
    return {
        "count": n,
        "mean_us": sum(s) / n / 1000,
        "p50_us": s[n // 2] / 1000,
        "p99_us": s[min(n - 1, (n * 99) // 100)] / 1000,
    }


def tcp_server(host: str, port: int, size: int, deadline: float) -> Result:
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(1024)
    emit("ready")
    buf = memoryview(bytearray(size))
    conns = 0
    while time.monotonic() < deadline:
        lsock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            conn, _ = lsock.accept()
        except TimeoutError:
            break
        conns += 1
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            while recv_exact(conn, buf):
                conn.sendall(buf)
        except OSError:
            pass
        conn.close()
    return {"connections": conns}


def tcp_rr(host: str, port: int, size: int, count: int, warmup: int, deadline: float) -> Result:
    sock = socket.create_connection((host, port), timeout=5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(max(0.1, deadline - time.monotonic()))
    msg = bytes(size)
    buf = memoryview(bytearray(size))
    samples: list[int] = []
    clock = time.perf_counter_ns
    for i in range(warmup + count):
        if time.monotonic() > deadline:
            break
        t0 = clock()
        sock.sendall(msg)
        if not recv_exact(sock, buf):
            break
        if i >= warmup:
            samples.append(clock() - t0)
    sock.close()
    return {**percentiles(samples), "warmup": min(warmup, len(samples) + warmup)}


def cps(host: str, port: int, size: int, count: int, duration: float, deadline: float) -> Result:
    msg = bytes(size)
    buf = memoryview(bytearray(size))
    done = failed = 0
    start = time.monotonic()
    stop = min(deadline, start + duration)
    while done < count and time.monotonic() < stop:
        try:
            sock = socket.create_connection((host, port), timeout=2)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.sendall(msg)
            ok = recv_exact(sock, buf)
            sock.close()
        except OSError:
            ok = False
        if ok:
            done += 1
        else:
            failed += 1
            if failed > 20:
                break
    elapsed = time.monotonic() - start
    return {
        "connections": done,
        "failed": failed,
        "seconds": elapsed,
        "per_s": done / elapsed if elapsed else 0,
    }


def udp_server(host: str, port: int, deadline: float) -> Result:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, port))
    emit("ready")
    buf = bytearray(65536)
    n = 0
    while time.monotonic() < deadline:
        sock.settimeout(max(0.1, deadline - time.monotonic()))
        try:
            size, peer = sock.recvfrom_into(buf)
        except TimeoutError:
            break
        sock.sendto(memoryview(buf)[:size], peer)
        n += 1
    return {"datagrams": n}


def udp_rr(host: str, port: int, size: int, count: int, warmup: int, deadline: float) -> Result:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    sock.settimeout(0.5)
    msg = bytes(size)
    buf = bytearray(65536)
    samples: list[int] = []
    lost = 0
    clock = time.perf_counter_ns
    for i in range(warmup + count):
        if time.monotonic() > deadline or lost > 20:
            break
        t0 = clock()
        sock.send(msg)
        try:
            sock.recv_into(buf)
        except TimeoutError:
            lost += 1
            continue
        except ConnectionRefusedError:
            lost += 1
            time.sleep(0.05)
            continue
        if i >= warmup:
            samples.append(clock() - t0)
    sock.close()
    out = percentiles(samples)
    out["lost"] = lost
    return out


def hold_server(host: str, port: int, count: int, deadline: float) -> Result:
    raise_nofile()
    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    emit("ready")
    held: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    sel.register(lsock, selectors.EVENT_READ)
    announced = False
    while time.monotonic() < deadline:
        if not announced and len(held) >= count:
            emit(f"accepted {len(held)}")
            announced = True
            sel.register(sys.stdin, selectors.EVENT_READ)
        for key, _ in sel.select(timeout=min(0.5, max(0.0, deadline - time.monotonic()))):
            if key.fileobj is sys.stdin:
                return {"accepted": len(held)}
            while len(held) < count:
                try:
                    conn, _ = lsock.accept()
                except BlockingIOError:
                    break
                held.append(conn)
    return {"accepted": len(held)}


def hold(host: str, port: int, count: int, deadline: float) -> Result:
    raise_nofile()
    held: list[socket.socket] = []
    failed = 0
    while len(held) < count and time.monotonic() < deadline and failed < 20:
        try:
            held.append(socket.create_connection((host, port), timeout=2))
        except OSError:
            failed += 1
    emit(f"connected {len(held)}")
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    sel.select(timeout=max(0.0, deadline - time.monotonic()))
    return {"connected": len(held), "failed": failed}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "mode", choices=["tcp-server", "tcp-rr", "cps", "udp-server", "udp-rr", "hold-server", "hold"]
    )
    p.add_argument("host")
    p.add_argument("port", type=int)
    p.add_argument("--size", type=int, default=64, help="bytes per request and per response")
    p.add_argument("--count", type=int, default=5000, help="round trips, connections, or held connections")
    p.add_argument("--warmup", type=int, default=200, help="round trips not timed")
    p.add_argument("--duration", type=float, default=2.0, help="cps: seconds of connecting")
    p.add_argument("--time", type=float, default=30.0, help="hard bound on the whole run, seconds")
    a = p.parse_args()
    deadline = time.monotonic() + a.time
    if a.mode == "tcp-server":
        out = tcp_server(a.host, a.port, a.size, deadline)
    elif a.mode == "tcp-rr":
        out = tcp_rr(a.host, a.port, a.size, a.count, a.warmup, deadline)
    elif a.mode == "cps":
        out = cps(a.host, a.port, a.size, a.count, a.duration, deadline)
    elif a.mode == "udp-server":
        out = udp_server(a.host, a.port, deadline)
    elif a.mode == "udp-rr":
        out = udp_rr(a.host, a.port, a.size, a.count, a.warmup, deadline)
    elif a.mode == "hold-server":
        out = hold_server(a.host, a.port, a.count, deadline)
    else:
        out = hold(a.host, a.port, a.count, deadline)
    emit(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
