"""passt mode over vhost-user, driven by the benchmark's front end (bench/vhost_front.py): the guest is a
namespace's own kernel stack on a tap, its frames cross passtd's virtio rings in shared memory.

This is what the bench's `passtd-vhost` lines stand on, checked for correctness: ARP for the gateway, a TCP
connection each way with sha256-checked data both ways, and 64 KiB TSO segments crossing the rings at MTU
1500 in both directions. Receive buffers are 2 KiB, so every super-segment spans many mergeable buffers.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.conftest import HOST4, REMOTE4, Topology, ip_json, sh, wait_for
from tests.netns.test_tcp import connect, digest, serve

pytestmark = pytest.mark.netns
FRONT = str(Path(__file__).resolve().parents[2] / "bench" / "vhost_front.py")
IF = "eth0"
MTU = 1500
PORT_OUT, PORT_IN = 20011, 20012
SIZE = 4 * 1024 * 1024


def start_front(topo: Topology, sock: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        ["ip", "netns", "exec", topo.guest, sys.executable, FRONT, str(sock), IF, "--time", "60",
         "--buf", "2048"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    topo.pids.append(proc.pid)  # killed by the fixture if the test fails before it is stopped
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("ready"), line + (proc.stderr.read() if proc.stderr else "")
    return proc


def stop_front(proc: subprocess.Popen[str]) -> dict[str, int]:
    """SIGTERM, then the counters the front end prints on its way out."""
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    last = err.strip().splitlines()[-1]
    return {k: int(v) for k, v in (f.split("=") for f in last.split()) if v.isdigit()}


def test_front_end_moves_arp_and_tcp_both_ways_with_tso(topo: Topology) -> None:
    sock = topo.tmp / "vhost.sock"
    daemon = topo.passtd("passt", "--vhost-user", "-f", "-s", str(sock), "-m", str(MTU),
                         "-t", f"{PORT_IN}:{PORT_IN}", "-u", "none", "--control", "none")  # fmt: skip
    wait_for(lambda: sock.exists() or daemon.proc.poll() is not None, 15, "the vhost-user socket")
    assert daemon.proc.poll() is None, daemon.output()
    front = start_front(topo, sock)
    sh("ip", "link", "set", IF, "mtu", str(MTU), "up", ns=topo.guest)
    sh("ip", "addr", "add", f"{HOST4}/24", "dev", IF, ns=topo.guest)
    sh("ip", "route", "add", "default", "via", REMOTE4, ns=topo.guest)

    # guest → host's loopback (the gateway address); the first frames are an ARP request and its reply
    srv = serve(topo, topo.host, "127.0.0.1", PORT_OUT, timeout=60, size=SIZE, seed=2)
    out = connect(topo, topo.guest, REMOTE4, PORT_OUT, timeout=60, size=SIZE, seed=1).result()
    assert (out["rx_len"], out["rx_sha"]) == (SIZE, digest(SIZE, 2))
    got = srv.result()
    assert (got["rx_len"], got["rx_sha"]) == (SIZE, digest(SIZE, 1))
    neigh = ip_json(topo.guest, "neigh", "show", REMOTE4, "dev", IF)
    assert neigh and neigh[0].get("lladdr"), neigh

    # host → a forwarded port → the guest
    srv = serve(topo, topo.guest, "0.0.0.0", PORT_IN, timeout=60, size=SIZE, seed=4)
    out = connect(topo, topo.host, "127.0.0.1", PORT_IN, timeout=60, size=SIZE, seed=3).result()
    assert (out["rx_len"], out["rx_sha"]) == (SIZE, digest(SIZE, 4))
    got = srv.result()
    assert (got["rx_len"], got["rx_sha"]) == (SIZE, digest(SIZE, 3))

    time.sleep(0.1)
    stats = stop_front(front)
    assert daemon.proc.poll() is None, daemon.output()
    # Super-segments crossed both ways although the link's MTU is 1500 (payload + headers of one segment)
    assert stats["tx_max"] > 2 * MTU, stats
    assert stats["rx_max"] > 2 * MTU, stats
