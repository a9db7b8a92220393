"""Command line → Config: good argv against an injected host view; one exact line per bad option."""

from __future__ import annotations

import subprocess
import sys
import types
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import passtd
from passtd.__main__ import main
from passtd.config import Config, default_socket_path
from passtd.dataplane.core.context import DEFAULT_MAC, Context, Ip4Net, Ip6Net, link_local_from_mac
from passtd.dataplane.io.hostview import HostView
from passtd.errors import ConfigError
from passtd.options import parse_args

REPO = Path(__file__).resolve().parents[1]
OUR_LL = link_local_from_mac(DEFAULT_MAC)

HOST = HostView(
    ifname4="eth0",
    addr4=IPv4Address("192.0.2.2"),
    prefix4=24,
    gw4=IPv4Address("192.0.2.1"),
    ifname6="eth1",
    addr6=IPv6Address("fd00::2"),
    prefix6=56,
    gw6=IPv6Address("fe80::1"),
    nameservers=(IPv4Address("192.0.2.53"), IPv6Address("fd00::53"), IPv4Address("127.0.0.53")),
    search=("example.org", "example.net"),
)
EMPTY = HostView()
V6ONLY = HostView(ifname6="wlan0", addr6=IPv6Address("2001:db8::2"), prefix6=64, gw6=IPv6Address("fe80::1"))


def field(config: Config, path: str) -> Any:
    value: Any = config
    for name in path.split("."):
        value = getattr(value, name)
    return value


def ip(text: str) -> Any:
    return ip_address(text)


GOOD: list[tuple[list[str], HostView, dict[str, Any]]] = [
    # host defaults, copied as passt does
    (
        ["passt"],
        HOST,
        {
            "mode": "passt",
            "ctx.mtu": 65520,
            "ctx.our_mac": DEFAULT_MAC,
            # the host's loopback resolver (127.0.0.53) is offered as the gateway, and relayed (passt does so)
            "ctx.ip4": Ip4Net(ip("192.0.2.2"), 24, ip("192.0.2.1"), (ip("192.0.2.53"), ip("192.0.2.1"))),
            "ctx.ip6": Ip6Net(ip("fd00::2"), 56, ip("fe80::1"), OUR_LL, (ip("fd00::53"),)),
            "ctx.dns_forward": (ip("192.0.2.1"),),
            "ctx.dns_upstream": (ip("192.0.2.53"), ip("fd00::53")),
            "ctx.search": ("example.org", "example.net"),
            "ctx.dhcp": True,
            "ctx.ndp": True,
            "ctx.dhcpv6": True,
            "ctx.ra": True,
            "ctx.icmp": True,
            "ctx.map_gw": True,
            "socket_path": "/run/passtd/passtd.socket",
            "one_off": False,
            "netns": None,
            "netns_pid": None,
            "command": None,
            "ns_ifname": "eth0",
            "config_net": False,
            "pcap": None,
            "pid_file": None,
            "foreground": False,
            "debug": False,
            "quiet": False,
            "log_format": "console",
        },
    ),
    (["passt"], EMPTY, {"ctx.ip4": None, "ctx.ip6": None, "ns_ifname": "tap0", "ctx.search": ()}),
    (["pasta"], V6ONLY, {"ctx.ip4": None, "ctx.ip6.addr": ip("2001:db8::2"), "ns_ifname": "wlan0"}),
    (["passt", "-s", "/tmp/q.sock", "-1"], HOST, {"socket_path": "/tmp/q.sock", "one_off": True}),
    (["passt", "--socket=/tmp/q.sock", "--one-off"], HOST, {"socket_path": "/tmp/q.sock", "one_off": True}),
    # -a/-n/-g
    (["passt", "-a", "10.0.0.5"], HOST, {"ctx.ip4.addr": ip("10.0.0.5"), "ctx.ip4.prefix_len": 24}),
    (["passt", "-a", "10.0.0.5"], HOST, {"ctx.ip4.gateway": ip("192.0.2.1")}),
    (["passt", "-a", "10.0.0.5", "-n", "255.255.0.0"], HOST, {"ctx.ip4.prefix_len": 16}),
    (["passt", "-a", "10.0.0.5", "-n", "20"], HOST, {"ctx.ip4.prefix_len": 20}),
    (["passt", "-a", "10.0.0.5/20", "-n", "20"], HOST, {"ctx.ip4.prefix_len": 20}),
    (["passt", "-a", "10.0.0.5/12"], HOST, {"ctx.ip4.prefix_len": 12}),
    (
        ["passt", "-a", "10.0.0.5", "-n", "255.255.255.255", "-g", "10.0.0.1"],
        HOST,
        {"ctx.ip4.prefix_len": 32},
    ),
    (
        ["passt", "-a", "10.0.0.5"],
        EMPTY,
        {"ctx.ip4": Ip4Net(ip("10.0.0.5"), 24, ip("10.0.0.1")), "ctx.ip6": None},
    ),
    (["passt", "-a", "10.0.0.1"], EMPTY, {"ctx.ip4.gateway": ip("10.0.0.2")}),
    (["passt", "-a", "10.0.0.5/31"], EMPTY, {"ctx.ip4.gateway": ip("10.0.0.4")}),
    (["passt", "-a", "10.0.0.4/31"], EMPTY, {"ctx.ip4.gateway": ip("10.0.0.5")}),
    (["passt", "-a", "10.0.0.5", "-g", "10.0.0.254"], EMPTY, {"ctx.ip4.gateway": ip("10.0.0.254")}),
    (
        ["passt", "-g", "192.0.2.254"],
        HOST,
        {"ctx.ip4.addr": ip("192.0.2.2"), "ctx.ip4.gateway": ip("192.0.2.254")},
    ),
    (["passt", "-a", "fd01::5"], HOST, {"ctx.ip6.addr": ip("fd01::5"), "ctx.ip6.prefix_len": 56}),
    (["passt", "-a", "fd01::5/48"], HOST, {"ctx.ip6.prefix_len": 48, "ctx.ip6.gateway": ip("fe80::1")}),
    (
        ["passt", "-a", "fd01::5"],
        EMPTY,
        {"ctx.ip6": Ip6Net(ip("fd01::5"), 64, OUR_LL, OUR_LL), "ctx.ip4": None},
    ),
    (
        ["passt", "-a", "fd01::5", "-M", "02:00:00:00:00:01"],
        EMPTY,
        {"ctx.our_mac": bytes.fromhex("020000000001"), "ctx.ip6.our_ll": ip("fe80::ff:fe00:1")},
    ),
    (["passt", "-g", "fd00::fe", "-g", "192.0.2.9"], HOST, {"ctx.ip6.gateway": ip("fd00::fe")}),
    (["passt", "-g", "fd00::fe", "-g", "192.0.2.9"], HOST, {"ctx.ip4.gateway": ip("192.0.2.9")}),
    (["passt", "-a", "10.1.1.1", "-a", "fd01::1"], EMPTY, {"ctx.ip4.addr": ip("10.1.1.1")}),
    (["passt", "-a", "10.1.1.1", "-a", "fd01::1"], EMPTY, {"ctx.ip6.addr": ip("fd01::1")}),
    # families
    (["passt", "-4"], HOST, {"ctx.ip6": None, "ctx.ip4.addr": ip("192.0.2.2")}),
    (["passt", "--ipv6-only"], HOST, {"ctx.ip4": None, "ctx.ip6.addr": ip("fd00::2")}),
    (["passt", "-m", "1000"], HOST, {"ctx.mtu": 1000, "ctx.ip6": None, "ctx.ip4.addr": ip("192.0.2.2")}),
    (["passt", "--mtu", "68"], HOST, {"ctx.mtu": 68, "ctx.ip6": None}),
    (["passt", "--mtu=1280"], HOST, {"ctx.mtu": 1280, "ctx.ip6.addr": ip("fd00::2")}),
    (["passt", "-m", "65520"], HOST, {"ctx.mtu": 65520}),
    # DNS and search
    (
        ["passt", "-D", "9.9.9.9", "--dns", "2620:fe::fe", "-D", "9.9.9.9"],
        HOST,
        {"ctx.ip4.dns": (ip("9.9.9.9"),), "ctx.ip6.dns": (ip("2620:fe::fe"),)},
    ),
    (["passt", "-D", "127.0.0.1"], HOST, {"ctx.ip4.dns": (ip("127.0.0.1"),), "ctx.ip6.dns": ()}),
    (["passt", "-D", "none"], HOST, {"ctx.ip4.dns": (), "ctx.ip6.dns": ()}),
    (["passt", "-D", "2620:fe::fe", "-4"], HOST, {"ctx.ip4.dns": (), "ctx.ip6": None}),
    (
        ["passt", "-S", "a.example b.example.", "-S", "c.example"],
        HOST,
        {"ctx.search": ("a.example", "b.example", "c.example")},
    ),
    (["passt", "--search", "none"], HOST, {"ctx.search": ()}),
    (["passt", "-S", "x_y.example"], HOST, {"ctx.search": ("x_y.example",)}),
    # services
    (
        ["passt", "--no-dhcp", "--no-dhcpv6", "--no-ra", "--no-icmp", "--no-map-gw"],
        HOST,
        {
            "ctx.dhcp": False,
            "ctx.dhcpv6": False,
            "ctx.ra": False,
            "ctx.icmp": False,
            "ctx.map_gw": False,
            "ctx.ndp": True,
        },
    ),
    (["passt", "--no-ndp"], HOST, {"ctx.ndp": False, "ctx.ra": False, "ctx.dhcpv6": True}),
    (["passt", "-M", "9A:55:9a:55:9a:1"], HOST, {"ctx.our_mac": bytes.fromhex("9a559a559a01")}),
    # process
    (
        ["passt", "-f", "-d", "-p", "/tmp/x.pcap", "-P", "/tmp/x.pid", "--log-format", "json"],
        HOST,
        {
            "foreground": True,
            "debug": True,
            "pcap": "/tmp/x.pcap",
            "pid_file": "/tmp/x.pid",
            "log_format": "json",
        },
    ),
    (["pasta", "-q", "--log-format=console"], HOST, {"quiet": True, "debug": False, "log_format": "console"}),
    # pasta targets
    (
        ["pasta"],
        HOST,
        {
            "mode": "pasta",
            "command": (),
            "netns": None,
            "netns_pid": None,
            "socket_path": None,
            "one_off": False,
        },
    ),
    (["pasta", "1234"], HOST, {"netns_pid": 1234, "command": None, "netns": None}),
    (["pasta", "-4", "--", "sh", "-c", "ip a"], HOST, {"command": ("sh", "-c", "ip a"), "ctx.ip6": None}),
    (["pasta", "--"], HOST, {"command": ()}),
    (["pasta", "--", "1234"], HOST, {"command": ("1234",), "netns_pid": None}),
    (
        ["pasta", "ping", "-c", "1", "-4", "host"],
        HOST,
        {
            "command": ("ping", "-c", "1", "-4", "host"),
            "ctx.ip6": Ip6Net(ip("fd00::2"), 56, ip("fe80::1"), OUR_LL, (ip("fd00::53"),)),
        },
    ),
    (["pasta", "sh", "--", "x"], HOST, {"command": ("sh", "--", "x")}),
    (["pasta", "12", "34"], HOST, {"command": ("12", "34"), "netns_pid": None}),
    (["pasta", "--netns", "blue"], HOST, {"netns": "blue", "command": None, "netns_pid": None}),
    (["pasta", "--netns=/proc/1/ns/net"], HOST, {"netns": "/proc/1/ns/net"}),
    (
        ["pasta", "-I", "veth-x", "--config-net", "--netns", "b"],
        HOST,
        {"ns_ifname": "veth-x", "config_net": True},
    ),
]


@pytest.mark.parametrize(("argv", "host", "expected"), GOOD)
def test_good_argv(argv: list[str], host: HostView, expected: dict[str, Any]) -> None:
    config = parse_args(argv, host, env={})
    for path, value in expected.items():
        assert field(config, path) == value, path


def test_default_socket_follows_xdg_runtime_dir() -> None:
    config = parse_args(["passt"], HOST, env={"XDG_RUNTIME_DIR": "/run/user/1000/"})
    assert config.socket_path == "/run/user/1000/passtd/passtd.socket"
    assert default_socket_path({"XDG_RUNTIME_DIR": ""}) == "/run/passtd/passtd.socket"
    assert default_socket_path({}) == "/run/passtd/passtd.socket"


BAD_CHARS = "contains one of '/%:,' or a blank"
BAD: list[tuple[list[str], str]] = [
    # argparse-level
    ([], "a mode is required: passt or pasta"),
    (["bogus"], "'bogus' is not a mode: use passt or pasta"),
    (["passt", "--bogus"], "unrecognized option '--bogus'"),  # glibc getopt's words: Podman matches them
    (["passt", "--bogus=1"], "unrecognized option '--bogus=1'"),
    (["passt", "--sock", "/x"], "unrecognized option '--sock'"),  # no abbreviations
    (["passt", "-Z"], "invalid option -- 'Z'"),
    (["passt", "extra"], "extra: unexpected argument"),
    (["passt", "--", "sh"], "--: passt mode takes no command"),
    (["passt", "-I", "x"], "invalid option -- 'I'"),
    (["passt", "--netns", "x"], "unrecognized option '--netns'"),
    (["passt", "--config-net"], "unrecognized option '--config-net'"),
    (["pasta", "-s", "/x"], "invalid option -- 's'"),
    (["pasta", "--one-off"], "unrecognized option '--one-off'"),
    (["passt", "--dhcp-dns"], "unrecognized option '--dhcp-dns'"),  # pasta only, as in passt
    (["pasta", "--no-dhcp-search"], "unrecognized option '--no-dhcp-search'"),  # passt only
    (["passt", "--userns", "/proc/1/ns/user"], "unrecognized option '--userns'"),
    (["passt", "--mtu"], "--mtu: expects a value"),
    (["passt", "-a"], "--address: expects a value"),
    (["passt", "-4=x"], "--ipv4-only: ignored explicit argument 'x'"),
    # mtu
    (["passt", "--mtu", "70000"], "--mtu: 70000 is out of range 68..65520"),
    (["passt", "-m", "67"], "--mtu: 67 is out of range 68..65520"),
    (["passt", "-m", "0x100"], "--mtu: '0x100' is not a number"),
    (["passt", "-m", "1000", "-6"], "--mtu: 1000 is below 1280, the IPv6 minimum, but -6 was given"),
    (["passt", "-m", "1000", "-a", "fd01::5"], "--address: fd01::5 is IPv6, but --mtu 1000 is below 1280"),
    (["passt", "-m", "1279", "-g", "fd01::1"], "--gateway: fd01::1 is IPv6, but --mtu 1279 is below 1280"),
    # addresses
    (["passt", "-a", "foo"], "--address: 'foo' is not an IPv4 or IPv6 address"),
    (["passt", "-a", "10.0.0.256"], "--address: '10.0.0.256' is not an IPv4 or IPv6 address"),
    (["passt", "-a", "127.0.0.2"], "--address: 127.0.0.2 cannot be a guest address"),
    (["passt", "-a", "224.0.0.5"], "--address: 224.0.0.5 cannot be a guest address"),
    (["passt", "-a", "0.0.0.0"], "--address: 0.0.0.0 cannot be a guest address"),
    (["passt", "-a", "255.255.255.255"], "--address: 255.255.255.255 cannot be a guest address"),
    (["passt", "-a", "::"], "--address: :: cannot be a guest address"),
    (["passt", "-a", "fe80::5"], "--address: fe80::5 cannot be a guest address"),
    (["passt", "-a", "ff02::1"], "--address: ff02::1 cannot be a guest address"),
    (["passt", "-a", "::ffff:10.0.0.1"], "--address: ::ffff:a00:1 cannot be a guest address"),
    (["passt", "-a", "10.0.0.5/33"], "--address: '10.0.0.5/33' has a bad prefix length (1..32)"),
    (["passt", "-a", "10.0.0.5/"], "--address: '10.0.0.5/' has a bad prefix length (1..32)"),
    (["passt", "-a", "fd01::5/0"], "--address: 'fd01::5/0' has a bad prefix length (1..128)"),
    (
        ["passt", "-a", "10.0.0.5", "-a", "10.0.0.6"],
        "--address: given twice for IPv4 (10.0.0.5 and 10.0.0.6)",
    ),
    (["passt", "-a", "fd01::5", "-a", "fd01::6"], "--address: given twice for IPv6 (fd01::5 and fd01::6)"),
    (["passt", "-a", "10.0.0.0", "-n", "24"], "--address: 10.0.0.0 is not a host address in 10.0.0.0/24"),
    (["passt", "-a", "10.0.0.255/24"], "--address: 10.0.0.255 is not a host address in 10.0.0.0/24"),
    (["passt", "-a", "192.0.2.1"], "--address: 192.0.2.1 is also the gateway"),
    (["passt", "-a", "fe80::1", "-6"], "--address: fe80::1 cannot be a guest address"),
    (["passt", "-g", "fd00::2"], "--gateway: fd00::2 is also the guest address"),
    (["passt", "-a", "10.0.0.5", "-g", "10.0.0.5"], "--gateway: 10.0.0.5 is also the guest address"),
    (["passt", "-6", "-a", "10.0.0.5"], "--address: 10.0.0.5 is IPv4, but -6/--ipv6-only disables IPv4"),
    (["passt", "-4", "-a", "fd01::5"], "--address: fd01::5 is IPv6, but -4/--ipv4-only disables IPv6"),
    # netmask
    (["passt", "-n", "24"], "--netmask: needs an IPv4 -a/--address"),
    (["passt", "-a", "fd01::5", "-n", "24"], "--netmask: needs an IPv4 -a/--address"),
    (["passt", "-a", "10.0.0.5", "-n", "33"], "--netmask: 33 is out of range 1..32"),
    (["passt", "-a", "10.0.0.5", "-n", "0"], "--netmask: 0 is out of range 1..32"),
    (["passt", "-a", "10.0.0.5", "-n", "255.0.255.0"], "--netmask: 255.0.255.0 is not a contiguous netmask"),
    (["passt", "-a", "10.0.0.5", "-n", "0.0.0.0"], "--netmask: 0.0.0.0 is not a contiguous netmask"),
    (["passt", "-a", "10.0.0.5", "-n", "0.0.0.255"], "--netmask: 0.0.0.255 is not a contiguous netmask"),
    (["passt", "-a", "10.0.0.5", "-n", "/24"], "--netmask: '/24' is not a netmask"),
    (["passt", "-a", "10.0.0.5/24", "-n", "16"], "--netmask: /16 contradicts --address 10.0.0.5/24"),
    (["passt", "-6", "-n", "24"], "--netmask: IPv4 only, but -6/--ipv6-only disables IPv4"),
    # gateway
    (["passt", "-g", "gw"], "--gateway: 'gw' is not an IPv4 or IPv6 address"),
    (["passt", "-g", "0.0.0.0"], "--gateway: 0.0.0.0 cannot be a gateway"),
    (["passt", "-g", "127.0.0.1"], "--gateway: 127.0.0.1 cannot be a gateway"),
    (["passt", "-g", "ff02::2"], "--gateway: ff02::2 cannot be a gateway"),
    (
        ["passt", "-g", "10.0.0.1", "-g", "10.0.0.2"],
        "--gateway: given twice for IPv4 (10.0.0.1 and 10.0.0.2)",
    ),
    (["passt", "-6", "-g", "10.0.0.1"], "--gateway: 10.0.0.1 is IPv4, but -6/--ipv6-only disables IPv4"),
    (["passt", "-4", "-g", "fd00::1"], "--gateway: fd00::1 is IPv6, but -4/--ipv4-only disables IPv6"),
    # flags and process options
    (["passt", "-d", "-q"], "-q/--quiet: cannot be combined with -d/--debug"),
    (["passt", "--log-format", "xml"], "--log-format: 'xml' is not one of console, json"),
    (["passt", "-M", "9a:55:9a:55:9a"], "--mac-addr: '9a:55:9a:55:9a' is not a MAC address"),
    (["passt", "-M", "9a:55:9a:55:9a:zz"], "--mac-addr: '9a:55:9a:55:9a:zz' is not a MAC address"),
    (["passt", "-M", "9a:55:9a:55:9a:+5"], "--mac-addr: '9a:55:9a:55:9a:+5' is not a MAC address"),
    (["passt", "-M", "01:00:5e:00:00:01"], "--mac-addr: 01:00:5e:00:00:01 is a multicast address"),
    (["passt", "-M", "00:00:00:00:00:00"], "--mac-addr: 00:00:00:00:00:00 is the all-zero address"),
    (["passt", "-D", "resolver"], "--dns: 'resolver' is not an IPv4 or IPv6 address"),
    (["passt", "-D", "none", "-D", "1.1.1.1"], "--dns: 'none' cannot be combined with addresses"),
    (["passt", "-D", "0.0.0.0"], "--dns: 0.0.0.0 cannot be a nameserver"),
    (["passt", "-D", "ff02::fb"], "--dns: ff02::fb cannot be a nameserver"),
    (["passt", "-S", "a..example"], "--search: 'a..example' is not a domain name"),
    (["passt", "--search=-bad.example"], "--search: '-bad.example' is not a domain name"),
    (["passt", "-S", "x" * 64 + ".example"], f"--search: {'x' * 64 + '.example'!r} is not a domain name"),
    (["passt", "-S", "none x.example"], "--search: 'none' cannot be combined with domains"),
    (["passt", "-S", " "], "--search: expects at least one domain"),
    (["passt", "-p", ""], "--pcap: expects a file name"),
    (["passt", "-P", ""], "--pid: expects a file name"),
    (["passt", "-s", ""], "--socket: expects a path"),
    (["passt", "-s", "/" + "s" * 107], f"--socket: {'/' + 's' * 107!r} is longer than 107 bytes"),
    # pasta targets
    (["pasta", "--netns", "blue", "1234"], "--netns: cannot be combined with a PID (1234)"),
    (["pasta", "--netns", "blue", "--", "sh"], "--netns: cannot be combined with a command"),
    (["pasta", "--netns", "blue", "sh"], "--netns: cannot be combined with a command"),
    (["pasta", "--netns", ""], "--netns: '' is not a namespace name or path"),
    (["pasta", "--netns", ".."], "--netns: '..' is not a namespace name or path"),
    (["pasta", "0"], "0: not a valid PID"),
    (["pasta", "-I", ""], "--ns-ifname: '' is not a valid interface name (empty)"),
    (
        ["pasta", "-I", "sixteen-chars-xx"],
        "--ns-ifname: 'sixteen-chars-xx' is not a valid interface name (at most 15 characters)",
    ),
    (["pasta", "-I", "a/b"], f"--ns-ifname: 'a/b' is not a valid interface name ({BAD_CHARS})"),
    (["pasta", "-I", "eth0:1"], f"--ns-ifname: 'eth0:1' is not a valid interface name ({BAD_CHARS})"),
    (["pasta", "-I", "tap%d"], f"--ns-ifname: 'tap%d' is not a valid interface name ({BAD_CHARS})"),
]


@pytest.mark.parametrize(("argv", "message"), BAD)
def test_bad_argv_is_one_exact_line(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(argv, HOST, env={})
    assert str(info.value) == message
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["passt", "-g", "10.0.0.1"], "--gateway: 10.0.0.1 needs an IPv4 -a/--address (the host has none)"),
        (["passt", "-g", "fd00::1"], "--gateway: fd00::1 needs an IPv6 -a/--address (the host has none)"),
        (
            ["passt", "-a", "10.0.0.5/32"],
            "--gateway: needed for 10.0.0.5/32 (no room for a gateway in the subnet)",
        ),
    ],
)
def test_bad_argv_without_host_defaults(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(argv, EMPTY, env={})
    assert str(info.value) == message


def test_explicit_family_beats_missing_host() -> None:
    """A host with no IPv4 route still serves IPv4 when asked for it, and vice versa."""
    config = parse_args(["pasta", "-a", "10.0.0.5", "-g", "10.0.0.9", "-D", "10.0.0.53"], V6ONLY, env={})
    assert config.ctx.ip4 == Ip4Net(ip("10.0.0.5"), 24, ip("10.0.0.9"), (ip("10.0.0.53"),))
    assert config.ctx.ip6 is not None
    assert config.ctx.ip6.dns == ()
    assert config.ns_ifname == "wlan0"


def test_config_rejects_inconsistent_fields() -> None:
    good = parse_args(["pasta", "1"], HOST, env={})
    assert good.mode == "pasta"
    cases: list[tuple[dict[str, Any], str]] = [
        ({"netns": "x"}, "pasta needs exactly one of --netns, a PID or a command"),
        ({"netns_pid": None}, "pasta needs exactly one of --netns, a PID or a command"),
        ({"socket_path": "/x"}, "pasta mode takes no socket"),
        ({"mode": "passt", "netns_pid": None, "socket_path": None}, "passt mode needs a socket path or --fd"),
        ({"mode": "passt", "socket_path": "/x"}, "passt mode takes no namespace or command"),
        ({"ctx": Context(mtu=65521)}, "--mtu: 65521 is out of range 68..65520"),
        ({"ctx": replace(good.ctx, mtu=1200)}, "--mtu: 1200 is below 1280, the IPv6 minimum"),
        ({"debug": True, "quiet": True}, "-q/--quiet: cannot be combined with -d/--debug"),
    ]
    for changes, message in cases:
        with pytest.raises(ConfigError) as info:
            replace(good, **changes)
        assert str(info.value) == message


def test_main_reports_one_line_and_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["passt", "--mtu", "70000"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "passtd: error: --mtu: 70000 is out of range 68..65520\n"


def test_main_version_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"passtd {passtd.__version__}\n"
    assert main(["pasta", "--version"]) == 0
    assert capsys.readouterr().out == "pasta 0.1.0 (passtd)\n"  # upstream: "pasta VERSION", read by Podman
    assert main(["passt", "--help"]) == 0
    out = capsys.readouterr().out
    for option in (
        "--address",
        "--netmask",
        "--gateway",
        "--mtu",
        "--mac-addr",
        "--dns",
        "--search",
        "--socket",
    ):
        assert option in out
    assert main(["pasta", "-h"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: passtd pasta [OPTIONS] [--netns NAME|PATH | PID | [--] CMD [ARGS...]]")
    assert "--ns-ifname" in out
    assert "--one-off" not in out


def test_main_hands_config_to_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Config] = []

    def run(config: Config, reparse: object, listener: object) -> int:
        seen.append(config)
        return 7

    fake = types.ModuleType("passtd.daemon")
    fake.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "passtd.daemon", fake)
    monkeypatch.setattr(
        "passtd.dataplane.io.hostview.read_host_view", lambda resolv_conf="", interface=None: HOST
    )
    assert main(["pasta", "-a", "10.0.0.5", "--", "true"]) == 7
    assert len(seen) == 1
    assert seen[0].command == ("true",)
    assert seen[0].ctx.ip4 is not None
    assert seen[0].ctx.ip4.addr == ip("10.0.0.5")


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "passtd", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_bad_option_exits_2_with_one_line() -> None:
    proc = _run_cli("passt", "--mtu", "70000")
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == ["passtd: error: --mtu: 70000 is out of range 68..65520"]
    assert proc.stderr.endswith("\n")


def test_cli_unknown_option_exits_2_with_one_line() -> None:
    proc = _run_cli("pasta", "--socket", "/tmp/x")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["passtd: error: unrecognized option '--socket'"]


def test_cli_version_and_help_exit_0() -> None:
    proc = _run_cli("--version")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "passtd 0.1.0\n", "")
    proc = _run_cli("--help")
    assert proc.returncode == 0
    assert "passt" in proc.stdout
    assert "pasta" in proc.stdout
    assert proc.stderr == ""


def test_errors_and_help_load_no_dataplane_io() -> None:
    """A typo must not cost a netlink round-trip or the daemon's imports."""
    code = (
        "import sys; from passtd.__main__ import main; rc = main(['passt', '-m', 'x']); "
        "print(rc, 'passtd.daemon' in sys.modules, 'pyroute2' in sys.modules)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.stdout.split() == ["2", "False", "False"]
    assert proc.stderr == "passtd: error: --mtu: 'x' is not a number\n"


TOKENS = [
    "passt",
    "pasta",
    "--",
    "-a",
    "-n",
    "-g",
    "-m",
    "-M",
    "-D",
    "-S",
    "-s",
    "-I",
    "--netns",
    "-4",
    "-6",
    "-1",
    "-d",
    "-q",
    "-f",
    "--no-ndp",
    "--config-net",
    "--log-format",
    "none",
    "json",
    "10.0.0.5",
    "10.0.0.5/31",
    "fd01::5",
    "fe80::1",
    "24",
    "255.255.255.0",
    "1000",
    "70000",
    "1234",
    "0",
    "sh",
    "",
    "x",
    "9a:55:9a:55:9a:55",
]


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from(TOKENS) | st.text(max_size=8).filter(lambda t: not t.startswith("-")), max_size=8
    )
)
def test_any_argv_gives_config_or_one_line_error(argv: list[str]) -> None:
    """Nothing but ConfigError escapes, whatever the argv (help/version tokens are not generated)."""
    message: str | None = None
    try:
        config = parse_args(argv, HOST, env={})
    except ConfigError as exc:
        message = str(exc)
    if message is None:
        assert config.mode in ("passt", "pasta")
    else:
        assert message
        assert "\n" not in message


# ------------------------------------------------------------------ the integrators' options (issue 13)

LOOPBACK_ONLY = replace(HOST, nameservers=(IPv4Address("127.0.0.53"),))

DROP_IN: list[tuple[list[str], HostView, dict[str, Any]]] = [
    (["passt", "--fd", "3"], HOST, {"fd": 3, "socket_path": None, "one_off": True}),
    (["passt", "-F", "7", "-s", "/x.socket"], HOST, {"fd": 7, "socket_path": None}),  # passt: --fd wins
    (["passt", "--socket-path", "/v.socket"], HOST, {"socket_path": "/v.socket"}),
    (["passt", "--vhost-user"], HOST, {"vhost_user": True}),
    (
        ["passt", "--map-host-loopback", "192.0.2.9", "--map-guest-addr", "192.0.2.99"],
        HOST,
        {
            "ctx.map_host_loopback4": ip("192.0.2.9"),
            "ctx.map_host_loopback6": ip("fe80::1"),  # the other family keeps its default, the gateway
            "ctx.map_guest_addr4": ip("192.0.2.99"),
            "ctx.map_guest_addr6": None,
        },
    ),
    (["passt"], HOST, {"ctx.map_host_loopback4": ip("192.0.2.1"), "ctx.map_guest_addr4": None}),
    (["passt", "--no-map-gw"], HOST, {"ctx.map_host_loopback4": None, "ctx.map_gw": False}),
    (["passt", "--map-host-loopback", "none"], HOST, {"ctx.map_host_loopback6": None, "ctx.map_gw": False}),
    # one resolver per family receives the relayed queries: --dns-host replaces the host's of its family
    (
        ["passt", "--dns-host", "127.0.0.1"],
        HOST,
        {"ctx.dns_upstream": (ip("127.0.0.1"), *(n for n in HOST.nameservers if n.version == 6))},
    ),
    (["passt", "--freebind", "--no-splice"], HOST, {"freebind": True, "splice": False}),
    (["pasta", "1"], HOST, {"splice": True, "host_lo_to_ns_lo": False}),
    (["pasta", "--host-lo-to-ns-lo", "1"], HOST, {"host_lo_to_ns_lo": True}),
    (["pasta", "--no-splice", "1"], HOST, {"splice": False}),
    (
        ["passt", "--outbound-if4", "eth0", "--outbound-if6", "wlan0"],
        HOST,
        {"outbound_if4": "eth0", "outbound_if6": "wlan0"},
    ),
    (["passt", "--no-tcp", "--no-udp"], HOST, {"ctx.tcp": False, "ctx.udp": False}),
    (["passt"], HOST, {"ctx.tcp": True, "ctx.udp": True, "ctx.hostname": "", "ctx.fqdn": ""}),
    (
        ["passt", "-H", "vm1", "--fqdn", "vm1.example.org."],
        HOST,
        {"ctx.hostname": "vm1", "ctx.fqdn": "vm1.example.org"},
    ),
    # passt offers nameservers and search domains unless told not to; pasta only when asked (upstream)
    (["passt"], HOST, {"ctx.dhcp_dns": True, "ctx.dhcp_search": True}),
    (["passt", "--no-dhcp-dns", "--no-dhcp-search"], HOST, {"ctx.dhcp_dns": False, "ctx.dhcp_search": False}),
    (["pasta", "1"], HOST, {"ctx.dhcp_dns": False, "ctx.dhcp_search": False}),
    (["pasta", "--dhcp-dns", "--dhcp-search", "1"], HOST, {"ctx.dhcp_dns": True, "ctx.dhcp_search": True}),
    # a PID joins its user namespace too, unless --netns-only; --userns says which
    (["pasta", "1234"], HOST, {"netns_pid": 1234, "userns": "/proc/1234/ns/user", "netns_only": False}),
    (["pasta", "--netns-only", "1234"], HOST, {"userns": None, "netns_only": True}),
    (
        ["pasta", "--userns=/proc/9/ns/user", "--netns=/proc/9/ns/net"],
        HOST,
        {"userns": "/proc/9/ns/user", "netns": "/proc/9/ns/net"},
    ),
    (["pasta", "--netns", "/run/netns/x"], HOST, {"userns": None, "netns_quit": True}),
    (["pasta", "--no-netns-quit", "--netns", "x"], HOST, {"netns_quit": False}),
    (["pasta", "--ns-mac-addr", "02:00:00:00:00:07", "1"], HOST, {"ns_mac": bytes.fromhex("020000000007")}),
    (["passt", "--runas", "0:0"], HOST, {"runas": (0, 0)}),
    (["passt", "--runas", "nobody"], HOST, {"runas": (65534, 65534)}),
    (["passt", "-c", "/run/p.sock"], HOST, {"pesto_path": "/run/p.sock"}),
    (["pasta", "--conf-path", "/run/p.sock", "1"], HOST, {"pesto_path": "/run/p.sock"}),
    (["passt", "-D", "none", "-S", "none"], HOST, {"ctx.ip4.dns": (), "ctx.ip6.dns": (), "ctx.search": ()}),
    (["passt", "-m", "0"], HOST, {"ctx.mtu": 65520, "ctx.assign_mtu": False}),
    (["passt", "-m", "1500"], HOST, {"ctx.mtu": 1500, "ctx.assign_mtu": True}),
    (["passt", "-4", "-6"], HOST, {"ctx.ip4": None}),  # the last of -4/-6 wins
    (["passt", "-6", "-4"], HOST, {"ctx.ip6": None}),
    (["passt", "--ipv6-only", "--ipv4-only"], HOST, {"ctx.ip6": None}),
    (["passt", "--stderr", "-e", "--trace"], HOST, {"debug": True}),
    (["pasta", "--no-copy-routes", "--no-copy-addrs", "--config-net", "1"], HOST, {"config_net": True}),
    (["passt", "--search", "a.example b.example"], HOST, {"ctx.search": ("a.example", "b.example")}),
    (["passt", "-t", "2222:22", "-t", "8080"], HOST, {"forward.tcp_in.to_spec": None}),
    # a host whose only resolver is on loopback (systemd-resolved): the guest asks the gateway, relayed there
    # (per family, as passt's get_dns: an IPv4 loopback resolver is offered as the IPv4 gateway only)
    (
        ["passt"],
        LOOPBACK_ONLY,
        {
            "ctx.ip4.dns": (ip("192.0.2.1"),),
            "ctx.ip6.dns": (),
            "ctx.dns_forward": (ip("192.0.2.1"),),
            "ctx.dns_upstream": (ip("127.0.0.53"),),
        },
    ),
    (["passt", "--no-map-gw"], LOOPBACK_ONLY, {"ctx.ip4.dns": (), "ctx.dns_forward": ()}),
]


@pytest.mark.parametrize(("argv", "host", "expected"), DROP_IN)
def test_drop_in_options(argv: list[str], host: HostView, expected: dict[str, Any]) -> None:
    config = parse_args(argv, host, env={})
    for path, value in expected.items():
        if path == "forward.tcp_in.to_spec":  # repeated -t accumulate
            assert config.forward is not None
            assert set(config.forward.tcp_in.to_spec().split(",")) == {"2222:22", "8080"}
            continue
        assert field(config, path) == value, path


DROP_IN_BAD: list[tuple[list[str], str]] = [
    (["passt", "--fd", "x"], "--fd: 'x' is not a file descriptor number"),
    (["passt", "--fd", "1"], "--fd: 1 is standard input, output or error, not a socket"),
    (["passt", "--map-host-loopback", "127.0.0.1"], "--map-host-loopback: 127.0.0.1 cannot be mapped"),
    (["passt", "--map-guest-addr", "x"], "--map-guest-addr: 'x' is not an IPv4 or IPv6 address"),
    (["passt", "--dns-host", "0.0.0.0"], "--dns-host: 0.0.0.0 cannot be a nameserver"),
    (["passt", "-H", "a b"], "-H/--hostname: 'a b' is not a host name"),
    (["passt", "--fqdn", "x" * 300], f"--fqdn: {'x' * 300!r} is not a host name"),
    (
        ["passt", "--outbound-if4", "a%b"],
        f"--outbound-if4: 'a%b' is not a valid interface name ({BAD_CHARS})",
    ),
    (["passt", "--runas", "no-such-user-here"], "--runas: no user named 'no-such-user-here'"),
    (["passt", "--runas", "0:no-such-group-here"], "--runas: no group named 'no-such-group-here'"),
    (["passt", "--runas", "0:"], "--runas: '0:' is not USER[:GROUP]"),
    (
        ["pasta", "--ns-mac-addr", "01:00:00:00:00:01", "1"],
        "--ns-mac-addr: 01:00:00:00:00:01 is a multicast address",
    ),
    (
        ["pasta", "--host-lo-to-ns-lo", "--no-splice", "1"],
        "--host-lo-to-ns-lo: cannot be combined with --no-splice",
    ),
    (["passt", "-c", "/" + "p" * 107], f"-c/--conf-path: {'/' + 'p' * 107!r} is longer than 107 bytes"),
    (["passt", "--netns-only"], "unrecognized option '--netns-only'"),
]


@pytest.mark.parametrize(("argv", "message"), DROP_IN_BAD)
def test_drop_in_options_bad(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(argv, HOST, env={})
    assert str(info.value) == message


def test_control_socket_paths_are_derived_for_the_aliases() -> None:
    """passtctl --pid FILE / --socket PATH find it with the same rule (passtd.paths)."""
    env = {"XDG_RUNTIME_DIR": "/run/user/1000"}
    assert parse_args(["passt", "-s", "/r/vm.socket"], HOST, env=env).control_path == "/r/vm.control"
    assert (
        parse_args(["passt", "--fd", "3", "-P", "/r/vm.pid"], HOST, env=env).control_path == "/r/vm.control"
    )
    pasta = parse_args(["pasta", "1"], HOST, env=env).control_path
    assert pasta is not None and pasta.startswith("/run/user/1000/passtd/pasta-")
    assert parse_args(["passt"], HOST, env=env).control_path == "/run/user/1000/passtd/passtd.control"
