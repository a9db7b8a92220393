"""plan_dns: nameservers offered to the guest and the DNS relay, after passt's conf.c get_dns."""

from __future__ import annotations

import dataclasses
from ipaddress import IPv4Address, IPv6Address, ip_address

from passtd.dataplane.core.context import Context, Ip4Net
from passtd.dataplane.core.dns import DnsPlan, plan_dns
from passtd.dataplane.core.icmp import LOOPBACK4
from passtd.dataplane.core.udp import target_for

GW4, GW6 = IPv4Address("192.0.2.1"), IPv6Address("fe80::1")
RESOLVED = IPv4Address("127.0.0.53")
LO6 = IPv6Address("::1")
NS4, NS6 = IPv4Address("198.51.100.53"), IPv6Address("2001:db8::53")
FWD = IPv4Address("169.254.1.1")


def test_only_a_loopback_resolver_is_offered_as_the_gateway_and_relayed() -> None:
    """systemd-resolved: the guest gets the gateway, its queries to gateway:53 go to 127.0.0.53."""
    plan = plan_dns((RESOLVED,), host_loopback4=GW4, host_loopback6=GW6)
    assert plan == DnsPlan(guest4=(GW4,), forward=(GW4,), upstream=(RESOLVED,))
    ctx = Context(ip4=Ip4Net(IPv4Address("192.0.2.10"), 24, GW4, plan.guest4), dns_forward=plan.forward,
                  dns_upstream=plan.upstream)  # fmt: skip
    assert target_for(ctx, GW4.packed, 53) == RESOLVED.packed
    assert target_for(ctx, GW4.packed, 80) == LOOPBACK4  # other ports: loopback


def test_ipv6_loopback_resolver_and_both_families() -> None:
    plan = plan_dns((RESOLVED, LO6, IPv4Address("127.0.0.1")), host_loopback4=GW4, host_loopback6=GW6)
    assert plan.guest4 == (GW4,) and plan.guest6 == (GW6,)  # one alias per family, however many resolvers
    assert plan.forward == (GW4, GW6)
    assert plan.upstream == (RESOLVED, LO6)


def test_mixed_host_list_keeps_order_and_the_first_resolver_is_the_target() -> None:
    plan = plan_dns((NS4, NS6, RESOLVED), host_loopback4=GW4, host_loopback6=GW6)
    assert plan.guest4 == (NS4, GW4) and plan.guest6 == (NS6,)
    assert plan.forward == (GW4,) and plan.upstream == (NS4, NS6)


def test_resolver_on_the_gateway_address_is_relayed_not_sent_to_loopback() -> None:
    """The host's router is also its resolver and we shadow its address: relay, as passt does."""
    plan = plan_dns((GW4,), host_loopback4=GW4)
    assert plan == DnsPlan(guest4=(GW4,), forward=(GW4,), upstream=(GW4,))


def test_no_map_gw_leaves_a_loopback_resolver_out() -> None:
    plan = plan_dns((RESOLVED, NS4))
    assert plan.guest4 == (NS4,) and plan.forward == () and plan.upstream == (RESOLVED,)


def test_dns_forward_is_offered_and_relayed() -> None:
    """--dns-forward without -D: the guest is offered the forwarding address (Podman, RootlessKit)."""
    plan = plan_dns((RESOLVED,), dns_forward=(FWD, FWD), host_loopback4=GW4)
    assert plan == DnsPlan(guest4=(FWD,), forward=(FWD,), upstream=(RESOLVED,))


def test_explicit_dns_as_given_and_none() -> None:
    plan = plan_dns((RESOLVED,), dns=(NS4, NS6, NS4), host_loopback4=GW4)
    assert (plan.guest4, plan.guest6, plan.forward) == ((NS4,), (NS6,), ())
    assert plan.upstream == (RESOLVED,)
    none = plan_dns((RESOLVED, NS6), dns=(), host_loopback4=GW4)
    assert none == DnsPlan()
    assert plan_dns((RESOLVED,), dns=(), dns_forward=(FWD,), dns_host=(NS4,)) == DnsPlan(
        forward=(FWD,), upstream=(NS4,)
    )


def test_dns_host_chooses_the_target_per_family() -> None:
    """--dns-host: the last one per family wins; the other family keeps the host's first resolver."""
    other = IPv4Address("127.0.0.2")
    plan = plan_dns((RESOLVED, NS6), dns_host=(NS4, other), host_loopback4=GW4)
    assert plan.upstream == (other, NS6) and plan.forward == (GW4,)
    plan6 = plan_dns((RESOLVED,), dns_host=(LO6,), host_loopback4=GW4)
    assert plan6.upstream == (RESOLVED, LO6)


def test_unusable_host_entries_are_skipped() -> None:
    plan = plan_dns((ip_address("0.0.0.0"), ip_address("ff02::fb"), NS4))
    assert plan == DnsPlan(guest4=(NS4,), upstream=(NS4,))


def test_tcp_dns_to_the_gateway_is_relayed_too() -> None:
    """passt relays TCP as well as UDP (port 53, and 853 for DNS over TLS): a guest falling back to TCP for
    a truncated answer reaches the same resolver."""
    from tests.helpers.tcpfake import CTX as TCP_CTX
    from tests.helpers.tcpfake import GW4, Rig

    gw = IPv4Address(GW4)
    plan = plan_dns((RESOLVED,), host_loopback4=gw)
    rig = Rig(dataclasses.replace(TCP_CTX, dns_forward=plan.forward, dns_upstream=plan.upstream))
    for sport, dport in ((40001, 53), (40002, 853), (40003, 80)):
        rig.guest(0x02, 1000, dst=GW4, sport=sport, dport=dport)
    targets = {c.guest_port: c.target_addr for c in rig.flows if hasattr(c, "target_addr")}
    assert targets == {40001: RESOLVED.packed, 40002: RESOLVED.packed, 40003: LOOPBACK4}
