"""Which nameservers the guest is offered, and which of its DNS queries are relayed where (passt conf.c
get_dns / add_dns_resolv, fwd.c fwd_nat_from_tap).

The guest cannot reach a resolver on the host's loopback (systemd-resolved's 127.0.0.53, a local dnsmasq):
127.0.0.53 inside the guest is the guest itself. So, as passt does, a loopback nameserver of the host is
offered to the guest as the --map-host-loopback address (the gateway by default), and the guest's DNS to that
address (port 53) is relayed to the host's resolver instead of to the host's 127.0.0.1:53. A nameserver
equal to the --map-host-loopback address is treated the same way: without the relay, traffic to it would land
on the host's loopback. With --no-map-gw and no --map-host-loopback there is no such address, and the loopback
resolver is left out, as passt does.

`-D/--dns` replaces the host's list as given. `--dns-forward ADDR` makes ADDR a relayed address; with no `-D`
the guest is offered the forwarding addresses (what a container runtime that names one expects). The relay
target is `--dns-host` for its family, else the host's first nameserver of that family; a query of the other
family goes to the first target there is (udp.target_for).

Pure and small on purpose: the option layer calls `plan_dns` once with the parsed options and the host view.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

IPAddr = IPv4Address | IPv6Address


@dataclass(frozen=True, slots=True)
class DnsPlan:
    """What `plan_dns` decided: the lists for `Ip4Net.dns`/`Ip6Net.dns`, Context.dns_forward/dns_upstream."""

    guest4: tuple[IPv4Address, ...] = ()  # offered by DHCP
    guest6: tuple[IPv6Address, ...] = ()  # offered by DHCPv6 and RA (RDNSS)
    forward: tuple[IPAddr, ...] = ()  # guest-side addresses whose port-53 traffic is relayed
    upstream: tuple[IPAddr, ...] = ()  # where it is relayed: at most one per family, IPv4 first


def plan_dns(
    host_nameservers: Sequence[IPAddr],
    *,
    dns: Sequence[IPAddr] | None = None,
    dns_forward: Sequence[IPAddr] = (),
    dns_host: Sequence[IPAddr] = (),
    host_loopback4: IPv4Address | None = None,
    host_loopback6: IPv6Address | None = None,
) -> DnsPlan:
    """Plan DNS for the guest.

    `host_nameservers`: the host's resolv.conf order. `dns`: -D/--dns addresses, None when not given, empty
    for `-D none`. `dns_forward`: --dns-forward. `dns_host`: --dns-host (the last one per family wins).
    `host_loopback4/6`: the guest-side addresses that mean the host's loopback (Context's --map-host-loopback,
    the gateway by default), None when there is none.
    """
    usable = [a for a in host_nameservers if not a.is_unspecified and not a.is_multicast]
    upstream: list[IPAddr] = []
    for version in (4, 6):
        chosen = [a for a in dns_host if a.version == version]
        if chosen:
            upstream.append(chosen[-1])
        elif dns != ():  # `-D none` also means: no resolver of the host's to relay to
            upstream += [a for a in usable if a.version == version][:1]

    forward: list[IPAddr] = list(dict.fromkeys(dns_forward))
    if dns is not None:
        offered: list[IPAddr] = list(dict.fromkeys(dns))
    elif dns_forward:
        offered = list(forward)
    else:
        offered = []
        for ns in usable:
            alias: IPAddr | None = host_loopback4 if ns.version == 4 else host_loopback6
            if ns.is_loopback or ns == alias:
                if alias is None:
                    continue  # unreachable from the guest
                if alias not in forward:
                    forward.append(alias)
                ns = alias
            if ns not in offered:
                offered.append(ns)
    return DnsPlan(
        guest4=tuple(a for a in offered if isinstance(a, IPv4Address)),
        guest6=tuple(a for a in offered if isinstance(a, IPv6Address)),
        forward=tuple(forward),
        upstream=tuple(upstream),
    )
