"""Fixed StatusViews and a fake ControlAPI shared by the control-plane tests."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from passtd.control.api import (
    BackendView,
    BindResultView,
    ConfigView,
    ConnectionEventView,
    ConnectionFilter,
    ConnectionView,
    CountersView,
    DescriptorsView,
    EventQueue,
    ForwardDirection,
    ForwardOp,
    ForwardRuleView,
    ForwardTableView,
    InvalidArgument,
    LimitsView,
    LimitView,
    NotFound,
    PortPolicyChangeView,
    ResourceExhausted,
    StatusView,
    TcpDetailsView,
    TimeoutsView,
)

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
    limits=LimitsView(
        max_flows=4096,
        flows=LimitView(max=4096, in_use=5),
        flows_by_protocol={"tcp": LimitView(max=2048, in_use=3), "udp": LimitView(max=1024, in_use=2)},
        guest_addresses=LimitView(max=64, in_use=2),
        pending_syns=LimitView(max=512),
        watch_streams=LimitView(max=32, in_use=1),
        concurrent_rpcs=LimitView(max=128, in_use=1),  # what the servicer reports while serving one call
        descriptors=DescriptorsView(soft_limit=1048576, hard_limit=1048576, reserved=256, in_use=40),
    ),
    flow_states={"tcp": {"ESTABLISHED": 2, "FIN_WAIT_1": 1}, "udp": {"ACTIVE": 2}},
)

T0 = 1_700_000_000.0  # a fixed wall clock for the connection samples

CONN_TCP = ConnectionView(
    id=7,
    protocol="tcp",
    state="ESTABLISHED",
    direction="guest",
    guest_address="10.0.2.15",
    guest_port=45678,
    remote_address="10.0.2.2",
    remote_port=5001,
    local_address="127.0.0.1",
    local_port=39000,
    bytes_from_guest=4096,
    bytes_to_guest=1572864,
    packets_from_guest=5,
    packets_to_guest=30,
    created_time=T0 - 125,
    last_activity_time=T0 - 2,
    tcp=TcpDetailsView(
        guest_srtt_seconds=0.0005,
        guest_rto_seconds=0.2,
        retransmits_to_guest=3,
        window_from_guest=65536,
        window_to_guest=131072,
        mss_to_guest=65480,
        host_rtt_us=40,
        host_retransmits=0,
    ),
)
CONN_UDP = ConnectionView(
    id=9,
    protocol="udp",
    state="ACTIVE",
    direction="host",
    guest_address="2001:db8::2",
    guest_port=53,
    remote_address="2001:db8::1",
    remote_port=40000,
    local_address="::",
    local_port=5353,
    bytes_from_guest=100,
    bytes_to_guest=50,
    packets_from_guest=1,
    packets_to_guest=1,
    created_time=T0 - 10,
    last_activity_time=T0 - 10,
)
CONN_ICMP = ConnectionView(
    id=12,
    protocol="icmp",
    state="ACTIVE",
    direction="guest",
    guest_address="10.0.2.15",
    guest_port=3,
    remote_address="192.0.2.1",
    created_time=T0,
    last_activity_time=T0,
)
CONNECTIONS = (CONN_TCP, CONN_UDP, CONN_ICMP)

TIMEOUTS = TimeoutsView(
    tcp_syn=240.0,
    tcp_fin=240.0,
    tcp_activity=7200.0,
    tcp_ack_interval=0.02,
    tcp_rto_initial=1.0,
    tcp_rto_min=0.2,
    tcp_rto_max=60.0,
    tcp_max_retransmits=12,
    udp_idle=180.0,
    icmp_idle=60.0,
)
TIMEOUT_RANGES = {"udp_idle": (1.0, 86400.0), "tcp_max_retransmits": (1, 100)}

TABLE_TCP = ForwardTableView(
    direction="tcp_in",
    spec="22,80:8080",
    mode="spec",
    rules=(
        ForwardRuleView(first=22, last=22, target_first=22),
        ForwardRuleView(first=80, last=80, target_first=8080),
    ),
)


def _none(direction: ForwardDirection) -> ForwardTableView:
    return ForwardTableView(direction=direction, spec="none", mode="none")


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
    """A ControlAPI over literals: returns `view` and `connections`, or raises `error` when set; counts
    calls and records what it was asked to change."""

    view: StatusView = SAMPLE
    error: Exception | None = None
    calls: int = 0
    connections: list[ConnectionView] = field(default_factory=lambda: list(CONNECTIONS))
    queues: list[EventQueue] = field(default_factory=list)
    queue_size: int = 16
    max_watchers: int = 4
    current_timeouts: TimeoutsView = TIMEOUTS
    tables: dict[ForwardDirection, ForwardTableView] = field(
        default_factory=lambda: {
            "tcp_in": TABLE_TCP,
            "udp_in": _none("udp_in"),
            "tcp_out": _none("tcp_out"),
            "udp_out": _none("udp_out"),
        }
    )
    changes: list[tuple[str, str, str]] = field(default_factory=list)
    change_options: list[tuple[bool, tuple[int, ...]]] = field(default_factory=list)
    reset_log: list[int] = field(default_factory=list)

    def _check(self) -> None:
        self.calls += 1
        if self.error is not None:
            raise self.error

    async def status(self) -> StatusView:
        self._check()
        return self.view

    async def list_connections(
        self, flt: ConnectionFilter, after_id: int, limit: int
    ) -> tuple[list[ConnectionView], int]:
        self._check()
        found = sorted(
            (c for c in self.connections if c.id > after_id and flt.matches(c)), key=lambda c: c.id
        )
        page = found[:limit]
        return page, (page[-1].id if len(found) > limit and page else 0)

    def watch(self, flt: ConnectionFilter) -> EventQueue:
        self._check()
        if len([q for q in self.queues if not q.closed]) >= self.max_watchers:
            raise ResourceExhausted(f"too many connection watchers (limit {self.max_watchers})")
        queue = EventQueue(self.queue_size)
        self.queues.append(queue)
        return queue

    def emit(self, kind: str, conn: ConnectionView, reason: str = "") -> None:
        """What the dataplane's callback does: offer to every open queue, never block."""
        event = ConnectionEventView(kind=kind, time=T0, connection=conn, reason=reason)  # type: ignore[arg-type]
        for queue in self.queues:
            queue.offer(event)

    async def reset_connections(
        self, ids: Sequence[int] | None, flt: ConnectionFilter
    ) -> list[ConnectionView]:
        self._check()
        if ids is not None:
            known = {c.id for c in self.connections}
            missing = [i for i in ids if i not in known]
            if missing:
                raise NotFound(f"no connection with id {', '.join(map(str, missing))}")
            gone = [c for c in self.connections if c.id in ids]
        else:
            gone = [c for c in self.connections if flt.matches(c)]
        self.connections = [c for c in self.connections if c not in gone]
        self.reset_log += [c.id for c in gone]
        return gone

    def port_policy(self) -> tuple[ForwardTableView, ...]:
        self._check()
        return tuple(self.tables.values())

    async def change_forward(
        self,
        op: ForwardOp,
        direction: ForwardDirection,
        spec: str,
        *,
        dry_run: bool = False,
        ids: Sequence[int] = (),
    ) -> PortPolicyChangeView:
        self._check()
        self.changes.append((op, direction, spec))
        self.change_options.append((dry_run, tuple(ids)))
        previous = self.tables[direction]
        current = ForwardTableView(direction=direction, spec=spec, mode="spec")
        self.tables[direction] = current
        binds = (
            BindResultView(
                address="0.0.0.0", port=8080, target_port=8080, ok=True, message="tcp 0.0.0.0:8080: listening"
            ),
            BindResultView(
                address="::",
                port=8080,
                target_port=8080,
                ok=False,
                error="EADDRINUSE",
                message="tcp [::]:8080: Address already in use (another socket is bound to it)",
            ),
        )
        return PortPolicyChangeView.build(previous, current, binds)

    def timeouts(self) -> TimeoutsView:
        self._check()
        return self.current_timeouts

    def set_timeouts(self, values: Mapping[str, float]) -> TimeoutsView:
        self._check()
        for name, value in values.items():
            lo, hi = TIMEOUT_RANGES.get(name, (0.0, 1e9))
            if not lo <= value <= hi:
                raise InvalidArgument(f"timeouts.{name}: {value:g} s is out of range {lo:g}..{hi:g} s")
        self.current_timeouts = replace(self.current_timeouts, **values)  # type: ignore[arg-type]
        return self.current_timeouts
