"""The gRPC control service of a live passtd, driven with passtctl."""

from __future__ import annotations

import json
import os
import select
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from passtd.control.pb import passt_pb2, passt_pb2_grpc
from tests.netns.conftest import HOST4, REMOTE4, Topology, sh, wait_for

pytestmark = pytest.mark.netns
PASSTCTL = [sys.executable, "-m", "passtctl"]


def passtctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PASSTCTL, *args], capture_output=True, text=True, timeout=20, check=False)


def test_status_health_and_exclusive_socket(topo: Topology) -> None:
    ctl = str(topo.tmp / "ctl.sock")
    daemon = topo.passtd(
        "pasta", "-f", "-I", "eth0", "--netns", topo.guest, "--control", ctl, wait_tap="eth0"
    )
    wait_for(lambda: os.path.exists(ctl), 10, "control socket")
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
    sh("ping", "-c", "1", "-W", "1", "10.77.0.2", ns=topo.guest, check=False)  # some guest traffic
    health = passtctl("-c", ctl, "health")
    assert health.returncode == 0 and "SERVING" in health.stdout
    out = passtctl("-c", ctl, "status", "-o", "json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["mode"] == "pasta"
    assert status["backend"]["guest_connected"] is True
    assert status["config"]["ipv4_address"] == HOST4
    assert status["config"]["mtu"] == 65520
    assert status["counters"]["frames_from_guest"] > 0  # a number
    # A second passtd on the same control path refuses to start and the first keeps serving.
    second = subprocess.run(
        ["ip", "netns", "exec", topo.host, sys.executable, "-m", "passtd", "passt", "-f",
         "-s", str(topo.tmp / "other.sock"), "--control", ctl],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert second.returncode == 1
    assert "in use" in second.stderr or "listening" in second.stderr, second.stderr
    assert passtctl("-c", ctl, "health").returncode == 0
    assert daemon.stop() == 0
    assert not os.path.exists(ctl)


# ---------------------------------------------------------------------------------------------------------
# Connections, port policy and timeouts, against real traffic

TOOL = str(Path(__file__).with_name("tcptool.py"))
IF = "eth0"
MiB = 1024 * 1024


def start(topo: Topology, *extra: str) -> str:
    """pasta in the guest namespace with a control socket; returns the socket path."""
    ctl = str(topo.tmp / "ctl.sock")
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--config-net", "--control", ctl, *extra,
                wait_tap=IF)  # fmt: skip
    wait_for(lambda: os.path.exists(ctl), 10, "control socket")
    return ctl


def popen(topo: Topology, argv: list[str]) -> subprocess.Popen[str]:
    return topo.popen(*argv)


def spawn(topo: Topology, ns: str, *argv: str) -> subprocess.Popen[str]:
    return popen(topo, ["ip", "netns", "exec", ns, *argv])


def line(proc: subprocess.Popen[str], timeout: float = 15) -> str:
    """One line of `proc`'s stdout, within `timeout` seconds."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout}s"
    return proc.stdout.readline().strip()


def conns(ctl: str, *args: str) -> list[dict[str, Any]]:
    out = passtctl("-c", ctl, "conns", "list", "-o", "json", *args)
    assert out.returncode == 0, out.stderr
    return list(json.loads(out.stdout).get("connections", []))


# A host-side server: accept one connection, read N bytes, answer M bytes, then wait for EOF or a reset.
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('127.0.0.1', int(sys.argv[1]))); s.listen(); print('ready', flush=True)
c, _ = s.accept(); c.settimeout(60)
n = 0
while n < 3000:
    n += len(c.recv(3000 - n))
c.sendall(b'x' * 70000); print('answered', flush=True)
try:
    print('EOF' if c.recv(10) == b'' else 'data', flush=True)
except ConnectionResetError:
    print('ECONNRESET', flush=True)
"""
# The guest side: connect, send 3000 bytes, read the 70000-byte answer, then wait for EOF or a reset.
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.sendall(b'y' * 3000)
n = 0
while n < 70000:
    n += len(c.recv(70000 - n))
print('received', flush=True)
try:
    print('EOF' if c.recv(10) == b'' else 'data', flush=True)
except ConnectionResetError:
    print('ECONNRESET', flush=True)
"""


def test_list_then_reset_a_real_connection(topo: Topology) -> None:
    ctl = start(topo)
    server = spawn(topo, topo.host, sys.executable, "-c", SERVER, "5101")
    assert line(server) == "ready"
    client = spawn(topo, topo.guest, sys.executable, "-c", CLIENT, REMOTE4, "5101")
    assert line(client) == "received"
    assert line(server) == "answered"

    def settled() -> list[dict[str, Any]]:
        found = conns(ctl, "--port", "5101")
        return found if found and found[0]["bytes_to_guest"] == 70000 else []

    (conn,) = wait_for(settled, 10, "the connection with all bytes counted")
    assert conn["protocol"] == "tcp"
    assert conn["state"] == "established"
    assert conn["direction"] == "guest_initiated"
    assert (conn["guest_address"], conn["remote_address"], conn["remote_port"]) == (HOST4, REMOTE4, 5101)
    assert conn["local_address"] == "127.0.0.1"
    assert conn["local_port"] > 0
    assert (conn["bytes_from_guest"], conn["bytes_to_guest"]) == (3000, 70000)
    assert conn["packets_from_guest"] >= 1 and conn["packets_to_guest"] >= 2
    assert conn["tcp"]["mss_to_guest"] > 0
    assert conn["created_time"] <= conn["last_activity_time"] <= time.time() + 1
    # Filters: the wrong protocol or state finds nothing; the table and wide outputs show the flow.
    assert conns(ctl, "--proto", "udp", "--port", "5101") == []
    assert conns(ctl, "--state", "LAST_ACK", "--port", "5101") == []
    table = passtctl("-c", ctl, "conns", "list", "-o", "wide")
    assert table.returncode == 0
    assert f"{REMOTE4}:5101" in table.stdout and "68.4 KiB" in table.stdout, table.stdout

    reset = passtctl("-c", ctl, "conns", "reset", str(conn["id"]))
    assert reset.returncode == 0, reset.stderr
    assert reset.stdout == f"reset 1 connection: {conn['id']}\n"
    assert line(client) == "ECONNRESET"
    assert line(server) == "ECONNRESET"
    assert conns(ctl, "--port", "5101") == []
    again = passtctl("-c", ctl, "conns", "reset", str(conn["id"]))
    assert again.returncode == 1
    assert again.stderr == f"passtctl: error: no connection with id {conn['id']}\n"


def test_watch_shows_open_and_close(topo: Topology) -> None:
    ctl = start(topo)
    watch = popen(
        topo, [*PASSTCTL, "-c", ctl, "conns", "watch", "-o", "json", "--port", "5102", "--for", "8"]
    )
    assert watch.stderr is not None
    assert "watching" in watch.stderr.readline()
    server = spawn(topo, topo.host, sys.executable, TOOL, "serve", "127.0.0.1", "5102", "--first", "read",
                   "--size", "1000", "--timeout", "20")  # fmt: skip
    assert line(server) == "ready"
    out = sh(
        sys.executable, TOOL, "connect", REMOTE4, "5102", "--size", "5000", "--timeout", "20", ns=topo.guest
    )
    assert json.loads(out.stdout)["rx_len"] == 1000
    stdout, stderr = watch.communicate(timeout=20)
    assert watch.returncode == 0, stderr
    events = [json.loads(x) for x in stdout.splitlines()]
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "opened", kinds
    assert kinds[-1] == "closed", kinds
    assert len({e["connection"]["id"] for e in events}) == 1
    closed = events[-1]
    assert closed["reason"] == "fin"
    assert closed["connection"]["remote_port"] == 5102
    assert (closed["connection"]["bytes_from_guest"], closed["connection"]["bytes_to_guest"]) == (5000, 1000)


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('127.0.0.1', int(sys.argv[1])))
print('ready', flush=True)
s.settimeout(30)
data, peer = s.recvfrom(100); s.sendto(data, peer)
"""
UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(10)
s.sendto(b'hello', (sys.argv[1], int(sys.argv[2]))); print(s.recv(100).decode(), flush=True)
"""


def test_timeouts_set_and_refused(topo: Topology) -> None:
    ctl = start(topo)
    before = passtctl("-c", ctl, "timeouts", "get", "-o", "json")
    assert json.loads(before.stdout)["udp_idle"] == 180
    # Out of range: refused with INVALID_ARGUMENT naming the field and its range; nothing changes.
    bad = passtctl("-c", ctl, "timeouts", "set", "tcp_activity=30s", "udp_idle=0.5s")
    assert bad.returncode == 1
    assert bad.stderr == "passtctl: error: timeouts.udp_idle: 0.5 s is out of range 1..86400 s\n"
    with grpc.insecure_channel(f"unix:{ctl}") as channel:
        request = passt_pb2.SetTimeoutsRequest(timeouts=passt_pb2.Timeouts(tcp_fin=0))
        request.update_mask.paths.append("tcp_fin")
        with pytest.raises(grpc.RpcError) as info:
            passt_pb2_grpc.ControlStub(channel).SetTimeouts(request, timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    after = json.loads(passtctl("-c", ctl, "timeouts", "get", "-o", "json").stdout)
    assert (after["udp_idle"], after["tcp_activity"], after["tcp_fin"]) == (180, 7200, 240)

    # udp_idle=2s: an idle UDP flow goes away within ~3 s.
    done = passtctl("-c", ctl, "timeouts", "set", "udp_idle=2s", "tcp_activity=2s")
    assert done.returncode == 0, done.stderr
    assert "udp_idle             2 s\n" in done.stdout, done.stdout
    server = spawn(topo, topo.host, sys.executable, "-c", UDP_ECHO, "5103")
    assert line(server) == "ready"
    out = sh(sys.executable, "-c", UDP_CLIENT, REMOTE4, "5103", ns=topo.guest)
    assert out.stdout.strip() == "hello"
    udp = conns(ctl, "--proto", "udp", "--port", "5103")
    assert len(udp) == 1 and udp[0]["state"] == "active"
    t0 = time.monotonic()
    wait_for(lambda: not conns(ctl, "--proto", "udp", "--port", "5103"), 5, "the idle UDP flow to expire")
    assert time.monotonic() - t0 < 3.5

    # tcp_activity=2s: an idle TCP connection is reset on both sides within ~3 s.
    tcp_server = spawn(topo, topo.host, sys.executable, "-c", SERVER, "5104")
    assert line(tcp_server) == "ready"
    client = spawn(topo, topo.guest, sys.executable, "-c", CLIENT, REMOTE4, "5104")
    assert line(client) == "received"
    t0 = time.monotonic()
    assert line(client, 10) == "ECONNRESET"
    assert time.monotonic() - t0 < 4.5
    assert conns(ctl, "--port", "5104") == []


def test_ports_add_and_remove(topo: Topology) -> None:
    ctl = start(topo, "-t", "20001")
    listed = passtctl("-c", ctl, "ports", "list")
    assert listed.stdout.splitlines()[1].split() == ["tcp_in", "-t", "20001"], listed.stdout
    # An established transfer on 20001 whose reader stalls for 4 s, so it is still running below.
    guest_server = spawn(topo, topo.guest, sys.executable, TOOL, "serve", "0.0.0.0", "20001",
                         "--size", str(16 * MiB), "--timeout", "60")  # fmt: skip
    assert line(guest_server) == "ready"
    host_client = spawn(topo, topo.host, sys.executable, TOOL, "connect", "127.0.0.1", "20001",
                        "--first", "read", "--pause", "4", "--timeout", "60")  # fmt: skip
    wait_for(lambda: conns(ctl, "--port", "20001"), 10, "the transfer on 20001")

    refused = sh(
        "socat", "-u", "OPEN:/dev/null", "TCP:127.0.0.1:20005", ns=topo.host, check=False, timeout=10
    )
    assert refused.returncode != 0
    added = passtctl("-c", ctl, "ports", "add", "20005")
    assert added.returncode == 0, added.stdout + added.stderr
    assert added.stdout.startswith("tcp_in (-t): 20001 -> 20001,20005\n"), added.stdout
    assert "tcp 0.0.0.0:20005: listening" in added.stdout
    new_server = spawn(topo, topo.guest, sys.executable, TOOL, "serve", "0.0.0.0", "20005",
                       "--size", "777", "--timeout", "20")  # fmt: skip
    assert line(new_server) == "ready"
    out = sh(sys.executable, TOOL, "connect", "127.0.0.1", "20005", "--first", "read", "--timeout", "20",
             ns=topo.host)  # fmt: skip
    assert json.loads(out.stdout)["rx_len"] == 777

    removed = passtctl("-c", ctl, "ports", "remove", "20005")
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert removed.stdout.startswith("tcp_in (-t): 20001,20005 -> 20001\n  removed: "), removed.stdout
    refused = sh(
        "socat", "-u", "OPEN:/dev/null", "TCP:127.0.0.1:20005", ns=topo.host, check=False, timeout=10
    )
    assert "Connection refused" in refused.stderr, refused.stderr
    # Removing 20001 itself closes its listener, not the transfer running through it.
    assert passtctl("-c", ctl, "ports", "set", "none").returncode == 0
    assert host_client.poll() is None, "the transfer ended before the policy changes"
    out_text, err = host_client.communicate(timeout=60)
    assert host_client.returncode == 0, err
    assert json.loads(out_text.strip().splitlines()[-1])["rx_len"] == 16 * MiB
    # A refused change (an overlap), then -T at run time: the namespace's loopback port reaches the host's.
    overlap = passtctl("-c", ctl, "ports", "add", "20003")
    assert overlap.returncode == 0
    again = passtctl("-c", ctl, "ports", "add", "20003")
    assert again.returncode == 1 and "20003" in again.stderr, again.stderr
    out_dir = passtctl("-c", ctl, "ports", "set", "-T", "8080")
    assert out_dir.returncode == 0, out_dir.stderr
    lines = out_dir.stdout.splitlines()
    assert lines[0] == "tcp_out (-T): auto -> 8080", lines
    assert "ok    tcp 127.0.0.1:8080: listening" in [line.strip() for line in lines[1:]], lines
    ns_listening = sh("ss", "-Htln", "sport", "= :8080", ns=topo.guest).stdout
    assert "127.0.0.1:8080" in ns_listening, ns_listening


def test_status_counts_flows_by_state_and_reflection(topo: Topology) -> None:
    ctl = start(topo)
    server = spawn(topo, topo.host, sys.executable, "-c", SERVER, "5105")
    assert line(server) == "ready"
    client = spawn(topo, topo.guest, sys.executable, "-c", CLIENT, REMOTE4, "5105")
    assert line(client) == "received"
    status = json.loads(passtctl("-c", ctl, "status", "-o", "json").stdout)
    assert status["flows"]["tcp"] >= 1
    assert status["flow_states"]["tcp"]["states"]["established"] >= 1
    with grpc.insecure_channel(f"unix:{ctl}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (reply,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
    assert "passt.v1.Control" in {s.name for s in reply.list_services_response.service}
    all_reset = passtctl("-c", ctl, "conns", "reset", "--all")
    assert all_reset.returncode == 0 and all_reset.stdout.startswith("reset 1 connection"), all_reset.stdout
    assert line(client) == "ECONNRESET"


def test_control_over_tcp_on_loopback(topo: Topology) -> None:
    """--control-listen with --control-insecure (loopback only), driven by passtctl -c tcp:HOST:PORT."""
    daemon = topo.passtd(
        "passt", "-f", "-s", str(topo.tmp / "p.sock"), "--control", "none",
        "--control-listen", "127.0.0.1:7777", "--control-insecure",
    )  # fmt: skip
    out = None
    for _ in range(50):
        out = subprocess.run(
            ["ip", "netns", "exec", topo.host, sys.executable, "-m", "passtctl", "-c", "tcp:127.0.0.1:7777",
             "--insecure", "health"],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        if out.returncode == 0:
            break
        time.sleep(0.2)
    assert out is not None and out.returncode == 0 and "SERVING" in out.stdout, out
    assert daemon.stop() == 0
    refused = subprocess.run(
        ["ip", "netns", "exec", topo.host, sys.executable, "-m", "passtd", "passt", "-f", "-s",
         str(topo.tmp / "q.sock"), "--control-listen", "0.0.0.0:7778"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert refused.returncode == 2
    assert refused.stderr.strip().startswith("passtd: error: --control-listen: needs --control-cert")


def test_port_range_beyond_the_descriptors_is_refused_and_control_stays_usable(topo: Topology) -> None:
    """14.9: `ports set 10000-59999` under a low open-files limit used to answer OK while 80 % of the binds
    failed with EMFILE, after which passtctl could not connect to undo it."""
    ctl = start(topo)
    pid = topo.daemons[-1].proc.pid
    sh("prlimit", "--pid", str(pid), "--nofile=700:700")
    big = passtctl("-c", ctl, "ports", "set", "10000-59999")
    assert big.returncode == 1, big.stdout + big.stderr
    assert "new listening sockets but only" in big.stderr and "nothing changed" in big.stderr, big.stderr
    assert len(os.listdir(f"/proc/{pid}/fd")) < 200  # nothing was bound on the way to the refusal
    status = passtctl("-c", ctl, "status", "-o", "json")
    assert status.returncode == 0, status.stderr
    limits = json.loads(status.stdout)["limits"]
    assert limits["descriptors"]["soft_limit"] == 700
    assert 0 < limits["descriptors"]["in_use"] < 200
    assert limits["watch_streams"]["max"] == 32 and limits["concurrent_rpcs"]["in_use"] == 1
    table = passtctl("-c", ctl, "status")
    assert "descriptors" in table.stdout and "limit 700" in table.stdout, table.stdout
    small = passtctl("-c", ctl, "ports", "set", "20001-20010")
    assert small.returncode == 0, small.stdout + small.stderr
    assert small.stdout.startswith("tcp_in (-t): auto -> 20001-20010\n"), small.stdout
    assert passtctl("-c", ctl, "ports", "set", "none").returncode == 0


def test_watch_in_order_then_fails_when_the_daemon_stops(topo: Topology) -> None:
    """Events of real flows arrive in the order they happened (each flow: opened first, closed last, stamps
    never going back); stopping the daemon ends `conns watch` with exit 1 and a line saying so."""
    ctl = start(topo)
    daemon = topo.daemons[-1]
    watch = popen(topo, [*PASSTCTL, "-c", ctl, "conns", "watch", "-o", "json", "--port", "5103"])
    assert watch.stderr is not None
    assert "watching" in watch.stderr.readline()
    for _ in range(3):  # one connection per server: three flows one after the other
        server = spawn(topo, topo.host, sys.executable, TOOL, "serve", "127.0.0.1", "5103", "--first", "read",
                       "--size", "1000", "--timeout", "20")  # fmt: skip
        assert line(server) == "ready"
        sh(sys.executable, TOOL, "connect", REMOTE4, "5103", "--size", "2000", "--timeout", "20",
           ns=topo.guest)  # fmt: skip
    wait_for(lambda: conns(ctl, "--port", "5103") == [], 10, "the three flows gone")
    assert daemon.stop() == 0
    out, err = watch.communicate(timeout=15)
    assert watch.returncode == 1
    assert err == f"passtctl: error: {ctl}: the daemon ended the watch (it is stopping)\n"
    events = [json.loads(x) for x in out.splitlines()]
    times = [e["time"] for e in events]
    assert times == sorted(times), events
    by_flow: dict[int, list[str]] = {}
    for event in events:
        by_flow.setdefault(event["connection"]["id"], []).append(event["kind"])
    assert len(by_flow) == 3
    for kinds in by_flow.values():
        assert kinds[0] == "opened" and kinds[-1] == "closed" and kinds.count("closed") == 1, kinds
    assert all(e["reason"] == "fin" for e in events if e["kind"] == "closed")
