"""`make soak`: passtd under a hostile guest, with figures. Not part of `make test`; about 5 minutes; root.

Phases (each with its own passtd, all in namespaces this script creates, see `topology`):
  control  14.10: iperf3 through pasta mode, alone and while a client loops ListConnections over 2 000 flows
  fuzz     a million mutated frames of every kind, half written on the tap inside the namespace (pasta mode,
           an AF_PACKET socket), half over the qemu stream socket (passt mode); then the invariants: passtd
           alive, no traceback in its log, drops counted by reason, descriptors and RSS back near the
           baseline once the flows expired (timeouts set short through the control API)
  floods   SYN, UDP to many ports, many echo ids, many source addresses, each while iperf3 runs and control
           calls are timed
  nofile   descriptor exhaustion: a UDP flood to many ports under `prlimit --nofile=300`

    guest ns ──tap── passtd in host ns (192.0.2.1/24, 2001:db8:1::1/64) ──veth── remote ns (192.0.2.2,
                                                        2001:db8:1::2; 198.51.100.1 and 2001:db8:2::1 on lo)

Traffic goes only to the documentation ranges inside these namespaces: 198.51.100.1 and 2001:db8:2::1
answer (iperf3 listens there), 198.51.100.99 and 2001:db8:2::99 are routed to the remote namespace, which
does not forward, so SYNs to them stay half-open. Every process is ended by its PID; the namespaces are
deleted in `finally`. `run.py inject ...` is the frame writer that runs inside the guest namespace.

    .venv/bin/python soak/run.py [--frames 1000000] [--phases control,fuzz,floods,nofile]
                                  [--passtd-root DIR]   (run another checkout's passtd, for before/after)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from soak.frames import FLOODS, Fuzzer, Link, flood_frame  # noqa: E402
from tests.helpers.procs import Procs, run_checked  # noqa: E402

PY = sys.executable
IF = "eth0"
HOST4, REMOTE4, FAR4, DROP4 = "192.0.2.1", "192.0.2.2", "198.51.100.1", "198.51.100.99"
HOST6, REMOTE6, FAR6, DROP6 = "2001:db8:1::1", "2001:db8:1::2", "2001:db8:2::1", "2001:db8:2::99"
IPERF_PORT = 5201
BATCH, IN_FLIGHT = 1000, 8000  # frames written between two looks at passtd's counter, and the most unread
TXQUEUELEN = 10000  # the guest side of the tap queues this many frames for passtd (the default is 1 000)
STREAM_MIN = 14  # qemu's stream framing: a shorter length means a desynchronised stream and a disconnect
SHORT_TIMEOUTS = {"udp_idle": 1.0, "icmp_idle": 1.0, "tcp_syn": 1.0, "tcp_fin": 1.0, "tcp_activity": 1.0}


def out(*parts: str, file: Any = None) -> None:
    """One line on stdout (or `file`), flushed: the soak's figures are its output."""
    stream = file or sys.stdout
    stream.write(" ".join(parts) + "\n")
    stream.flush()


def log(msg: str) -> None:
    out(f"[{time.strftime('%H:%M:%S')}] {msg}")


def sh(*argv: str, timeout: float = 20, check: bool = True) -> str:
    return run_checked(*argv, timeout=timeout, check=check)


# ------------------------------------------------------------------------------------------- processes


@dataclass
class Topo:
    host: str
    remote: str
    guest: str
    veth: str
    tmp: Path
    procs: Procs


@contextlib.contextmanager
def topology(tmp: Path) -> Iterator[Topo]:
    sfx = secrets.token_hex(3)
    t = Topo(f"pds-{sfx}-h", f"pds-{sfx}-r", f"pds-{sfx}-g", f"pdsv{sfx}", tmp, Procs(tmp))
    made: list[str] = []
    try:
        for ns in (t.host, t.remote, t.guest):
            sh("ip", "netns", "add", ns)
            made.append(ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh(
            "ip",
            "link",
            "add",
            t.veth,
            "netns",
            t.host,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            t.remote,
        )
        for ns, dev, a4, a6 in ((t.host, t.veth, HOST4, HOST6), (t.remote, "eth0", REMOTE4, REMOTE6)):
            sh("ip", "-n", ns, "addr", "add", f"{a4}/24", "dev", dev)
            sh("ip", "-n", ns, "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            sh("ip", "-n", ns, "link", "set", dev, "up")
        sh("ip", "-n", t.remote, "addr", "add", f"{FAR4}/32", "dev", "lo")
        sh("ip", "-n", t.remote, "addr", "add", f"{FAR6}/128", "dev", "lo")
        sh("ip", "-n", t.host, "route", "add", "default", "via", REMOTE4)
        sh("ip", "-n", t.host, "-6", "route", "add", "default", "via", REMOTE6)
        sh("ip", "netns", "exec", t.host, "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647")
        yield t
    finally:
        t.procs.end_all()
        for ns in made:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10, check=False)


# ---------------------------------------------------------------------------------------------- passtd


class Ctl:
    """A control client on the daemon's socket (grpc, in this process)."""

    def __init__(self, path: str) -> None:
        import grpc

        from passtd.control.pb import passt_pb2, passt_pb2_grpc

        self.pb = passt_pb2
        self.grpc = grpc
        self.channel = grpc.insecure_channel(f"unix:{path}")
        self.stub = passt_pb2_grpc.ControlStub(self.channel)

    def status(self, timeout: float = 10) -> Any:
        return self.stub.GetStatus(self.pb.GetStatusRequest(), timeout=timeout)

    def list(self, page: int = 10000, timeout: float = 10) -> Any:
        return self.stub.ListConnections(self.pb.ListConnectionsRequest(page_size=page), timeout=timeout)

    def reset_all(self) -> int:
        return len(
            self.stub.ResetConnections(self.pb.ResetConnectionsRequest(all=True), timeout=30).connections
        )

    def set_timeouts(self, **values: float) -> None:
        request = self.pb.SetTimeoutsRequest(timeouts=self.pb.Timeouts(**values))
        request.update_mask.paths.extend(values)
        self.stub.SetTimeouts(request, timeout=10)

    def close(self) -> None:
        self.channel.close()


@dataclass
class Daemon:
    proc: subprocess.Popen[str]
    ctl_path: str
    log: Path
    ctl: Ctl
    sock: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def rss_mib(self) -> float:
        for text in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if text.startswith("VmRSS:"):
                return int(text.split()[1]) / 1024
        return 0.0

    def fd_kinds(self) -> dict[str, int]:
        """Open descriptors by kind: sockets by /proc/PID/net table (tcp, udp6, icmp...), else the target."""
        tables: dict[str, str] = {}
        for table in ("tcp", "tcp6", "udp", "udp6", "icmp", "icmp6", "raw", "raw6", "unix"):
            with contextlib.suppress(OSError):
                for row in Path(f"/proc/{self.pid}/net/{table}").read_text().splitlines()[1:]:
                    cols = row.split()
                    inode = cols[6] if table == "unix" else (cols[9] if len(cols) > 9 else "")
                    tables[inode] = table
        kinds: dict[str, int] = {}
        for fd in os.listdir(f"/proc/{self.pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{self.pid}/fd/{fd}")
                kind = (
                    tables.get(target[8:-1], "socket")
                    if target.startswith("socket:")
                    else target.split(":")[0]
                )
                kinds[kind] = kinds.get(kind, 0) + 1
        return kinds

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tracebacks(self) -> int:
        return self.log.read_text(errors="replace").count("Traceback")

    def log_count(self, needle: str) -> int:
        return self.log.read_text(errors="replace").count(needle)

    def flows(self) -> int:
        return sum(self.ctl.status().flows.values())


def _wait(predicate: Any, timeout: float, what: str, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")


def start_passtd(t: Topo, name: str, mode: str, root: Path, *extra: str) -> Daemon:
    ctl = str(t.tmp / f"{name}.ctl")
    log_path = t.tmp / f"{name}.log"
    env = dict(os.environ, PYTHONPATH=str(root), XDG_RUNTIME_DIR=str(t.tmp))
    if mode == "pasta":
        argv = [
            "pasta",
            "-f",
            "-I",
            IF,
            "--netns",
            t.guest,
            "--config-net",
            "-t",
            "none",
            "-u",
            "none",
            "-T",
            "none",
            "-U",
            "none",
            "--control",
            ctl,
            *extra,
        ]
        sock = ""
    else:
        sock = str(t.tmp / f"{name}.sock")
        argv = ["passt", "-f", "-s", sock, "-t", "none", "-u", "none", "--control", ctl, *extra]
    # Another checkout (--passtd-root): the venv's editable install of this one must not shadow it.
    boot = (
        "import runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if '__editable__' not in "
        f"getattr(f, '__module__', '')]; sys.path.insert(0, {str(root)!r}); "
        "sys.argv[0] = 'passtd'; runpy.run_module('passtd', run_name='__main__', alter_sys=True)"
    )
    launch = ["-m", "passtd"] if root == ROOT else ["-c", boot]
    proc = t.procs.spawn(
        t.host, PY, *launch, *argv, log_name=f"{name}.log", log_stdout=True, env=env, cwd=root
    )

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        if not os.path.exists(ctl) or (sock and not os.path.exists(sock)):
            return False
        if mode == "pasta":
            routes = json.loads(sh("ip", "-n", t.guest, "-j", "-4", "route", "show", "default") or "[]")
            return bool(routes)
        return True

    _wait(ready, 20, f"{name} to start")
    if mode == "pasta":
        sh("ip", "-n", t.guest, "link", "set", IF, "txqueuelen", str(TXQUEUELEN))
    daemon = Daemon(proc, ctl, log_path, Ctl(ctl), sock)
    _wait(lambda: daemon.ctl.status() is not None, 10, "the control socket")
    return daemon


def stop_passtd(t: Topo, daemon: Daemon) -> int:
    daemon.ctl.close()
    t.procs.end(daemon.proc, 10)
    return daemon.proc.returncode


def guest_mac(t: Topo) -> str:
    links = json.loads(sh("ip", "-n", t.guest, "-j", "link", "show", IF))
    return str(links[0]["address"])


def link_of(daemon: Daemon, mac: str) -> Link:
    cfg = daemon.ctl.status().config
    return Link.build(
        mac,
        cfg.our_mac,
        cfg.ipv4_address or HOST4,
        cfg.ipv4_gateway or REMOTE4,
        cfg.ipv6_address or HOST6,
        (FAR4, DROP4),
        (FAR6, DROP6),
    )


# --------------------------------------------------------------------------- frame writers and readers


def inject_main(argv: list[str]) -> int:
    """Inside the guest namespace: write frames on the tap with an AF_PACKET socket, paced by passtd's own
    frame counter (GetStatus) so that the tap's queue does not overflow; print one JSON line."""
    p = argparse.ArgumentParser(prog="soak/run.py inject")
    p.add_argument("--link", required=True)
    p.add_argument("--ctl", required=True)
    p.add_argument("--frames", type=int, default=0)
    p.add_argument("--flood", choices=FLOODS)
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--rate", type=float, default=0, help="frames/s at most (floods)")
    p.add_argument("--seed", type=int, default=1)
    a = p.parse_args(argv)
    link = Link(
        **{
            k: bytes.fromhex(v) if isinstance(v, str) else tuple(bytes.fromhex(x) for x in v)
            for k, v in json.loads(a.link).items()
        }
    )
    fuzzer = Fuzzer(link, a.seed)
    ctl = Ctl(a.ctl)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((IF, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    base = ctl.status().counters.frames_from_guest
    stats = Path(f"/sys/class/net/{IF}/statistics/tx_dropped")
    dropped0 = int(stats.read_text())
    sent = errors = 0
    start = time.monotonic()
    deadline = start + a.duration
    limit = a.frames or 1 << 62
    while sent < limit and time.monotonic() < deadline:
        for _ in range(BATCH):
            frame = flood_frame(fuzzer, a.flood) if a.flood else fuzzer.frame()
            if len(frame) < 14:
                frame = frame + b"\0" * (14 - len(frame))  # AF_PACKET needs the Ethernet header at least
            try:
                sock.send(frame)
                sent += 1
            except OSError:
                errors += 1
        if a.rate:
            ahead = sent / a.rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)
        # The fuzz is paced on what passtd has read (the tap's queue holds TXQUEUELEN frames and drops
        # beyond); a flood only keeps to its rate, and what the queue drops the kernel counts.
        pace_deadline = time.monotonic() + (0 if a.flood else 5)
        while time.monotonic() < pace_deadline:
            seen = ctl.status().counters.frames_from_guest - base
            if sent - seen < IN_FLIGHT:
                break
            time.sleep(0.001)
    elapsed = time.monotonic() - start
    time.sleep(0.2)
    tap_dropped = int(stats.read_text()) - dropped0
    out(
        json.dumps(
            {
                "sent": sent,
                "send_errors": errors,
                "seconds": elapsed,
                "mutations": fuzzer.counts,
                "tap_dropped": tap_dropped,
            }
        )
    )
    return 0


def inject(t: Topo, daemon: Daemon, link: Link, *args: str, timeout: float = 600) -> dict[str, Any]:
    link_json = json.dumps(
        {k: v.hex() if isinstance(v, bytes) else [x.hex() for x in v] for k, v in link.__dict__.items()}
    )
    proc = t.procs.spawn(
        t.guest, PY, str(Path(__file__)), "inject", "--link", link_json, "--ctl", daemon.ctl_path, *args
    )
    out, err = proc.communicate(timeout=timeout)
    t.procs.started.remove(proc)
    if proc.returncode != 0:
        raise RuntimeError(f"inject failed: {err[-2000:]}")
    return dict(json.loads(out.strip().splitlines()[-1]))


def stream_fuzz(daemon: Daemon, link: Link, frames: int, seed: int) -> dict[str, Any]:
    """passt mode: be qemu on the stream socket (4-byte big-endian length, then the frame); a thread
    drains what passtd sends back."""
    fuzzer = Fuzzer(link, seed)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(daemon.sock)
    received = [0]
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([sock], [], [], 0.2)  # the socket stays blocking for sendall
            if not ready:
                continue
            try:
                data = sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                continue
            except OSError:
                return
            if not data:
                return
            received[0] += len(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    base = daemon.ctl.status().counters.frames_from_guest
    start = time.monotonic()
    sent = 0
    pack = struct.Struct("!I").pack
    while sent < frames:
        batch = []
        for _ in range(min(1000, frames - sent)):
            frame = fuzzer.frame()
            frame += b"\0" * (STREAM_MIN - len(frame))  # the framing stays valid: the frames are the fuzz
            batch.append(pack(len(frame)) + frame)
        sock.sendall(b"".join(batch))
        sent += len(batch)
    seconds = time.monotonic() - start
    with contextlib.suppress(RuntimeError):  # issue 14.7: frames left in passtd's buffer until more arrive
        _wait(lambda: daemon.ctl.status().counters.frames_from_guest - base >= sent, 10, "every frame read")
    stranded = sent - (daemon.ctl.status().counters.frames_from_guest - base)
    stop.set()
    sock.close()
    reader.join(2)
    return {
        "sent": sent,
        "seconds": seconds,
        "bytes_back": received[0],
        "mutations": fuzzer.counts,
        "stranded": max(stranded, 0),
    }


# ------------------------------------------------------------------------------- measuring while loaded


class Prober:
    """Times control calls in a loop on a thread (GetStatus and ListConnections by turns)."""

    def __init__(
        self,
        daemon: Daemon,
        calls: tuple[str, ...] = ("status", "list"),
        pause: float = 0.0,
        fresh: bool = False,
    ) -> None:
        self.daemon, self.calls, self.pause, self.fresh = daemon, calls, pause, fresh
        self.latency: dict[str, list[float]] = {c: [] for c in calls}
        self.failures: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        ctl = Ctl(self.daemon.ctl_path)
        while not self._stop.is_set():
            for call in self.calls:
                t0 = time.perf_counter()
                if self.fresh:  # a new connection each time, as passtctl makes: the accept path is timed too
                    ctl.close()
                    ctl = Ctl(self.daemon.ctl_path)
                try:
                    ctl.status(timeout=5) if call == "status" else ctl.list(timeout=5)
                    self.latency[call].append(time.perf_counter() - t0)
                except Exception as exc:  # an RpcError: count it by code and go on
                    code = str(exc.code()) if hasattr(exc, "code") else type(exc).__name__
                    self.failures[code] = self.failures.get(code, 0) + 1
                if self.pause:
                    time.sleep(self.pause)
        ctl.close()

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)

    def summary(self) -> str:
        parts = []
        for call, values in self.latency.items():
            if values:
                ms = sorted(v * 1000 for v in values)
                p99 = ms[min(len(ms) - 1, int(len(ms) * 0.99))]
                parts.append(
                    f"{call} n={len(ms)} p50 {statistics.median(ms):.1f} ms p99 {p99:.1f} ms "
                    f"max {ms[-1]:.1f} ms"
                )
        if self.failures:
            parts.append(f"failures {self.failures}")
        return "; ".join(parts) or "no calls"


def iperf(t: Topo, seconds: float) -> float:
    """Gbit/s of one iperf3 upload from the guest to the remote namespace's 198.51.100.1."""
    time.sleep(0.5)  # the server takes a moment before it accepts the next test ("the server is busy")
    out = sh(
        "ip",
        "netns",
        "exec",
        t.guest,
        "iperf3",
        "-c",
        FAR4,
        "-p",
        str(IPERF_PORT),
        "-t",
        str(seconds),
        "-J",
        timeout=seconds + 30,
        check=False,
    )
    data = json.loads(out or "{}")
    if "error" in data or "end" not in data:
        log(f"iperf3: {data.get('error', 'no result')}")
        return 0.0
    return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9


def start_iperf_server(t: Topo) -> None:
    t.procs.spawn(
        t.remote,
        "iperf3",
        "-s",
        "-B",
        FAR4,
        "-p",
        str(IPERF_PORT),
        log_name="iperf3-server.log",
        log_stdout=True,
    )
    time.sleep(0.5)


def open_udp_flows(t: Topo, n: int) -> None:
    """`n` UDP flows from the guest to the silent address: they stay open until udp_idle."""
    code = (
        "import socket, time\n"
        f"socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('{DROP4}', 19999))\n"
        "time.sleep(0.5)  # the guest resolves the gateway first; meanwhile it queues only 101 packets\n"
        f"for i in range({n}):\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        f"    s.sendto(b'x', ('{DROP4}', 20000 + i))\n"
        "    s.close()\n"
        "    time.sleep(0.0002)  # the tap queues 1 000 frames; passtd opens a socket per flow\n"
    )
    sh("ip", "netns", "exec", t.guest, PY, "-c", code, timeout=60)


def dropped(status: Any) -> dict[str, int]:
    return {k: int(v) for k, v in status.counters.dropped.items()}


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


# ---------------------------------------------------------------------------------------------- phases


@dataclass
class Report:
    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def add(self, text: str) -> None:
        log(text)
        self.lines.append(text)

    def problem(self, text: str) -> None:
        log("PROBLEM: " + text)
        self.problems.append(text)


def phase_control(t: Topo, root: Path, r: Report, seconds: float, rounds: int = 3) -> None:
    """Transfers alone and under a ListConnections loop, by turns (a shared machine: medians of pairs)."""
    d = start_passtd(t, "control", "pasta", root)
    try:
        start_iperf_server(t)
        open_udp_flows(t, 2000)
        _wait(lambda: d.flows() >= 1900, 20, "2 000 UDP flows")
        cpu0 = d.cpu_seconds()
        with Prober(d, ("list",)) as idle_probe:
            time.sleep(3)
        per_call = (d.cpu_seconds() - cpu0) / max(len(idle_probe.latency["list"]), 1) * 1000
        r.add(
            f"control: ListConnections over {d.flows()} flows, no transfer: {idle_probe.summary()}; "
            f"passtd CPU {per_call:.1f} ms per call"
        )
        iperf(t, 1)  # warm-up
        alone: list[float] = []
        loaded: list[float] = []
        probes: list[str] = []
        for _ in range(rounds):
            alone.append(iperf(t, seconds))
            with Prober(d, ("list",)) as probe:
                loaded.append(iperf(t, seconds))
            probes.append(probe.summary())
        a, b = statistics.median(alone), statistics.median(loaded)
        r.add(
            f"control: iperf3 guest->remote alone {', '.join(f'{x:.2f}' for x in alone)} Gbit/s, while a "
            f"client loops ListConnections {', '.join(f'{x:.2f}' for x in loaded)} Gbit/s; "
            f"medians {a:.2f} -> {b:.2f} ({(1 - b / a) * 100 if a else 0:.0f} % less)"
        )
        r.add(f"control: ListConnections during the transfers: {' | '.join(probes)}")
    finally:
        stop_passtd(t, d)


def _settle(d: Daemon, timeout: float) -> float:
    """Wait for every flow to expire; return the seconds it took."""
    t0 = time.monotonic()
    with contextlib.suppress(RuntimeError):
        _wait(lambda: d.flows() == 0, timeout, "the flows to expire", 0.25)
    return time.monotonic() - t0


def _fuzz_checks(
    r: Report, name: str, d: Daemon, before: Any, fds0: int, rss0: float, result: dict[str, Any]
) -> None:
    after = d.ctl.status()
    frames = after.counters.frames_from_guest - before.counters.frames_from_guest
    drops = diff(dropped(after), dropped(before))
    r.add(
        f"fuzz {name}: {result['sent']} frames in {result['seconds']:.1f} s "
        f"({result['sent'] / result['seconds']:.0f} frames/s written), passtd read {frames}, "
        f"dropped {sum(drops.values())} by {len(drops)} reasons"
    )
    r.add(
        f"fuzz {name}: mutations {result['mutations']}; dropped by the tap's queue before passtd: "
        f"{result.get('tap_dropped', 0)}"
    )
    r.add(
        f"fuzz {name}: drops by reason "
        + ", ".join(f"{k} {v}" for k, v in sorted(drops.items(), key=lambda kv: -kv[1]))
    )
    if result.get("stranded"):
        r.problem(
            f"fuzz {name}: {result['stranded']} frames written were never read by passtd (issue 14.7: "
            "frames stranded in the stream buffer until the guest sends more)"
        )
    took = _settle(d, 30)
    fds1, rss1 = d.fds(), d.rss_mib()
    left = d.ctl.status()
    r.add(
        f"fuzz {name}: after expiry ({took:.1f} s): flows {sum(left.flows.values())}, descriptors {fds0} -> "
        f"{fds1}, RSS {rss0:.1f} -> {rss1:.1f} MiB, learned guest addresses "
        f"{len(left.backend.guest_addresses)}"
    )
    if d.proc.poll() is not None:
        r.problem(f"fuzz {name}: passtd exited with {d.proc.returncode}")
    if d.tracebacks():
        r.problem(f"fuzz {name}: {d.tracebacks()} tracebacks in the log ({d.log})")
    if not drops:
        r.problem(f"fuzz {name}: no drop was counted")
    if fds1 > fds0 + 2:  # the control connection may come and go; a flow's socket may not stay
        r.problem(
            f"fuzz {name}: {fds1 - fds0} descriptors more than before the fuzz, with no flow open "
            f"(by kind now: {d.fd_kinds()})"
        )
    if sum(left.flows.values()):
        r.problem(f"fuzz {name}: {sum(left.flows.values())} flows still open 30 s after the fuzz")


def phase_fuzz(t: Topo, root: Path, r: Report, frames: int) -> None:
    half = frames // 2
    d = start_passtd(t, "fuzz-pasta", "pasta", root)
    try:
        d.ctl.set_timeouts(**SHORT_TIMEOUTS)
        time.sleep(1)
        fds0, rss0, before = d.fds(), d.rss_mib(), d.ctl.status()
        result = inject(t, d, link_of(d, guest_mac(t)), "--frames", str(half), "--seed", "14")
        _fuzz_checks(r, "pasta", d, before, fds0, rss0, result)
    finally:
        stop_passtd(t, d)
    d = start_passtd(t, "fuzz-passt", "passt", root)
    try:
        d.ctl.set_timeouts(**SHORT_TIMEOUTS)
        time.sleep(0.5)
        fds0, rss0, before = d.fds(), d.rss_mib(), d.ctl.status()
        result = stream_fuzz(d, link_of(d, "52:54:00:12:34:56"), frames - half, 15)
        _fuzz_checks(r, "passt", d, before, fds0, rss0, result)
    finally:
        stop_passtd(t, d)


def phase_floods(t: Topo, root: Path, r: Report, seconds: float, rate: float) -> None:
    d = start_passtd(t, "floods", "pasta", root)
    try:
        start_iperf_server(t)
        link = link_of(d, guest_mac(t))
        iperf(t, 1)
        with Prober(d, pause=0.05) as probe:
            alone = iperf(t, seconds)
        r.add(f"floods: iperf3 alone {alone:.2f} Gbit/s; control calls {probe.summary()}")
        for what in FLOODS:
            before, fds0 = d.ctl.status(), d.fds()
            result: dict[str, Any] = {}
            flooder = threading.Thread(
                target=lambda w=what, result=result: result.update(
                    inject(t, d, link, "--flood", w, "--duration", str(seconds + 1), "--rate", str(rate))
                )
            )
            with Prober(d, pause=0.05) as probe:
                flooder.start()
                time.sleep(0.5)
                during = iperf(t, seconds)
                flooder.join(seconds + 60)
            after = d.ctl.status()
            peak = sum(after.flows.values())
            drops = diff(dropped(after), dropped(before))
            sent, rate_done = (
                result.get("sent", 0),
                result.get("sent", 0) / max(result.get("seconds", 1), 1e-9),
            )
            less = (1 - during / alone) * 100 if alone else 0
            r.add(
                f"flood {what}: {sent} frames at {rate_done:.0f}/s; "
                f"iperf3 {during:.2f} Gbit/s ({less:.0f} % less than alone); "
                f"flows open after {peak}, descriptors {fds0} -> {d.fds()}, learned addresses "
                f"{len(after.backend.guest_addresses)}; drops {drops or 'none'}; control {probe.summary()}"
            )
            t0 = time.perf_counter()
            n = d.ctl.reset_all()
            ms = (time.perf_counter() - t0) * 1000
            r.add(f"flood {what}: ResetConnections(all) reset {n} flows in {ms:.0f} ms")
            if d.proc.poll() is not None:
                r.problem(f"flood {what}: passtd exited with {d.proc.returncode}")
                return
        if d.tracebacks():
            r.problem(f"floods: {d.tracebacks()} tracebacks in the log ({d.log})")
    finally:
        stop_passtd(t, d)


def phase_nofile(t: Topo, root: Path, r: Report, seconds: float, rate: float) -> None:
    d = start_passtd(t, "nofile", "pasta", root)
    try:
        start_iperf_server(t)
        d.ctl.set_timeouts(udp_idle=2.0)
        sh("prlimit", "--pid", str(d.pid), "--nofile=300:300")
        time.sleep(1.2)  # passtd re-shares its descriptors on its next one-second tick
        fds0 = d.fds()
        link = link_of(d, guest_mac(t))
        result: dict[str, Any] = {}
        flooder = threading.Thread(
            target=lambda: result.update(
                inject(
                    t, d, link, "--flood", "udp_ports", "--duration", str(seconds + 2), "--rate", str(rate)
                )
            )
        )
        with Prober(d, pause=0.05, fresh=True) as probe:  # a new connection per call, as passtctl makes
            flooder.start()
            time.sleep(1.5)  # the flows have taken the descriptors by now
            fds_peak = d.fds()
            tcp_ok = iperf(t, 1)
            fresh = Ctl(d.ctl_path)
            status_ok = True
            try:
                fresh.status(timeout=5)
            except Exception:  # an RpcError
                status_ok = False
            fresh.close()
            flooder.join(seconds + 60)
        r.add(
            f"nofile 300: UDP to many ports, {result['sent']} frames; descriptors {fds0} -> {fds_peak}; "
            f"TCP through passtd during the flood {tcp_ok:.2f} Gbit/s; control {probe.summary()}; "
            f"GetStatus on a new connection during the flood {'ok' if status_ok else 'FAILED'}; log: "
            f"{d.log_count('Too many open files')} 'Too many open files', {d.tracebacks()} tracebacks"
        )
        took = _settle(d, 30)
        r.add(f"nofile 300: after expiry ({took:.1f} s) descriptors {d.fds()}, TCP {iperf(t, 1):.2f} Gbit/s")
        if d.proc.poll() is not None:
            r.problem(f"nofile: passtd exited with {d.proc.returncode}")
        if not status_ok or probe.failures:
            r.problem(f"nofile: control calls failed under descriptor exhaustion: {probe.failures}")
        if d.tracebacks():
            r.problem(f"nofile: {d.tracebacks()} tracebacks in the log ({d.log})")
        if tcp_ok == 0:
            r.problem("nofile: a TCP transfer through passtd failed while the UDP flood held the descriptors")
    finally:
        stop_passtd(t, d)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "inject":
        return inject_main(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=1_000_000, help="mutated frames in all (half per mode)")
    p.add_argument("--phases", default="control,fuzz,floods,nofile")
    p.add_argument("--seconds", type=float, default=5, help="length of each transfer")
    p.add_argument("--rate", type=float, default=20000, help="flood frames/s")
    p.add_argument("--passtd-root", type=Path, default=ROOT, help="the checkout whose passtd runs")
    a = p.parse_args()
    if os.geteuid() != 0:
        out("soak/run.py: error: needs root (network namespaces)", file=sys.stderr)
        return 2
    phases = [x for x in a.phases.split(",") if x]
    unknown = set(phases) - {"control", "fuzz", "floods", "nofile"}
    if unknown:
        out(f"soak/run.py: error: unknown phase {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    r = Report()
    started = time.monotonic()
    tmp = Path(sh("mktemp", "-d", "/tmp/passtd-soak.XXXXXX").strip())
    log(f"soak: passtd from {a.passtd_root}, logs in {tmp}")
    with topology(tmp) as t:
        for phase in phases:
            try:
                if phase == "control":
                    phase_control(t, a.passtd_root, r, a.seconds)
                elif phase == "fuzz":
                    phase_fuzz(t, a.passtd_root, r, a.frames)
                elif phase == "floods":
                    phase_floods(t, a.passtd_root, r, a.seconds, a.rate)
                else:
                    phase_nofile(t, a.passtd_root, r, a.seconds, a.rate)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                r.problem(f"{phase}: {exc}")
    out(f"\n== soak figures ({time.monotonic() - started:.0f} s) ==")
    for text in r.lines:
        out(text)
    out(f"== {len(r.problems)} problem(s) ==")
    for text in r.problems:
        out(text)
    return 1 if r.problems else 0


if __name__ == "__main__":
    sys.exit(main())
