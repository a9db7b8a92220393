"""Fixed StatusViews and a fake ControlAPI shared by the control-plane tests."""

from __future__ import annotations

from dataclasses import dataclass

from passtd.control.api import BackendView, ConfigView, CountersView, LimitsView, StatusView

SAMPLE = StatusView(
    version="0.1.0",
    mode="passt",
    uptime=3723.75,
    backend=BackendView(
        kind="unix-stream",
        path="/run/passtd/passtd.socket",
        guest_connected=True,
        guest_mac="52:54:00:12:34:56",
        guest_addresses=("10.0.2.15", "2001:db8::2"),
    ),
    config=ConfigView(
        ipv4_address="10.0.2.15",
        ipv4_prefix_length=24,
        ipv4_gateway="10.0.2.2",
        ipv6_address="2001:db8::2",
        ipv6_prefix_length=64,
        ipv6_gateway="fe80::1",
        ipv6_link_local="fe80::9855:9aff:fe55:9a55",
        dns=("10.0.2.3", "2001:db8::3"),
        search=("example.com", "lab.example"),
        mtu=65520,
        our_mac="9a:55:9a:55:9a:55",
        dhcpv6=False,
        map_gateway=False,
    ),
    counters=CountersView(
        frames_from_guest=1234,
        bytes_from_guest=1572864,
        frames_to_guest=987,
        bytes_to_guest=12000,
        dropped={"ipv4.bad_checksum": 2, "arp.truncated": 1},
    ),
    flows={"udp": 2, "tcp": 3},
    limits=LimitsView(max_flows=4096),
)

# pasta with nothing learned yet and IPv6 disabled: the empty and zero cases.
BARE = StatusView(
    version="0.1.0",
    mode="pasta",
    uptime=0.4,
    backend=BackendView(kind="tap", ifname="tap0"),
    config=ConfigView(
        ipv4_address="192.0.2.10",
        ipv4_prefix_length=24,
        mtu=1500,
        our_mac="9a:55:9a:55:9a:55",
        dhcp=False,
        dhcpv6=False,
        ndp=False,
        ra=False,
        icmp=False,
        map_gateway=False,
    ),
    counters=CountersView(),
    limits=LimitsView(max_flows=128),
)


@dataclass
class FakeControlAPI:
    """Returns `view`, or raises `error` when set; counts calls."""

    view: StatusView = SAMPLE
    error: Exception | None = None
    calls: int = 0

    def status(self) -> StatusView:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return self.view
