"""Transactional forwarding on a live pasta, driven with passtctl: rule ids, a refused transaction, dry run,
per-rule counters of a real connection, and more than 255 rules."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from tests.netns.conftest import Topology, sh, wait_for
from tests.netns.test_control_live import TOOL, line, passtctl, spawn, start

pytestmark = pytest.mark.netns


def listening(topo: Topology) -> list[str]:
    """The host namespace's TCP listening sockets as `ss -Htln` prints them (local address:port), sorted."""
    out = sh("ss", "-Htln", ns=topo.host).stdout
    return sorted(row.split()[3] for row in out.splitlines() if row.strip())


def policy(ctl: str) -> dict[str, Any]:
    out = passtctl("-c", ctl, "ports", "list", "-o", "json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


def tcp_in(ctl: str) -> dict[str, Any]:
    return next(t for t in policy(ctl)["tables"] if t["direction"] == "tcp_in")


def test_refused_transaction_dry_run_ids_and_counters(topo: Topology) -> None:
    ctl = start(topo, "-t", "20001", "-T", "none", "-U", "none")  # no auto scan changing the tables
    # Port 20007 is taken on the host's loopback by someone else (this test) before passtd tries it.
    squatter = spawn(topo, topo.host, sys.executable, "-c",
                     "import socket, sys, time\n"
                     "s = socket.socket(); s.bind(('127.0.0.1', 20007)); s.listen()\n"
                     "print('ready', flush=True); time.sleep(60)")  # fmt: skip
    assert line(squatter) == "ready"
    before_ss, before_policy = listening(topo), policy(ctl)
    assert "127.0.0.1:20007" in before_ss and "0.0.0.0:20001" in before_ss
    (rule,) = tcp_in(ctl)["rules"]
    assert int(rule["id"]) > 0 and rule["first"] == 20001

    refused = passtctl("-c", ctl, "ports", "add", "20005,20007")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "not applied" in refused.stderr and "20007" in refused.stderr, refused.stderr
    assert "EADDRINUSE" in refused.stderr and "nothing changed" in refused.stderr, refused.stderr
    assert listening(topo) == before_ss  # 20005 was bound during the transaction, and closed again
    assert policy(ctl) == before_policy

    dry = passtctl("-c", ctl, "ports", "add", "--dry-run", "20005")
    assert dry.returncode == 0, dry.stdout + dry.stderr
    assert dry.stdout.startswith("dry run, nothing changed: tcp_in (-t): 20001 -> 20001,20005"), dry.stdout
    assert "tcp 0.0.0.0:20005: free" in dry.stdout, dry.stdout
    assert listening(topo) == before_ss and policy(ctl) == before_policy
    dry_bad = passtctl("-c", ctl, "ports", "add", "--dry-run", "20007")
    assert dry_bad.returncode == 1 and "EADDRINUSE" in dry_bad.stderr, dry_bad.stderr

    added = passtctl("-c", ctl, "ports", "add", "20005")
    assert added.returncode == 0, added.stdout + added.stderr
    assert "rule ids added: " in added.stdout, added.stdout
    new_id = int(added.stdout.split("rule ids added: ")[1].split()[0])
    assert "0.0.0.0:20005" in listening(topo)
    # A real connection through rule `new_id`: 777 bytes from the guest's server to the host's client.
    server = spawn(topo, topo.guest, sys.executable, TOOL, "serve", "0.0.0.0", "20005", "--size", "777",
                   "--timeout", "20")  # fmt: skip
    assert line(server) == "ready"
    out = sh(sys.executable, TOOL, "connect", "127.0.0.1", "20005", "--first", "read", "--timeout", "20",
             ns=topo.host)  # fmt: skip
    assert json.loads(out.stdout)["rx_len"] == 777

    def counted() -> dict[str, Any] | None:
        rules = {int(r["id"]): r for r in tcp_in(ctl)["rules"]}
        counters = rules[new_id].get("counters", {})
        return counters if int(counters.get("bytes_out", 0)) >= 777 else None

    counters = wait_for(counted, 10, "the connection counted in its rule")
    assert int(counters["connections"]) == 1, counters
    first = next(r for r in tcp_in(ctl)["rules"] if r["first"] == 20001)
    assert int(first.get("counters", {}).get("connections", 0)) == 0  # the other rule saw nothing
    table = passtctl("-c", ctl, "ports", "list")
    row = next(r.split() for r in table.stdout.splitlines() if r.startswith(f"{new_id} "))
    assert row[:4] == [str(new_id), "tcp_in", "20005", "1"], table.stdout

    # Removed by id: the rule, its socket and its counters go; 20001 stays.
    removed = passtctl("-c", ctl, "ports", "remove", "--id", str(new_id))
    assert removed.returncode == 0, removed.stdout + removed.stderr
    assert "0.0.0.0:20005" not in listening(topo) and "0.0.0.0:20001" in listening(topo)
    gone = passtctl("-c", ctl, "ports", "remove", "--id", str(new_id))
    assert gone.returncode == 1 and f"no forwarding rule with id {new_id}" in gone.stderr, gone.stderr


def test_more_than_255_rules_through_passtctl(topo: Topology) -> None:
    ctl = start(topo, "-t", "none", "-u", "none", "-T", "none", "-U", "none")
    ports = list(range(30000, 30600, 2))  # 300 ports, none adjacent: 300 rules
    for chunk in (ports[:150], ports[150:]):
        out = passtctl("-c", ctl, "ports", "add", ",".join(map(str, chunk)))
        assert out.returncode == 0, out.stdout[-500:] + out.stderr
    rules = tcp_in(ctl)["rules"]
    assert len(rules) == 300 and len({r["id"] for r in rules}) == 300
    assert sum(1 for a in listening(topo) if a.startswith("0.0.0.0:30")) == 300
    server = spawn(topo, topo.guest, sys.executable, TOOL, "serve", "0.0.0.0", "30598", "--size", "5",
                   "--timeout", "20")  # fmt: skip
    assert line(server) == "ready"
    out = sh(sys.executable, TOOL, "connect", "127.0.0.1", "30598", "--first", "read", "--timeout", "20",
             ns=topo.host)  # fmt: skip
    assert json.loads(out.stdout)["rx_len"] == 5  # the 300th rule forwards
    ids = [str(r["id"]) for r in rules[:260]]
    args = [a for i in ids for a in ("--id", i)]
    out = passtctl("-c", ctl, "ports", "remove", *args)
    assert out.returncode == 0, out.stdout[-500:] + out.stderr
    assert len(tcp_in(ctl)["rules"]) == 40
    assert sum(1 for a in listening(topo) if a.startswith("0.0.0.0:30")) == 40


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(20)
print("ready", flush=True)
for _ in range(3):
    data, peer = s.recvfrom(2048)
    s.sendto(data, peer)
"""

UDP_CLIENT = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
got = 0
for _ in range(3):
    s.sendto(b"x" * 100, ("127.0.0.1", int(sys.argv[1])))
    got += len(s.recv(2048))
print(got)
"""


def test_udp_rule_counts_datagrams_and_bytes(topo: Topology) -> None:
    ctl = start(topo, "-t", "none", "-u", "20011", "-T", "none", "-U", "none")
    server = spawn(topo, topo.guest, sys.executable, "-c", UDP_ECHO, "20011")
    assert line(server) == "ready"
    out = sh(sys.executable, "-c", UDP_CLIENT, "20011", ns=topo.host, timeout=20)
    assert out.stdout.strip() == "300"
    (table,) = [t for t in policy(ctl)["tables"] if t["direction"] == "udp_in"]
    (rule,) = table["rules"]
    counters = {k: int(v) for k, v in rule["counters"].items()}
    assert counters == {"connections": 0, "datagrams": 3, "bytes_in": 300, "bytes_out": 300}, counters
