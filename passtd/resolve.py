"""Parsed options → Config: what each value means, checked against the host's defaults (passt's conf.c).

The syntax is options.py's; the guest's address plan is plan.py's (pure); the host's defaults arrive as a
HostView read through the io layer's public `read_host_view` (netlink and resolv.conf), or injected by tests.
Every problem is a one-line ConfigError naming the option.
"""

from __future__ import annotations

import argparse
import grp
import os
import pwd
import re
from collections.abc import Mapping, Sequence
from dataclasses import replace
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Final, Literal, NamedTuple

from passtd.config import (
    DEFAULT_NS_IFNAME,
    IPV6_MIN_MTU,
    LOG_SIZE_DEFAULT,
    LOG_SIZE_MIN,
    MTU_DEFAULT,
    MTU_MAX,
    MTU_MIN,
    Config,
    default_control_path,
    default_socket_path,
)
from passtd.dataplane.core.context import DEFAULT_MAC, Context
from passtd.dataplane.core.dns import plan_dns
from passtd.dataplane.core.fwd import ForwardTables
from passtd.errors import BackendError, ConfigError
from passtd.limits import ifname_problem, socket_path_problem
from passtd.plan import plan_ip4, plan_ip6

if TYPE_CHECKING:
    from passtd.dataplane.io.hostview import HostView

IPAddr = IPv4Address | IPv6Address

LOG_FORMATS: Final = ("console", "json")
NAME_MAX: Final = 253  # RFC 1035 section 2.3.4: a domain name in text form
FD_MAX: Final = 1 << 20

_MAC_RE: Final = re.compile(r"[0-9A-Fa-f]{1,2}(?::[0-9A-Fa-f]{1,2}){5}")
_LABEL_RE: Final = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_PID_RE: Final = re.compile(r"[0-9]+")


def _parse_mtu(text: str | None) -> int:
    """-m 0 means "don't assign an MTU" in passt: nothing is offered, the data path keeps its default."""
    if text is None:
        return MTU_DEFAULT
    try:
        mtu = int(text, 10)
    except ValueError:
        raise ConfigError(f"--mtu: {text!r} is not a number") from None
    if mtu == 0:
        return MTU_DEFAULT
    if not MTU_MIN <= mtu <= MTU_MAX:
        raise ConfigError(f"--mtu: {mtu} is out of range {MTU_MIN}..{MTU_MAX}")
    return mtu


def _parse_mac(text: str | None, option: str = "--mac-addr") -> bytes:
    if text is None:
        return DEFAULT_MAC
    if _MAC_RE.fullmatch(text) is None:
        raise ConfigError(f"{option}: {text!r} is not a MAC address")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1:
        raise ConfigError(f"{option}: {text} is a multicast address")
    if mac == bytes(6):
        raise ConfigError(f"{option}: {text} is the all-zero address")
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


def _parse_dns(values: Sequence[str], host: HostView) -> tuple[IPAddr, ...]:
    """-D/--dns: addresses, or `none` for no nameserver at all (without -D, core/dns.py plans them)."""
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
    """-S takes one domain or several separated by blanks (qemu passes `--search "d1 d2"` as one word)."""
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
    """The one rule for interface names (passtd.limits), checked here so a bad name never reaches the tap."""
    problem = ifname_problem(name)
    if problem is not None:
        raise ConfigError(f"{option}: {name!r} is not a valid interface name ({problem})")
    return name


def _check_file(option: str, path: str | None) -> str | None:
    if path is not None and (not path or "\0" in path):
        raise ConfigError(f"{option}: expects a file name")
    return path


def check_socket(path: str, option: str = "--socket") -> str:
    problem = socket_path_problem(path)
    if problem is not None:
        raise ConfigError(f"{option}: {problem}")
    return path


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


def _parse_name(option: str, text: str | None) -> str:
    """-H/--hostname and --fqdn: a DNS name as DHCP carries it (RFC 1035 labels, at most 253 characters)."""
    if text is None:
        return ""
    name = text.removesuffix(".")
    if (
        not name
        or len(name) > NAME_MAX
        or not name.isascii()
        or not all(_LABEL_RE.fullmatch(label) for label in name.split("."))
    ):
        raise ConfigError(f"{option}: {text!r} is not a host name")
    return name


def _parse_nat(option: str, text: str | None) -> tuple[bool, IPv4Address | None, IPv6Address | None]:
    """--map-host-loopback / --map-guest-addr: (given 'none', IPv4 address, IPv6 address); one family each."""
    if text is None:
        return False, None, None
    if text == "none":
        return True, None, None
    addr = _parse_ip(option, text)
    if addr.is_unspecified or addr.is_loopback or addr.is_multicast:
        raise ConfigError(f"{option}: {addr} cannot be mapped")
    if isinstance(addr, IPv4Address):
        return False, addr, None
    return False, None, addr


def _parse_fd(text: str | None) -> int | None:
    if text is None:
        return None
    if not text.isascii() or not text.isdigit() or int(text) > FD_MAX:
        raise ConfigError(f"--fd: {text!r} is not a file descriptor number")
    fd = int(text)
    if fd <= 2:
        raise ConfigError(f"--fd: {fd} is standard input, output or error, not a socket")
    return fd


def _parse_runas(text: str | None) -> tuple[int, int] | None:
    """USER[:GROUP], names or numbers (passt's conf_runas); the user's primary group without GROUP."""
    if text is None:
        return None
    user, colon, group = text.partition(":")
    if not user or (colon and not group):
        raise ConfigError(f"--runas: {text!r} is not USER[:GROUP]")
    if user.isascii() and user.isdigit():
        uid = gid = int(user)
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError(f"--runas: no user named {user!r}") from None
        uid, gid = entry.pw_uid, entry.pw_gid
    if colon:
        if group.isascii() and group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise ConfigError(f"--runas: no group named {group!r}") from None
    return uid, gid


def _derive_userns(userns: str | None, netns_only: bool, pid: int | None) -> str | None:
    """pasta PID joins that process's user namespace too, unless --netns-only; --userns says which."""
    if netns_only:
        return None
    if userns is not None:
        if not userns or "\0" in userns:
            raise ConfigError("--userns: expects a path")
        return userns
    return None if pid is None else f"/proc/{pid}/ns/user"


def _read_host_view(interface: str | None) -> HostView:
    """The host's defaults through the io layer (netlink and resolv.conf): only when the tests inject none."""
    from passtd.dataplane.io.hostview import read_host_view

    try:
        return read_host_view(interface=interface)
    except BackendError as exc:
        raise ConfigError(f"--interface: {exc}") from None


# --------------------------------------------------------------------------- the whole


def resolve(ns: argparse.Namespace, host: HostView | None, env: Mapping[str, str] | None) -> Config:
    """Check and combine the parsed options (from argv and the file) against the host's defaults."""
    mode: Literal["passt", "pasta"] = ns.mode
    environ = os.environ if env is None else env
    if ns.debug and ns.quiet:
        raise ConfigError("-q/--quiet: cannot be combined with -d/--debug")
    log_format = ns.log_format or "console"
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"--log-format: {log_format!r} is not one of {', '.join(LOG_FORMATS)}")
    interface = None if ns.interface is None else _check_ifname("--interface", ns.interface)
    outbound_if4 = None if ns.outbound_if4 is None else _check_ifname("--outbound-if4", ns.outbound_if4)
    outbound_if6 = None if ns.outbound_if6 is None else _check_ifname("--outbound-if6", ns.outbound_if6)
    pasta = _resolve_pasta(ns) if mode == "pasta" else None
    socket_path, fd = _resolve_guest_socket(ns, environ) if mode == "passt" else (None, None)
    runas = _parse_runas(ns.runas)
    pesto_path = None if ns.conf_path is None else check_socket(ns.conf_path, "-c/--conf-path")
    ctx_args = _check_addresses(ns)  # before the host is read: a bad value must not wait for netlink
    if host is None:
        host = _read_host_view(interface)
    ctx = _resolve_ctx(ns, host, ctx_args)
    control_path, control_listen = _resolve_control(ns, mode, socket_path, environ)
    default_ifname = host.ifname4 or host.ifname6 or DEFAULT_NS_IFNAME
    return Config(
        mode=mode,
        ctx=ctx,
        socket_path=socket_path,
        one_off=mode == "passt" and (ns.one_off or fd is not None),
        netns=None if pasta is None else pasta.netns,
        netns_pid=None if pasta is None else pasta.pid,
        command=None if pasta is None else pasta.command,
        ns_ifname=default_ifname if pasta is None or pasta.ifname is None else pasta.ifname,
        config_net=getattr(ns, "config_net", False),
        pcap=_check_file("--pcap", ns.pcap),
        pid_file=_check_file("--pid", ns.pid),
        foreground=ns.foreground,
        debug=ns.debug or ns.trace,
        quiet=ns.quiet,
        log_format="json" if log_format == "json" else "console",
        control_path=control_path,
        control_group=ns.control_group,
        control_listen=control_listen,
        control_cert=ns.control_cert,
        control_key=ns.control_key,
        control_client_ca=ns.control_client_ca,
        control_insecure=ns.control_insecure,
        metrics_listen=_parse_metrics_listen(ns.metrics_listen),
        forward=_resolve_forward(ns, mode),
        max_flows=_parse_max_flows(ns.max_flows),
        log_file=_check_file("--log-file", ns.log_file),
        log_size=_parse_log_size(ns.log_size),
        interface=interface,
        outbound=_parse_outbound(ns.outbound),
        outbound_if4=outbound_if4,
        outbound_if6=outbound_if6,
        freebind=ns.freebind,
        splice=mode == "pasta" and not ns.no_splice,
        host_lo_to_ns_lo=pasta is not None and pasta.host_lo_to_ns_lo,
        fd=fd,
        vhost_user=getattr(ns, "vhost_user", False),
        runas=runas,
        userns=None if pasta is None else pasta.userns,
        netns_only=pasta is not None and pasta.netns_only,
        netns_quit=pasta is None or pasta.netns_quit,
        ns_mac=None if pasta is None else pasta.ns_mac,
        pesto_path=pesto_path,
        host_view=host,
    )


class _Addresses(NamedTuple):
    """The address options, checked on their own (no host needed)."""

    mtu: int
    assign_mtu: bool
    our_mac: bytes
    addr4: tuple[IPv4Address, int | None] | None
    addr6: tuple[IPv6Address, int | None] | None
    netmask: int | None
    gw4: IPv4Address | None
    gw6: IPv6Address | None


def _check_addresses(ns: argparse.Namespace) -> _Addresses:
    mtu = _parse_mtu(ns.mtu)
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
    return _Addresses(
        mtu,
        ns.mtu is None or int(ns.mtu, 10) != 0,
        _parse_mac(ns.mac_addr),
        None if addr4 is None else (addr4, prefixes[addr4]),
        None if addr6 is None else (addr6, prefixes[addr6]),
        netmask,
        gw4,
        gw6,
    )


def _resolve_ctx(ns: argparse.Namespace, host: HostView, a: _Addresses) -> Context:
    """The dataplane's Context, the DNS relay's addresses (guest side, host side) included."""
    dns_forward = tuple(_parse_ip("--dns-forward", t) for t in ns.dns_forward or ())
    dns_host = None if ns.dns_host is None else _parse_ip("--dns-host", ns.dns_host)
    if dns_host is not None and dns_host.is_unspecified:
        raise ConfigError(f"--dns-host: {dns_host} cannot be a nameserver")
    no_map, mhl4, mhl6 = _parse_nat("--map-host-loopback", ns.map_host_loopback)
    _, mga4, mga6 = _parse_nat("--map-guest-addr", ns.map_guest_addr)
    map_gw = not (ns.no_map_gw or no_map)
    ip4 = None
    if not ns.ipv6_only:
        ip4 = plan_ip4(a.addr4, a.netmask, a.gw4, host, ())
    ip6 = None
    if not ns.ipv4_only and a.mtu >= IPV6_MIN_MTU:
        ip6 = plan_ip6(a.addr6, a.gw6, host, (), a.our_mac)
    if map_gw:  # passt: the gateway stands for the host's loopback unless told otherwise
        mhl4 = mhl4 or (None if ip4 is None else ip4.gateway)
        mhl6 = mhl6 or (None if ip6 is None else ip6.gateway)
    # What the guest is offered and where its queries go: core/dns.py, after passt's get_dns (a loopback
    # resolver such as systemd-resolved's is offered as the host-loopback address and relayed there).
    plan = plan_dns(
        host.nameservers,
        dns=None if ns.dns is None else _parse_dns(ns.dns, host),
        dns_forward=dns_forward,
        dns_host=() if dns_host is None else (dns_host,),
        host_loopback4=mhl4,
        host_loopback6=mhl6,
    )
    if ip4 is not None:
        ip4 = replace(ip4, dns=plan.guest4)
    if ip6 is not None:
        ip6 = replace(ip6, dns=plan.guest6)
    pasta = ns.mode == "pasta"
    ctx = Context(
        our_mac=a.our_mac,
        mtu=a.mtu,
        assign_mtu=a.assign_mtu,
        ip4=ip4,
        ip6=ip6,
        search=_parse_search(ns.search, host),
        dhcp=not ns.no_dhcp,
        ndp=not ns.no_ndp,
        dhcpv6=not ns.no_dhcpv6,
        ra=not (ns.no_ra or ns.no_ndp),  # router advertisements are NDP messages (RFC 4861 section 4.2)
        icmp=not ns.no_icmp,
        map_gw=map_gw,
        tcp=not ns.no_tcp,
        udp=not ns.no_udp,
        hostname=_parse_name("-H/--hostname", ns.hostname),
        fqdn=_parse_name("--fqdn", ns.fqdn),
        dhcp_dns=ns.dhcp_dns if pasta else not ns.no_dhcp_dns,  # pasta offers none unless asked (passt)
        dhcp_search=ns.dhcp_search if pasta else not ns.no_dhcp_search,
        map_host_loopback4=mhl4,
        map_host_loopback6=mhl6,
        map_guest_addr4=mga4,
        map_guest_addr6=mga6,
        dns_forward=plan.forward,
        dns_upstream=plan.upstream,
    )
    return ctx


class _Pasta(NamedTuple):
    netns: str | None
    pid: int | None
    command: tuple[str, ...] | None
    ifname: str | None
    userns: str | None
    netns_only: bool
    netns_quit: bool
    ns_mac: bytes | None
    host_lo_to_ns_lo: bool


def _resolve_pasta(ns: argparse.Namespace) -> _Pasta:
    netns, pid, command = _pasta_target(ns.netns, ns.target)
    if ns.host_lo_to_ns_lo and ns.no_splice:
        raise ConfigError("--host-lo-to-ns-lo: cannot be combined with --no-splice")
    return _Pasta(
        netns=netns,
        pid=pid,
        command=command,
        ifname=None if ns.ns_ifname is None else _check_ifname("--ns-ifname", ns.ns_ifname),
        userns=_derive_userns(ns.userns, ns.netns_only, pid),
        netns_only=ns.netns_only,
        netns_quit=not ns.no_netns_quit,
        ns_mac=None if ns.ns_mac_addr is None else _parse_mac(ns.ns_mac_addr, "--ns-mac-addr"),
        host_lo_to_ns_lo=ns.host_lo_to_ns_lo,
    )


def _resolve_guest_socket(ns: argparse.Namespace, env: Mapping[str, str]) -> tuple[str | None, int | None]:
    """passt: the socket path qemu connects to, or --fd, a socket qemu already connected (passt: -F wins)."""
    fd = _parse_fd(ns.fd)
    if fd is not None:
        return None, fd
    return check_socket(ns.socket if ns.socket is not None else default_socket_path(env)), None


def _loopback_host(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_metrics_listen(text: str | None) -> tuple[str, int] | None:
    """`PORT`, `:PORT` (both on 127.0.0.1), `ADDR:PORT` or `[IPV6]:PORT`. A non-loopback ADDR is allowed:
    binding it is the operator's explicit choice to expose the metrics to that network."""
    if text is None:
        return None
    from passtd.control.server import parse_listen  # import-light: no grpc here

    if text.isascii() and text.isdigit():
        text = f":{text}"
    if text.startswith(":"):
        text = "127.0.0.1" + text
    host, port = parse_listen(text, "--metrics-listen")
    try:
        ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ConfigError(f"--metrics-listen: {host!r} is not an IP address") from None
    return host, port


def _resolve_control(
    ns: argparse.Namespace, mode: str, socket_path: str | None, env: Mapping[str, str]
) -> tuple[str | None, tuple[str, int] | None]:
    control_listen = None
    if ns.control_listen is not None:
        from passtd.control.server import parse_listen  # import-light: no grpc here

        control_listen = parse_listen(ns.control_listen)
        if ns.control_insecure and not _loopback_host(control_listen[0]):
            raise ConfigError(
                f"--control-insecure: only allowed on a loopback address, not {control_listen[0]!r} "
                "(use --control-cert, --control-key and --control-client-ca)"
            )
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
        return None, control_listen
    if ns.control is not None:
        return check_socket(ns.control, "--control"), control_listen
    pid_file = _check_file("--pid", ns.pid)
    return default_control_path(mode, socket_path, env, os.getpid(), pid_file), control_listen


def _resolve_forward(ns: argparse.Namespace, mode: Literal["passt", "pasta"]) -> ForwardTables:
    return ForwardTables.from_options(
        _joined(ns.tcp_ports), _joined(ns.udp_ports),
        _joined(getattr(ns, "tcp_ns", None)), _joined(getattr(ns, "udp_ns", None)), mode,
    )  # fmt: skip


def _parse_max_flows(text: str | None) -> int:
    if text is None:
        return 256 * 1024
    try:
        max_flows = int(text)
    except ValueError:
        raise ConfigError(f"--max-flows: {text!r} is not a number") from None
    if not 1 <= max_flows <= 1 << 22:
        raise ConfigError(f"--max-flows: {max_flows} is out of range 1..{1 << 22}")
    return max_flows


def _parse_log_size(text: str | None) -> int:
    if text is None:
        return LOG_SIZE_DEFAULT
    try:
        log_size = int(text, 10)
    except ValueError:
        raise ConfigError(f"--log-size: {text!r} is not a number") from None
    if log_size < LOG_SIZE_MIN:
        raise ConfigError(f"--log-size: {log_size} is below the minimum of {LOG_SIZE_MIN} bytes")
    return log_size


def _parse_outbound(values: Sequence[str] | None) -> tuple[IPAddr, ...]:
    outbound = tuple(_parse_ip("--outbound", t) for t in values or ())
    _per_family("--outbound", outbound)
    return outbound


def _joined(values: Sequence[str] | None) -> str | None:
    """Repeated -t/-u/-T/-U options act as one spec with space-separated parts (libvirt repeats them)."""
    return None if not values else " ".join(values)
