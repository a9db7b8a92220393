"""--outbound: which source a socket toward a target is bound to."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address

from passtd.dataplane.io.sockets import Outbound

V4, V6 = IPv4Address("10.77.0.5"), IPv6Address("fd77::5")


def test_source_per_family_and_never_for_loopback() -> None:
    out = Outbound((V4, V6))
    assert out.source(IPv4Address("10.88.0.1").packed) == "10.77.0.5"
    assert out.source(IPv6Address("fd88::1").packed) == "fd77::5"
    assert out.source(IPv4Address("127.0.0.1").packed) is None
    assert out.source(IPv4Address("127.1.2.3").packed) is None
    assert out.source(IPv6Address("::1").packed) is None


def test_only_the_families_given_and_nothing_by_default() -> None:
    assert Outbound((V4,)).source(IPv6Address("fd88::1").packed) is None
    assert Outbound().source(IPv4Address("10.88.0.1").packed) is None
