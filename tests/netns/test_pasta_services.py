"""pasta mode end to end: real DHCP clients, SLAAC, DHCPv6 and ping in a guest namespace behind passtd."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.netns.conftest import (
    FAR4,
    FAR6,
    HOST4,
    HOST6,
    HOST_DNS,
    HOST_SEARCH,
    OUR_LL,
    REMOTE4,
    REMOTE6,
    Topology,
    ip_json,
    sh,
    wait_for,
)

pytestmark = pytest.mark.netns
IF = "eth0"


def addrs(topo: Topology, family: str) -> list[tuple[str, int]]:
    out = []
    for link in ip_json(topo.guest, family, "addr", "show", "dev", IF):
        out += [(a["local"], a["prefixlen"]) for a in link.get("addr_info", []) if a.get("scope") == "global"]
    return out


def routes(topo: Topology, family: str) -> list[dict[str, object]]:
    return list(ip_json(topo.guest, family, "route", "show", "default"))


def test_dhclient_gets_the_hosts_configuration(topo: Topology) -> None:
    # pasta offers nameservers and search domains by DHCP only when asked (upstream: --dhcp-dns/--dhcp-search)
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--dhcp-dns", "--dhcp-search", wait_tap=IF)
    lease = topo.dhclient(IF, "-4")
    assert addrs(topo, "-4") == [(HOST4, 24)]
    assert [(r["gateway"], r["dev"]) for r in routes(topo, "-4")] == [(REMOTE4, IF)]
    assert ip_json(topo.guest, "link", "show", "dev", IF)[0]["mtu"] == 65520
    assert f"option domain-name-servers {HOST_DNS};" in lease
    assert "option interface-mtu 65520;" in lease
    assert f'option domain-search "{HOST_SEARCH}.";' in lease
    assert "option dhcp-lease-time 4294967295;" in lease
    resolv = Path(f"/etc/netns/{topo.guest}/resolv.conf").read_text()
    assert f"nameserver {HOST_DNS}" in resolv and HOST_SEARCH in resolv


def test_mtu_zero_assigns_no_mtu(topo: Topology) -> None:
    """-m 0: the tap keeps the kernel's MTU and the lease offers none (passt: "disables assignment")."""
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "-m", "0", wait_tap=IF)
    lease = topo.dhclient(IF, "-4")
    assert addrs(topo, "-4") == [(HOST4, 24)]
    assert ip_json(topo.guest, "link", "show", "dev", IF)[0]["mtu"] == 1500
    assert "interface-mtu" not in lease


def test_pasta_offers_no_dns_by_dhcp_unless_asked(topo: Topology) -> None:
    """As upstream pasta: the namespace usually shares the host's resolv.conf, so DHCP carries no DNS."""
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, wait_tap=IF)
    lease = topo.dhclient(IF, "-4")
    assert addrs(topo, "-4") == [(HOST4, 24)]
    assert "domain-name-servers" not in lease and "domain-search" not in lease


def test_dhclient_with_explicit_addresses(topo: Topology) -> None:
    topo.passtd(
        "pasta", "-f", "-I", IF, "--netns", topo.guest,
        "-a", "10.99.0.5", "-n", "16", "-g", "10.99.0.1", "-D", "10.99.0.53", "-D", "10.99.0.54",
        "-S", "one.test", "-S", "two.test", "-m", "9000", "--dhcp-dns", "--dhcp-search",
        wait_tap=IF,
    )  # fmt: skip
    lease = topo.dhclient(IF, "-4")
    assert addrs(topo, "-4") == [("10.99.0.5", 16)]
    assert [r["gateway"] for r in routes(topo, "-4")] == ["10.99.0.1"]
    assert ip_json(topo.guest, "link", "show", "dev", IF)[0]["mtu"] == 9000
    assert "option domain-name-servers 10.99.0.53,10.99.0.54;" in lease
    assert 'option domain-search "one.test.", "two.test.";' in lease


def test_busybox_udhcpc(topo: Topology) -> None:
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--dhcp-dns", "--dhcp-search", wait_tap=IF)
    dump = topo.tmp / "udhcpc.env"
    script = topo.tmp / "udhcpc.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {dump}\nexit 0\n')
    script.chmod(0o755)
    sh("busybox", "udhcpc", "-i", IF, "-n", "-q", "-f", "-t", "3", "-T", "2", "-O", "mtu", "-O", "search",
       "-s", str(script), ns=topo.guest, timeout=30)  # fmt: skip
    env = dict(line.split("=", 1) for line in dump.read_text().splitlines() if "=" in line)
    assert env["ip"] == HOST4
    assert env["subnet"] == "255.255.255.0"
    assert env["router"].split() == [REMOTE4]
    assert env["dns"].split() == [HOST_DNS]
    assert env["mtu"] == "65520"
    assert env["search"].split() == [HOST_SEARCH]
    assert env["lease"] == "4294967295"


def test_slaac_and_router_advertisement(topo: Topology) -> None:
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, wait_tap=IF)
    sh("sysctl", "-qw", f"net.ipv6.conf.{IF}.accept_ra=2", ns=topo.guest)
    got = wait_for(lambda: [a for a in addrs(topo, "-6") if a[0].startswith("fd77:")], 15, "SLAAC address")
    assert got[0][1] == 64
    default = wait_for(lambda: routes(topo, "-6"), 10, "IPv6 default route")
    assert default[0]["gateway"] == OUR_LL
    rdisc = sh("rdisc6", "-1", "-w", "3000", IF, ns=topo.guest, timeout=20).stdout
    assert "fd77::/64" in rdisc
    assert "65520" in rdisc  # MTU option
    assert "Recursive DNS server" not in rdisc  # the host has no IPv6 nameserver in this topology


def test_dhclient6_gets_the_128(topo: Topology) -> None:
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "-D", "fd77::53", "--dhcp-dns", wait_tap=IF)
    sh("sysctl", "-qw", f"net.ipv6.conf.{IF}.accept_ra=0", ns=topo.guest)
    topo.wait_link_local(IF)
    lease = topo.dhclient(IF, "-6")
    assert (HOST6, 128) in addrs(topo, "-6")
    assert "fd77::53" in lease


def test_ping_remote_and_gateway(topo: Topology) -> None:
    # The remote drops (and counts) any echo request aimed at its own gateway addresses: a ping of the
    # gateway that leaves the host would be lost and counted here.
    rules = topo.tmp / "rules.nft"
    rules.write_text(
        "table inet t {\n chain in {\n  type filter hook input priority 0;\n"
        f"  ip daddr {REMOTE4} icmp type echo-request counter drop\n"
        f"  ip6 daddr {REMOTE6} icmpv6 type echo-request counter drop\n }}\n}}\n"
    )
    sh("nft", "-f", str(rules), ns=topo.remote)
    topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, "--config-net", wait_tap=IF)
    topo.wait_link_local(IF)
    for target in (FAR4, FAR6, REMOTE4, REMOTE6):
        out = sh("ping", "-c", "2", "-i", "0.2", "-W", "3", target, ns=topo.guest, timeout=20, check=False)
        assert out.returncode == 0, f"ping {target}: {out.stdout}{out.stderr}"
    counters = sh("nft", "list", "ruleset", ns=topo.remote).stdout
    assert counters.count("counter packets 0 bytes 0") == 2, counters


def test_spawned_command_exit_code_and_config_net(topo: Topology) -> None:
    script = f"ip -j addr show dev {IF} > {topo.tmp}/addr.json; ip -j route > {topo.tmp}/route.json; exit 7"
    daemon = topo.passtd("pasta", "-f", "-I", IF, "--config-net", "--", "sh", "-c", script)
    assert daemon.proc.wait(20) == 7, daemon.output()
    text = (topo.tmp / "addr.json").read_text()
    assert HOST4 in text and HOST6 in text and '"mtu":65520' in text
    assert REMOTE4 in (topo.tmp / "route.json").read_text()


def test_exits_when_the_namespace_is_deleted(topo: Topology) -> None:
    daemon = topo.passtd("pasta", "-f", "-I", IF, "--netns", topo.guest, wait_tap=IF)
    sh("ip", "netns", "del", topo.guest)
    try:
        assert daemon.proc.wait(10) == 0, daemon.output()
    finally:
        sh("ip", "netns", "add", topo.guest)  # so the fixture's clean-up finds it


def test_attach_by_pid(topo: Topology) -> None:
    sleeper = os.path.join(topo.tmp, "sleep.pid")
    sh("sh", "-c", f"sleep 60 >/dev/null 2>&1 & echo $! > {sleeper}", ns=topo.guest)
    pid = int(Path(sleeper).read_text())
    topo.pids.append(pid)
    daemon = topo.passtd("pasta", "-f", "-I", "tap1", str(pid), wait_tap="tap1")
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
