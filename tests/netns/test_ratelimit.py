"""Rate limits on a live passtd (issue 17): TCP paced both ways without loss, cleared at once, UDP over the
limit dropped and counted, bad requests refused naming the field, the [limits] table applied on SIGHUP.

Loose bounds on purpose: a 2 Mbit/s limit makes 1 MiB take about 4 s (it must take clearly more than 2 s),
unlimited it takes a small fraction of that. The precise rates are bench/run.py's `ratelimit` line.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from passtd.control.pb import passt_pb2, passt_pb2_grpc
from tests.netns.conftest import REMOTE4, Topology, wait_for
from tests.netns.test_metrics_live import PORT as METRICS_PORT
from tests.netns.test_metrics_live import samples, scrape
from tests.netns.test_tcp import connect, digest, serve

pytestmark = pytest.mark.netns
PASSTCTL = [sys.executable, "-m", "passtctl"]
IF = "eth0"
MiB = 1024 * 1024


def passtctl(ctl: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PASSTCTL, "-c", ctl, *args], capture_output=True, text=True, timeout=20, check=False
    )


def limits(ctl: str) -> dict[str, Any]:
    out = passtctl(ctl, "limits", "get", "-o", "json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def start(topo: Topology, *extra: str) -> str:
    ctl = str(topo.tmp / "ctl.sock")
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--config-net", "--control", ctl, *extra,
                wait_tap=IF)  # fmt: skip
    wait_for(lambda: os.path.exists(ctl), 10, "control socket")
    return ctl


def upload(topo: Topology, size: int, port: int) -> float:
    """Guest → host (through the tap to the gateway, the host's loopback): seconds for `size` bytes."""
    server = serve(topo, topo.host, "127.0.0.1", port, first="read", size=0, seed=1)
    t0 = time.monotonic()
    client = connect(topo, topo.guest, REMOTE4, port, size=size, seed=2, timeout=60)
    assert client.result() == {"rx_len": 0, "rx_sha": digest(0, 1)}
    took = time.monotonic() - t0
    assert server.result()["rx_sha"] == digest(size, 2)  # every byte, in order: shaped, not dropped
    return took


def download(topo: Topology, size: int, port: int) -> float:
    """Host → guest: the guest connects and reads `size` bytes."""
    server = serve(topo, topo.host, "127.0.0.1", port, size=size, seed=3)
    t0 = time.monotonic()
    client = connect(topo, topo.guest, REMOTE4, port, first="read", size=0, seed=4, timeout=60)
    assert client.result() == {"rx_len": size, "rx_sha": digest(size, 3)}
    took = time.monotonic() - t0
    server.result()
    return took


def test_tcp_is_paced_both_ways_and_clearing_restores_speed(topo: Topology) -> None:
    ctl = start(topo)
    fast_up = upload(topo, MiB, 5301)
    fast_down = download(topo, MiB, 5302)
    out = passtctl(ctl, "limits", "set", "--egress", "2M", "--ingress", "2M")
    assert out.returncode == 0, out.stderr
    assert "2 Mbit/s" in out.stdout
    slow_up = upload(topo, MiB, 5303)
    slow_down = download(topo, MiB, 5304)
    # 8 Mbit at 2 Mbit/s is 4.2 s (less the 16 KiB burst): clearly more than 2 s, not absurdly more
    assert 3.0 < slow_up < 10, (fast_up, slow_up)
    assert 3.0 < slow_down < 10, (fast_down, slow_down)
    got = limits(ctl)
    assert got["egress"]["rate"] == 2_000_000 and got["ingress"]["rate"] == 2_000_000
    counters = got["counters"]
    assert counters["egress.bytes"] >= MiB and counters["ingress.bytes"] >= MiB
    assert counters["tcp.egress.held"] > 0 and counters["tcp.ingress.held"] > 0
    assert "udp.egress.dropped" not in counters  # TCP is never dropped
    # Cleared: full speed again, at once
    out = passtctl(ctl, "limits", "set", "--egress", "none", "--ingress", "0")
    assert out.returncode == 0, out.stderr
    again_up = upload(topo, MiB, 5305)
    again_down = download(topo, MiB, 5306)
    assert again_up < 2.0 and again_down < 2.0, (again_up, again_down)
    assert limits(ctl)["egress"]["rate"] == 0


def test_a_limit_set_mid_transfer_applies_and_clearing_it_wakes_the_flow(topo: Topology) -> None:
    """A flow held for tokens under a very low limit resumes at once when the limit is cleared."""
    ctl = start(topo)
    assert passtctl(ctl, "limits", "set", "--ingress", "100k").returncode == 0
    server = serve(topo, topo.host, "127.0.0.1", 5311, size=4 * MiB, seed=5)
    t0 = time.monotonic()
    client = connect(topo, topo.guest, REMOTE4, 5311, first="read", size=0, seed=6, timeout=60)
    time.sleep(1.5)  # at 100 kbit/s, 4 MiB would take more than five minutes
    assert client.proc.poll() is None
    assert passtctl(ctl, "limits", "set", "--ingress", "none").returncode == 0
    assert client.result() == {"rx_len": 4 * MiB, "rx_sha": digest(4 * MiB, 5)}
    assert time.monotonic() - t0 < 10
    server.result()


UDP_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.send(bytes(1000))  # resolves the gateway's MAC first: the guest's kernel drops what it queues meanwhile
time.sleep(0.5)
for i in range(int(sys.argv[3])):
    s.send(i.to_bytes(4, "big") + bytes(996))
"""
UDP_COUNTER = """
import socket, sys, json
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(("127.0.0.1", int(sys.argv[1])))
s.settimeout(3.0)
print("ready", flush=True)
n = 0
try:
    while True:
        s.recv(2048)
        n += 1
except TimeoutError:
    pass
print(json.dumps({"received": n}), flush=True)
"""


def test_udp_beyond_the_bucket_is_dropped_and_counted(topo: Topology) -> None:
    ctl = start(topo, "--metrics-listen", str(METRICS_PORT))
    # 8 kbit/s with a 10 000-byte bucket: of 201 datagrams of 1000 bytes sent at once, about 10 pass
    assert passtctl(ctl, "limits", "set", "--egress", "8k", "--egress-burst", "10000").returncode == 0
    counter = subprocess.Popen(["ip", "netns", "exec", topo.host, sys.executable, "-c", UDP_COUNTER, "5320"],
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    topo.pids.append(counter.pid)
    assert counter.stdout is not None and counter.stdout.readline().strip() == "ready"
    sender = ["ip", "netns", "exec", topo.guest, sys.executable, "-c", UDP_SENDER, REMOTE4, "5320", "200"]
    subprocess.run(sender, check=True, timeout=20)
    out, _ = counter.communicate(timeout=20)
    received = json.loads(out.strip().splitlines()[-1])["received"]
    counters = limits(ctl)["counters"]
    dropped = counters["udp.egress.dropped"]
    assert 5 <= received <= 15, received
    assert received + dropped == 201, (received, dropped)
    assert counters["udp.egress.dropped_bytes"] == dropped * 1000
    status = json.loads(passtctl(ctl, "status", "-o", "json").stdout)
    assert status["counters"]["dropped"]["rate.udp.egress"] == dropped
    assert status["rate_limits"]["counters"]["udp.egress.dropped"] == dropped
    _, body = scrape(topo)
    got = samples(body)
    assert got[("passtd_rate_limit_dropped_total", (("direction", "egress"), ("protocol", "udp")))] == dropped
    assert got[("passtd_rate_limit_bits_per_second", (("direction", "egress"),))] == 8000
    assert got[("passtd_rate_limit_bits_per_second", (("direction", "ingress"),))] == 0


def test_bad_requests_name_the_field_and_change_nothing(topo: Topology) -> None:
    ctl = start(topo)
    assert passtctl(ctl, "limits", "set", "--egress", "10M", "--ingress", "1G").returncode == 0
    before = limits(ctl)
    for args, field in (
        (("--egress", "5"), "egress.rate"),
        (("--ingress", "2T"), "ingress.rate"),
        (("--egress", "1M", "--egress-burst", "100"), "egress.burst"),
    ):
        out = passtctl(ctl, "limits", "set", *args)
        assert out.returncode == 1 and field in out.stderr, (args, out.stderr)
    for args in (("--egress", "fast"), ("--burst", "1k"), ("--ingress-burst", "2k")):
        out = passtctl(ctl, "limits", "set", *args)
        assert out.returncode == 2, (args, out.stderr)
        assert out.stderr.count("\n") == 1, out.stderr  # one line
    with grpc.insecure_channel(f"unix:{ctl}") as channel:
        stub = passt_pb2_grpc.ControlStub(channel)
        request = passt_pb2.SetRateLimitsRequest(ingress=passt_pb2.RateLimit(rate=0, burst=5000))
        with pytest.raises(grpc.RpcError) as err:
            stub.SetRateLimits(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.details() or "").startswith("ingress.burst")
        # one direction at a time: the other is left as it is
        reply = stub.SetRateLimits(passt_pb2.SetRateLimitsRequest(egress=passt_pb2.RateLimit(rate=3000)))
        assert (reply.egress.rate, reply.ingress.rate) == (3000, 1_000_000_000)
    after = limits(ctl)
    assert after["ingress"] == before["ingress"]


def test_limits_table_applied_at_start_and_on_sighup(topo: Topology, tmp_path: Path) -> None:
    conf = tmp_path / "passtd.toml"
    conf.write_text('[limits]\negress = "20M"\ningress_burst = "64k"\ningress = 1000000\n')
    ctl = start(topo, "--config", str(conf))
    got = limits(ctl)
    assert (got["egress"]["rate"], got["ingress"]["rate"], got["ingress"]["burst"]) == (
        20_000_000,
        10**6,
        64000,
    )
    conf.write_text('[limits]\negress = "none"\ningress = "5M"\n')
    os.kill(topo.daemons[-1].proc.pid, signal.SIGHUP)
    wait_for(lambda: limits(ctl)["ingress"]["rate"] == 5_000_000, 10, "reloaded limits")
    assert limits(ctl)["egress"]["rate"] == 0
    # A bad table is one line naming the key, and what runs is kept
    conf.write_text('[limits]\negress = "lots"\n')
    os.kill(topo.daemons[-1].proc.pid, signal.SIGHUP)
    wait_for(lambda: "limits.egress" in topo.daemons[-1].output(), 10, "reload error in the log")
    assert limits(ctl)["ingress"]["rate"] == 5_000_000
