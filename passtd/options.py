"""Command line → Config, with passt(1)/pasta(1) option names so existing users feel at home.

    passtd passt [OPTIONS]
    passtd pasta [OPTIONS] [--netns NAME|PATH | PID | [--] CMD [ARGS...]]

Every problem is reported as exactly one line, `passtd: error: <option>: <what is wrong>`, with exit code 2:
argparse's usage dump is suppressed because a wall of usage hides the one word that was wrong. `--help` and
`--version` still print and exit 0.

Defaults are copied from the host (passt's model, so the guest needs no NAT): the IPv4 and IPv6 address,
prefix and gateway of the interface holding each family's default route, and the nameservers and search
list of /etc/resolv.conf. A family the host has no default route for is disabled unless addresses are given.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address
from typing import TYPE_CHECKING, Final, Literal, NoReturn, TypeVar

from passtd import __version__
from passtd.config import (
    DEFAULT_NS_IFNAME,
    IPV6_MIN_MTU,
    LOG_SIZE_DEFAULT,
    LOG_SIZE_MIN,
    MTU_DEFAULT,
    MTU_MAX,
    MTU_MIN,
    SUN_PATH_MAX,
    Config,
    default_control_path,
    default_socket_path,
)
from passtd.configfile import FileConfig, OptionSpec, key_error, load
from passtd.dataplane.core.context import (
    DEFAULT_MAC,
    Context,
    Ip4Net,
    Ip6Net,
    host_loopback4,
    host_loopback6,
    link_local_from_mac,
)
from passtd.dataplane.core.dns import plan_dns
from passtd.dataplane.core.fwd import ForwardTables
from passtd.errors import ConfigError

if TYPE_CHECKING:
    from passtd.dataplane.io.hostview import HostView

IPAddr = IPv4Address | IPv6Address
T = TypeVar("T")

PROG: Final = "passtd"
V4_DEFAULT_PREFIX: Final = 24
V6_DEFAULT_PREFIX: Final = 64
LOG_FORMATS: Final = ("console", "json")
IFNAMSIZ: Final = 16  # including the NUL

_MAC_RE: Final = re.compile(r"[0-9A-Fa-f]{1,2}(?::[0-9A-Fa-f]{1,2}){5}")
_LABEL_RE: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PID_RE: Final = re.compile(r"[0-9]+")
_ARGUMENT_RE: Final = re.compile(r"argument (\S+): (.*)", re.DOTALL)

_PASTA_USAGE: Final = "passtd pasta [OPTIONS] [--netns NAME|PATH | PID | [--] CMD [ARGS...]]"
_DEFAULTS_EPILOG: Final = (
    "Without -a/-n/-g, the guest copies the address, prefix and gateway of the host's default-route\n"
    "interface for each IP family; a family with no host default route is disabled unless -a is given.\n"
    "Without -D/-S, nameservers and search domains come from /etc/resolv.conf."
)


# --------------------------------------------------------------------------- argparse, one line per error


def _one_line(message: str) -> str:
    """Rewrite argparse's wording into `<option>: <problem>`, always on one line."""
    message = " ".join(message.split())
    if message.startswith("unrecognized arguments: "):
        first = message.removeprefix("unrecognized arguments: ").split(" ", 1)[0]
        if first == "--":
            return "--: passt mode takes no command"
        if first.startswith("-"):
            return f"{first.split('=', 1)[0]}: unrecognized option"
        return f"{first}: unexpected argument"
    if message.startswith("the following arguments are required"):
        return "a mode is required: passt or pasta"
    m = _ARGUMENT_RE.fullmatch(message)
    if m is None:
        return message
    names, problem = m.group(1), m.group(2)
    if names == "MODE":
        bad = re.search(r"invalid choice: ('[^']*')", problem)
        return f"{bad.group(1) if bad else names} is not a mode: use passt or pasta"
    option = names.split("/")[-1]
    if problem == "expected one argument":
        problem = "expects a value"
    return f"{option}: {problem}"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(_one_line(message))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status != 0:
            raise ConfigError(_one_line(message or "invalid arguments"))
        if message:
            sys.stderr.write(message)
        raise SystemExit(0)  # --help, --version


def _add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by both modes, with passt(1)'s names and meaning."""
    a = p.add_argument
    a("--version", action="version", version=f"{PROG} {__version__}")
    a("-a", "--address", action="append", metavar="ADDR", help="guest IPv4 or IPv6 address (once per family)")
    a("-n", "--netmask", metavar="MASK", help="guest IPv4 netmask, dotted or prefix length")
    a(
        "-g",
        "--gateway",
        action="append",
        metavar="ADDR",
        help="guest gateway, IPv4 or IPv6 (once per family)",
    )
    a("-m", "--mtu", metavar="MTU", help=f"MTU for the guest, {MTU_MIN}..{MTU_MAX} (default {MTU_DEFAULT})")
    a("-M", "--mac-addr", metavar="ADDR", help="our MAC address toward the guest (default 9a:55:9a:55:9a:55)")
    a("-D", "--dns", action="append", metavar="ADDR", help="nameserver for the guest, repeatable, or 'none'")
    a("-S", "--search", action="append", metavar="LIST", help="search domains, space-separated, or 'none'")
    a("-p", "--pcap", metavar="FILE", help="capture guest traffic to a pcap FILE")
    a("-P", "--pid", metavar="FILE", help="write our PID to FILE")
    a("-f", "--foreground", action="store_true", help="do not daemonise")
    a("-d", "--debug", action="store_true", help="debug logging")
    a("-q", "--quiet", action="store_true", help="log errors only")
    a("-4", "--ipv4-only", action="store_true", help="disable IPv6")
    a("-6", "--ipv6-only", action="store_true", help="disable IPv4")
    a("--no-dhcp", action="store_true", help="no DHCP server")
    a("--no-ndp", action="store_true", help="no NDP responses (implies --no-ra)")
    a("--no-dhcpv6", action="store_true", help="no DHCPv6 server")
    a("--no-ra", action="store_true", help="no router advertisements")
    a("--no-icmp", action="store_true", help="no ICMP/ICMPv6 echo translation")
    a("--no-map-gw", action="store_true", help="do not map the gateway address to the host's loopback")
    a("--log-format", metavar="FORMAT", help="console (default) or json")
    a("-t", "--tcp-ports", action="append", metavar="SPEC", help="TCP ports forwarded to the guest")
    a("-u", "--udp-ports", action="append", metavar="SPEC", help="UDP ports forwarded to the guest")
    a("--dns-forward", action="append", metavar="ADDR",
      help="DNS queries the guest sends to ADDR go to the host's first nameserver")  # fmt: skip
    a("--max-flows", metavar="N", help="bound on concurrent flows (default 262144)")
    a("--control", metavar="PATH", help="gRPC control socket (default: next to the socket), or 'none'")
    a("--control-group", metavar="GROUP", help="group allowed to use the control socket (mode 0660)")
    a("--control-listen", metavar="HOST:PORT", help="also serve the control API over TCP (TLS, client certs)")
    a("--control-cert", metavar="FILE", help="PEM certificate chain for --control-listen")
    a("--control-key", metavar="FILE", help="PEM private key for --control-listen")
    a("--control-client-ca", metavar="FILE", help="CA bundle that client certificates must chain to")
    a("--control-insecure", action="store_true", help="plaintext --control-listen, loopback only")
    a("--config", metavar="FILE", help="TOML file with long options as keys; the command line wins")
    a("-l", "--log-file", metavar="PATH", help="log to PATH instead of stderr")
    a(
        "--log-size",
        metavar="SIZE",
        help=f"cap of the log file in bytes, oldest lines go first (default {LOG_SIZE_DEFAULT})",
    )
    a("-i", "--interface", metavar="NAME", help="copy addresses and routes from host interface NAME")
    a("-o", "--outbound", action="append", metavar="ADDR",
      help="source address for TCP and UDP sockets toward the network (one per family)")  # fmt: skip


def _build_parser() -> argparse.ArgumentParser:
    top = _Parser(prog=PROG, allow_abbrev=False, description="User-mode networking for VMs and namespaces.")
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    modes = top.add_subparsers(dest="mode", required=True, metavar="MODE", parser_class=_Parser)
    fmt = argparse.RawDescriptionHelpFormatter

    passt = modes.add_parser(
        "passt",
        allow_abbrev=False,
        help="serve a qemu guest on a UNIX socket",
        epilog=_DEFAULTS_EPILOG,
        formatter_class=fmt,
    )
    _add_common(passt)
    passt.add_argument("-s", "--socket", metavar="PATH", help="UNIX socket path for qemu")
    passt.add_argument("-1", "--one-off", action="store_true", help="quit when the guest disconnects")

    pasta = modes.add_parser(
        "pasta",
        allow_abbrev=False,
        usage=_PASTA_USAGE,
        help="connect a network namespace",
        epilog=_DEFAULTS_EPILOG,
        formatter_class=fmt,
    )
    _add_common(pasta)
    pasta.add_argument("-I", "--ns-ifname", metavar="NAME", help="tap device name in the namespace")
    pasta.add_argument(
        "-T", "--tcp-ns", action="append", metavar="SPEC", help="namespace TCP ports to the host"
    )
    pasta.add_argument(
        "-U", "--udp-ns", action="append", metavar="SPEC", help="namespace UDP ports to the host"
    )
    pasta.add_argument(
        "--config-net", action="store_true", help="configure addresses and routes in the netns"
    )
    pasta.add_argument(
        "--netns", metavar="NAME|PATH", help="join an existing netns (/run/netns/NAME or a path)"
    )
    # REMAINDER matches pasta's getopt "+": options end at the first PID or command word.
    pasta.add_argument(
        "target",
        nargs=argparse.REMAINDER,
        metavar="PID|CMD",
        help="PID, or [--] CMD [ARGS...] (default: $SHELL)",
    )
    return top


# --------------------------------------------------------------------------- value parsers


def _parse_mtu(text: str | None) -> int:
    if text is None:
        return MTU_DEFAULT
    try:
        mtu = int(text, 10)
    except ValueError:
        raise ConfigError(f"--mtu: {text!r} is not a number") from None
    if not MTU_MIN <= mtu <= MTU_MAX:
        raise ConfigError(f"--mtu: {mtu} is out of range {MTU_MIN}..{MTU_MAX}")
    return mtu


def _parse_mac(text: str | None) -> bytes:
    if text is None:
        return DEFAULT_MAC
    if _MAC_RE.fullmatch(text) is None:
        raise ConfigError(f"--mac-addr: {text!r} is not a MAC address")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1:
        raise ConfigError(f"--mac-addr: {text} is a multicast address")
    if mac == bytes(6):
        raise ConfigError(f"--mac-addr: {text} is the all-zero address")
    return mac


def _parse_ip(option: str, text: str) -> IPAddr:
    try:
        return ip_address(text)
    except ValueError:
        raise ConfigError(f"{option}: {text!r} is not an IPv4 or IPv6 address") from None


def _parse_address(text: str) -> tuple[IPAddr, int | None]:
    """ADDR or ADDR/PREFIX; the address must be one a guest can own."""
    addr_text, slash, prefix_text = text.partition("/")
    addr = _parse_ip("--address", addr_text)
    prefix: int | None = None
    if slash:
        limit = 32 if addr.version == 4 else 128
        if not prefix_text.isascii() or not prefix_text.isdigit() or not 1 <= int(prefix_text) <= limit:
            raise ConfigError(f"--address: {text!r} has a bad prefix length (1..{limit})")
        prefix = int(prefix_text)
    if (
        addr.is_unspecified
        or addr.is_loopback
        or addr.is_multicast
        or (isinstance(addr, IPv4Address) and addr.is_reserved)
        or (isinstance(addr, IPv6Address) and (addr.is_link_local or addr.ipv4_mapped is not None))
    ):
        raise ConfigError(f"--address: {addr} cannot be a guest address")
    return addr, prefix


def _parse_gateway(text: str) -> IPAddr:
    gw = _parse_ip("--gateway", text)
    if (
        gw.is_unspecified
        or gw.is_loopback
        or gw.is_multicast
        or (isinstance(gw, IPv4Address) and gw.is_reserved)
    ):
        raise ConfigError(f"--gateway: {gw} cannot be a gateway")
    return gw


def _parse_netmask(text: str) -> int:
    """Dotted (255.255.255.0) or a prefix length (24), as passt accepts both."""
    if text.isascii() and text.isdigit():
        prefix = int(text)
        if not 1 <= prefix <= 32:
            raise ConfigError(f"--netmask: {text} is out of range 1..32")
        return prefix
    try:
        mask = int(IPv4Address(text))
    except ValueError:
        raise ConfigError(f"--netmask: {text!r} is not a netmask") from None
    host_bits = ~mask & 0xFFFFFFFF
    if mask == 0 or host_bits & (host_bits + 1):  # ones must be contiguous from the top
        raise ConfigError(f"--netmask: {text} is not a contiguous netmask")
    return 32 - host_bits.bit_length()


def _per_family(option: str, values: Sequence[IPAddr]) -> tuple[IPv4Address | None, IPv6Address | None]:
    """At most one value per family, as passt takes one address and one gateway of each."""
    v4 = [v for v in values if isinstance(v, IPv4Address)]
    v6 = [v for v in values if isinstance(v, IPv6Address)]
    for same in (v4, v6):
        if len(same) > 1:
            raise ConfigError(f"{option}: given twice for IPv{same[0].version} ({same[0]} and {same[1]})")
    return (v4[0] if v4 else None), (v6[0] if v6 else None)


def _parse_dns(values: Sequence[str] | None, host: HostView) -> tuple[IPAddr, ...]:
    if values is None:  # the host's resolvers, minus loopback ones the guest would look for in itself
        return tuple(ns for ns in host.nameservers if not ns.is_loopback and not ns.is_unspecified)
    if "none" in values:
        if len(values) > 1:
            raise ConfigError("--dns: 'none' cannot be combined with addresses")
        return ()
    out: list[IPAddr] = []
    for text in values:
        ns = _parse_ip("--dns", text)
        if ns.is_unspecified or ns.is_multicast:
            raise ConfigError(f"--dns: {ns} cannot be a nameserver")
        if ns not in out:
            out.append(ns)
    return tuple(out)


def _parse_search(values: Sequence[str] | None, host: HostView) -> tuple[str, ...]:
    if values is None:
        return host.search
    words = [w for v in values for w in v.split()]
    if "none" in words:
        if len(words) > 1:
            raise ConfigError("--search: 'none' cannot be combined with domains")
        return ()
    out: list[str] = []
    for word in words:
        domain = word.removesuffix(".")
        labels = domain.split(".")
        if (
            not domain
            or len(domain) > 253
            or not domain.isascii()
            or not all(_LABEL_RE.fullmatch(label) for label in labels)
        ):
            raise ConfigError(f"--search: {word!r} is not a domain name")
        if domain not in out:
            out.append(domain)
    if not out:
        raise ConfigError("--search: expects at least one domain")
    return tuple(out)


def _check_ifname(option: str, name: str) -> str:
    """Linux's dev_valid_name(): 1..15 bytes, not . or .., no '/', ':' or whitespace."""
    if (
        not name
        or len(name.encode()) >= IFNAMSIZ
        or name in (".", "..")
        or any(c in "/:" or c.isspace() for c in name)
    ):
        raise ConfigError(f"{option}: {name!r} is not a valid interface name")
    return name


def _check_file(option: str, path: str | None) -> str | None:
    if path is not None and (not path or "\0" in path):
        raise ConfigError(f"{option}: expects a file name")
    return path


def _check_socket(path: str, option: str = "--socket") -> str:
    if not path or "\0" in path:
        raise ConfigError(f"{option}: expects a path")
    if len(os.fsencode(path)) > SUN_PATH_MAX:
        raise ConfigError(f"{option}: {path!r} is longer than {SUN_PATH_MAX} bytes")
    return path


# --------------------------------------------------------------------------- address plan


def _first(*values: T | None) -> T:
    """The first value that is not None (0 and empty values count as given)."""
    for value in values:
        if value is not None:
            return value
    raise AssertionError("the last value is a default and never None")


def _auto_gateway4(addr: IPv4Address, prefix: int) -> IPv4Address:
    """A gateway in the guest's subnet when neither -g nor the host gives one: its first other host."""
    net = IPv4Network(f"{addr}/{prefix}", strict=False)
    if prefix == 32:
        raise ConfigError(f"--gateway: needed for {addr}/32 (no room for a gateway in the subnet)")
    if prefix == 31:  # RFC 3021: both addresses are hosts
        return net[0] if net[1] == addr else net[1]
    return net[1] if net[1] != addr else net[2]


def _plan_ip4(
    addr_opt: tuple[IPv4Address, int | None] | None,
    netmask: int | None,
    gateway: IPv4Address | None,
    host: HostView,
    dns: tuple[IPv4Address, ...],
) -> Ip4Net | None:
    if addr_opt is not None:
        addr, given_prefix = addr_opt
        if given_prefix is not None and netmask is not None and given_prefix != netmask:
            raise ConfigError(f"--netmask: /{netmask} contradicts --address {addr}/{given_prefix}")
        prefix = _first(given_prefix, netmask, host.prefix4, V4_DEFAULT_PREFIX)
    elif netmask is not None:
        raise ConfigError("--netmask: needs an IPv4 -a/--address")
    elif host.addr4 is None:
        if gateway is not None:
            raise ConfigError(f"--gateway: {gateway} needs an IPv4 -a/--address (the host has none)")
        return None
    else:
        addr, prefix = host.addr4, _first(host.prefix4, V4_DEFAULT_PREFIX)
    gw = gateway if gateway is not None else host.gw4
    if gw is None:
        gw = _auto_gateway4(addr, prefix)
    if gw == addr:
        raise ConfigError(
            f"--gateway: {gw} is also the guest address"
            if gateway is not None
            else f"--address: {addr} is also the gateway"
        )
    net = IPv4Network(f"{addr}/{prefix}", strict=False)
    if prefix <= 30 and addr in (net.network_address, net.broadcast_address):
        raise ConfigError(f"--address: {addr} is not a host address in {net}")
    return Ip4Net(addr=addr, prefix_len=prefix, gateway=gw, dns=dns)


def _plan_ip6(
    addr_opt: tuple[IPv6Address, int | None] | None,
    gateway: IPv6Address | None,
    host: HostView,
    dns: tuple[IPv6Address, ...],
    our_mac: bytes,
) -> Ip6Net | None:
    if addr_opt is not None:
        addr, given_prefix = addr_opt
        prefix = _first(given_prefix, host.prefix6, V6_DEFAULT_PREFIX)
    elif host.addr6 is None:
        if gateway is not None:
            raise ConfigError(f"--gateway: {gateway} needs an IPv6 -a/--address (the host has none)")
        return None
    else:
        addr, prefix = host.addr6, _first(host.prefix6, V6_DEFAULT_PREFIX)
    our_ll = link_local_from_mac(our_mac)
    gw = _first(gateway, host.gw6, our_ll)
    if gw == addr:
        raise ConfigError(
            f"--gateway: {gw} is also the guest address"
            if gateway is not None
            else f"--address: {addr} is also the gateway"
        )
    return Ip6Net(addr=addr, prefix_len=prefix, gateway=gw, our_ll=our_ll, dns=dns)


# --------------------------------------------------------------------------- pasta target


def _pasta_target(
    netns: str | None, target: Sequence[str]
) -> tuple[str | None, int | None, tuple[str, ...] | None]:
    """(netns, pid, command): exactly one is set; a bare pasta spawns the user's shell (command ())."""
    pid: int | None = None
    command: tuple[str, ...] | None = None
    if target and target[0] == "--":
        command = tuple(target[1:])
    elif len(target) == 1 and _PID_RE.fullmatch(target[0]):
        pid = int(target[0])
        if pid == 0:
            raise ConfigError("0: not a valid PID")
    elif target:
        command = tuple(target)
    if netns is not None:
        if netns in ("", ".", "..") or "\0" in netns or netns.endswith("/"):
            raise ConfigError(f"--netns: {netns!r} is not a namespace name or path")
        if pid is not None:
            raise ConfigError(f"--netns: cannot be combined with a PID ({pid})")
        if command is not None:
            raise ConfigError("--netns: cannot be combined with a command")
        return netns, None, None
    if pid is None and command is None:
        command = ()
    return None, pid, command


# --------------------------------------------------------------------------- host defaults


def _read_host_view(interface: str | None) -> HostView:
    """The host's defaults: from the default-route interfaces, or all from `interface` (-i, as passt)."""
    from passtd.dataplane.io.hostview import read_host_view

    view = read_host_view()
    if interface is None:
        return view
    return host_view_on(interface, view)


def host_view_on(interface: str, base: HostView) -> HostView:
    """Addresses and default gateways of `interface` only; resolvers still come from `base`.

    passt(1) -i: addresses and routes are derived from that interface. An interface without a default route
    still lends its address; the gateway is then chosen as without -g.
    """
    import socket

    from pyroute2 import IPRoute, NetlinkError

    from passtd.dataplane.io.hostview import _addrs, _routes, pick_address, pick_default_route

    values: dict[str, object] = {"ifname4": None, "addr4": None, "prefix4": None, "gw4": None,
                                 "ifname6": None, "addr6": None, "prefix6": None, "gw6": None}  # fmt: skip
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=interface)
            if not found:
                raise ConfigError(f"--interface: no interface named {interface!r}")
            index = int(found[0])
            for family, sfx in ((socket.AF_INET, "4"), (socket.AF_INET6, "6")):
                route = pick_default_route(r for r in _routes(ipr, family) if r.oif == index)
                gateway = None if route is None else route.gateway
                addr = pick_address(_addrs(ipr, family, index), gateway)
                values[f"ifname{sfx}"] = interface
                if addr is not None:
                    values[f"addr{sfx}"] = ip_address(addr.address)
                    values[f"prefix{sfx}"] = addr.prefix_len
                if gateway is not None and addr is not None:
                    values[f"gw{sfx}"] = ip_address(gateway.split("%", 1)[0])
    except (OSError, NetlinkError) as exc:
        raise ConfigError(f"--interface: cannot read {interface}: {exc}") from None
    return replace(base, **values)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- public API


def option_specs(parser: argparse.ArgumentParser | None = None) -> dict[str, OptionSpec]:
    """Config-file keys: every long option of either mode, with the modes that accept it."""
    top = parser or _build_parser()
    found: dict[str, tuple[str, str, set[str]]] = {}
    for mode, sub in _subparsers(top).items():
        for action in sub._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if not longs or action.dest in _NOT_KEYS:
                continue
            key = longs[0][2:]
            kind = (
                "flag"
                if isinstance(action, argparse._StoreTrueAction)
                else "list"
                if isinstance(action, argparse._AppendAction)
                else "value"
            )
            found.setdefault(key, (action.dest, kind, set()))[2].add(mode)
    return {
        key: OptionSpec(key, dest, kind, frozenset(modes))  # type: ignore[arg-type]
        for key, (dest, kind, modes) in found.items()
    }


_NOT_KEYS: Final = frozenset({"help", "version", "config", "target"})


def _subparsers(top: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the top parser has the mode subcommands")


def options_with_values(mode: str) -> frozenset[str]:
    """Option strings of `mode` that take a separate value (-t, --tcp-ports, ...), for argv rewriters."""
    sub = _subparsers(_build_parser())[mode]
    return frozenset(
        o for a in sub._actions if a.nargs is None and a.option_strings for o in a.option_strings
    )


def _option_dests(top: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string (-t, --tcp-ports) → its argparse destination, to name keys in errors."""
    out: dict[str, str] = {}
    for sub in _subparsers(top).values():
        for action in sub._actions:
            for option in action.option_strings:
                out[option] = action.dest
    return out


def _leading_config(argv: list[str]) -> str | None:
    """`passtd --config FILE [OPTIONS]`: the mode then comes from the file."""
    if not argv:
        return None
    if argv[0] == "--config":
        if len(argv) < 2:
            raise ConfigError("--config: expects a value")
        return argv[1]
    if argv[0].startswith("--config="):
        return argv[0].removeprefix("--config=")
    return None


def _merge(ns: argparse.Namespace, file: FileConfig) -> set[str]:
    """Fill what the command line left unset from the file; returns the destinations the file supplied."""
    taken: set[str] = set()
    for dest, value in file.values.items():
        if getattr(ns, dest, None) in (None, False):
            setattr(ns, dest, value)
            taken.add(dest)
    return taken


def _blame_file(exc: ConfigError, file: FileConfig, taken: set[str], dests: Mapping[str, str]) -> ConfigError:
    """Rewrite `--mtu: reason` as `FILE: key 'mtu': reason` when the file supplied that option."""
    message = str(exc)
    head, sep, reason = message.partition(": ")
    if not sep:
        return exc
    for option in head.split("/"):
        dest = dests.get(option)
        if dest is not None and dest in taken:
            return key_error(file.path, file.key_of(dest), reason)
    return exc


def parse_args(
    argv: Sequence[str], host: HostView | None = None, *, env: Mapping[str, str] | None = None
) -> Config:
    """Parse and resolve argv (and the --config file it names) into a Config; raises a one-line ConfigError.

    `host` and `env` are injected by tests; by default they are read from the system (netlink, resolv.conf,
    os.environ). `--help`/`--version` print and raise SystemExit(0), as argparse does.
    """
    original = tuple(argv)
    args = list(argv)
    parser = _build_parser()
    specs = option_specs(parser)
    file: FileConfig | None = None
    leading = _leading_config(args)
    if leading is not None:
        file = load(leading, specs)
        if file.mode is None:
            raise key_error(leading, "mode", "required when the command line names no mode")
        args = [file.mode, *args]
    ns = parser.parse_args(args)
    taken: set[str] = set()
    if ns.config is not None:
        if file is None or file.path != ns.config:
            file = load(_check_file("--config", ns.config) or "", specs)
        file.check_mode(ns.mode)
        taken = _merge(ns, file)
    try:
        config = _resolve(ns, host, env)
    except ConfigError as exc:
        if file is None:
            raise
        raise _blame_file(exc, file, taken, _option_dests(parser)) from None
    if file is None:
        return replace(config, argv=original)
    return replace(config, argv=original, config_file=file.path, timeouts=file.timeouts)


def _resolve(ns: argparse.Namespace, host: HostView | None, env: Mapping[str, str] | None) -> Config:
    """Check and combine the parsed options (from argv and the file) against the host's defaults."""
    mode: Literal["passt", "pasta"] = ns.mode

    if ns.ipv4_only and ns.ipv6_only:
        raise ConfigError("-6/--ipv6-only: cannot be combined with -4/--ipv4-only")
    if ns.debug and ns.quiet:
        raise ConfigError("-q/--quiet: cannot be combined with -d/--debug")
    log_format = ns.log_format or "console"
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"--log-format: {log_format!r} is not one of {', '.join(LOG_FORMATS)}")

    mtu = _parse_mtu(ns.mtu)
    our_mac = _parse_mac(ns.mac_addr)
    addresses = [_parse_address(t) for t in ns.address or ()]
    addr4, addr6 = _per_family("--address", [a for a, _ in addresses])
    prefixes = dict(addresses)
    gw4, gw6 = _per_family("--gateway", [_parse_gateway(t) for t in ns.gateway or ()])
    netmask = None if ns.netmask is None else _parse_netmask(ns.netmask)

    if ns.ipv6_only:
        for option, value in (("--address", addr4), ("--gateway", gw4)):
            if value is not None:
                raise ConfigError(f"{option}: {value} is IPv4, but -6/--ipv6-only disables IPv4")
        if netmask is not None:
            raise ConfigError("--netmask: IPv4 only, but -6/--ipv6-only disables IPv4")
    if ns.ipv4_only:
        for option, value6 in (("--address", addr6), ("--gateway", gw6)):
            if value6 is not None:
                raise ConfigError(f"{option}: {value6} is IPv6, but -4/--ipv4-only disables IPv6")
    if mtu < IPV6_MIN_MTU:  # RFC 8200: IPv6 needs 1280; the daemon notes the family is off
        if ns.ipv6_only:
            raise ConfigError(f"--mtu: {mtu} is below {IPV6_MIN_MTU}, the IPv6 minimum, but -6 was given")
        for option, value6 in (("--address", addr6), ("--gateway", gw6)):
            if value6 is not None:
                raise ConfigError(f"{option}: {value6} is IPv6, but --mtu {mtu} is below {IPV6_MIN_MTU}")

    interface = None if ns.interface is None else _check_ifname("--interface", ns.interface)
    if host is None:
        host = _read_host_view(interface)
    outbound = tuple(_parse_ip("--outbound", t) for t in ns.outbound or ())
    _per_family("--outbound", outbound)
    log_size = LOG_SIZE_DEFAULT
    if ns.log_size is not None:
        try:
            log_size = int(ns.log_size, 10)
        except ValueError:
            raise ConfigError(f"--log-size: {ns.log_size!r} is not a number") from None
        if log_size < LOG_SIZE_MIN:
            raise ConfigError(f"--log-size: {log_size} is below the minimum of {LOG_SIZE_MIN} bytes")
    dns_forward = tuple(_parse_ip("--dns-forward", t) for t in ns.dns_forward or ())
    dns = _parse_dns(ns.dns, host)
    if dns_forward and ns.dns is None:
        dns = dns_forward  # the guest asks the forwarding address; passtd relays to the host's resolver
    search = _parse_search(ns.search, host)

    ip4 = None
    if not ns.ipv6_only:
        ip4 = _plan_ip4(
            None if addr4 is None else (addr4, prefixes[addr4]),
            netmask,
            gw4,
            host,
            tuple(d for d in dns if isinstance(d, IPv4Address)),
        )
    ip6 = None
    if not ns.ipv4_only and mtu >= IPV6_MIN_MTU:
        ip6 = _plan_ip6(
            None if addr6 is None else (addr6, prefixes[addr6]),
            gw6,
            host,
            tuple(d for d in dns if isinstance(d, IPv6Address)),
            our_mac,
        )

    ctx = Context(
        our_mac=our_mac,
        mtu=mtu,
        ip4=ip4,
        ip6=ip6,
        search=search,
        dhcp=not ns.no_dhcp,
        ndp=not ns.no_ndp,
        dhcpv6=not ns.no_dhcpv6,
        ra=not (ns.no_ra or ns.no_ndp),  # router advertisements are NDP messages (RFC 4861 section 4.2)
        icmp=not ns.no_icmp,
        map_gw=not ns.no_map_gw,
    )
    # A loopback resolver of the host is offered as the --map-host-loopback address (the gateway unless
    # --no-map-gw) and relayed (core/dns.py); the guest-side addresses come from the Context just built.
    lo4, lo6 = host_loopback4(ctx), host_loopback6(ctx)
    dns_plan = plan_dns(
        host.nameservers,
        dns=None if ns.dns is None else dns,
        dns_forward=dns_forward,
        host_loopback4=None if lo4 is None else IPv4Address(lo4),
        host_loopback6=None if lo6 is None else IPv6Address(lo6),
    )
    ctx = replace(
        ctx,
        ip4=None if ip4 is None else replace(ip4, dns=dns_plan.guest4),
        ip6=None if ip6 is None else replace(ip6, dns=dns_plan.guest6),
        dns_forward=dns_plan.forward,
        dns_upstream=dns_plan.upstream,
    )

    default_ifname = host.ifname4 or host.ifname6 or DEFAULT_NS_IFNAME
    socket_path: str | None = None
    one_off = False
    netns: str | None = None
    netns_pid: int | None = None
    command: tuple[str, ...] | None = None
    config_net = False
    ns_ifname = default_ifname
    if mode == "passt":
        environ = os.environ if env is None else env
        socket_path = _check_socket(ns.socket if ns.socket is not None else default_socket_path(environ))
        one_off = ns.one_off
    else:
        netns, netns_pid, command = _pasta_target(ns.netns, ns.target)
        config_net = ns.config_net
        if ns.ns_ifname is not None:
            ns_ifname = _check_ifname("--ns-ifname", ns.ns_ifname)

    forward = ForwardTables.from_options(
        _joined(ns.tcp_ports), _joined(ns.udp_ports),
        _joined(getattr(ns, "tcp_ns", None)), _joined(getattr(ns, "udp_ns", None)), mode,
    )  # fmt: skip
    max_flows = 256 * 1024
    if ns.max_flows is not None:
        try:
            max_flows = int(ns.max_flows)
        except ValueError:
            raise ConfigError(f"--max-flows: {ns.max_flows!r} is not a number") from None
        if not 1 <= max_flows <= 1 << 22:
            raise ConfigError(f"--max-flows: {max_flows} is out of range 1..{1 << 22}")
    environ = os.environ if env is None else env
    control_path: str | None
    control_listen = None
    if ns.control_listen is not None:
        from passtd.control.server import parse_listen  # import-light: no grpc here

        control_listen = parse_listen(ns.control_listen)
        if not ns.control_insecure and not (ns.control_cert and ns.control_key and ns.control_client_ca):
            raise ConfigError(
                "--control-listen: needs --control-cert, --control-key and --control-client-ca "
                "(or --control-insecure on a loopback address)"
            )
    elif ns.control_insecure or ns.control_cert or ns.control_key or ns.control_client_ca:
        raise ConfigError(
            "--control-cert/--control-key/--control-client-ca/--control-insecure: need --control-listen"
        )
    if ns.control == "none":
        control_path = None
    elif ns.control is not None:
        control_path = _check_socket(ns.control, "--control")
    else:
        control_path = default_control_path(mode, socket_path, environ, os.getpid())
    return Config(
        mode=mode,
        ctx=ctx,
        socket_path=socket_path,
        one_off=one_off,
        netns=netns,
        netns_pid=netns_pid,
        command=command,
        ns_ifname=ns_ifname,
        config_net=config_net,
        pcap=_check_file("--pcap", ns.pcap),
        pid_file=_check_file("--pid", ns.pid),
        foreground=ns.foreground,
        debug=ns.debug,
        quiet=ns.quiet,
        log_format="json" if log_format == "json" else "console",
        control_path=control_path,
        control_group=ns.control_group,
        control_listen=control_listen,
        control_cert=ns.control_cert,
        control_key=ns.control_key,
        control_client_ca=ns.control_client_ca,
        control_insecure=ns.control_insecure,
        forward=forward,
        max_flows=max_flows,
        dns_forward=dns_plan.forward,
        dns_upstream=dns_plan.upstream,
        log_file=_check_file("--log-file", ns.log_file),
        log_size=log_size,
        interface=interface,
        outbound=outbound,
        host_view=host,
    )


def _joined(values: Sequence[str] | None) -> str | None:
    """Repeated -t/-u/-T/-U options act as one spec with space-separated parts."""
    return None if not values else " ".join(values)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `passtd` and `python -m passtd`: parse, then hand over to the daemon."""
    try:
        config = parse_args(sys.argv[1:] if argv is None else argv)
    except ConfigError as exc:
        sys.stderr.write(f"{PROG}: error: {' '.join(str(exc).split())}\n")
        return 2
    except SystemExit as exc:  # --help / --version, already printed
        return exc.code if isinstance(exc.code, int) else 0
    from passtd.daemon import run  # lazy: --help and bad options never load the dataplane

    return run(config)
