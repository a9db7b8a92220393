"""Guest services end to end in real namespaces: DNS through a resolver on the host's loopback, as on a
systemd-resolved desktop, with a real DHCP client (busybox udhcpc) and a real resolver client (nslookup)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.conftest import REMOTE4, Topology, sh

pytestmark = pytest.mark.netns
IF = "eth0"
ANSWER = "192.0.2.77"

# A tiny resolver: answers every A query with ANSWER, at most 8 times, and gives up after 30 s of silence.
RESOLVER = f"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
s.settimeout(30)
print("ready", flush=True)
for _ in range(8):
    try:
        q, peer = s.recvfrom(512)
    except socket.timeout:
        break
    qid = struct.unpack("!H", q[:2])[0]
    end = 12
    while end < len(q) and q[end]:
        end += q[end] + 1
    question = q[12:end + 5]
    answer = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton("{ANSWER}")
    s.sendto(struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + answer, peer)
    print("query from", peer[0], flush=True)
"""


def start_resolver(topo: Topology, addr: str) -> subprocess.Popen[str]:
    server = subprocess.Popen(
        ["ip", "netns", "exec", topo.host, sys.executable, "-c", RESOLVER, addr],
        stdout=subprocess.PIPE,
        text=True,
    )
    topo.pids.append(server.pid)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    return server


def udhcpc_env(topo: Topology) -> dict[str, str]:
    dump = topo.tmp / "udhcpc.env"
    script = topo.tmp / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {dump}\nexit 0\n')
    script.chmod(0o755)
    sh("busybox", "udhcpc", "-i", IF, "-n", "-q", "-f", "-t", "3", "-T", "2", "-s", str(script),
       ns=topo.guest, timeout=30)  # fmt: skip
    return dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)


def test_loopback_only_resolver_reaches_the_guest_through_the_gateway(topo: Topology) -> None:
    """Host's only nameserver is 127.0.0.53: DHCP offers the gateway, and a query to it is answered by the
    resolver on the host's loopback (the one the test runs), coming back from the gateway."""
    Path(f"/etc/netns/{topo.host}/resolv.conf").write_text("nameserver 127.0.0.53\n")
    server = start_resolver(topo, "127.0.0.53")
    try:
        topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--config-net", wait_tap=IF)
        env = udhcpc_env(topo)
        assert env["router"].split() == [REMOTE4]
        assert env["dns"].split() == [REMOTE4]  # the gateway, standing for the host's loopback resolver
        out = sh("busybox", "nslookup", "-type=a", "www.passtd.test", REMOTE4, ns=topo.guest, timeout=20,
                 check=False)  # fmt: skip
        assert ANSWER in out.stdout, out.stdout + out.stderr
    finally:
        server.kill()
        seen = server.communicate(timeout=5)[0]
    assert "query from 127.0.0.1" in seen or "query from 10.77.0.1" in seen, seen


def test_loopback_resolver_left_out_with_no_map_gw(topo: Topology) -> None:
    """--no-map-gw: there is no guest-side address for the host's loopback, so no nameserver is offered."""
    Path(f"/etc/netns/{topo.host}/resolv.conf").write_text("nameserver 127.0.0.53\n")
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--no-map-gw", wait_tap=IF)
    env = udhcpc_env(topo)
    assert env["router"].split() == [REMOTE4]
    assert "dns" not in env
