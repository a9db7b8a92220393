"""What the host looks like from where passtd starts: the defaults that the guest copies (as passt does).

By default the guest gets the address, prefix and gateway of the host's default-route interface and the host's
nameservers, so no NAT is needed. Reading is best effort: a host with no default route for a family simply has
no defaults for it, and options.py then disables that family unless the user gives addresses.

The choosing logic (`pick_default_route`, `pick_address`, `parse_resolv_conf`) is pure and works on plain
values, so it is tested without netlink; `read_host_view` is the thin pyroute2 adapter around it.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any, Final, NamedTuple

from passtd.errors import BackendError

RTN_UNICAST: Final = 1  # rtnetlink route type; blackhole/unreachable defaults carry no traffic
RT_SCOPE_UNIVERSE: Final = 0  # a global address
IFA_F_TEMPORARY: Final = 0x01  # RFC 8981 privacy address: short-lived, avoid when a stable one exists
IFA_F_DADFAILED: Final = 0x08
IFA_F_DEPRECATED: Final = 0x20
IFA_F_TENTATIVE: Final = 0x40
_UNUSABLE: Final = IFA_F_DADFAILED | IFA_F_DEPRECATED | IFA_F_TENTATIVE


@dataclass(frozen=True)
class HostView:
    """The host's default-route interface per family, and its resolver configuration."""

    ifname4: str | None = None
    addr4: IPv4Address | None = None
    prefix4: int | None = None
    gw4: IPv4Address | None = None
    ifname6: str | None = None
    addr6: IPv6Address | None = None
    prefix6: int | None = None
    gw6: IPv6Address | None = None
    nameservers: tuple[IPv4Address | IPv6Address, ...] = ()
    search: tuple[str, ...] = ()


class RouteInfo(NamedTuple):
    """A default route reduced to what we need: its metric, outgoing interface index and gateway."""

    metric: int
    oif: int
    gateway: str | None


class AddrInfo(NamedTuple):
    """An interface address reduced to what we need to choose one."""

    address: str
    prefix_len: int
    scope: int
    flags: int


def pick_default_route(routes: Iterable[RouteInfo]) -> RouteInfo | None:
    """The kernel uses the lowest metric; ties keep the first the kernel listed (its own order)."""
    best: RouteInfo | None = None
    for route in routes:
        if best is None or route.metric < best.metric:
            best = route
    return best


def pick_address(addrs: Sequence[AddrInfo], gateway: str | None) -> AddrInfo | None:
    """Prefer a global, usable, stable address, and one whose subnet holds the gateway.

    Deprecated, tentative and DAD-failed addresses are skipped; a temporary (privacy) address is used only if
    it is all there is, since the guest keeps its address far longer than a privacy address lives.
    """
    candidates = [a for a in addrs if a.scope == RT_SCOPE_UNIVERSE and not a.flags & _UNUSABLE]
    if not candidates:
        return None

    def rank(a: AddrInfo) -> tuple[int, int]:
        on_link = 0
        if gateway is not None:
            try:
                net = (
                    IPv4Network(f"{a.address}/{a.prefix_len}", strict=False)
                    if ":" not in a.address
                    else IPv6Network(f"{a.address}/{a.prefix_len}", strict=False)
                )
                on_link = 0 if ip_address(gateway) in net else 1
            except ValueError:
                on_link = 1
        return (1 if a.flags & IFA_F_TEMPORARY else 0, on_link)

    return min(candidates, key=rank)  # min() is stable: kernel order breaks ties


def parse_resolv_conf(text: str) -> tuple[tuple[IPv4Address | IPv6Address, ...], tuple[str, ...]]:
    """Nameservers and search domains from resolv.conf(5) text.

    Comments start with '#' or ';'; malformed lines are skipped, as the resolver does. `domain` and `search`
    are mutually exclusive and the last one wins. Scoped (link-local with %ifname) nameservers are dropped:
    the guest cannot reach the host's link. Duplicates are dropped, order kept.
    """
    servers: list[IPv4Address | IPv6Address] = []
    search: tuple[str, ...] = ()
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0]
        fields = line.split()
        if len(fields) < 2:
            continue
        keyword, args = fields[0], fields[1:]
        if keyword == "nameserver":
            try:
                addr = ip_address(args[0])
            except ValueError:
                continue
            if isinstance(addr, IPv6Address) and (addr.scope_id is not None or addr.is_link_local):
                continue
            if addr not in servers:
                servers.append(addr)
        elif keyword == "search":
            search = tuple(dict.fromkeys(d.rstrip(".") for d in args if d.rstrip(".")))
        elif keyword == "domain":
            search = (args[0].rstrip("."),) if args[0].rstrip(".") else ()
    return tuple(servers), search


def _read_resolv_conf(path: str) -> tuple[tuple[IPv4Address | IPv6Address, ...], tuple[str, ...]]:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return parse_resolv_conf(f.read())
    except OSError:
        return (), ()


def _routes(ipr: Any, family: int) -> list[RouteInfo]:
    """Default routes of the main table as RouteInfo; a multipath route contributes its first hop."""
    out: list[RouteInfo] = []
    for msg in ipr.get_default_routes(family=family):
        if msg["type"] != RTN_UNICAST:
            continue
        metric = msg.get_attr("RTA_PRIORITY") or 0
        oif = msg.get_attr("RTA_OIF")
        gateway = msg.get_attr("RTA_GATEWAY")
        if oif is None:
            hops = msg.get_attr("RTA_MULTIPATH") or []
            if not hops:
                continue
            oif = hops[0]["oif"]
            gateway = hops[0].get_attr("RTA_GATEWAY")
        out.append(RouteInfo(int(metric), int(oif), gateway))
    return out


def _addrs(ipr: Any, family: int, index: int) -> list[AddrInfo]:
    out: list[AddrInfo] = []
    for msg in ipr.get_addr(family=family, index=index):
        address = msg.get_attr("IFA_ADDRESS")
        if address is None:
            continue
        flags = msg.get_attr("IFA_FLAGS")  # 32-bit; the header's ifa_flags holds only the low 8 bits
        if flags is None:
            flags = msg["flags"]
        out.append(AddrInfo(str(address), int(msg["prefixlen"]), int(msg["scope"]), int(flags)))
    return out


def _ifname(ipr: Any, index: int) -> str | None:
    links = ipr.get_links(index)
    if not links:
        return None
    name = links[0].get_attr("IFLA_IFNAME")
    return None if name is None else str(name)


def _family(ipr: Any, family: int) -> tuple[str | None, str | None, int | None, str | None]:
    """(ifname, address, prefix_len, gateway) of the family's default route; Nones when there is none."""
    route = pick_default_route(_routes(ipr, family))
    if route is None:
        return None, None, None, None
    addr = pick_address(_addrs(ipr, family, route.oif), route.gateway)
    ifname = _ifname(ipr, route.oif)
    if addr is None:
        return ifname, None, None, route.gateway
    return ifname, addr.address, addr.prefix_len, route.gateway


def read_host_view(resolv_conf: str = "/etc/resolv.conf", interface: str | None = None) -> HostView:
    """Read the host's defaults over netlink and from resolv.conf; failures leave fields empty.

    With `interface` (passt's -i), addresses and gateways come from that interface only; one that does not
    exist or cannot be read raises BackendError (the option layer names the option).
    """
    view = _read_default_view(resolv_conf)
    return view if interface is None else _interface_view(interface, view)


def _interface_view(interface: str, base: HostView) -> HostView:
    """Addresses and default gateways of `interface` only; resolvers still come from `base`.

    An interface without a default route still lends its address; the gateway is then chosen as without -g.
    """
    from pyroute2 import IPRoute, NetlinkError

    values: dict[str, object] = {"ifname4": None, "addr4": None, "prefix4": None, "gw4": None,
                                 "ifname6": None, "addr6": None, "prefix6": None, "gw6": None}  # fmt: skip
    try:
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=interface)
            if not found:
                raise BackendError(f"no interface named {interface!r}")
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
        raise BackendError(f"cannot read {interface}: {exc}") from None
    return replace(base, **values)  # type: ignore[arg-type]


def _read_default_view(resolv_conf: str) -> HostView:
    from pyroute2 import IPRoute, NetlinkError  # lazy: keeps `passtd --help` fast

    empty: tuple[str | None, str | None, int | None, str | None] = (None, None, None, None)
    v4, v6 = empty, empty
    try:
        with IPRoute() as ipr:
            v4 = _family(ipr, socket.AF_INET)
            v6 = _family(ipr, socket.AF_INET6)
    except (OSError, NetlinkError):
        pass
    nameservers, search = _read_resolv_conf(resolv_conf)
    return HostView(
        ifname4=v4[0],
        addr4=None if v4[1] is None else IPv4Address(v4[1]),
        prefix4=v4[2],
        gw4=None if v4[3] is None else IPv4Address(v4[3]),
        ifname6=v6[0],
        addr6=None if v6[1] is None else IPv6Address(v6[1]),
        prefix6=v6[2],
        gw6=None if v6[3] is None else IPv6Address(v6[3].split("%", 1)[0]),
        nameservers=nameservers,
        search=search,
    )
