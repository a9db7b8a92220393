"""Pure conversion from the control API's views to protobuf messages (unit-tested without gRPC)."""

from __future__ import annotations

from typing import Final

from passtd.control.api import BackendView, ConfigView, CountersView, LimitsView, Mode, StatusView
from passtd.control.pb import passt_pb2

MODE_TO_PB: Final[dict[Mode, passt_pb2.Mode.ValueType]] = {
    "passt": passt_pb2.MODE_PASST,
    "pasta": passt_pb2.MODE_PASTA,
}


def backend_to_pb(view: BackendView) -> passt_pb2.Backend:
    return passt_pb2.Backend(
        kind=view.kind,
        path=view.path,
        ifname=view.ifname,
        guest_connected=view.guest_connected,
        guest_mac=view.guest_mac,
        guest_addresses=view.guest_addresses,
    )


def config_to_pb(view: ConfigView) -> passt_pb2.Config:
    return passt_pb2.Config(
        ipv4_address=view.ipv4_address,
        ipv4_prefix_length=view.ipv4_prefix_length,
        ipv4_gateway=view.ipv4_gateway,
        ipv6_address=view.ipv6_address,
        ipv6_prefix_length=view.ipv6_prefix_length,
        ipv6_gateway=view.ipv6_gateway,
        ipv6_link_local=view.ipv6_link_local,
        dns=view.dns,
        search=view.search,
        mtu=view.mtu,
        our_mac=view.our_mac,
        dhcp=view.dhcp,
        dhcpv6=view.dhcpv6,
        ndp=view.ndp,
        ra=view.ra,
        icmp=view.icmp,
        map_gateway=view.map_gateway,
    )


def counters_to_pb(view: CountersView) -> passt_pb2.Counters:
    return passt_pb2.Counters(
        frames_from_guest=view.frames_from_guest,
        bytes_from_guest=view.bytes_from_guest,
        frames_to_guest=view.frames_to_guest,
        bytes_to_guest=view.bytes_to_guest,
        dropped=dict(view.dropped),
    )


def limits_to_pb(view: LimitsView) -> passt_pb2.Limits:
    return passt_pb2.Limits(max_flows=view.max_flows)


def status_to_pb(view: StatusView) -> passt_pb2.Status:
    """The GetStatus reply. Raises ValueError if a counter does not fit its proto type (a daemon bug)."""
    return passt_pb2.Status(
        version=view.version,
        mode=MODE_TO_PB[view.mode],
        uptime_seconds=view.uptime,
        backend=backend_to_pb(view.backend),
        config=config_to_pb(view.config),
        counters=counters_to_pb(view.counters),
        flows=dict(view.flows),
        limits=limits_to_pb(view.limits),
    )
