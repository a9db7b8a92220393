"""UDP translation end to end: echo through passtd in every direction, big datagrams, DNS forwarding."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.conftest import FAR4, FAR6, HOST4, REMOTE4, REMOTE6, Topology, sh
from tests.netns.test_tcp import IF, Peer

pytestmark = pytest.mark.netns


@pytest.fixture
def pasta(topo: Topology) -> Topology:
    topo.passtd(
        "pasta", "-f", "-I", IF, "--netns", topo.guest, "--config-net", "-u", "21001-21009", wait_tap=IF
    )
    topo.wait_link_local(IF)
    return topo


def echo(topo: Topology, ns: str, host: str, port: int, count: int) -> Peer:
    return Peer(topo, ns, "udp-echo", host, str(port), "--count", str(count), timeout=60).wait_ready()


def client(topo: Topology, ns: str, host: str, port: int, count: int, size: int = 100) -> Peer:
    return Peer(
        topo, ns, "udp-client", host, str(port), "--count", str(count), "--size", str(size), timeout=60
    )


@pytest.mark.parametrize(("gw", "loopback"), [(REMOTE4, "127.0.0.1"), (REMOTE6, "::1")], ids=["v4", "v6"])
def test_guest_to_host_loopback(pasta: Topology, gw: str, loopback: str) -> None:
    server = echo(pasta, pasta.host, loopback, 6001, 1000)
    got = client(pasta, pasta.guest, gw, 6001, 1000).result()
    assert got["ok"] == 1000
    result = server.result()
    assert result["echoed"] == 1000
    assert result["peers"] == [f"{loopback}:{got['sport']}"]  # the guest's own source port


@pytest.mark.parametrize(
    ("loopback", "any_addr"), [("127.0.0.1", "0.0.0.0"), ("::1", "::")], ids=["v4", "v6"]
)
def test_host_to_guest_forwarded(pasta: Topology, loopback: str, any_addr: str) -> None:
    server = echo(pasta, pasta.guest, any_addr, 21001, 1000)
    got = client(pasta, pasta.host, loopback, 21001, 1000).result()
    assert got["ok"] == 1000
    peers = server.result()["peers"]
    assert len(peers) == 1 and peers[0].rsplit(":", 1)[0] in (
        REMOTE4,
        REMOTE6,
    )  # loopback shows as the gateway


@pytest.mark.parametrize("far", [FAR4, FAR6], ids=["v4", "v6"])
def test_guest_to_remote_keeps_source_port(pasta: Topology, far: str) -> None:
    server = echo(pasta, pasta.remote, far, 6002, 1000)
    got = client(pasta, pasta.guest, far, 6002, 1000).result()
    assert got["ok"] == 1000
    assert server.result()["peers"] == [f"{HOST4 if '.' in far else 'fd77::1'}:{got['sport']}"]


def test_remote_to_guest_forwarded(pasta: Topology) -> None:
    server = echo(pasta, pasta.guest, "0.0.0.0", 21002, 100)
    assert client(pasta, pasta.remote, HOST4, 21002, 100).result()["ok"] == 100
    assert server.result()["peers"][0].startswith(REMOTE4 + ":")


@pytest.mark.parametrize("direction", ["guest_to_host", "host_to_guest"])
def test_60000_byte_datagrams(pasta: Topology, direction: str) -> None:
    if direction == "guest_to_host":
        server = echo(pasta, pasta.host, "127.0.0.1", 6003, 20)
        got = client(pasta, pasta.guest, REMOTE4, 6003, 20, size=60000).result()
    else:
        server = echo(pasta, pasta.guest, "0.0.0.0", 21003, 20)
        got = client(pasta, pasta.host, "127.0.0.1", 21003, 20, size=60000).result()
    assert got["ok"] == 20
    assert server.result()["echoed"] == 20


def test_idle_flows_expire(topo: Topology) -> None:
    ctl = str(topo.tmp / "ctl.sock")
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--config-net", "--control", ctl, wait_tap=IF)
    server = echo(topo, topo.host, "127.0.0.1", 6004, 1)
    assert client(topo, topo.guest, REMOTE4, 6004, 1).result()["ok"] == 1
    server.result()

    def udp_flows() -> int:
        res = subprocess.run([sys.executable, "-m", "passtctl", "-c", ctl, "status", "-o", "json"],
                             capture_output=True, text=True, timeout=10, check=True)  # fmt: skip
        return int(json.loads(res.stdout)["flows"].get("udp", 0))

    assert udp_flows() == 1  # default idle timeout: 180 s


DNS_SERVER = """
import socket, struct
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("ready", flush=True)
for _ in range(4):
    q, peer = s.recvfrom(512)
    qid, flags, qd = struct.unpack("!HHH", q[:6])
    end = 12
    while q[end]:
        end += q[end] + 1
    question = q[12:end + 5]
    answer = b"\\xc0\\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes((10, 1, 2, 3))
    s.sendto(struct.pack("!HHHHHH", qid, 0x8180, 1, 1, 0, 0) + question + answer, peer)
"""


def test_dns_forwarding_reaches_the_hosts_resolver(topo: Topology) -> None:
    Path(f"/etc/netns/{topo.host}/resolv.conf").write_text("nameserver 127.0.0.1\n")
    server = subprocess.Popen(["ip", "netns", "exec", topo.host, sys.executable, "-c", DNS_SERVER],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    topo.pids.append(server.pid)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--config-net", "--dns-forward", "10.77.0.99",
                wait_tap=IF)  # fmt: skip
    out = sh("busybox", "nslookup", "-type=a", "www.passtd.test", "10.77.0.99", ns=topo.guest, timeout=20,
             check=False)  # fmt: skip
    assert "10.1.2.3" in out.stdout, out.stdout + out.stderr
    assert "10.77.0.99" in out.stdout  # the answer came from the forwarding address
    server.kill()
    server.communicate(timeout=5)


def test_namespace_loopback_to_host_with_udp_ns(topo: Topology) -> None:
    """-U: datagrams to a port on the namespace's own loopback reach the same port on the host's loopback,
    replies come back to the sender, and each sender is a flow of its own."""
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "-U", "6020", "-u", "none", wait_tap=IF)
    for loopback in ("127.0.0.1", "::1"):
        server = echo(topo, topo.host, loopback, 6020, 40)
        assert client(topo, topo.guest, loopback, 6020, 20).result()["ok"] == 20
        assert client(topo, topo.guest, loopback, 6020, 20).result()["ok"] == 20  # a second sender
        assert len(server.result()["peers"]) == 2  # two host sockets, one per namespace sender


def test_udp_follows_tcp_ns_ports_when_not_given(topo: Topology) -> None:
    """As pasta: -T without -U forwards the same UDP ports too."""
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "-T", "5021", "-u", "none", wait_tap=IF)
    server = echo(topo, topo.host, "127.0.0.1", 5021, 10)
    assert client(topo, topo.guest, "127.0.0.1", 5021, 10).result()["ok"] == 10
    server.result()
