"""Side-by-side benchmark: passtd against Debian's pasta/passt and slirp4netns, in one run, alternating tools.

Run as root from the repository root: `.venv/bin/python bench/run.py [--quick]`. See bench/README.md for what
each line measures. Everything runs in namespaces this script creates (`pdb-<random>-{h,r,g}`) and on their
loopback; nothing is sent anywhere else, every process is bounded in time and ended by its PID, and every
process is pinned to one CPU (children inherit the affinity) so that scheduling across CPUs does not swamp the
figures. Only ratios measured in the same run are meaningful.

    guest ns (pdb-X-g) ──tap── tool in host ns (pdb-X-h: 10.77.0.1/24, lo) ──veth── remote ns (pdb-X-r)

The remote namespace only provides the host namespace with a default route (the tools copy address and gateway
from it); the benchmark's traffic goes to the gateway address, which every tool maps to the host's loopback.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # for tests.helpers.topology, when run as a script
from tests.helpers.procs import Procs, run_checked  # noqa: E402
from tests.helpers.topology import HOST4, REMOTE4, namespaces  # noqa: E402

BENCH = Path(__file__).resolve().parent
PEER = str(BENCH / "peer.py")
RELAY = str(BENCH / "relay.py")
FRONT = str(BENCH / "vhost_front.py")
PY = sys.executable
IF = "eth0"
FWD_HOST_PORT, FWD_GUEST_PORT = 20101, 5201
# Forwarded to a server in the guest for the host-initiated round-trip and connection lines (TCP and UDP), and
# the port a guest reaches on the host's loopback through -T (pasta mode).
FWD_RR_HOST_PORT, FWD_RR_GUEST_PORT = 20103, 5213
FWD_UDP_HOST_PORT, FWD_UDP_GUEST_PORT = 20104, 5214
P_NS_TO_HOST = 5215
P_TCP_OUT, P_RR, P_UDP_RR, P_UDP, P_HOLD = 5202, 5203, 5204, 5205, 5206
HOLD_CONNS = 10_000
CLK_TCK = os.sysconf("SC_CLK_TCK")

# metric -> (label, unit, higher_is_better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "tcp_out_gbps": ("TCP ns→host through the tap", "Gbit/s", True),
    "tcp_in_gbps": ("TCP host→ns through the tap (-R)", "Gbit/s", True),
    "tcp_fwd_gbps": ("TCP host→ns, forwarded loopback port", "Gbit/s", True),
    "tcp_rr_mean_us": ("TCP request/response, mean", "µs", False),
    "tcp_rr_p99_us": ("TCP request/response, p99", "µs", False),
    "cps": ("TCP connect+request+close", "conn/s", True),
    "tcp_rr_usr_us": ("tool user CPU per TCP round trip", "µs", False),
    "tcp_rr_sys_us": ("tool system CPU per TCP round trip", "µs", False),
    "cps_usr_us": ("tool user CPU per connection", "µs", False),
    "cps_sys_us": ("tool system CPU per connection", "µs", False),
    "udp_rr_mean_us": ("UDP request/response, mean", "µs", False),
    "udp_rr_p99_us": ("UDP request/response, p99", "µs", False),
    # Host-initiated, through a forwarded port: from the host's loopback (pasta splices it) and from another
    # host (crosses the tap); -T: the namespace's loopback to the host's; UDP from the host into the guest.
    "fwd_lo_rr_mean_us": ("TCP request/response host lo→fwd port", "µs", False),
    "fwd_lo_cps": ("TCP connections host lo→fwd port", "conn/s", True),
    "fwd_lo_cps_usr_us": ("tool user CPU per connection, host lo→fwd port", "µs", False),
    "fwd_lo_cps_sys_us": ("tool system CPU per connection, host lo→fwd port", "µs", False),
    "fwd_tap_rr_mean_us": ("TCP request/response remote→fwd port (tap)", "µs", False),
    "fwd_tap_cps": ("TCP connections remote→fwd port (tap)", "conn/s", True),
    "fwd_tap_cps_usr_us": ("tool user CPU per connection, remote→fwd port", "µs", False),
    "fwd_tap_cps_sys_us": ("tool system CPU per connection, remote→fwd port", "µs", False),
    "ns_lo_rr_mean_us": ("TCP request/response ns lo→host lo (-T)", "µs", False),
    "ns_lo_cps": ("TCP connections ns lo→host lo (-T)", "conn/s", True),
    "ns_lo_cps_usr_us": ("tool user CPU per connection, ns lo→host lo", "µs", False),
    "ns_lo_cps_sys_us": ("tool system CPU per connection, ns lo→host lo", "µs", False),
    "udp_rr_in_mean_us": ("UDP request/response host lo→fwd port", "µs", False),
    "udp_gbps": ("UDP ns→host received at fixed rate", "Gbit/s", True),
    "udp_loss_pct": ("UDP ns→host loss at fixed rate", "%", False),
    "tcp_out_cpu_s_per_gb": ("tool CPU per GB, TCP ns→host", "s/GB", False),
    "tcp_in_cpu_s_per_gb": ("tool CPU per GB, TCP host→ns", "s/GB", False),
    "tcp_fwd_cpu_s_per_gb": ("tool CPU per GB, forwarded port", "s/GB", False),
    # passt mode: what plays qemu (bench/relay.py, bench/vhost_front.py) shares the CPU with the tool
    "tcp_out_front_cpu_s_per_gb": ("qemu stand-in CPU per GB, TCP ns→host", "s/GB", False),
    "tcp_in_front_cpu_s_per_gb": ("qemu stand-in CPU per GB, TCP host→ns", "s/GB", False),
    "rl_out_1m_ratio": ("TCP ns→host at a 1 Mbit/s egress limit, measured/limit", "ratio", True),
    "rl_in_1m_ratio": ("TCP host→ns at a 1 Mbit/s ingress limit, measured/limit", "ratio", True),
    "rl_out_100m_ratio": ("TCP ns→host at a 100 Mbit/s egress limit, measured/limit", "ratio", True),
    "rl_in_100m_ratio": ("TCP host→ns at a 100 Mbit/s ingress limit, measured/limit", "ratio", True),
    "rl_out_1g_ratio": ("TCP ns→host at a 1 Gbit/s egress limit, measured/limit", "ratio", True),
    "rl_in_1g_ratio": ("TCP host→ns at a 1 Gbit/s ingress limit, measured/limit", "ratio", True),
    "rss_idle_mib": ("tool RSS, idle", "MiB", False),
    "rss_10k_mib": (f"tool RSS, {HOLD_CONNS} open TCP connections", "MiB", False),
}
PATH_LINES = ["fwd_lo_rr", "fwd_lo_cps", "fwd_tap_rr", "fwd_tap_cps", "ns_lo_rr", "ns_lo_cps", "udp_rr_in"]
ALL_LINES = [
    "tcp_out",
    "tcp_in",
    "tcp_fwd",
    "tcp_rr",
    "cps",
    "udp_rr",
    "udp",
    *PATH_LINES,
    "rss",
    "ratelimit",
]
QUICK_LINES = ["tcp_out", "tcp_in", "tcp_fwd", "tcp_rr", "cps", "udp_rr", "udp", *PATH_LINES]
PASST_MODE_LINES = ["tcp_out", "tcp_in", "tcp_fwd", "tcp_rr", "cps", "udp_rr",
                    "fwd_lo_rr", "fwd_lo_cps", "fwd_tap_rr", "fwd_tap_cps", "udp_rr_in"]  # fmt: skip
# Below the largest passt-mode MTU only the throughput lines run: vhost-user carries 64 KiB TSO segments at
# any MTU and the stream socket cannot, which is what these compare; the other lines do not depend on it.
PASST_MODE_SMALL_MTU_LINES = ["tcp_out", "tcp_in"]


class BenchError(Exception):
    """A line that could not be measured; recorded in the notes, never fatal for the run."""


def log(msg: str) -> None:
    sys.stderr.write(f"[{time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def sh(*argv: str, timeout: float = 20, check: bool = True) -> str:
    return run_checked(*argv, timeout=timeout, check=check, error=BenchError)


# ------------------------------------------------------------------------------------------------- processes


def what(proc: subprocess.Popen[str]) -> str:
    """A short name for a process in messages: the command after `ip netns exec NS`."""
    args = proc.args if isinstance(proc.args, list) else [str(proc.args)]
    return " ".join(str(x) for x in args[4:7])


_pending: dict[int, bytes] = {}


def read_line(proc: subprocess.Popen[str], want: str, timeout: float) -> str:
    """The first stdout line containing `want`, waiting at most `timeout` seconds.

    Reads the pipe's descriptor directly (a buffered reader behind select() would hide lines it already
    holds); never mix with communicate() on the same process.
    """
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = _pending.pop(proc.pid, b"")
    while True:
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if want.encode() in line:
                _pending[proc.pid] = buf
                return line.decode(errors="replace").strip()
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    raise BenchError(f"no '{want}' from {what(proc)} within {timeout}s (exit {proc.poll()})")


def finish_json(proc: subprocess.Popen[str], timeout: float) -> dict[str, Any]:
    """Wait for a peer or iperf3 to exit and parse the JSON it printed last."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise BenchError(f"{what(proc)} did not finish within {timeout}s") from None
    text = out.strip()
    if not text:
        raise BenchError(f"{what(proc)} printed nothing (exit {proc.returncode}): {(err or '')[:300]}")
    try:  # iperf3 -J prints one multi-line document, the peers one JSON line last
        data = json.loads(text if what(proc).startswith("iperf3") else text.splitlines()[-1])
    except json.JSONDecodeError as exc:
        raise BenchError(f"{what(proc)}: unparsable output: {text[-300:]}") from exc
    if not isinstance(data, dict):
        raise BenchError(f"{what(proc)}: unexpected output")
    if "error" in data:
        raise BenchError(f"iperf3: {data['error']}")
    return data


def cpu_seconds(pid: int) -> float:
    """utime+stime (and reaped children's) of a process, from /proc (10 ms resolution)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return sum(int(x) for x in fields[11:15]) / CLK_TCK


def cpu_split(pid: int) -> tuple[float, float]:
    """(user, system) seconds of a process: user is the tool's own code (Python for passtd), system also
    holds the peers' kernel work done inside its syscalls (loopback and tap delivery)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def per_op_cpu(key: str, pid: int, before: tuple[float, float], ops: float) -> dict[str, float]:
    """Tool CPU µs per operation (round trip, connection), user and system apart."""
    if not pid or ops <= 0:
        return {}
    after = cpu_split(pid)
    return {
        f"{key}_usr_us": (after[0] - before[0]) / ops * 1e6,
        f"{key}_sys_us": (after[1] - before[1]) / ops * 1e6,
    }


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for {pid}")


# ------------------------------------------------------------------------------------------------- topology


@dataclass
class Topo:
    host: str
    remote: str
    guest: str
    veth: str
    tmp: Path


@contextlib.contextmanager
def topology(tmp: Path) -> Iterator[Topo]:
    """The tests' namespaces (tests/helpers/topology.py), with TIME-WAIT reuse for the connection lines."""
    with namespaces("pdb") as n:
        t = Topo(n.host, n.remote, n.guest, n.veth, tmp)
        for ns in (t.host, t.guest):
            sh("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1")
        yield t


def wait_guest_ready(t: Topo, proc: subprocess.Popen[str], timeout: float = 15) -> str:
    """Wait until the guest's interface is up with an IPv4 address and a default route; return the gateway."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what(proc)} exited with {proc.returncode}")
        routes = json.loads(sh("ip", "-n", t.guest, "-j", "-4", "route", "show", "default") or "[]")
        addrs = json.loads(
            sh("ip", "-n", t.guest, "-j", "-4", "addr", "show", "dev", IF, check=False) or "[]"
        )
        if routes and routes[0].get("gateway") and any(a.get("addr_info") for a in addrs):
            return str(routes[0]["gateway"])
        time.sleep(0.05)
    raise BenchError(f"guest interface not configured within {timeout}s")


# ------------------------------------------------------------------------------------------------- tools


@dataclass
class Running:
    pid: int
    gw: str
    extra: list[subprocess.Popen[str]] = field(default_factory=list)


@dataclass
class Tool:
    name: str
    group: str  # "pasta" (tap in a namespace) or "passt" (UNIX socket, through bench/relay.py)
    start: Callable[[Topo, Procs, int], Running]
    unsupported: frozenset[str] = frozenset()  # lines the tool has no way to do (slirp4netns has no -T)


def _fwd_spec() -> str:
    """Every host address (so another host reaches the guest across the tap, and the host's loopback too)."""
    return f"{FWD_HOST_PORT}:{FWD_GUEST_PORT},{FWD_RR_HOST_PORT}:{FWD_RR_GUEST_PORT}"


def _udp_fwd_spec() -> str:
    return f"{FWD_UDP_HOST_PORT}:{FWD_UDP_GUEST_PORT}"


def _finish_pasta_like(t: Topo, procs: Procs, proc: subprocess.Popen[str], mtu: int) -> Running:
    gw = wait_guest_ready(t, proc)
    sh("ip", "-n", t.guest, "link", "set", IF, "mtu", str(mtu))
    return Running(proc.pid, gw)


def limits_file(t: Topo) -> Path:
    """passtd's config file: only a [limits] table, rewritten by the ratelimit line and applied on SIGHUP
    (no control socket: the other lines measure passtd as it runs without one)."""
    return t.tmp / "passtd-limits.toml"


def start_passtd(t: Topo, procs: Procs, mtu: int) -> Running:
    limits_file(t).write_text("")
    proc = procs.spawn(
        t.host, PY, "-m", "passtd", "pasta", "-f", "-q", "-I", IF, "--netns", t.guest, "--config-net",
        "-m", str(mtu), "-t", _fwd_spec(), "-u", _udp_fwd_spec(), "-T", str(P_NS_TO_HOST), "-U", "none",
        "--no-icmp", "--control", "none", "--config", str(limits_file(t)), log_name="passtd.log", cwd=ROOT,
    )  # fmt: skip
    return _finish_pasta_like(t, procs, proc, mtu)


def start_pasta(t: Topo, procs: Procs, mtu: int) -> Running:
    proc = procs.spawn(
        t.host, "pasta", "-f", "-q", "--runas", "0", "-I", IF, "--netns", t.guest, "--config-net",
        "-m", str(mtu), "-t", _fwd_spec(), "-u", _udp_fwd_spec(), "-T", str(P_NS_TO_HOST), "-U", "none",
        "--no-icmp", log_name="pasta.log",
    )  # fmt: skip
    return _finish_pasta_like(t, procs, proc, mtu)


def start_slirp(t: Topo, procs: Procs, mtu: int) -> Running:
    rfd, wfd = os.pipe()
    api = str(t.tmp / "slirp.sock")
    try:
        proc = procs.spawn(
            t.host, "slirp4netns", "--configure", "--mtu", str(mtu), "--netns-type=path", f"--ready-fd={wfd}",
            f"--api-socket={api}", "--disable-dns", f"/run/netns/{t.guest}", IF,
            pass_fds=(wfd,), log_name="slirp4netns.log",
        )  # fmt: skip
        os.close(wfd)
        wfd = -1
        ready, _, _ = select.select([rfd], [], [], 15)
        if not ready or os.read(rfd, 1) != b"1":
            raise BenchError("slirp4netns did not signal readiness")
    finally:
        os.close(rfd)
        if wfd >= 0:
            os.close(wfd)
    for proto, host_port, guest_port in (
        ("tcp", FWD_HOST_PORT, FWD_GUEST_PORT),
        ("tcp", FWD_RR_HOST_PORT, FWD_RR_GUEST_PORT),
        ("udp", FWD_UDP_HOST_PORT, FWD_UDP_GUEST_PORT),
    ):
        req = {"execute": "add_hostfwd", "arguments": {"proto": proto, "host_addr": "0.0.0.0",
               "host_port": host_port, "guest_port": guest_port}}  # fmt: skip
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(5)
            s.connect(api)
            s.sendall(json.dumps(req).encode())
            s.shutdown(socket.SHUT_WR)
            reply = s.recv(4096).decode()
        if "error" in reply:
            raise BenchError(f"slirp4netns add_hostfwd: {reply}")
    return _finish_pasta_like(t, procs, proc, mtu)


def _start_passt_mode(t: Topo, procs: Procs, mtu: int, argv: list[str], name: str,
                      vhost: bool = False) -> Running:  # fmt: skip
    """The tool on a UNIX socket and, in the guest namespace, what plays qemu: bench/relay.py (the stream
    protocol) or bench/vhost_front.py (vhost-user)."""
    sock = str(t.tmp / f"{name}.sock")
    proc = procs.spawn(t.host, *argv, "-s", sock, log_name=f"{name}.log", cwd=ROOT)
    deadline = time.monotonic() + 15
    while not os.path.exists(sock):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise BenchError(f"{name} did not create its socket (exit {proc.poll()})")
        time.sleep(0.05)
    front = FRONT if vhost else RELAY
    relay = procs.spawn(t.guest, PY, front, sock, IF, "--time", "300", log_name=f"{name}-front.log")
    read_line(relay, "ready", 10)
    sh("ip", "-n", t.guest, "link", "set", IF, "mtu", str(mtu), "up")
    sh("ip", "-n", t.guest, "addr", "add", f"{HOST4}/24", "dev", IF)
    sh("ip", "-n", t.guest, "route", "add", "default", "via", REMOTE4)
    return Running(proc.pid, REMOTE4, [relay])


def start_passtd_passt(t: Topo, procs: Procs, mtu: int) -> Running:
    argv = [PY, "-m", "passtd", "passt", "-f", "-q", "-m", str(mtu), "-t", _fwd_spec(), "-u", _udp_fwd_spec(),
            "--no-icmp", "--control", "none"]  # fmt: skip
    return _start_passt_mode(t, procs, mtu, argv, "passtd-passt")


def start_passtd_vhost(t: Topo, procs: Procs, mtu: int) -> Running:
    argv = [PY, "-m", "passtd", "passt", "--vhost-user", "-f", "-q", "-m", str(mtu), "-t", _fwd_spec(),
            "-u", _udp_fwd_spec(), "--no-icmp", "--control", "none"]  # fmt: skip
    return _start_passt_mode(t, procs, mtu, argv, "passtd-vhost", vhost=True)


def start_passt(t: Topo, procs: Procs, mtu: int) -> Running:
    argv = ["passt", "-f", "-q", "--runas", "0", "-m", str(mtu), "-t", _fwd_spec(), "-u", _udp_fwd_spec(),
            "--no-icmp"]  # fmt: skip
    return _start_passt_mode(t, procs, mtu, argv, "passt")


NS_ONLY = frozenset({"ns_lo_rr", "ns_lo_cps"})  # -T: there is no namespace in passt mode
NO_LIMITS = frozenset({"ratelimit"})  # rate limits are passtd's own (and measured in pasta mode only)

TOOLS = {
    "passtd": Tool("passtd", "pasta", start_passtd),
    "pasta": Tool("pasta", "pasta", start_pasta, NO_LIMITS),
    "slirp4netns": Tool("slirp4netns", "pasta", start_slirp, NS_ONLY | NO_LIMITS),  # and it has no -T
    "passtd-passt": Tool("passtd-passt", "passt", start_passtd_passt, NS_ONLY | NO_LIMITS),
    "passtd-vhost": Tool("passtd-vhost", "passt", start_passtd_vhost, NS_ONLY | NO_LIMITS),
    "passt": Tool("passt", "passt", start_passt, NS_ONLY | NO_LIMITS),
}
REFERENCE = {"passtd": ["pasta", "slirp4netns"], "passtd-passt": ["passt"],
             "passtd-vhost": ["passtd-passt", "passt"]}  # fmt: skip


# ------------------------------------------------------------------------------------------------- lines


@dataclass
class Ctx:
    topo: Topo
    procs: Procs
    run: Running
    mtu: int
    duration: int
    rr_count: int
    cps_seconds: float


def iperf_server(c: Ctx, ns: str, bind: str, port: int) -> subprocess.Popen[str]:
    srv = c.procs.spawn(ns, "iperf3", "-s", "-1", "-B", bind, "-p", str(port), "--forceflush")
    read_line(srv, "listening", 5)
    return srv


def iperf(c: Ctx, key: str, client_ns: str, server_ns: str, bind: str, target: str, port: int,
          *extra: str, server_port: int = 0) -> dict[str, float]:  # fmt: skip
    srv = iperf_server(c, server_ns, bind, server_port or port)
    front = c.run.extra[0].pid if c.run.extra else 0
    try:
        front0 = cpu_seconds(front) if front else 0.0
        cpu0 = cpu_seconds(c.run.pid)
        argv = ["iperf3", "-c", target, "-p", str(port), "-t", str(c.duration), "-O", "1", "-J"]
        cli = c.procs.spawn(client_ns, *argv, "--connect-timeout", "3000", *extra)
        try:
            data = finish_json(cli, c.duration + 20)
        finally:
            c.procs.end(cli)
        cpu = cpu_seconds(c.run.pid) - cpu0
        front_cpu = cpu_seconds(front) - front0 if front else 0.0
    finally:
        c.procs.end(srv)
    end = data["end"]
    if "-u" in extra:
        s = end.get("sum", {})
        lost = float(s.get("lost_percent", 100.0))
        sent_bps = float(s.get("bits_per_second", 0.0))
        return {"udp_gbps": sent_bps * (1 - lost / 100) / 1e9, "udp_loss_pct": lost}
    got = end["sum_received"]
    out = {f"{key}_gbps": float(got["bits_per_second"]) / 1e9}
    # CPU is sampled around the whole client run, so divide by every byte of it, the omitted warm-up included
    # (the client's intervals: bytes sent, or received with -R).
    gbytes = sum(float(i["sum"]["bytes"]) for i in data.get("intervals", [])) / 1e9
    if gbytes > 0.1:
        out[f"{key}_cpu_s_per_gb"] = cpu / gbytes
        if front:
            out[f"{key}_front_cpu_s_per_gb"] = front_cpu / gbytes
    return out


def line_tcp_out(c: Ctx) -> dict[str, float]:
    return iperf(c, "tcp_out", c.topo.guest, c.topo.host, "127.0.0.1", c.run.gw, P_TCP_OUT)


def line_tcp_in(c: Ctx) -> dict[str, float]:
    return iperf(c, "tcp_in", c.topo.guest, c.topo.host, "127.0.0.1", c.run.gw, P_TCP_OUT, "-R")


def line_tcp_fwd(c: Ctx) -> dict[str, float]:
    return iperf(c, "tcp_fwd", c.topo.host, c.topo.guest, "0.0.0.0", "127.0.0.1", FWD_HOST_PORT,
                 server_port=FWD_GUEST_PORT)  # fmt: skip


def peer_server(c: Ctx, mode: str, port: int, *args: str, ns: str = "", bind: str = "127.0.0.1"
                ) -> subprocess.Popen[str]:  # fmt: skip
    """A bench/peer.py server, in the host namespace on its loopback unless told otherwise."""
    srv = c.procs.spawn(ns or c.topo.host, PY, PEER, mode, bind, str(port), *args, "--time", "60")
    read_line(srv, "ready", 5)
    return srv


def peer_client(c: Ctx, mode: str, port: int, *args: str, timeout: float = 30, ns: str = "",
                target: str = "") -> dict[str, Any]:  # fmt: skip
    """A bench/peer.py client, in the guest toward the gateway unless told otherwise; its JSON result."""
    cli = c.procs.spawn(ns or c.topo.guest, PY, PEER, mode, target or c.run.gw, str(port), *args,
                        "--time", str(timeout))  # fmt: skip
    try:
        return finish_json(cli, timeout + 10)
    finally:
        c.procs.end(cli)


@dataclass(frozen=True)
class Route:
    """Where a request/response or connection line runs: the server's side and the client's way to it."""

    server_ns: str
    bind: str
    server_port: int
    client_ns: str
    target: str
    port: int


def guest_to_host(c: Ctx, port: int) -> Route:
    """The guest connects to the gateway, which means the host's loopback."""
    return Route(c.topo.host, "127.0.0.1", port, c.topo.guest, c.run.gw, port)


def rr(c: Ctx, key: str, path: Route, *, udp: bool = False, cpu: bool = True) -> dict[str, float]:
    """Mean and p99 of a ping-pong of small requests, and the tool's CPU per round trip."""
    srv = peer_server(c, "udp-server" if udp else "tcp-server", path.server_port, ns=path.server_ns,
                      bind=path.bind)  # fmt: skip
    try:
        cpu0 = cpu_split(c.run.pid) if c.run.pid else (0.0, 0.0)
        r = peer_client(c, "udp-rr" if udp else "tcp-rr", path.port, "--count", str(c.rr_count),
                        timeout=20 if udp else 30, ns=path.client_ns, target=path.target)  # fmt: skip
        used = per_op_cpu(key, c.run.pid, cpu0, r.get("count", 0) + r.get("warmup", 0)) if cpu else {}
    finally:
        c.procs.end(srv)
    if r.get("count", 0) < c.rr_count // 2:
        raise BenchError(f"{key}: {r.get('count', 0)} round trips completed, {r.get('lost', 0)} lost")
    return {f"{key}_mean_us": r["mean_us"], f"{key}_p99_us": r["p99_us"], **used}


def cps(c: Ctx, key: str, path: Route) -> dict[str, float]:
    """Connections per second (connect, one request and answer, close) and the tool's CPU per connection."""
    srv = peer_server(c, "tcp-server", path.server_port, ns=path.server_ns, bind=path.bind)
    try:
        cpu0 = cpu_split(c.run.pid) if c.run.pid else (0.0, 0.0)
        r = peer_client(c, "cps", path.port, "--count", "20000", "--duration", str(c.cps_seconds),
                        ns=path.client_ns, target=path.target)  # fmt: skip
        used = per_op_cpu(key, c.run.pid, cpu0, r["connections"])
    finally:
        c.procs.end(srv)
    if r["connections"] == 0:
        raise BenchError(f"{key}: no connection completed ({r['failed']} failed)")
    return {key: r["per_s"], **used}


def line_tcp_rr(c: Ctx) -> dict[str, float]:
    return rr(c, "tcp_rr", guest_to_host(c, P_RR))


def line_cps(c: Ctx) -> dict[str, float]:
    return cps(c, "cps", guest_to_host(c, P_RR))


def line_udp_rr(c: Ctx) -> dict[str, float]:
    return rr(c, "udp_rr", guest_to_host(c, P_UDP_RR), udp=True, cpu=False)


def fwd_from_lo(c: Ctx, host_port: int, guest_port: int) -> Route:
    """A host process connects to a forwarded port on the host's loopback (pasta splices this path)."""
    return Route(c.topo.guest, "0.0.0.0", guest_port, c.topo.host, "127.0.0.1", host_port)


def fwd_from_remote(c: Ctx) -> Route:
    """Another host connects to a forwarded port on the host's address: the flow crosses the tap."""
    return Route(c.topo.guest, "0.0.0.0", FWD_RR_GUEST_PORT, c.topo.remote, HOST4, FWD_RR_HOST_PORT)


def ns_lo_to_host_lo(c: Ctx) -> Route:
    """-T: a process in the namespace connects to its own loopback and reaches the host's."""
    return Route(c.topo.host, "127.0.0.1", P_NS_TO_HOST, c.topo.guest, "127.0.0.1", P_NS_TO_HOST)


def line_fwd_lo_rr(c: Ctx) -> dict[str, float]:
    return rr(c, "fwd_lo_rr", fwd_from_lo(c, FWD_RR_HOST_PORT, FWD_RR_GUEST_PORT))


def line_fwd_lo_cps(c: Ctx) -> dict[str, float]:
    return cps(c, "fwd_lo_cps", fwd_from_lo(c, FWD_RR_HOST_PORT, FWD_RR_GUEST_PORT))


def line_fwd_tap_rr(c: Ctx) -> dict[str, float]:
    return rr(c, "fwd_tap_rr", fwd_from_remote(c))


def line_fwd_tap_cps(c: Ctx) -> dict[str, float]:
    return cps(c, "fwd_tap_cps", fwd_from_remote(c))


def line_ns_lo_rr(c: Ctx) -> dict[str, float]:
    return rr(c, "ns_lo_rr", ns_lo_to_host_lo(c))


def line_ns_lo_cps(c: Ctx) -> dict[str, float]:
    return cps(c, "ns_lo_cps", ns_lo_to_host_lo(c))


def line_udp_rr_in(c: Ctx) -> dict[str, float]:
    return rr(c, "udp_rr_in", fwd_from_lo(c, FWD_UDP_HOST_PORT, FWD_UDP_GUEST_PORT), udp=True, cpu=False)


def udp_params(mtu: int) -> tuple[str, str]:
    """Offered rate and datagram size: fixed per MTU so every tool gets the same load."""
    return ("1G", "1400") if mtu <= 1500 else ("1G", "8000")


def line_udp(c: Ctx) -> dict[str, float]:
    rate, size = udp_params(c.mtu)
    return iperf(
        c, "udp", c.topo.guest, c.topo.host, "127.0.0.1", c.run.gw, P_UDP, "-u", "-b", rate, "-l", size
    )


def line_rss(c: Ctx) -> dict[str, float]:
    idle = rss_mib(c.run.pid)
    srv = c.procs.spawn(c.topo.host, PY, PEER, "hold-server", "127.0.0.1", str(P_HOLD),
                        "--count", str(HOLD_CONNS), "--time", "90", stdin=True)  # fmt: skip
    cli: subprocess.Popen[str] | None = None
    try:
        read_line(srv, "ready", 5)
        cli = c.procs.spawn(c.topo.guest, PY, PEER, "hold", c.run.gw, str(P_HOLD),
                            "--count", str(HOLD_CONNS), "--time", "90", stdin=True)  # fmt: skip
        line = read_line(cli, "connected", 75)
        n = int(line.split()[1])
        if n < HOLD_CONNS:
            raise BenchError(f"rss: only {n} of {HOLD_CONNS} connections opened")
        read_line(srv, "accepted", 15)
        time.sleep(0.5)
        held = rss_mib(c.run.pid)
    finally:
        for p in (cli, srv):
            if p is not None:
                c.procs.end(p)
    return {"rss_idle_mib": idle, "rss_10k_mib": held}


RATE_LIMITS = (("1m", 1_000_000), ("100m", 100_000_000), ("1g", 1_000_000_000))


def set_limits(c: Ctx, table: str) -> None:
    """Rewrite passtd's [limits] table and make it reload (SIGHUP); the reload is a few milliseconds."""
    limits_file(c.topo).write_text(table)
    os.kill(c.run.pid, signal.SIGHUP)
    time.sleep(0.5)


def line_ratelimit(c: Ctx) -> dict[str, float]:
    """Bulk TCP both ways under a limit at three rates: the receiver's rate over the run, after the usual 1 s
    warm-up (which takes the initial burst), over the limit. The 1 Mbit/s runs last at least 8 s: at MTU
    65520 a paced guest sends 64 KiB segments, half a second each at that rate."""
    out: dict[str, float] = {}
    try:
        for name, rate in RATE_LIMITS:
            for key, direction, extra in (("out", "egress", ()), ("in", "ingress", ("-R",))):
                set_limits(c, f"[limits]\n{direction} = {rate}\n")
                run = c if rate > 10_000_000 else replace(c, duration=max(c.duration, 8))
                metric = f"rl_{key}_{name}"
                got = iperf(run, metric, c.topo.guest, c.topo.host, "127.0.0.1", c.run.gw, P_TCP_OUT, *extra)
                bps = got[f"{metric}_gbps"] * 1e9
                out[f"{metric}_ratio"] = bps / rate
                log(f"  limit {direction} {rate / 1e6:g} Mbit/s: {bps / 1e6:.4g} Mbit/s, x{bps / rate:.3f}")
    finally:
        set_limits(c, "")
    return out


LINES: dict[str, Callable[[Ctx], dict[str, float]]] = {
    "tcp_out": line_tcp_out,
    "tcp_in": line_tcp_in,
    "tcp_fwd": line_tcp_fwd,
    "tcp_rr": line_tcp_rr,
    "cps": line_cps,
    "udp_rr": line_udp_rr,
    "udp": line_udp,
    "fwd_lo_rr": line_fwd_lo_rr,
    "fwd_lo_cps": line_fwd_lo_cps,
    "fwd_tap_rr": line_fwd_tap_rr,
    "fwd_tap_cps": line_fwd_tap_cps,
    "ns_lo_rr": line_ns_lo_rr,
    "ns_lo_cps": line_ns_lo_cps,
    "udp_rr_in": line_udp_rr_in,
    "rss": line_rss,
    "ratelimit": line_ratelimit,
}


# ------------------------------------------------------------------------------------------------- run


def pin_cpu(requested: int | None) -> int:
    allowed = sorted(os.sched_getaffinity(0))
    cpu = requested if requested is not None else (1 if 1 in allowed else allowed[-1])
    os.sched_setaffinity(0, {cpu})
    return cpu


def versions() -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version(), "kernel": platform.release()}
    for pkg in ("passt", "slirp4netns", "iperf3"):
        q = subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", pkg], capture_output=True, text=True, check=False
        )
        out[pkg] = q.stdout.strip() or "missing"
    return out


def git_rev() -> tuple[str, bool]:
    try:
        rev = sh("git", "-C", str(ROOT), "rev-parse", "--short", "HEAD").strip()
        dirty = bool(sh("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no").strip())
    except (BenchError, OSError):
        return "unknown", False
    return rev, dirty


def session_lines(a: argparse.Namespace, tool: Tool, rep: int, mtu: int) -> list[str]:
    """Which lines a session measures. RSS is deterministic enough for one sample per tool and MTU and costs
    about 30 s per reference tool, so it runs in the first repetition only; passt mode (through the relay
    or the vhost-user front end) runs at the MTUs in --passt-mtu only, and below the largest of them only
    its throughput lines."""
    chosen = a.lines.split(",") if a.lines else (QUICK_LINES if a.quick else ALL_LINES)
    lines = [x for x in chosen if x]
    if tool.group == "passt":
        if mtu not in a.passt_mtus:
            return []
        if not a.lines:
            lines = [x for x in lines if x in PASST_MODE_LINES]
            if mtu < max(a.passt_mtus):
                lines = [x for x in lines if x in PASST_MODE_SMALL_MTU_LINES]
    lines = [x for x in lines if x not in tool.unsupported]
    if rep > 0 and "rss" in lines and not a.lines:
        lines.remove("rss")
    return lines


def profiler(a: argparse.Namespace, procs: Procs, pid: int, tool: str, mtu: int, line: str
             ) -> subprocess.Popen[str] | None:  # fmt: skip
    """py-spy on passtd for the length of one line (`--profile DIR`): collapsed stacks, to read as text."""
    if not a.profile or not pid or not tool.startswith("passtd"):
        return None
    out = Path(a.profile) / f"{tool}-{mtu}-{line}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    # --native shows the compiled modules' C functions (otherwise their time lands in the nearest Python
    # frame), but stops passtd for every sample: figures of that run are not comparable.
    mode = "--native" if a.profile_native else "--nonblocking"
    spy = procs.spawn(None, a.py_spy, "record", "--pid", str(pid), "--format", "raw", "--rate", "500",
                      mode, "-o", str(out))  # fmt: skip
    time.sleep(0.5)  # py-spy attaches before the load starts
    return spy


def stop_profiler(spy: subprocess.Popen[str]) -> None:
    """SIGINT makes py-spy write what it sampled; then wait for it like any other process."""
    if spy.poll() is None:
        os.kill(spy.pid, signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            spy.wait(10)
    if spy.poll() is None:
        os.kill(spy.pid, signal.SIGKILL)
        spy.wait(5)


def session(tool: Tool, mtu: int, lines: list[str], a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """One tool at one MTU in fresh namespaces: every requested line once. Failures become notes."""
    values: dict[str, float] = {}
    errors: dict[str, str] = {}
    procs = Procs(tmp)
    try:
        with topology(tmp) as topo:
            try:
                running = tool.start(topo, procs, mtu)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                return {"values": {}, "errors": {"start": str(exc)}}
            ctx = Ctx(topo, procs, running, mtu, a.duration, a.rr_count, a.cps_seconds)
            for name in lines:
                spy = profiler(a, procs, running.pid, tool.name, mtu, name)
                try:
                    # Only the figures the table knows (a line may measure more, e.g. p99 of every path).
                    values.update((k, v) for k, v in LINES[name](ctx).items() if k in METRICS)
                except (BenchError, OSError, subprocess.SubprocessError, KeyError, ValueError) as exc:
                    errors[name] = f"{type(exc).__name__}: {exc}"
                finally:
                    if spy is not None:
                        stop_profiler(spy)
                if running.pid and not Path(f"/proc/{running.pid}").exists():
                    errors["exit"] = f"{tool.name} exited during {name}"
                    break
    finally:
        procs.end_all()
    return {"values": values, "errors": errors}


def summarise(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[tuple[str, int, str], list[float]] = {}
    for s in samples:
        groups.setdefault((s["metric"], s["mtu"], s["tool"]), []).append(s["value"])
    out = []
    for (metric, mtu, tool), vals in sorted(groups.items()):
        med = statistics.median(vals)
        out.append({"metric": metric, "mtu": mtu, "tool": tool, "n": len(vals), "median": med,
                    "min": min(vals), "max": max(vals)})  # fmt: skip
    return out


def ratios(summary: list[dict[str, Any]]) -> list[dict[str, Any]]:
    med = {(s["metric"], s["mtu"], s["tool"]): s["median"] for s in summary}
    out = []
    for (metric, mtu, tool), value in sorted(med.items()):
        for ref in REFERENCE.get(tool, []):
            other = med.get((metric, mtu, ref))
            if other:
                better = METRICS[metric][2]
                out.append({"metric": metric, "mtu": mtu, "tool": tool, "reference": ref,
                            "ratio": value / other, "higher_is_better": better})  # fmt: skip
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"


def table(summary: list[dict[str, Any]], tools: list[str]) -> str:
    by = {(s["metric"], s["mtu"], s["tool"]): s for s in summary}
    mtus = sorted({s["mtu"] for s in summary})
    rows: list[list[str]] = []
    for group, main, refs in (
        ("pasta", "passtd", ["pasta", "slirp4netns"]),
        ("passt", "passtd-passt", ["passt"]),
        ("vhost", "passtd-vhost", ["passtd-passt", "passt"]),
    ):
        cols = [t for t in [main, *refs] if t in tools]
        if not cols or (group == "vhost" and main not in cols):  # its references have their own table
            continue
        head = ["path (pinned to one CPU)", "MTU", *cols, *[f"{main}/{r}" for r in refs if r in cols]]
        rows.append(head)
        for metric, (label, unit, higher) in METRICS.items():
            for mtu in mtus:
                if not any((metric, mtu, t) in by for t in cols):
                    continue
                cells = [f"{label} [{unit}{'' if higher else ', lower better'}]", str(mtu)]
                for t in cols:
                    s = by.get((metric, mtu, t))
                    cells.append("-" if s is None else
                                 f"{fmt(s['median'])} ({fmt(s['min'])}-{fmt(s['max'])})" if s["n"] > 1 else
                                 fmt(s["median"]))  # fmt: skip
                for r in refs:
                    if r not in cols:
                        continue
                    a_, b_ = by.get((metric, mtu, main)), by.get((metric, mtu, r))
                    cells.append(f"{a_['median'] / b_['median']:.2f}" if a_ and b_ and b_["median"] else "-")
                rows.append(cells)
        rows.append([])
    if not rows:
        return "(no results)"
    widths = [max(len(r[i]) for r in rows if len(r) > i) for i in range(max(len(r) for r in rows))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)).rstrip() for r in rows)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 repetition, no RSS line, shorter runs")
    p.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    p.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, from: " + ", ".join(TOOLS))
    p.add_argument("--lines", help="comma-separated, from: " + ", ".join(LINES))
    p.add_argument("--mtu", default="1500,65520", help="comma-separated MTUs")
    p.add_argument(
        "--duration", type=int, help="seconds per iperf3 run after a 1 s omitted warm-up (4, quick 2)"
    )
    p.add_argument(
        "--rr-count", type=int, help="timed round trips per request/response line (5000, quick 2000)"
    )
    p.add_argument("--cps-seconds", type=float, help="seconds of connect loop (2, quick 1)")
    p.add_argument("--passt-mtu", default="1500,65520",
                   help="MTUs for the passt-mode tools (relay, vhost-user front end); below the largest, "
                        "TCP throughput only")  # fmt: skip
    p.add_argument("--cpu", type=int, help="CPU to pin everything to (default 1, else the last allowed)")
    p.add_argument("--budget", type=float, default=1200, help="stop starting sessions after BUDGET seconds")
    p.add_argument("--out", help="JSON path (default bench/results/<UTC date>-<git rev>.json)")
    p.add_argument("--no-save", action="store_true", help="do not write JSON unless --out is given")
    p.add_argument("--profile", help="record py-spy collapsed stacks of passtd per line into this directory")
    p.add_argument("--py-spy", default="py-spy", help="py-spy binary for --profile")
    p.add_argument("--profile-native", action="store_true",
                   help="--profile with C frames (compiled code); slows passtd while sampling")  # fmt: skip
    a = p.parse_args(argv)
    a.passt_mtus = [int(m) for m in a.passt_mtu.split(",") if m]
    a.reps = a.reps or (1 if a.quick else 3)
    a.duration = a.duration or (2 if a.quick else 4)
    a.rr_count = a.rr_count or (2000 if a.quick else 5000)
    a.cps_seconds = a.cps_seconds or (1.0 if a.quick else 2.0)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    if os.geteuid() != 0:
        log("bench/run.py needs root (network namespaces, taps)")
        return 2
    tools = [t for t in a.tools.split(",") if t]
    for t in tools:
        if t not in TOOLS:
            log(f"unknown tool {t}")
            return 2
    for line in (a.lines or "").split(","):
        if line and line not in LINES:
            log(f"unknown line {line}")
            return 2
    binaries = {"pasta": "pasta", "slirp4netns": "slirp4netns", "passt": "passt"}
    missing = [b for t, b in binaries.items() if t in tools and shutil.which(b) is None]
    if shutil.which("iperf3") is None:
        missing.append("iperf3")
    if missing:
        log(f"missing: {' '.join(missing)} (apt-get install passt slirp4netns iperf3)")
        return 2
    mtus = [int(m) for m in a.mtu.split(",")]
    cpu = pin_cpu(a.cpu)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # inherited: 10 000 connections need descriptors
    rev, dirty = git_rev()
    started = time.monotonic()
    samples: list[dict[str, Any]] = []
    notes: list[str] = []
    log(f"pinned to CPU {cpu}; tools {tools}; MTUs {mtus}; {a.reps} repetition(s)")
    with tempfile.TemporaryDirectory(prefix="pdb-") as tmpdir:
        tmp = Path(tmpdir)
        stopped = False
        for rep in range(a.reps):
            for mtu in mtus:
                order = tools[rep % len(tools) :] + tools[: rep % len(tools)]  # rotate who goes first
                for name in order:
                    if time.monotonic() - started > a.budget:
                        notes.append(
                            f"budget of {a.budget:.0f}s reached: stopped before rep {rep} mtu {mtu} {name}"
                        )
                        stopped = True
                        break
                    tool = TOOLS[name]
                    lines = session_lines(a, tool, rep, mtu)
                    if not lines:
                        continue
                    t0 = time.monotonic()
                    res = session(tool, mtu, lines, a, tmp)
                    for metric, value in res["values"].items():
                        samples.append(
                            {"rep": rep, "mtu": mtu, "tool": name, "metric": metric, "value": value}
                        )
                    for line, err in res["errors"].items():
                        notes.append(f"rep {rep} mtu {mtu} {name} {line}: {err}")
                    took = time.monotonic() - t0
                    log(f"rep {rep} mtu {mtu} {name}: {len(res['values'])} values, "
                        f"{len(res['errors'])} errors, {took:.1f}s")  # fmt: skip
                    for line, err in res["errors"].items():
                        log(f"  {line}: {err}")
                if stopped:
                    break
            if stopped:
                break
    summary = summarise(samples)
    result = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "git_rev": rev,
            "git_dirty": dirty,
            "pinned_cpu": cpu,
            "cpus_online": os.cpu_count(),
            "versions": versions(),
            "seconds": round(time.monotonic() - started, 1),
        },
        "config": {
            "quick": a.quick,
            "reps": a.reps,
            "tools": tools,
            "mtus": mtus,
            "iperf_seconds": a.duration,
            "iperf_omit_seconds": 1,
            "rr_count": a.rr_count,
            "rr_size": 64,
            "cps_seconds": a.cps_seconds,
            "udp_offered": {str(m): udp_params(m) for m in mtus},
            "passt_mode_mtus": a.passt_mtus,
            "rss_in_repetitions": [0],
            "hold_connections": HOLD_CONNS,
        },
        "metrics": {k: {"label": v[0], "unit": v[1], "higher_is_better": v[2]} for k, v in METRICS.items()},
        "samples": samples,
        "summary": summary,
        "ratios": ratios(summary),
        "notes": notes,
    }
    report = table(summary, tools) + "".join(f"\n  - {n}" for n in (["notes:", *notes] if notes else []))
    sys.stdout.write(report.replace("\n  - notes:", "\nnotes:") + "\n")
    if a.out or not a.no_save:
        day = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M")
        out = Path(a.out) if a.out else BENCH / "results" / f"{day}-{rev}{'-dirty' if dirty else ''}"
        if not a.out:
            out = out.with_name(out.name + ("-quick" if a.quick else "") + ".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
