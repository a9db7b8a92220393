"""Host defaults: the pure choosers, resolv.conf parsing, and netlink reads against the real kernel.

The real-kernel tests only READ the machine's routes and addresses (and, as root, build their own namespace
with dummy links); no traffic is sent anywhere.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest

from passtd.dataplane.io.hostview import (
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_TEMPORARY,
    IFA_F_TENTATIVE,
    AddrInfo,
    RouteInfo,
    _family,
    parse_resolv_conf,
    pick_address,
    pick_default_route,
    read_host_view,
)

REPO = Path(__file__).resolve().parents[2]


def ips(*texts: str) -> tuple[IPv4Address | IPv6Address, ...]:
    return tuple(ip_address(t) for t in texts)


RESOLV: list[tuple[str, tuple[IPv4Address | IPv6Address, ...], tuple[str, ...]]] = [
    ("", (), ()),
    ("nameserver 192.0.2.53\n", ips("192.0.2.53"), ()),
    (
        "nameserver 192.0.2.53\nnameserver 2001:db8::53\nsearch a.example b.example\n",
        ips("192.0.2.53", "2001:db8::53"),
        ("a.example", "b.example"),
    ),
    ("# comment\n; other comment\nnameserver 192.0.2.1 # trailing\n", ips("192.0.2.1"), ()),
    ("#nameserver 192.0.2.9\n   nameserver\t192.0.2.10\n", ips("192.0.2.10"), ()),
    ("nameserver\nnameserver bogus\nnameserver 192.0.2.300\nnameserver 192.0.2.7\n", ips("192.0.2.7"), ()),
    ("nameserver fe80::1%eth0\nnameserver fe80::2\nnameserver fd00::53\n", ips("fd00::53"), ()),
    ("nameserver 192.0.2.7\nnameserver 192.0.2.7\n", ips("192.0.2.7"), ()),
    ("domain corp.example\n", (), ("corp.example",)),
    ("search a.example\ndomain corp.example.\n", (), ("corp.example",)),
    ("domain corp.example\nsearch a.example. a.example b.example\n", (), ("a.example", "b.example")),
    ("search .\n", (), ()),
    (
        "options ndots:2 edns0\nsortlist 130.155.160.0/255.255.240.0\nnameserver 127.0.0.53\n",
        ips("127.0.0.53"),
        (),
    ),
    ("nameserver 192.0.2.1\r\nsearch x.example\r\n", ips("192.0.2.1"), ("x.example",)),
    ("NAMESERVER 192.0.2.1\n", (), ()),
]


@pytest.mark.parametrize(("text", "servers", "search"), RESOLV)
def test_parse_resolv_conf(
    text: str, servers: tuple[IPv4Address | IPv6Address, ...], search: tuple[str, ...]
) -> None:
    assert parse_resolv_conf(text) == (servers, search)


def test_pick_default_route() -> None:
    assert pick_default_route([]) is None
    a = RouteInfo(100, 2, "192.0.2.1")
    b = RouteInfo(50, 3, "198.51.100.1")
    c = RouteInfo(50, 4, "203.0.113.1")
    assert pick_default_route([a]) == a
    assert pick_default_route([a, b, c]) == b
    assert pick_default_route([c, a, b]) == c


def test_pick_address() -> None:
    glob = AddrInfo("2001:db8::2", 64, 0, 0)
    link = AddrInfo("fe80::2", 64, 253, 0)
    assert pick_address([], None) is None
    assert pick_address([link], None) is None
    for bad in (IFA_F_DEPRECATED, IFA_F_TENTATIVE, IFA_F_DADFAILED):
        assert pick_address([AddrInfo("2001:db8::9", 64, 0, bad)], None) is None
        assert pick_address([AddrInfo("2001:db8::9", 64, 0, bad), glob], None) == glob
    temp = AddrInfo("2001:db8::abcd", 64, 0, IFA_F_TEMPORARY)
    assert pick_address([temp, glob], None) == glob
    assert pick_address([temp], None) == temp
    other = AddrInfo("192.0.2.2", 24, 0, 0)
    onlink = AddrInfo("198.51.100.2", 24, 0, 0)
    assert pick_address([other, onlink], "198.51.100.1") == onlink
    assert pick_address([other, onlink], None) == other
    assert pick_address([other, onlink], "203.0.113.1") == other


class FakeMsg(dict[str, Any]):
    """Enough of a pyroute2 message: header fields by key, attributes by get_attr()."""

    def __init__(self, attrs: dict[str, Any], **header: Any) -> None:
        super().__init__(header)
        self.attrs = attrs

    def get_attr(self, name: str) -> Any:
        return self.attrs.get(name)


class FakeIPRoute:
    def __init__(self, routes: list[FakeMsg], addrs: dict[int, list[FakeMsg]], links: dict[int, str]) -> None:
        self.routes, self.addrs, self.links = routes, addrs, links

    def get_default_routes(self, family: int) -> list[FakeMsg]:
        assert family == socket.AF_INET
        return self.routes

    def get_addr(self, family: int, index: int) -> list[FakeMsg]:
        return self.addrs.get(index, [])

    def get_links(self, index: int) -> list[FakeMsg]:
        return [FakeMsg({"IFLA_IFNAME": self.links[index]})] if index in self.links else []


def test_family_skips_blackhole_and_follows_multipath() -> None:
    routes = [
        FakeMsg({"RTA_PRIORITY": 1}, type=6),  # blackhole default: carries nothing
        FakeMsg(
            {"RTA_PRIORITY": 10, "RTA_MULTIPATH": [FakeMsg({"RTA_GATEWAY": "198.51.100.1"}, oif=7)]}, type=1
        ),
        FakeMsg({"RTA_PRIORITY": 20, "RTA_OIF": 2, "RTA_GATEWAY": "192.0.2.1"}, type=1),
        FakeMsg({"RTA_PRIORITY": 5, "RTA_MULTIPATH": []}, type=1),
    ]
    addrs = {
        7: [FakeMsg({"IFA_ADDRESS": "198.51.100.2"}, prefixlen=24, scope=0, flags=0)],
        2: [FakeMsg({"IFA_ADDRESS": "192.0.2.2", "IFA_FLAGS": 0}, prefixlen=24, scope=0, flags=0)],
    }
    ipr = FakeIPRoute(routes, addrs, {7: "bond0", 2: "eth0"})
    assert _family(ipr, socket.AF_INET) == ("bond0", "198.51.100.2", 24, "198.51.100.1")
    assert _family(FakeIPRoute([], addrs, {}), socket.AF_INET) == (None, None, None, None)
    no_addr = FakeIPRoute([routes[2]], {}, {2: "eth0"})
    assert _family(no_addr, socket.AF_INET) == ("eth0", None, None, "192.0.2.1")
    # the 32-bit IFA_FLAGS attribute wins over the header's 8-bit field
    deprecated = {
        2: [
            FakeMsg(
                {"IFA_ADDRESS": "192.0.2.2", "IFA_FLAGS": IFA_F_DEPRECATED}, prefixlen=24, scope=0, flags=0
            )
        ]
    }
    assert _family(FakeIPRoute([routes[2]], deprecated, {2: "eth0"}), socket.AF_INET)[1] is None


def test_read_host_view_reads_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("nameserver 192.0.2.53\nnameserver fd00::53\nsearch test.example\n")
    view = read_host_view(str(conf))
    assert view.nameservers == ips("192.0.2.53", "fd00::53")
    assert view.search == ("test.example",)
    missing = read_host_view(str(tmp_path / "missing"))
    assert (missing.nameservers, missing.search) == ((), ())


def _ip_json(*args: str, netns: str | None = None) -> Any:
    prefix = ["ip", "-n", netns] if netns else ["ip"]
    out = subprocess.run(
        [*prefix, "-j", *args], capture_output=True, text=True, timeout=10, check=True
    ).stdout
    return json.loads(out) if out.strip() else []


def _expected_family(family: str) -> tuple[str, str | None, set[tuple[str, int]]] | None:
    """(dev, gateway, {(addr, prefix)} of global usable addresses on dev) for the lowest-metric default."""
    routes = [
        r for r in _ip_json(family, "route", "show", "default") if r.get("type", "unicast") == "unicast"
    ]
    routes = [r for r in routes if "dev" in r]
    if not routes:
        return None
    best = min(routes, key=lambda r: r.get("metric", 0))
    inet = "inet" if family == "-4" else "inet6"
    addrs = {
        (a["local"], a["prefixlen"])
        for link in _ip_json(family, "addr", "show", "dev", best["dev"])
        for a in link.get("addr_info", [])
        if a["family"] == inet
        and a["scope"] == "global"
        and not a.get("deprecated")
        and not a.get("tentative")
    }
    return best["dev"], best.get("gateway"), addrs


@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed")
def test_read_host_view_matches_ip_command() -> None:
    exp4, exp6 = _expected_family("-4"), _expected_family("-6")
    if exp4 is None and exp6 is None:
        pytest.skip("the host has no default route")
    view = read_host_view()
    got = (
        (view.ifname4, view.gw4, view.addr4, view.prefix4),
        (view.ifname6, view.gw6, view.addr6, view.prefix6),
    )
    for exp, (ifname, gw, addr, prefix) in zip((exp4, exp6), got, strict=True):
        if exp is None:
            assert (ifname, gw, addr, prefix) == (None, None, None, None)
            continue
        dev, gateway, addrs = exp
        assert ifname == dev
        assert gw == (None if gateway is None else ip_address(gateway))
        if addrs:
            assert addr is not None
            assert (str(addr), prefix) in addrs
        else:
            assert addr is None


# --------------------------------------------------------------------------- a namespace of our own (root)


def _ns(netns: str, *args: str) -> None:
    subprocess.run(["ip", "-n", netns, *args], check=True, capture_output=True, timeout=10)


def _view_in(netns: str) -> dict[str, Any]:
    code = (
        "import json, dataclasses; from passtd.dataplane.io.hostview import read_host_view; "
        "v = read_host_view('/nonexistent'); "
        "print(json.dumps({k: (None if x is None else str(x)) for k, x in dataclasses.asdict(v).items() "
        "if k not in ('nameservers', 'search')}))"
    )
    proc = subprocess.run(
        ["ip", "netns", "exec", netns, sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


@pytest.mark.netns
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create network namespaces")
@pytest.mark.skipif(shutil.which("ip") is None, reason="iproute2 `ip` is not installed")
def test_read_host_view_in_namespace(netns_name: str) -> None:
    netns = netns_name
    assert _view_in(netns) == dict.fromkeys(
        ("ifname4", "addr4", "prefix4", "gw4", "ifname6", "addr6", "prefix6", "gw6")
    )
    for dev in ("hv0", "hv1"):  # veth pairs kept inside the namespace: no dummy module needed
        _ns(netns, "link", "add", dev, "type", "veth", "peer", "name", f"{dev}p")
        _ns(netns, "link", "set", f"{dev}p", "up")
        _ns(netns, "link", "set", dev, "up")
    _ns(netns, "addr", "add", "10.77.0.2/24", "dev", "hv0")
    _ns(netns, "addr", "add", "10.78.0.9/16", "dev", "hv1")
    _ns(netns, "addr", "add", "10.79.0.9/24", "dev", "hv1")
    _ns(netns, "route", "add", "default", "via", "10.77.0.1", "metric", "100")
    _ns(netns, "route", "add", "default", "via", "10.79.0.1", "metric", "50")
    _ns(netns, "-6", "addr", "add", "fd77::3/64", "dev", "hv0", "nodad", "preferred_lft", "0")
    _ns(netns, "-6", "addr", "add", "fd77::2/64", "dev", "hv0", "nodad")
    _ns(netns, "-6", "route", "add", "default", "via", "fd77::1", "dev", "hv0")
    view = _view_in(netns)
    assert view == {
        "ifname4": "hv1",
        "addr4": "10.79.0.9",  # the address whose subnet holds the gateway
        "prefix4": "24",
        "gw4": "10.79.0.1",
        "ifname6": "hv0",
        "addr6": "fd77::2",  # fd77::3 is deprecated
        "prefix6": "64",
        "gw6": "fd77::1",
    }
