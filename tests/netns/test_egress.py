"""Egress rules on a live pasta: a guest namespace, the remote host namespace behind the veth (10.88.0.1,
fd88::1 on its loopback), and the host's loopback behind the gateway. Denied TCP is refused at once and never
reaches the remote, denied UDP gets ICMP administratively prohibited (the guest's connected socket sees
EHOSTUNREACH / EACCES), denied echo gets nothing; counters, a live change during traffic, resetting existing
flows, the gateway, conns watch, the config file on SIGHUP, and INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import dpkt
import grpc
import pytest

from passtd.control.pb import passt_pb2, passt_pb2_grpc
from passtd.dataplane.packets.ethernet import ETH_P_IP, build_ethernet
from passtd.dataplane.packets.tcp import SYN, SegmentBuilder, syn_options
from passtd.dataplane.packets.udp import build_udp4
from tests.netns.conftest import FAR4, FAR6, HOST4, REMOTE4, Topology, sh, wait_for
from tests.netns.test_passt_mode import GUEST_MAC, OUR_MAC, framed
from tests.netns.test_passt_mode import Guest as PasstGuest
from tests.netns.test_passt_mode import start as start_passt

pytestmark = pytest.mark.netns
PASSTCTL = [sys.executable, "-m", "passtctl"]
IF = "eth0"
GW4 = REMOTE4  # pasta copies the host's gateway: to the guest it is the host (its loopback)

# Remote side: TCP and UDP on every port given, on each address given (bound to it, so that UDP replies come
# from the address the datagram went to), one line per connection or datagram ("tcp PORT" / "udp PORT"),
# UDP echoed, TCP drained until EOF or reset. Ends itself after 120 s.
SERVER = r"""
import selectors, socket, sys, time
sel = selectors.DefaultSelector()
for port in map(int, sys.argv[2:]):
    for address in sys.argv[1].split(","):
      for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        s = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        if kind == socket.SOCK_STREAM:
            s.listen(64)
        sel.register(s, selectors.EVENT_READ, ("listen" if kind == socket.SOCK_STREAM else "udp", port))
print("ready", flush=True)
end = time.monotonic() + 120
while time.monotonic() < end:
    for key, _ in sel.select(1):
        what, port = key.data
        if what == "listen":
            c, _ = key.fileobj.accept()
            print(f"tcp {port}", flush=True)
            sel.register(c, selectors.EVENT_READ, ("conn", port))
        elif what == "udp":
            data, peer = key.fileobj.recvfrom(65536)
            print(f"udp {port}", flush=True)
            key.fileobj.sendto(data, peer)
        else:
            try:
                data = key.fileobj.recv(65536)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj)
                key.fileobj.close()
"""

# Guest side, one attempt: prints a JSON line {"result": "ok" | errno name, "seconds": ...}.
PROBE = r"""
import errno, json, socket, sys, time
kind, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
family = socket.AF_INET6 if ":" in host else socket.AF_INET
t0 = time.monotonic()
try:
    if kind == "tcp":
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        s.connect((host, port))
        s.sendall(b"x")
    else:
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(3)
        s.connect((host, port))
        s.send(b"ping")
        assert s.recv(100) == b"ping"
    result = "ok"
except TimeoutError:
    result = "timeout"
except OSError as exc:
    result = errno.errorcode.get(exc.errno, str(exc))
print(json.dumps({"result": result, "seconds": time.monotonic() - t0}), flush=True)
"""

# Guest side, a long TCP stream: "connected", then 1 KiB every 10 ms for up to 60 s; the error that ends it.
STREAM = r"""
import errno, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
print("connected", flush=True)
end = time.monotonic() + 60
try:
    while time.monotonic() < end:
        s.sendall(b"s" * 1024)
        time.sleep(0.01)
    print("done", flush=True)
except OSError as exc:
    print(errno.errorcode.get(exc.errno, str(exc)), flush=True)
"""


def spawn(topo: Topology, ns: str, *argv: str) -> subprocess.Popen[str]:
    return topo.popen(*argv, ns=ns)


_pending: dict[int, bytes] = {}  # pid → bytes read from its stdout, not yet split into lines


def _read_lines(proc: subprocess.Popen[str], wait: float, want: int) -> list[str]:
    """Up to `want` lines of `proc`'s stdout, read from the descriptor itself (a buffered readline would hide
    lines from select), waiting at most `wait` seconds for each next chunk."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    buf = _pending.get(proc.pid, b"")
    for _ in range(200):
        if buf.count(b"\n") >= want:
            break
        ready, _, _ = select.select([fd], [], [], wait)
        chunk = os.read(fd, 65536) if ready else b""
        if not chunk:
            break
        buf += chunk
    *done, rest = buf.split(b"\n")
    _pending[proc.pid] = b"\n".join([*done[want:], rest]) if len(done) > want else rest
    return [text.decode().strip() for text in done[:want]]


def line(proc: subprocess.Popen[str], timeout: float = 15) -> str:
    got = _read_lines(proc, timeout, 1)
    assert got, f"no output within {timeout}s"
    return got[0]


def lines_so_far(proc: subprocess.Popen[str], quiet: float = 0.5) -> list[str]:
    """The lines `proc` printed until it has been quiet for `quiet` seconds (bounded)."""
    return _read_lines(proc, quiet, 10_000)


def passtctl(ctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PASSTCTL, "-c", ctl, *args], capture_output=True, text=True, timeout=20, check=False
    )


def ok(ctl: str, *args: str) -> str:
    out = passtctl(ctl, *args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def egress(ctl: str) -> dict[str, Any]:
    return dict(json.loads(ok(ctl, "egress", "list", "-o", "json")))


def probe(topo: Topology, kind: str, host: str, port: int) -> dict[str, Any]:
    proc = sh(sys.executable, "-c", PROBE, kind, host, str(port), ns=topo.guest, timeout=20)
    return dict(json.loads(proc.stdout))


def ping(topo: Topology, host: str) -> bool:
    return sh("ping", "-c", "1", "-W", "1", host, ns=topo.guest, check=False, timeout=10).returncode == 0


def start(topo: Topology, *extra: str) -> str:
    ctl = str(topo.tmp / "ctl.sock")
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--config-net", "--control", ctl, *extra,
                wait_tap=IF)  # fmt: skip
    wait_for(lambda: os.path.exists(ctl), 10, "control socket")
    topo.wait_link_local(IF)
    wait_for(lambda: ping(topo, FAR6), 10, "IPv6 toward the remote")  # neighbour discovery done
    return ctl


def remote_server(topo: Topology, *ports: int) -> subprocess.Popen[str]:
    server = spawn(topo, topo.remote, sys.executable, "-c", SERVER, f"{FAR4},{FAR6}", *map(str, ports))
    assert line(server) == "ready"
    return server


def test_denied_and_allowed_both_families_and_the_counters(topo: Topology) -> None:
    ctl = start(topo, "--metrics-listen", "127.0.0.1:9464")
    server = remote_server(topo, 7001, 7002)
    assert probe(topo, "tcp", FAR4, 7001)["result"] == "ok"  # no rules: everything goes
    ok(ctl, "egress", "add", "deny", "--proto", "tcp", "--ports", "7001", f"{FAR4}/32")
    ok(ctl, "egress", "add", "deny", "--proto", "tcp", "--ports", "7000-7001", "fd88::/16")
    ok(ctl, "egress", "add", "deny", "--proto", "udp", "--ports", "7001", FAR4)
    ok(ctl, "egress", "add", "deny", "--proto", "udp", "--ports", "7001", FAR6)
    ok(ctl, "egress", "add", "deny", "--proto", "icmp", FAR4)
    lines_so_far(server)
    for host in (FAR4, FAR6):
        denied = probe(topo, "tcp", host, 7001)
        assert denied["result"] == "ECONNREFUSED" and denied["seconds"] < 1.0, denied  # RST at once
        assert probe(topo, "tcp", host, 7002)["result"] == "ok"
        assert probe(topo, "udp", host, 7002)["result"] == "ok"
    # Denied UDP: administratively prohibited reaches the guest's connected socket as a hard error.
    assert probe(topo, "udp", FAR4, 7001)["result"] == "EHOSTUNREACH"
    assert probe(topo, "udp", FAR6, 7001)["result"] == "EACCES"
    assert not ping(topo, FAR4)
    assert ping(topo, FAR6)
    seen = lines_so_far(server)
    assert "tcp 7001" not in seen and "udp 7001" not in seen, seen  # no connect, no datagram: refused here
    assert seen.count("tcp 7002") == 2 and seen.count("udp 7002") == 2, seen

    state = egress(ctl)
    matches = {r["id"]: r["matches"] for r in state["rules"]}
    assert [r["id"] for r in state["rules"]] == [1, 2, 3, 4, 5]
    assert matches == {1: 1, 2: 1, 3: 1, 4: 1, 5: 1}
    assert (state["denied_tcp"], state["denied_udp"], state["denied_icmp"]) == (2, 2, 1)
    assert state["default_action"] == "allow" and state["default_matches"] >= 4
    table = ok(ctl, "egress", "list")
    assert "7000-7001" in table and "fd88::/16" in table and "denied: tcp 2, udp 2, icmp 1" in table, table
    # Removing a rule and a bad id.
    ok(ctl, "egress", "remove", "5")
    assert ping(topo, FAR4)
    missing = passtctl(ctl, "egress", "remove", "5")
    assert missing.returncode == 1 and missing.stderr == "passtctl: error: id: no egress rule 5\n"
    status = json.loads(ok(ctl, "status", "-o", "json"))
    assert status["counters"]["dropped"]["egress.tcp"] == 2
    metrics = sh("curl", "-sf", "--max-time", "5", "http://127.0.0.1:9464/metrics", ns=topo.host).stdout
    for sample in ('passtd_egress_rule_matches_total{action="deny",rule="1"} 1.0',
                   'passtd_egress_denied_total{protocol="udp"} 2.0', "passtd_egress_rules 4.0"):  # fmt: skip
        assert sample in metrics.splitlines(), sample


def test_default_deny_with_an_allow_list_and_bad_requests(topo: Topology) -> None:
    ctl = start(topo)
    server = remote_server(topo, 7003)
    out = ok(ctl, "egress", "add", "allow", "--proto", "tcp", "--ports", "7003", FAR6)
    assert "fd88::1/128" in out
    ok(ctl, "egress", "set-default", "deny")
    assert probe(topo, "tcp", FAR6, 7003)["result"] == "ok"
    assert probe(topo, "tcp", FAR4, 7003)["result"] == "ECONNREFUSED"
    assert probe(topo, "udp", FAR6, 7003)["result"] == "EACCES"
    assert not ping(topo, FAR6)
    assert lines_so_far(server) == ["tcp 7003"]
    # INVALID_ARGUMENT naming the field, through gRPC itself; nothing changes then.
    with grpc.insecure_channel(f"unix:{ctl}") as channel:
        stub = passt_pb2_grpc.ControlStub(channel)
        bad = passt_pb2.EgressRule(action=passt_pb2.EGRESS_ACTION_DENY, destination="192.0.2.1/24")
        good = passt_pb2.EgressRule(action=passt_pb2.EGRESS_ACTION_ALLOW)
        deny = passt_pb2.EGRESS_ACTION_DENY
        icmp_ports = passt_pb2.EgressRule(action=deny, protocol=passt_pb2.PROTOCOL_ICMP,
                                          ports=[passt_pb2.EgressPortRange(first=22)])  # fmt: skip
        too_high = passt_pb2.EgressRule(action=deny, protocol=passt_pb2.PROTOCOL_TCP,
                                        ports=[passt_pb2.EgressPortRange(first=9, last=70000)])  # fmt: skip
        no_action = passt_pb2.EgressRule()
        cases = [
            (stub.SetEgress, passt_pb2.SetEgressRequest(rules=[good, bad]), "rules[1].destination: "),
            (stub.AddEgressRule, passt_pb2.AddEgressRuleRequest(rule=icmp_ports),
             "rule.ports: port ranges need protocol tcp or udp"),
            (stub.AddEgressRule, passt_pb2.AddEgressRuleRequest(rule=too_high), "rule.ports: port 70000 is"),
            (stub.AddEgressRule, passt_pb2.AddEgressRuleRequest(rule=no_action), "rule.action: "),
            (stub.AddEgressRule, passt_pb2.AddEgressRuleRequest(rule=good, position=9), "position: "),
            (stub.SetEgressDefault, passt_pb2.SetEgressDefaultRequest(action=7), "action: "),
            (stub.SetEgress, passt_pb2.SetEgressRequest(rules=[passt_pb2.EgressRule(id=3, action=deny),
                                                               passt_pb2.EgressRule(id=3, action=deny)]),
             "rules[1].id: duplicate rule id 3"),
        ]  # fmt: skip
        for call, request, message in cases:
            with pytest.raises(grpc.RpcError) as info:
                call(request, timeout=10)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
            assert (info.value.details() or "").startswith(message), info.value.details()
        policy = stub.GetEgress(passt_pb2.GetEgressRequest(), timeout=10)
        assert len(policy.rules) == 1 and policy.default_action == passt_pb2.EGRESS_ACTION_DENY
    cli_bad = passtctl(ctl, "egress", "add", "deny", "--proto", "icmp", "--ports", "22", "any")
    assert cli_bad.returncode == 1
    assert cli_bad.stderr == "passtctl: error: rule.ports: port ranges need protocol tcp or udp\n"


def test_live_change_during_traffic_then_reset_existing(topo: Topology) -> None:
    ctl = start(topo)
    server = remote_server(topo, 7010, 7011)
    stream = spawn(topo, topo.guest, sys.executable, "-c", STREAM, FAR4, "7010")
    assert line(stream) == "connected"
    assert probe(topo, "udp", FAR4, 7011)["result"] == "ok"  # a UDP flow that stays open (udp_idle)

    def flows(proto: str) -> list[dict[str, Any]]:
        out = json.loads(ok(ctl, "conns", "list", "-o", "json", "--proto", proto, "--address", FAR4))
        return list(out.get("connections", []))

    (before,) = flows("tcp")
    assert len(flows("udp")) == 1
    # A deny rule for this very destination, without reset: new flows are refused, the open ones go on.
    ok(ctl, "egress", "add", "deny", "--proto", "tcp", FAR4)
    ok(ctl, "egress", "add", "deny", "--proto", "udp", FAR4)
    assert probe(topo, "tcp", FAR4, 7010)["result"] == "ECONNREFUSED"
    time.sleep(0.5)
    (after,) = flows("tcp")
    assert after["id"] == before["id"] and after["bytes_from_guest"] > before["bytes_from_guest"]
    assert len(flows("udp")) == 1
    # The same list again over gRPC, now resetting what it denies: the stream sees RST, UDP is closed.
    with grpc.insecure_channel(f"unix:{ctl}") as channel:
        stub = passt_pb2_grpc.ControlStub(channel)
        current = stub.GetEgress(passt_pb2.GetEgressRequest(), timeout=10)
        reply = stub.SetEgress(
            passt_pb2.SetEgressRequest(rules=current.rules, reset_existing=True), timeout=10
        )
    assert reply.flows_reset == 2 and reply.flows_reset_total == 2
    assert [r.id for r in reply.rules] == [r.id for r in current.rules]  # ids and counters kept
    assert line(stream) == "ECONNRESET"
    assert flows("tcp") == [] and flows("udp") == []
    assert "tcp 7010" in lines_so_far(server)


def test_denying_the_gateway_denies_the_host_and_watch_shows_it(topo: Topology) -> None:
    ctl = start(topo)
    host_server = spawn(topo, topo.host, sys.executable, "-c", SERVER, "127.0.0.1,::1", "7020")  # the host's
    assert line(host_server) == "ready"
    assert probe(topo, "tcp", GW4, 7020)["result"] == "ok"
    watch = spawn(topo, topo.host, *PASSTCTL, "-c", ctl, "conns", "watch", "-o", "json", "--port", "7020",
                  "--for", "20")  # fmt: skip
    assert watch.stderr is not None and "watching" in watch.stderr.readline()
    ok(ctl, "egress", "add", "deny", f"{GW4}/32")
    assert probe(topo, "tcp", GW4, 7020)["result"] == "ECONNREFUSED"
    assert probe(topo, "udp", GW4, 7020)["result"] == "EHOSTUNREACH"
    assert not ping(topo, GW4)
    assert probe(topo, "tcp", FAR4, 7020)["result"] == "ECONNREFUSED"  # nothing listens there: a real RST
    events = [json.loads(text) for text in lines_so_far(watch, 1.0)]
    denied = [e for e in events if e["kind"] == "denied"]
    assert len(denied) == 2, events  # the TCP and the UDP attempt to the gateway (echo has no port 7020)
    assert {e["connection"]["protocol"] for e in denied} == {"tcp", "udp"}
    assert all(e["connection"]["remote_address"] == GW4 and e["reason_detail"] == "egress_denied:rule=1"
               for e in denied)  # fmt: skip
    assert lines_so_far(host_server) == ["tcp 7020"]  # only the attempt before the rule arrived


def test_config_file_rules_applied_at_start_and_on_sighup(topo: Topology) -> None:
    conf = topo.tmp / "passtd.toml"
    conf.write_text(f'[[egress]]\naction = "deny"\nprotocol = "tcp"\nports = 7030\ndestination = "{FAR4}"\n')
    ctl = start(topo, "--config", str(conf))
    remote_server(topo, 7030, 7031)
    assert probe(topo, "tcp", FAR4, 7030)["result"] == "ECONNREFUSED"
    assert probe(topo, "tcp", FAR4, 7031)["result"] == "ok"
    ok(ctl, "egress", "add", "deny", "--proto", "tcp", "--ports", "7031", FAR4)  # a run-time addition
    conf.write_text('egress_default = "deny"\n[[egress]]\naction = "allow"\nprotocol = "tcp"\nports = 7030\n')
    daemon = topo.daemons[-1]
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config.reloaded" in daemon.output(), 10, "the reload")
    state = egress(ctl)
    assert state["default_action"] == "deny" and [r["action"] for r in state["rules"]] == ["allow"]
    assert probe(topo, "tcp", FAR4, 7030)["result"] == "ok"
    assert probe(topo, "tcp", FAR4, 7031)["result"] == "ECONNREFUSED"
    # A bad file on SIGHUP: one error line, the running rules kept.
    conf.write_text('[[egress]]\naction = "deny"\ndestination = "10.88.0.1/8"\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config.reload.failed" in daemon.output(), 10, "the failed reload")
    assert "egress[0].destination" in daemon.output()
    assert probe(topo, "tcp", FAR4, 7030)["result"] == "ok"


def test_passt_mode_raw_frames_from_the_config_file(topo: Topology) -> None:
    """passt mode (qemu's stream socket), rules from the config file at start: the frames themselves. A denied
    SYN gets RST|ACK acknowledging it, a denied datagram ICMP type 3 code 13 quoting it; an allowed SYN goes
    through to the remote (SYN-ACK)."""
    remote_server(topo, 7041)
    conf = topo.tmp / "passt.toml"
    conf.write_text('[[egress]]\naction = "deny"\nprotocol = "tcp"\nports = 7040\n'
                    f'[[egress]]\naction = "deny"\nprotocol = "udp"\ndestination = "{FAR4}"\n')  # fmt: skip
    path, _daemon = start_passt(topo, "--config", str(conf))
    guest = PasstGuest(path)
    try:
        me, far = socket.inet_aton(HOST4), socket.inet_aton(FAR4)

        def send(packet: bytes) -> dpkt.ip.IP:
            guest.sock.sendall(framed(build_ethernet(OUR_MAC, GUEST_MAC, ETH_P_IP, packet)))
            (eth,) = guest.read_until(1)
            assert isinstance(eth.data, dpkt.ip.IP)
            return eth.data

        rst = send(SegmentBuilder(me, far, 40000, 7040).build(1000, 0, SYN, 65535, b"", syn_options(1460, 7)))
        assert (rst.src, rst.dst, rst.data.sport, rst.data.dport) == (far, me, 7040, 40000)
        assert rst.data.flags == dpkt.tcp.TH_RST | dpkt.tcp.TH_ACK and rst.data.ack == 1001
        icmp = send(build_udp4(me, far, 40001, 7041, b"query"))
        assert (icmp.src, icmp.p, icmp.data.type, icmp.data.code) == (far, 1, 3, 13)
        quoted = dpkt.ip.IP(bytes(icmp.data.data)[4:])  # after the unused word: the datagram's IP header
        assert (quoted.src, quoted.dst, quoted.data.sport, quoted.data.dport) == (me, far, 40001, 7041)
        synack = send(
            SegmentBuilder(me, far, 40002, 7041).build(5000, 0, SYN, 65535, b"", syn_options(1460, 7))
        )
        assert synack.data.flags == dpkt.tcp.TH_SYN | dpkt.tcp.TH_ACK and synack.data.ack == 5001
    finally:
        guest.sock.close()
