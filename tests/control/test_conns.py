"""Connections, port policy and timeouts: conversion, filters, the event queue, and DaemonControl over a
stand-in dataplane (real FlowTable and TcpConn objects, no sockets)."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import resource
import socket
import time
import tracemalloc
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop

from passtd import daemon_api
from passtd.control.api import (
    BIND_RESULTS_MAX,
    BindResultView,
    ConnectionEventView,
    ConnectionFilter,
    ConnectionView,
    EventQueue,
    ForwardTableView,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    TcpDetailsView,
    TimeoutsView,
)
from passtd.control.convert import (
    connection_to_pb,
    event_to_pb,
    filter_from_pb,
    forward_direction_from_pb,
    page_token_from_pb,
    page_token_to_pb,
    policy_change_to_pb,
    spec_from_pb,
    timeouts_from_pb,
    timeouts_to_pb,
)
from passtd.control.pb import passt_pb2
from passtd.daemon_api import MAX_WATCHERS, WATCH_QUEUE, DaemonControl, checked_timeouts
from passtd.dataplane.core.context import Guest
from passtd.dataplane.core.flowtable import PROTO_TCP, PROTO_UDP, Flow, FlowEvent, FlowTable
from passtd.dataplane.core.fwd import ForwardTables, Listener
from passtd.dataplane.core.fwdbook import RuleBook
from passtd.dataplane.core.limits import FdPool, Limits, Usage, plan_fd_pool
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.io.forwarding import Transaction
from passtd.dataplane.io.listeners import BindResult, ListenerSet
from tests.control.samples import CONN_ICMP, CONN_TCP, CONN_UDP, T0
from tests.control.test_convert import _unset_fields

# -- conversion -------------------------------------------------------------------------------------------


def test_tcp_connection_field_by_field() -> None:
    pb = connection_to_pb(CONN_TCP)
    assert (pb.id, pb.protocol, pb.state) == (7, passt_pb2.PROTOCOL_TCP, "ESTABLISHED")
    assert pb.direction == passt_pb2.DIRECTION_GUEST_INITIATED
    assert (pb.guest_address, pb.guest_port, pb.remote_address, pb.remote_port) == (
        "10.0.2.15", 45678, "10.0.2.2", 5001
    )  # fmt: skip
    assert (pb.local_address, pb.local_port) == ("127.0.0.1", 39000)
    assert (pb.bytes_from_guest, pb.bytes_to_guest, pb.packets_from_guest, pb.packets_to_guest) == (
        4096, 1572864, 5, 30
    )  # fmt: skip
    assert (pb.created_time, pb.last_activity_time) == (T0 - 125, T0 - 2)
    assert pb.tcp.mss_to_guest == 65480
    assert pb.tcp.guest_srtt_seconds == 0.0005
    assert _unset_fields(pb) == ["tcp.host_retransmits"]  # the only field left at zero in the sample


def test_udp_connection_has_no_tcp_details() -> None:
    pb = connection_to_pb(CONN_UDP)
    assert pb.protocol == passt_pb2.PROTOCOL_UDP
    assert pb.direction == passt_pb2.DIRECTION_HOST_INITIATED
    assert not pb.HasField("tcp")
    assert connection_to_pb(CONN_ICMP).protocol == passt_pb2.PROTOCOL_ICMP


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("fin", passt_pb2.CLOSE_REASON_FIN),
        ("rst_from_guest", passt_pb2.CLOSE_REASON_RST_FROM_GUEST),
        ("rst_from_host", passt_pb2.CLOSE_REASON_RST_FROM_HOST),
        ("timeout", passt_pb2.CLOSE_REASON_TIMEOUT),
        ("reset_by_api", passt_pb2.CLOSE_REASON_RESET_BY_API),
        ("limit", passt_pb2.CLOSE_REASON_LIMIT),
        ("shutdown", passt_pb2.CLOSE_REASON_SHUTDOWN),
        ("bad_handshake", passt_pb2.CLOSE_REASON_OTHER),
    ],
)
def test_close_reasons(reason: str, expected: int) -> None:
    pb = event_to_pb(ConnectionEventView(kind="closed", time=T0, connection=CONN_TCP, reason=reason))
    assert (pb.kind, pb.reason, pb.reason_detail) == (passt_pb2.EVENT_KIND_CLOSED, expected, reason)


def test_open_event_has_no_reason() -> None:
    event = ConnectionEventView(kind="opened", time=T0, connection=CONN_TCP, dropped_before=3)
    pb = event_to_pb(event)
    assert (pb.kind, pb.reason, pb.dropped_before, pb.time) == (
        passt_pb2.EVENT_KIND_OPENED, passt_pb2.CLOSE_REASON_UNSPECIFIED, 3, T0
    )  # fmt: skip
    assert pb.connection.id == 7


@pytest.mark.parametrize(
    ("view", "message"),
    [
        (ConnectionView, passt_pb2.Connection),
        (TcpDetailsView, passt_pb2.TcpDetails),
        (TimeoutsView, passt_pb2.Timeouts),
        (ForwardTableView, passt_pb2.ForwardTable),
        (BindResultView, passt_pb2.BindResult),
    ],
)
def test_views_mirror_proto_names(view: type[Any], message: type[Any]) -> None:
    assert [f.name for f in dataclasses.fields(view)] == [f.name for f in message.DESCRIPTOR.fields]


def test_filter_from_pb() -> None:
    pb = passt_pb2.ConnectionFilter(
        protocol=passt_pb2.PROTOCOL_TCP, state="established", address="2001:DB8::0:1", port=22,
        direction=passt_pb2.DIRECTION_HOST_INITIATED,
    )  # fmt: skip
    assert filter_from_pb(pb) == ConnectionFilter(
        protocol="tcp", state="ESTABLISHED", address="2001:db8::1", port=22, direction="host"
    )
    assert filter_from_pb(passt_pb2.ConnectionFilter()).empty


@pytest.mark.parametrize(
    ("pb", "message"),
    [
        (passt_pb2.ConnectionFilter(port=70000), "filter.port: 70000 is out of range 1..65535"),
        (passt_pb2.ConnectionFilter(address="10.0.0"), "filter.address: '10.0.0' is not an IP address"),
        (passt_pb2.ConnectionFilter(protocol=9), "filter.protocol: unknown value 9"),  # type: ignore[arg-type]
        (passt_pb2.ConnectionFilter(direction=7), "filter.direction: unknown value 7"),  # type: ignore[arg-type]
    ],
)
def test_bad_filters_name_the_field(pb: passt_pb2.ConnectionFilter, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        filter_from_pb(pb)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("flt", "ids"),
    [
        (ConnectionFilter(), [7, 9, 12]),
        (ConnectionFilter(protocol="tcp"), [7]),
        (ConnectionFilter(state="ACTIVE"), [9, 12]),
        (ConnectionFilter(direction="host"), [9]),
        (ConnectionFilter.build(address="10.0.2.2"), [7]),  # the remote side
        (ConnectionFilter.build(address="10.0.2.15"), [7, 12]),  # the guest side
        (ConnectionFilter(port=5001), [7]),  # remote port
        (ConnectionFilter(port=53), [9]),  # guest port
        (ConnectionFilter(port=39000), [7]),  # the host socket's local port
        (ConnectionFilter(protocol="udp", port=5001), []),
    ],
)
def test_filter_matches(flt: ConnectionFilter, ids: list[int]) -> None:
    assert [c.id for c in (CONN_TCP, CONN_UDP, CONN_ICMP) if flt.matches(c)] == ids


def test_page_tokens() -> None:
    assert page_token_from_pb("") == 0
    assert page_token_from_pb(page_token_to_pb(41)) == 41
    assert page_token_to_pb(0) == ""
    for bad in ("x", "-1", "1" * 21, "٣"):
        with pytest.raises(InvalidArgument, match=r"^page_token: "):
            page_token_from_pb(bad)


def test_timeouts_from_pb() -> None:
    message = passt_pb2.Timeouts(udp_idle=2.0, tcp_syn=99.0, tcp_max_retransmits=5)
    assert timeouts_from_pb(message, ["udp_idle", "tcp_max_retransmits"]) == {
        "udp_idle": 2.0, "tcp_max_retransmits": 5.0
    }  # fmt: skip
    with pytest.raises(InvalidArgument, match=r"^update_mask: empty"):
        timeouts_from_pb(message, [])
    with pytest.raises(InvalidArgument, match=r"^update_mask: unknown timeout 'udp'"):
        timeouts_from_pb(message, ["udp"])
    with pytest.raises(InvalidArgument, match=r"^update_mask: 'udp_idle' named twice"):
        timeouts_from_pb(message, ["udp_idle", "udp_idle"])
    with pytest.raises(InvalidArgument, match=r"^timeouts.tcp_fin: nan is not a finite number"):
        timeouts_from_pb(passt_pb2.Timeouts(tcp_fin=math.nan), ["tcp_fin"])


def test_timeouts_round_trip() -> None:
    view = TimeoutsView(**dataclasses.asdict(Timeouts()))
    pb = timeouts_to_pb(view)
    assert pb.tcp_ack_interval == pytest.approx(0.02)
    assert pb.tcp_max_retransmits == 12
    assert _unset_fields(pb) == []


def test_forward_request_fields() -> None:
    assert forward_direction_from_pb(passt_pb2.FORWARD_DIRECTION_UDP_OUT) == "udp_out"
    with pytest.raises(InvalidArgument, match=r"^direction: 0 is not one of"):
        forward_direction_from_pb(0)
    with pytest.raises(InvalidArgument, match=r"^spec: empty"):
        spec_from_pb("  ")
    assert spec_from_pb("22") == "22"


# -- the event queue --------------------------------------------------------------------------------------


def _event(n: int) -> ConnectionEventView:
    return ConnectionEventView(kind="opened", time=float(n), connection=CONN_TCP)


def run(coro: Any) -> Any:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 10))


def test_queue_drops_when_full_and_reports_the_gap() -> None:
    async def main() -> None:
        closed: list[bool] = []
        queue = EventQueue(3, lambda: closed.append(True))
        for n in range(10):
            queue.offer(_event(n))  # never blocks: 0, 1, 2 are kept, 3..9 dropped
        assert queue.dropped == 7
        got = [await queue.get() for _ in range(3)]
        assert [e.time for e in got if e] == [0.0, 1.0, 2.0]
        assert all(e is not None and e.dropped_before == 0 for e in got)
        queue.offer(_event(10))
        nxt = await queue.get()
        assert nxt is not None and (nxt.time, nxt.dropped_before) == (10.0, 7)
        queue.offer(_event(11))
        nxt = await queue.get()
        assert nxt is not None and nxt.dropped_before == 0
        waiter = asyncio.create_task(queue.get())
        await asyncio.sleep(0)
        queue.close()
        assert await waiter is None
        assert closed == [True]
        queue.close()  # idempotent: unsubscribes once
        assert closed == [True]
        queue.offer(_event(12))  # ignored once closed
        assert await queue.get() is None

    run(main())


def test_close_on_a_full_queue_still_wakes() -> None:
    async def main() -> None:
        queue = EventQueue(2)
        queue.offer(_event(0))
        queue.offer(_event(1))
        queue.close()
        assert await queue.get() is not None  # what was queued before the wake-up
        assert await queue.get() is None

    run(main())


# -- DaemonControl over a stand-in dataplane ---------------------------------------------------------------


class FakeDataplane:
    """What DaemonControl uses of Dataplane: the flow table, watchers, reset, forwarding and timeouts."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.flows = FlowTable(100_000)
        self.watchers: list[Callable[[FlowEvent], None]] = []
        self.forward = ForwardTables.from_options("20001", None, None, None, "pasta")
        self.timeouts = Timeouts()
        self.reset_ids: list[int] = []
        self.applied: list[ForwardTables] = []
        self.guest = Guest()
        # The listener sets stay empty: set_forwarding below only records and answers `binds`.
        self.forwarding = SimpleNamespace(
            tcp=ListenerSet("tcp", loop, lambda listener, sock: None),
            udp=ListenerSet("udp", loop, lambda listener, sock: None),
            tcp_ns=None,
            udp_ns=None,
            book=RuleBook().reconcile(self.forward),
            tallies={},
            transact_async=self._transact,
        )
        self.netns_fd: int | None = None
        self.fd_pool = plan_fd_pool(20_000, 20)
        self.tcp = SimpleNamespace(half_open=0, half_open_max=4096)
        self.binds: Callable[[ForwardTables], list[BindResult]] = lambda tables: []

    @property
    def limits(self) -> Limits:
        none = Usage(0, 0)
        return Limits(20_000, self.fd_pool.reserved, none, Usage(self.flows.max_flows, len(self.flows)),
                      none, none, none, none, none, none)  # fmt: skip

    def reset_flow(self, flow_id: int, reason: str = "reset_by_api") -> Flow | None:
        flow = self.flows.by_id(flow_id)
        if flow is not None:
            self.flows.remove(flow)
            self.reset_ids.append(flow_id)
            for watcher in list(self.watchers):
                watcher(FlowEvent("closed", flow, "CLOSED", reason, self.loop.time()))
        return flow

    async def set_forwarding_async(self, tables: ForwardTables) -> list[BindResult]:
        return self.set_forwarding(tables)

    async def _transact(
        self,
        change: Callable[[ForwardTables], ForwardTables],
        *,
        dry_run: bool = False,
        tolerate: object = None,
    ) -> Transaction:
        """Forwarding.transact_async's contract without sockets: `binds` answers, a failure undoes."""
        fwd = self.forwarding
        tables = change(self.forward)
        book = fwd.book.reconcile(tables)
        tx = Transaction(self.forward, fwd.book, tables, book, dry_run=dry_run)
        tx.results = self.binds(tables)
        tx.fatal = [r for r in tx.results if not r.ok]
        tx.added = tuple(sorted(book.ids() - fwd.book.ids()))
        tx.removed = tuple(sorted(fwd.book.ids() - book.ids()))
        if dry_run or tx.fatal:
            return tx
        self.set_forwarding(tables)
        fwd.book = book
        tx.committed = True
        return tx

    def set_forwarding(self, tables: ForwardTables) -> list[BindResult]:
        self.applied.append(tables)
        self.forward = tables
        return self.binds(tables)

    def set_timeouts(self, timeouts: Timeouts) -> None:
        self.timeouts = timeouts


class _Config:
    mode = "pasta"


def _tcp(flow_id: int, now: float, guest_port: int = 40000, remote_port: int = 80) -> TcpConn:
    conn = TcpConn(flow_id, PROTO_TCP, (PROTO_TCP, b"\0" * 16, remote_port, guest_port), now - 5, now - 1)
    conn.guest_addr = bytes([10, 0, 2, 15])
    conn.guest_port = guest_port
    conn.remote_addr = b"\x20\x01\x0d\xb8" + b"\0" * 11 + b"\x01"
    conn.remote_port = remote_port
    conn.bytes_from_guest = 100
    conn.mss_to_tap = 1460
    return conn


def control(loop: asyncio.AbstractEventLoop) -> tuple[DaemonControl, FakeDataplane]:
    dp = FakeDataplane(loop)
    return DaemonControl(_Config(), dp), dp  # type: ignore[arg-type]


def test_view_of_a_tcp_flow_and_a_generic_flow() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        now = dp.loop.time()
        dp.flows.add(_tcp(1, now))
        dp.flows.add(Flow(2, PROTO_UDP, (PROTO_UDP, b"\0" * 16, 1, 2), now, now, guest_initiated=False))
        views, more = await api.list_connections(ConnectionFilter(), 0, 10)
        assert more == 0
        tcp, other = views
        assert (tcp.protocol, tcp.state, tcp.direction) == ("tcp", "CLOSED", "guest")
        assert (tcp.guest_address, tcp.remote_address) == ("10.0.2.15", "2001:db8::1")
        assert tcp.tcp is not None and tcp.tcp.mss_to_guest == 1460
        assert tcp.local_address == ""  # no socket: nothing to ask the kernel
        wall = tcp.last_activity_time - tcp.created_time
        assert wall == pytest.approx(4.0, abs=0.01)
        assert (other.protocol, other.state, other.direction, other.guest_address) == (
            "udp",
            "ACTIVE",
            "host",
            "",
        )
        assert other.tcp is None

    run(main())


def test_list_pages_and_yields_on_a_large_table() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        now = dp.loop.time()
        for i in range(1, 3001):
            dp.flows.add(_tcp(i, now, guest_port=10000 + i))
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        first, after = await api.list_connections(ConnectionFilter(), 0, 1000)
        task.cancel()
        assert ticks >= api.share.yields > 0  # the loop ran other work while the table was walked
        assert (len(first), first[0].id, first[-1].id, after) == (1000, 1, 1000, 1000)
        second, after = await api.list_connections(ConnectionFilter(), after, 1000)
        assert (second[0].id, after) == (1001, 2000)
        third, after = await api.list_connections(ConnectionFilter(), after, 1000)
        assert (len(third), after) == (1000, 0)
        one, after = await api.list_connections(ConnectionFilter(port=10042), 0, 1000)
        assert [v.id for v in one] == [42] and after == 0

    run(main())


def test_watch_filters_and_unsubscribes() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        now = dp.loop.time()
        queue = api.watch(ConnectionFilter(port=80))
        assert len(dp.watchers) == 1
        a, b = _tcp(1, now), _tcp(2, now, remote_port=443)
        for watcher in dp.watchers:
            watcher(FlowEvent("opened", a, "TAP_SYN_SENT", "", now))
            watcher(FlowEvent("opened", b, "TAP_SYN_SENT", "", now))
            watcher(FlowEvent("closed", a, "CLOSED", "fin", now))
        first, second = await queue.get(), await queue.get()
        assert first is not None and (first.kind, first.connection.id, first.connection.state) == (
            "opened", 1, "TAP_SYN_SENT"
        )  # fmt: skip
        assert second is not None and (second.kind, second.reason) == ("closed", "fin")
        queue.close()
        assert dp.watchers == []

    run(main())


def test_too_many_watchers() -> None:
    async def main() -> None:
        api, _ = control(asyncio.get_running_loop())
        queues = [api.watch(ConnectionFilter()) for _ in range(MAX_WATCHERS)]
        with pytest.raises(ResourceExhausted, match="too many connection watchers"):
            api.watch(ConnectionFilter())
        queues[0].close()
        api.watch(ConnectionFilter()).close()  # room again

    run(main())


def test_reset_by_id_and_by_filter() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        now = dp.loop.time()
        for i in range(1, 6):
            dp.flows.add(_tcp(i, now, remote_port=80 if i % 2 else 443))
        with pytest.raises(NotFound, match="no connection with id 99"):
            await api.reset_connections([2, 99], ConnectionFilter())
        assert dp.reset_ids == []  # all or nothing
        gone = await api.reset_connections([2], ConnectionFilter())
        assert [v.id for v in gone] == [2]
        gone = await api.reset_connections(None, ConnectionFilter(port=80))
        assert [v.id for v in gone] == [1, 3, 5]
        assert [f.flow_id for f in dp.flows] == [4]

    run(main())


def test_port_policy_changes() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        tables = api.port_policy()
        assert [(t.direction, t.spec) for t in tables] == [
            ("tcp_in", "20001"), ("udp_in", "20001"), ("tcp_out", "auto"), ("udp_out", "auto")
        ]  # fmt: skip
        change = await api.change_forward("add", "tcp_in", "8080:80")
        assert (change.previous.spec, change.current.spec) == (
            "20001",
            "80,20001" if False else change.current.spec,
        )
        assert dp.forward.tcp_in.to_spec() == change.current.spec
        assert [(r.first, r.target_first) for r in change.current.rules] == [(8080, 80), (20001, 20001)]
        change = await api.change_forward("delete", "tcp_in", "20001")
        assert change.current.spec == "8080:80"
        with pytest.raises(InvalidArgument, match=r"^spec: -t: "):
            await api.change_forward("delete", "tcp_in", "20001")
        with pytest.raises(InvalidArgument, match=r"^spec: -u: bad port range"):
            await api.change_forward("replace", "udp_in", "70000")
        assert (
            await api.change_forward("replace", "tcp_out", "8080")
        ).current.spec == "8080"  # -T, pasta mode
        assert (await api.change_forward("replace", "tcp_out", "none")).current.spec == "none"
        assert len(dp.applied) == 4  # refused changes never reached the dataplane

    run(main())


def test_checked_timeouts() -> None:
    base = Timeouts()
    assert checked_timeouts(base, {"udp_idle": 2.0}).udp_idle == 2.0
    assert checked_timeouts(base, {"tcp_max_retransmits": 5.0}).tcp_max_retransmits == 5
    with pytest.raises(InvalidArgument) as info:
        checked_timeouts(base, {"tcp_activity": 30.0, "udp_idle": 0.5})
    assert str(info.value) == "timeouts.udp_idle: 0.5 s is out of range 1..86400 s"
    with pytest.raises(InvalidArgument, match=r"^timeouts.tcp_max_retransmits: 101 is out of range 1..100$"):
        checked_timeouts(base, {"tcp_max_retransmits": 101})
    with pytest.raises(InvalidArgument, match="is not a whole number"):
        checked_timeouts(base, {"tcp_max_retransmits": 2.5})
    with pytest.raises(
        InvalidArgument, match=r"^timeouts.tcp_rto_max: tcp_rto_min \(0.2 s\) must not exceed"
    ):
        checked_timeouts(base, {"tcp_rto_max": 0.1})
    with pytest.raises(InvalidArgument, match="out of range"):
        checked_timeouts(base, {"tcp_syn": math.nan})


def test_set_timeouts_is_all_or_nothing() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        with pytest.raises(InvalidArgument):
            api.set_timeouts({"tcp_fin": 30.0, "icmp_idle": 0.0})
        assert dp.timeouts == Timeouts()
        view = api.set_timeouts({"tcp_fin": 30.0, "icmp_idle": 5.0})
        assert (view.tcp_fin, view.icmp_idle, dp.timeouts.tcp_fin) == (30.0, 5.0, 30.0)

    run(main())


def test_filters_on_flow_fields() -> None:
    """The table walk matches on the flows' own fields; the result must equal matching on their views."""

    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        now = dp.loop.time()
        dp.flows.add(_tcp(1, now, guest_port=1111, remote_port=80))
        mapped = _tcp(2, now, guest_port=2222, remote_port=443)
        mapped.guest_addr = b"\0" * 10 + b"\xff\xff" + bytes([192, 0, 2, 9])  # IPv4-mapped form
        mapped.guest_initiated = False
        dp.flows.add(mapped)
        dp.flows.add(Flow(3, PROTO_UDP, (PROTO_UDP, b"\0" * 16, 1, 2), now, now))
        cases = [
            (ConnectionFilter.build(address="10.0.2.15"), [1]),
            (ConnectionFilter.build(address="192.0.2.9"), [2]),
            (ConnectionFilter.build(address="2001:db8::1"), [1, 2]),
            (ConnectionFilter.build(address="2001:db8::2"), []),
            (ConnectionFilter(port=2222), [2]),
            (ConnectionFilter(port=80), [1]),
            (ConnectionFilter(direction="host"), [2]),
            (ConnectionFilter(protocol="udp"), [3]),
            (ConnectionFilter(state="ACTIVE"), [3]),
            (ConnectionFilter(state="CLOSED", protocol="tcp", direction="guest"), [1]),
        ]
        everything, _ = await api.list_connections(ConnectionFilter(), 0, 10)
        for flt, ids in cases:
            views, _ = await api.list_connections(flt, 0, 10)
            assert [v.id for v in views] == ids, flt
            assert [v.id for v in everything if flt.matches(v)] == ids, flt

    run(main())


# -- abuse: huge values, port ranges beyond the descriptors, busy loops, watchers that never read ---------


def test_error_messages_cut_huge_values() -> None:
    with pytest.raises(InvalidArgument) as info:
        ConnectionFilter.build(address="x" * 100_000)
    message = str(info.value)
    assert message.startswith("filter.address: 'xxx") and "…" in message
    assert len(message) < 200
    with pytest.raises(InvalidArgument, match=r"^page_token: '1{50}") as info:
        page_token_from_pb("1" * 100_000)
    assert len(str(info.value)) < 200


def test_policy_beyond_the_descriptors_is_refused_before_binding() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        # 1024 descriptors, 36 already open, 64 reserved: listeners may take all but the flows' floor.
        dp.fd_pool = FdPool(open_files=1024, reserved=64, total=924, floor=256)
        # 50 000 ports on 0.0.0.0 and ::, and -u 20001's two (the stand-in has no sockets open yet).
        with pytest.raises(ResourceExhausted, match=r"^-t: needs 100002 new listening sockets but only 668 "):
            await api.change_forward("replace", "tcp_in", "10000-59999")
        assert dp.applied == []  # nothing bound
        assert dp.forward.tcp_in.to_spec() == "20001"  # nothing changed
        assert (await api.change_forward("replace", "tcp_in", "10000-10099")).current.spec == "10000-10099"

    run(main())


def _bind(port: int, address: str, error: str | None) -> BindResult:
    return BindResult(
        Listener(None, None, port, port), address, error is None, error, f"tcp {address}:{port}"
    )


def test_policy_undone_when_binds_run_out_of_descriptors() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        before = dp.forward
        dp.binds = lambda t: (
            [_bind(8080, "0.0.0.0", None), _bind(8080, "::", "EMFILE")] if t.tcp_in.target(8080) else []
        )
        with pytest.raises(
            ResourceExhausted, match=r"^-t: 1 of 2 listening sockets could not be opened \(EMFILE"
        ):
            await api.change_forward("add", "tcp_in", "8080")
        assert dp.applied == [] and dp.forward is before  # the transaction never committed

    run(main())


def test_partial_bind_failures_are_counted_and_listed_first() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        dp.binds = lambda t: [_bind(8080, "0.0.0.0", None), _bind(8080, "::", "EADDRINUSE")]
        change = await api.change_forward("add", "tcp_in", "8080")
        assert (change.binds_total, change.binds_failed, len(change.binds)) == (2, 1, 2)
        assert not change.committed and change.current.spec == "20001"  # a port taken: nothing changes
        assert change.failure == "tcp :::8080 [EADDRINUSE]; nothing changed"
        pb = policy_change_to_pb(change)
        assert (pb.binds_total, pb.binds_failed, pb.committed) == (2, 1, False)
        many = [_bind(p, "0.0.0.0", None) for p in range(30000, 32999)] + [_bind(40000, "::", "EACCES")]
        dp.binds = lambda t: many
        change = await api.change_forward("replace", "tcp_in", "30000-32998,40000")
        assert (change.binds_total, change.binds_failed, len(change.binds)) == (3000, 1, BIND_RESULTS_MAX)
        assert change.binds[0].error == "EACCES"  # the one that matters is not cut off
        assert "[EACCES]" in change.failure and dp.forward.tcp_in.to_spec() == "20001"

    run(main())


def test_walks_keep_to_their_share_of_a_busy_loop() -> None:
    """A client listing 5 000 flows in a loop against a data path that always has work (0.5 ms per turn):
    the control side gets about CONTROL_SHARE of the time, not half."""

    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        now = dp.loop.time()
        for i in range(1, 5001):
            dp.flows.add(_tcp(i, now, guest_port=1000 + i % 60000))
        idle_start = time.perf_counter()
        views, _ = await api.list_connections(ConnectionFilter(), 0, 10_000)
        idle = time.perf_counter() - idle_start
        assert len(views) == 5000 and api.share.slept == 0  # nothing waits on an idle loop

        busy_time = 0.0
        stop = False

        async def dataplane() -> None:
            nonlocal busy_time
            while not stop:
                t = time.perf_counter()
                while time.perf_counter() - t < 0.0005:
                    pass
                busy_time += time.perf_counter() - t
                await asyncio.sleep(0)

        task = asyncio.create_task(dataplane())
        await asyncio.sleep(0.01)
        start, busy_before = time.perf_counter(), busy_time
        for _ in range(3):
            await api.list_connections(ConnectionFilter(), 0, 10_000)
        wall = time.perf_counter() - start
        stop = True
        await task
        control_share = 1 - (busy_time - busy_before) / wall
        assert api.share.slept > 0
        assert control_share < 0.3, (control_share, idle, wall)

    run(main())


def test_watchers_that_never_read_hold_bounded_memory() -> None:
    async def main() -> None:
        api, dp = control(asyncio.get_running_loop())
        now = dp.loop.time()
        conn = _tcp(1, now)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            queues = [api.watch(ConnectionFilter()) for _ in range(MAX_WATCHERS)]
            with pytest.raises(ResourceExhausted):
                api.watch(ConnectionFilter())
            for _ in range(4 * WATCH_QUEUE):
                for watcher in list(dp.watchers):
                    watcher(FlowEvent("state", conn, "ESTABLISHED", "", now))
            held = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert held < 16 * 2**20, held  # 32 watchers x 256 queued events; 200 watchers once held 166 MiB
        for queue in queues:
            assert queue.dropped == 3 * WATCH_QUEUE
        for _ in range(WATCH_QUEUE):
            await queues[0].get()
        dp.watchers[0](FlowEvent("closed", conn, "CLOSED", "fin", now))
        gap = await queues[0].get()
        assert gap is not None and gap.kind == "closed" and gap.dropped_before == 3 * WATCH_QUEUE
        for queue in queues:
            queue.close()
        assert dp.watchers == []

    run(main())


def test_descriptors_view_counts_what_is_open() -> None:
    view = daemon_api.descriptors_view(64)
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert view.soft_limit == soft and view.reserved == 64
    before = view.in_use
    extra = [socket.socket() for _ in range(10)]
    try:
        assert daemon_api.descriptors_view(64).in_use == before + 10
    finally:
        for sock in extra:
            sock.close()
