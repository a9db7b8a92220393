"""The control plane's view of a running daemon: `ControlAPI` implemented over the dataplane.

Lives beside the composition root, not in passtd.control, so that the control package (and passtctl) never
import the dataplane.
"""

from __future__ import annotations

import time
from collections import Counter

from passtd import __version__
from passtd.config import Config
from passtd.control.api import BackendView, ConfigView, CountersView, LimitsView, StatusView
from passtd.dataplane.core.flowtable import PROTO_ICMP, PROTO_TCP, PROTO_UDP
from passtd.dataplane.io.dataplane import Dataplane

_PROTO_NAMES = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp"}


def _mac(mac: bytes) -> str:
    return mac.hex(":")


class DaemonControl:
    def __init__(self, config: Config, dataplane: Dataplane) -> None:
        self.config = config
        self.dp = dataplane
        self.started = time.monotonic()

    def status(self) -> StatusView:
        cfg, ctx, dp = self.config, self.config.ctx, self.dp
        guest = dp.guest
        backend = BackendView(
            kind="unix-stream" if cfg.mode == "passt" else "tap",
            path=cfg.socket_path or "",
            ifname=cfg.ns_ifname if cfg.mode == "pasta" else "",
            guest_connected=dp.tap is not None,
            guest_mac=_mac(guest.mac) if guest.mac else "",
            guest_addresses=tuple(sorted(str(a) for a in (*guest.addrs4, *guest.addrs6))),
        )
        config = ConfigView(
            ipv4_address=str(ctx.ip4.addr) if ctx.ip4 else "",
            ipv4_prefix_length=ctx.ip4.prefix_len if ctx.ip4 else 0,
            ipv4_gateway=str(ctx.ip4.gateway) if ctx.ip4 else "",
            ipv6_address=str(ctx.ip6.addr) if ctx.ip6 else "",
            ipv6_prefix_length=ctx.ip6.prefix_len if ctx.ip6 else 0,
            ipv6_gateway=str(ctx.ip6.gateway) if ctx.ip6 else "",
            ipv6_link_local=str(ctx.ip6.our_ll) if ctx.ip6 else "",
            dns=tuple(str(d) for d in (*(ctx.ip4.dns if ctx.ip4 else ()), *(ctx.ip6.dns if ctx.ip6 else ()))),
            search=ctx.search,
            mtu=ctx.mtu,
            our_mac=_mac(ctx.our_mac),
            dhcp=ctx.dhcp,
            dhcpv6=ctx.dhcpv6,
            ndp=ctx.ndp,
            ra=ctx.ra,
            icmp=ctx.icmp,
            map_gateway=ctx.map_gw,
        )
        stats = dp.stats
        counters = CountersView(
            frames_from_guest=stats.frames_from_tap,
            bytes_from_guest=stats.bytes_from_tap,
            frames_to_guest=stats.frames_to_tap,
            bytes_to_guest=stats.bytes_to_tap,
            dropped=dict(stats.dropped),
        )
        flows = Counter(_PROTO_NAMES.get(f.proto, str(f.proto)) for f in dp.flows)
        return StatusView(
            version=__version__,
            mode=cfg.mode,
            uptime=time.monotonic() - self.started,
            backend=backend,
            config=config,
            counters=counters,
            flows=dict(flows),
            limits=LimitsView(max_flows=dp.flows.max_flows),
        )
