"""The guest's address plan: pure functions from the given options and the host's defaults to Ip4Net/Ip6Net.

No I/O: the host's view arrives as a HostView value (read by the io layer), so every rule here is tested on
plain values. passt's model: without -a/-n/-g the guest copies the host's address, prefix and gateway, so no
NAT is needed; a family the host has no address for is disabled unless the user gives one.
"""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address
from typing import TYPE_CHECKING, Final, TypeVar

from passtd.dataplane.core.context import Ip4Net, Ip6Net, link_local_from_mac
from passtd.errors import ConfigError

if TYPE_CHECKING:
    from passtd.dataplane.io.hostview import HostView

T = TypeVar("T")

V4_DEFAULT_PREFIX: Final = 24
V6_DEFAULT_PREFIX: Final = 64


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


def plan_ip4(
    addr_opt: tuple[IPv4Address, int | None] | None,
    netmask: int | None,
    gateway: IPv4Address | None,
    host: HostView,
    dns: tuple[IPv4Address, ...],
) -> Ip4Net | None:
    """The guest's IPv4 network: -a/-n/-g first, then the host's address, prefix and gateway; None when
    neither gives an address (the family is off)."""
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


def plan_ip6(
    addr_opt: tuple[IPv6Address, int | None] | None,
    gateway: IPv6Address | None,
    host: HostView,
    dns: tuple[IPv6Address, ...],
    our_mac: bytes,
) -> Ip6Net | None:
    """The guest's IPv6 network, as for IPv4; the gateway defaults to our link-local address (passt's)."""
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
