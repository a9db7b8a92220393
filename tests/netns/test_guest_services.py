"""Guest services and the drop-in socket options end to end in real namespaces.

DNS through a resolver on the host's loopback (as on a systemd-resolved desktop) with a real DHCP client
(busybox udhcpc) and a real resolver client (nslookup); --outbound-if4, --no-splice, --host-lo-to-ns-lo,
--no-tcp, --no-udp and --freebind with real sockets on both sides. Options another change parses are set on
the parsed Config (`passtd_with`), so these tests run the real daemon whatever the command line accepts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.netns.conftest import FAR4, PASSTD, REMOTE4, Passtd, Topology, ip_json, sh, wait_for
from tests.netns.test_tcp import connect, digest, serve

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


# Runs the daemon on a parsed command line with some Config / Context fields replaced.
LAUNCH = """
import dataclasses, json, sys
from passtd.options import parse_args
from passtd.daemon import run
fields = json.loads(sys.argv[1])
config = parse_args(sys.argv[2:])
ctx = dataclasses.replace(config.ctx, **fields.pop("ctx", {}))
sys.exit(run(dataclasses.replace(config, ctx=ctx, **fields)))
"""


def passtd_with(topo: Topology, fields: dict[str, Any], *args: str) -> Passtd:
    """Start passtd (pasta mode, the guest namespace) with `fields` set on its Config; wait for the tap."""
    assert PASSTD[1:] == ["-m", "passtd"]
    log = topo.tmp / f"passtd-{len(topo.daemons)}.log"
    env = dict(os.environ, XDG_RUNTIME_DIR=str(topo.tmp))
    argv = ["pasta", "-f", "-I", IF, "--netns", topo.guest, "--config-net", *args]
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", topo.host, sys.executable, "-c", LAUNCH, json.dumps(fields), *argv],
            stdout=out, stderr=out, env=env,
        )  # fmt: skip
    daemon = Passtd(proc, log)
    topo.daemons.append(daemon)

    def tap_up() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"passtd exited with {proc.returncode}:\n{daemon.output()}")
        return any(
            link["ifname"] == IF and "UP" in link["flags"] for link in ip_json(topo.guest, "link", "show")
        )

    wait_for(tap_up, 15, f"tap {IF} in {topo.guest}")
    return daemon


def listening(topo: Topology, proto: str, port: int) -> list[str]:
    """Local addresses of the host namespace's sockets listening on `port` (ss)."""
    out = sh("ss", "-Hln", f"--{proto}", f"sport = :{port}", ns=topo.host).stdout
    return [line.split()[3] for line in out.splitlines() if line.strip()]


# Upstream pasta offers no DNS by DHCP unless --dhcp-dns: ask for it whatever pasta's default is here.
OFFER_DNS: dict[str, Any] = {"ctx": {"dhcp_dns": True}}


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
        passtd_with(topo, OFFER_DNS)
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
    passtd_with(topo, OFFER_DNS, "--no-map-gw")
    env = udhcpc_env(topo)
    assert env["router"].split() == [REMOTE4]
    assert "dns" not in env


def test_outbound_if4_leaves_through_that_interface(topo: Topology) -> None:
    """--outbound-if4: the guest's connection leaves by the named interface (its own route and source
    address), not by the default route's."""
    sfx = topo.veth[2:]
    second = f"vo{sfx}"
    sh(
        "ip",
        "link",
        "add",
        second,
        "netns",
        topo.host,
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        topo.remote,
    )
    sh("ip", "-n", topo.host, "addr", "add", "10.79.0.1/24", "dev", second)
    sh("ip", "-n", topo.remote, "addr", "add", "10.79.0.2/24", "dev", "eth1")
    sh("ip", "-n", topo.host, "link", "set", second, "up")
    sh("ip", "-n", topo.remote, "link", "set", "eth1", "up")
    sh("ip", "-n", topo.host, "route", "add", "default", "via", "10.79.0.2", "dev", second, "metric", "100")
    server = serve(topo, topo.remote, FAR4, 5101, size=1000, seed=41, peer=True)
    passtd_with(topo, {"outbound_if4": second})
    client = connect(topo, topo.guest, FAR4, 5101, first="read", size=10, seed=42)
    assert client.result() == {"rx_len": 1000, "rx_sha": digest(1000, 41)}
    assert server.result()["peer"] == "10.79.0.1"  # without the option: 10.77.0.1, via the default route


def test_no_splice_host_loopback_crosses_the_tap(topo: Topology) -> None:
    """--no-splice: a host-loopback connection to a forwarded port goes through the tap and appears in the
    namespace from the gateway (the --map-host-loopback address), not spliced from its own address."""
    passtd_with(topo, {"splice": False}, "-t", "20111")
    wait_for(lambda: listening(topo, "tcp", 20111), 10, "the forwarded port")
    server = serve(topo, topo.guest, "0.0.0.0", 20111, size=100_000, seed=43, peer=True)
    client = connect(topo, topo.host, "127.0.0.1", 20111, first="read", size=10, seed=44)
    assert client.result() == {"rx_len": 100_000, "rx_sha": digest(100_000, 43)}
    assert server.result()["peer"] == REMOTE4


def test_host_lo_to_ns_lo_reaches_a_service_on_the_namespaces_loopback(topo: Topology) -> None:
    """--host-lo-to-ns-lo: the splice goes to the namespace's 127.0.0.1, where a loopback-only service
    listens, and the service sees a loopback peer."""
    passtd_with(topo, {"host_lo_to_ns_lo": True}, "-t", "20112")
    wait_for(lambda: listening(topo, "tcp", 20112), 10, "the forwarded port")
    server = serve(topo, topo.guest, "127.0.0.1", 20112, size=1000, seed=45, peer=True)
    client = connect(topo, topo.host, "127.0.0.1", 20112, first="read", size=10, seed=46)
    assert client.result() == {"rx_len": 1000, "rx_sha": digest(1000, 45)}
    assert server.result()["peer"] == "127.0.0.1"


def test_default_splice_does_not_expose_the_namespaces_loopback(topo: Topology) -> None:
    """Without --host-lo-to-ns-lo a service bound only to the namespace's 127.0.0.1 is not reachable."""
    passtd_with(topo, {}, "-t", "20113")
    wait_for(lambda: listening(topo, "tcp", 20113), 10, "the forwarded port")
    server = serve(topo, topo.guest, "127.0.0.1", 20113, size=10, seed=47, timeout=5)
    try:
        out = sh(sys.executable, "-c", PROBE, "127.0.0.1", "20113", ns=topo.host, check=False)
        assert out.stdout.strip() in ("closed", "reset"), out.stdout + out.stderr
    finally:
        server.proc.kill()
        server.proc.communicate(timeout=5)


# Connect, then read: "data", "closed" (EOF) or "reset" (also while connecting); at most 5 s.
PROBE = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
    print("data" if s.recv(100) else "closed")
except ConnectionResetError:
    print("reset")
"""


def test_no_tcp_no_listeners_and_guest_segments_dropped(topo: Topology) -> None:
    """--no-tcp: no TCP listener for -t, and the guest's SYN is dropped (its connect times out, no RST)."""
    passtd_with(topo, {"ctx": {"tcp": False}}, "-t", "20114", "-u", "20114")
    wait_for(lambda: listening(topo, "udp", 20114), 10, "the UDP listener")  # forwarding is in place
    assert listening(topo, "tcp", 20114) == []
    out = sh(sys.executable, "-c", GUEST_CONNECT, FAR4, "5102", ns=topo.guest, check=False, timeout=20)
    assert out.stdout.strip() == "timeout", out.stdout + out.stderr


GUEST_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2)
    print("connected")
except socket.timeout:
    print("timeout")
except OSError as exc:
    print(exc.errno)
"""


def test_no_udp_no_listeners_but_dhcp_still_answers(topo: Topology) -> None:
    """--no-udp: no UDP listener for -u, the guest's datagrams go nowhere, its DHCP server still answers."""
    Path(f"/etc/netns/{topo.host}/resolv.conf").write_text("nameserver 127.0.0.53\n")
    server = start_resolver(topo, "127.0.0.53")
    try:
        passtd_with(topo, {"ctx": {"udp": False, "dhcp_dns": True}}, "-t", "20115", "-u", "20115")
        wait_for(lambda: listening(topo, "tcp", 20115), 10, "the TCP listener")  # forwarding is in place
        assert listening(topo, "udp", 20115) == []
        env = udhcpc_env(topo)
        assert env["dns"].split() == [REMOTE4]
        out = sh("busybox", "nslookup", "-type=a", "www.passtd.test", REMOTE4, ns=topo.guest, timeout=20,
                 check=False)  # fmt: skip
        assert ANSWER not in out.stdout
    finally:
        server.kill()
        seen = server.communicate(timeout=5)[0]
    assert "query from" not in seen


def test_freebind_forwards_an_address_the_host_does_not_have_yet(topo: Topology) -> None:
    """--freebind: -t 10.77.0.200/PORT listens although no interface has the address; once the address is
    added, connections to it reach the guest."""
    passtd_with(topo, {"freebind": True}, "-t", "10.77.0.200/20116")
    assert wait_for(lambda: listening(topo, "tcp", 20116), 10, "the listener") == ["10.77.0.200:20116"]
    sh("ip", "-n", topo.host, "addr", "add", "10.77.0.200/32", "dev", "lo")
    server = serve(topo, topo.guest, "0.0.0.0", 20116, size=1000, seed=48)
    client = connect(topo, topo.host, "10.77.0.200", 20116, first="read", size=10, seed=49)
    assert client.result() == {"rx_len": 1000, "rx_sha": digest(1000, 48)}
    server.result()


def test_tcp_dns_to_the_gateway_reaches_the_loopback_resolver(topo: Topology) -> None:
    """DNS over TCP (a truncated answer's retry) to the gateway reaches the resolver on 127.0.0.53 too."""
    Path(f"/etc/netns/{topo.host}/resolv.conf").write_text("nameserver 127.0.0.53\n")
    server = serve(topo, topo.host, "127.0.0.53", 53, size=600, seed=50, peer=True)
    passtd_with(topo, {})
    client = connect(topo, topo.guest, REMOTE4, 53, first="read", size=40, seed=51)
    assert client.result() == {"rx_len": 600, "rx_sha": digest(600, 50)}
    assert server.result()["rx_sha"] == digest(40, 51)


def test_dhclient_receives_hostname_and_fqdn(topo: Topology) -> None:
    """-H/--hostname and --fqdn: ISC dhclient records option 12 and the RFC 4702 option 81 of the lease."""
    passtd_with(topo, {"ctx": {"hostname": "vm1", "fqdn": "vm1.passtd.test"}})
    text = topo.dhclient(IF, "-4")
    assert 'option host-name "vm1";' in text
    assert 'option fqdn.fqdn "vm1.passtd.test";' in text
    assert "option fqdn.encoded true;" in text and "option fqdn.rcode1 255;" in text


def test_dhclient6_receives_the_fqdn(topo: Topology) -> None:
    """--fqdn over DHCPv6: option 39 (RFC 4704) in the Reply, as ISC dhclient -6 records it."""
    passtd_with(topo, {"ctx": {"fqdn": "vm1.passtd.test"}})
    topo.wait_link_local(IF)
    text = topo.dhclient(IF, "-6")
    assert 'option fqdn.fqdn "vm1.passtd.test";' in text
    assert "option dhcp6.fqdn 0:3:76:6d:31:6:70:61:73:73:74:64:4:74:65:73:74:0;" in text  # flags 0, wire form
