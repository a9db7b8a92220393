"""`-t all`: tens of thousands of listeners, measured; running out of descriptors is reported, not fatal."""

from __future__ import annotations

import os
import resource
import time

import pytest

from tests.netns.conftest import Topology, sh, wait_for

pytestmark = [pytest.mark.netns, pytest.mark.slow]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def reachable(ns: str, port: int) -> bool:
    out = sh("python3", "-c", f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()",
             ns=ns, check=False, timeout=10)  # fmt: skip
    return out.returncode == 0


def test_all_ports_start_up_time_and_memory(topo: Topology) -> None:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    ports = min(limit - 500, 60000)  # this sandbox's hard limit caps how many sockets one process may hold
    sh("sysctl", "-qw", f"net.ipv4.ip_local_port_range={ports + 1} 65535", ns=topo.host)
    base = topo.passtd("passt", "-f", "-s", str(topo.tmp / "idle.sock"), "--control", "none")
    wait_for(lambda: (topo.tmp / "idle.sock").exists(), 10, "idle passtd")
    idle_rss = rss_kib(base.proc.pid)
    base.stop()
    t0 = time.monotonic()
    daemon = topo.passtd(
        "passt",
        "-f",
        "-s",
        str(topo.tmp / "p.sock"),
        "--control",
        "none",
        "-t",
        "0.0.0.0/~65535",
        "-u",
        "none",
    )

    def ready() -> bool:
        assert daemon.proc.poll() is None, daemon.output()
        return reachable(topo.host, ports)

    wait_for(ready, 120, f"port {ports} forwarded", interval=0.5)
    elapsed = time.monotonic() - t0
    rss = rss_kib(daemon.proc.pid)
    fds = len(os.listdir(f"/proc/{daemon.proc.pid}/fd"))
    per_port = (rss - idle_rss) / ports
    failed = daemon.output().count("forward.bind.failed")
    print(f"\n-t all: {ports} ports, {fds} fds, start-up {elapsed:.1f} s, RSS {rss / 1024:.1f} MiB "
          f"(idle {idle_rss / 1024:.1f} MiB, {per_port:.2f} KiB/port), {failed} binds failed")  # fmt: skip
    assert fds >= ports
    assert failed == 0
    assert elapsed < 60
    assert per_port < 8  # KiB: listeners must stay cheap
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0


def test_running_out_of_descriptors_is_reported(topo: Topology) -> None:
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    daemon = topo.passtd("passt", "-f", "-s", str(topo.tmp / "p.sock"), "--control", "none",
                         "-t", f"1-{min(limit + 1000, 65535)}")  # fmt: skip
    wait_for(lambda: "EMFILE" in daemon.output() or daemon.proc.poll() is not None, 120, "EMFILE report")
    assert daemon.proc.poll() is None, daemon.output()
    assert reachable(topo.host, 1)  # what could be bound is served
    assert daemon.stop() == 0
