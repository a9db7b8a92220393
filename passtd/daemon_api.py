"""The control plane's view of a running daemon: `ControlAPI` implemented over the dataplane.

Lives beside the composition root, not in passtd.control, so that the control package (and passtctl) never
import the dataplane. Everything here runs on the dataplane's loop: walks over the flow table run one at a
time and keep to CONTROL_SHARE of a busy loop (LoopShare), so that frames keep flowing however hard clients
loop; a port policy never binds more sockets than the descriptors allow; watch callbacks only build a small
view and offer it to a bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, replace
from typing import Final, Protocol

from passtd import __version__
from passtd.config import Config
from passtd.control.api import (
    FORWARD_DIRECTIONS,
    BackendView,
    BindResultView,
    ConfigView,
    ConnectionEventView,
    ConnectionFilter,
    ConnectionView,
    CountersView,
    DescriptorsView,
    EgressRuleView,
    EgressView,
    EventQueue,
    FailedPrecondition,
    ForwardCountersView,
    ForwardDirection,
    ForwardOp,
    ForwardRuleView,
    ForwardTableView,
    InvalidArgument,
    LimitsView,
    LimitView,
    LoopShare,
    NotFound,
    PortPolicyChangeView,
    RateLimitsView,
    RateLimitView,
    ResourceExhausted,
    StatusView,
    TcpDetailsView,
    TimeoutsView,
    clip,
    quote,
)
from passtd.dataplane.core.egress import (
    DEFAULT_ID,
    Egress,
    EgressError,
    EgressPolicy,
    EgressRule,
    assign_ids,
    check_ports,
    make_policy,
    make_rule,
    parse_action,
    parse_network,
    parse_proto,
)
from passtd.dataplane.core.flowtable import (
    PROTO_ICMP,
    PROTO_TCP,
    PROTO_UDP,
    Flow,
    FlowEvent,
    FwdTally,
    key_addr,
)
from passtd.dataplane.core.fwd import OPTION_OF, ForwardTables, Listener, PortPolicy
from passtd.dataplane.core.fwdbook import RuleBook
from passtd.dataplane.core.ratelimit import RateSpec, TokenBucket
from passtd.dataplane.core.tcp.conn import TcpConn
from passtd.dataplane.core.timeouts import RANGES, Timeouts
from passtd.dataplane.io.dataplane import Dataplane, flow_state
from passtd.dataplane.io.forwarding import Tolerate, Transaction, local_port_range, on_loopback
from passtd.dataplane.io.listeners import BindResult, ListenerSet
from passtd.dataplane.io.sockets import local_name
from passtd.errors import ConfigError

PROTO_NAMES: Final = {PROTO_TCP: "tcp", PROTO_UDP: "udp", PROTO_ICMP: "icmp"}
WATCH_QUEUE: Final = 256  # events buffered per watcher before they are dropped (~1 KiB each)
MAX_WATCHERS: Final = 32  # so every watcher together holds at most ~8 MiB of queued events
CONTROL_SHARE: Final = 0.1  # of the loop's time a walk over the flows may take while frames are waiting
# Descriptors a port policy change must leave free: the control socket's accepts and calls, the tap, the
# flows' next sockets. The dataplane's own reserve (its limits object) replaces this when it has one.
# A bind that failed for one of these failed for lack of resources, not because of its port: the whole change
# is undone, so that a range too large for the descriptors cannot leave the daemon without any.
RESOURCE_ERRNOS: Final = frozenset(
    errno.errorcode[e] for e in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
)
INT_TIMEOUTS: Final = frozenset({"tcp_max_retransmits"})


def _mac(mac: bytes) -> str:
    return mac.hex(":")


def _addr(packed: bytes) -> str:
    """A 4- or 16-byte packed address as text (IPv4-mapped IPv6 shown as IPv4); "" when absent."""
    if len(packed) not in (4, 16):
        return ""
    return _addr_text(packed)


@functools.lru_cache(maxsize=4096)
def _addr_text(packed: bytes) -> str:
    """Cached: a listing of thousands of flows repeats a few addresses, and ipaddress costs ~2 µs each."""
    addr = ipaddress.ip_address(packed)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


@functools.lru_cache(maxsize=4096)
def _sockname_text(host: str) -> str:
    """getsockname()'s host as the API shows addresses (IPv4-mapped IPv6 as IPv4, zone kept out)."""
    return _addr_text(ipaddress.ip_address(host.split("%", 1)[0]).packed)


def _packed_forms(text: str) -> tuple[bytes, ...]:
    """An address as the flows may store it: 4 bytes, 16 bytes, and IPv4-mapped IPv6 for IPv4."""
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv4Address):
        return (addr.packed, key_addr(addr.packed))
    return (addr.packed,)


def _local(flow: Flow) -> tuple[str, int]:
    """The host socket's local address and port as the API shows them ("", 0 when it has none)."""
    host, port = local_name(flow.host_socket())
    return (_sockname_text(host), port) if host else ("", 0)


def _endpoint(address: str, port: int) -> str:
    if not address:
        return "-"
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


class FlowLogger(Protocol):
    """What FlowLog needs of a structlog logger."""

    def debug(self, event: str, **fields: object) -> object: ...


class FlowLog:
    """`-d`: one debug line per flow opened and closed, with both sides' addresses and ports (the host
    socket's own too), the reason and the byte counts. A dataplane watcher registered only at debug level,
    so without -d the data path builds no event for it."""

    def __init__(self, log: FlowLogger) -> None:
        self.log = log
        self.local: dict[int, str] = {}  # flow id → its host socket's address, kept from open to close

    def __call__(self, event: FlowEvent) -> None:
        flow = event.flow
        if event.kind == "denied":  # egress rules: never a flow, no socket
            self.log.debug(
                "flow.denied",
                proto=PROTO_NAMES.get(flow.proto, f"ip{flow.proto}"),
                guest=_endpoint(_addr(flow.guest_addr), flow.guest_port),
                remote=_endpoint(_addr(flow.remote_addr), flow.remote_port),
                reason=event.reason,
            )
            return
        if event.kind != "closed" and flow.flow_id not in self.local:
            address, port = _local(flow)  # the host socket may be connected only after the open
            if address:
                self.local[flow.flow_id] = _endpoint(address, port)
        if event.kind not in ("opened", "closed"):
            return
        fields: dict[str, object] = {
            "flow_id": flow.flow_id,
            "proto": PROTO_NAMES.get(flow.proto, f"ip{flow.proto}"),
            "initiated_by": "guest" if flow.guest_initiated else "host",
            "guest": _endpoint(_addr(flow.guest_addr), flow.guest_port),
            "remote": _endpoint(_addr(flow.remote_addr), flow.remote_port),
        }
        if event.kind == "opened":
            local = self.local.get(flow.flow_id, "")
        else:  # the socket is closed by now: the address it had
            local = self.local.pop(flow.flow_id, "")
        if local:
            fields["local"] = local
        if event.kind == "closed":
            fields.update(
                reason=event.reason or "unknown",
                bytes_from_guest=flow.bytes_from_guest,
                bytes_to_guest=flow.bytes_to_guest,
                seconds=round(max(0.0, event.time - flow.created), 3),
            )
        self.log.debug("flow.opened" if event.kind == "opened" else "flow.closed", **fields)


def _bind_view(result: BindResult) -> BindResultView:
    return BindResultView(
        address=result.address,
        ifname=result.listener.ifname or "",
        port=result.listener.port,
        target_port=result.listener.target_port,
        ok=result.ok,
        error=result.errno_name or "",
        message=result.message,
    )


def counters_view(tally: FwdTally | None) -> ForwardCountersView:
    if tally is None:
        return ForwardCountersView()
    connections, datagrams, bytes_in, bytes_out = tally.snapshot()
    return ForwardCountersView(
        connections=connections, datagrams=datagrams, bytes_in=bytes_in, bytes_out=bytes_out
    )


def table_view(
    direction: ForwardDirection,
    policy: PortPolicy,
    listening: ListenerSet | None = None,
    book: RuleBook | None = None,
    tallies: Mapping[int, FwdTally] | None = None,
) -> ForwardTableView:
    """One direction's policy; in `auto` mode with its `listening` set, the ports auto has bound now. With
    the `book` of rule ids, rules are listed as added, with their ids (and counters, from `tallies`)."""
    bound = sorted({lst.port for lst in listening.listeners}) if listening and policy.mode == "auto" else []
    tallies = tallies or {}
    entries = book.of(direction) if book is not None else ()
    if policy.mode == "spec":
        listed = [(e.id, e.rule) for e in entries if e.rule is not None] or [(0, r) for r in policy.rules]
    else:
        listed = []
    whole = entries[0].id if entries and policy.mode in ("all", "auto") else 0
    return ForwardTableView(
        auto_bound=tuple(bound),
        direction=direction,
        spec=policy.to_spec(),
        mode=policy.mode,
        rules=tuple(
            ForwardRuleView(
                bind_address="" if r.bind_addr is None else str(r.bind_addr),
                ifname=r.ifname or "",
                first=r.first,
                last=r.last,
                target_first=r.target_first,
                id=rule_id,
                counters=counters_view(tallies.get(rule_id)),
                target_address="" if r.target_addr is None else str(r.target_addr),
            )
            for rule_id, r in listed
        ),
        excluded=tuple(sorted(policy.excluded)),
        rule_id=whole,
        counters=counters_view(tallies.get(whole)) if whole else ForwardCountersView(),
    )


def transaction_failure(tx: Transaction) -> str:
    """One line: the first bind that undid the transaction, its errno, and how many failed."""
    if not tx.fatal:
        return ""
    first = tx.fatal[0]
    more = f"; {len(tx.fatal)} of {len(tx.results)} sockets failed" if len(tx.fatal) > 1 else ""
    text = f"{first.message} [{first.errno_name}]{more}; nothing changed"
    if tx.not_restored:
        text += "; could not restore: " + ", ".join(r.message for r in tx.not_restored)
    return text


def descriptors_in_use(soft_limit: int) -> int:
    """Open descriptors of this process (one readdir of /proc/self/fd, minus the one it opens); the limit
    itself when even that descriptor cannot be had."""
    try:
        return max(len(os.listdir("/proc/self/fd")) - 1, 0)
    except OSError as exc:
        return soft_limit if exc.errno in (errno.EMFILE, errno.ENFILE) else 0


def descriptors_view(reserved: int) -> DescriptorsView:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    soft_limit = 0 if soft == unlimited else soft
    return DescriptorsView(
        soft_limit=soft_limit,
        hard_limit=0 if hard == unlimited else hard,
        reserved=reserved,
        in_use=descriptors_in_use(soft_limit),
    )


def limits_view(dp: Dataplane, flows: Mapping[str, int], watchers: LimitView) -> LimitsView:
    """The limits the status reports: the one place that reads them from the dataplane (`Dataplane.limits`,
    core/limits.py, and the TCP handler's cap on half-open guest connections). `flows` is the open flows by
    protocol, counted by the caller's walk."""
    lim = dp.limits
    by_proto = {"tcp": lim.tcp, "udp": lim.udp, "icmp": lim.icmp}
    return LimitsView(
        max_flows=lim.flows.max,
        flows=LimitView(max=lim.flows.max, in_use=sum(flows.values())),
        flows_by_protocol={
            proto: LimitView(max=by_proto[proto].max, in_use=flows.get(proto, 0))
            for proto in PROTO_NAMES.values()
        },
        guest_addresses=LimitView(
            max=lim.guest_addresses4.max + lim.guest_addresses6.max,
            in_use=lim.guest_addresses4.used + lim.guest_addresses6.used,
        ),
        pending_syns=LimitView(max=dp.tcp.half_open_max, in_use=dp.tcp.half_open),
        watch_streams=watchers,
        descriptors=descriptors_view(lim.fds_reserved),
    )


def checked_timeouts(current: Timeouts, values: Mapping[str, float]) -> Timeouts:
    """`current` with `values` applied, all checked first against RANGES; InvalidArgument names the field."""
    for name, value in values.items():
        if name not in RANGES:
            raise InvalidArgument(f"timeouts.{clip(name)}: unknown timeout (known: {', '.join(RANGES)})")
        lo, hi = RANGES[name]
        unit = "" if name in INT_TIMEOUTS else " s"
        if not lo <= value <= hi:
            raise InvalidArgument(f"timeouts.{name}: {value:g}{unit} is out of range {lo:g}..{hi:g}{unit}")
        if name in INT_TIMEOUTS and value != int(value):
            raise InvalidArgument(f"timeouts.{name}: {value:g} is not a whole number")
    typed = {k: int(v) if k in INT_TIMEOUTS else float(v) for k, v in values.items()}
    new = replace(current, **typed)  # type: ignore[arg-type]
    if new.tcp_rto_min > new.tcp_rto_max:
        field = "tcp_rto_min" if "tcp_rto_min" in values else "tcp_rto_max"
        raise InvalidArgument(
            f"timeouts.{field}: tcp_rto_min ({new.tcp_rto_min:g} s) must not exceed "
            f"tcp_rto_max ({new.tcp_rto_max:g} s)"
        )
    return new


class DaemonControl:
    def __init__(self, config: Config, dataplane: Dataplane) -> None:
        self.config = config
        self.dp = dataplane
        self.started = time.monotonic()
        self._watchers = 0
        # Walks over the flow table run one at a time and share one budget of the loop (LoopShare): many
        # clients looping ListConnections cost a transfer no more than one does.
        self.share = LoopShare(CONTROL_SHARE)
        self._walk = asyncio.Lock()

    # -- what a metrics scrape reads besides the status (passtd.control.metrics.MetricsSource) ---------------

    def listening_sockets(self) -> Mapping[str, int]:
        fwd = self.dp.forwarding
        sets = ((fwd.tcp, "tcp_in"), (fwd.udp, "udp_in"), (fwd.tcp_ns, "tcp_out"), (fwd.udp_ns, "udp_out"))
        return {name: len(sockets) if sockets is not None else 0 for sockets, name in sets}

    def bind_failures(self) -> Mapping[str, int]:
        """Counted by the forwarding for every change: start-up, reload, control calls, pesto, `auto`."""
        return dict(self.dp.forwarding.bind_failures)

    def forward_counters(self) -> Mapping[tuple[str, str], ForwardCountersView]:
        """Every forwarding rule's counters, by (direction, rule id), for the metrics."""
        fwd = self.dp.forwarding
        return {(e.direction, str(e.id)): counters_view(fwd.tallies.get(e.id)) for e in fwd.book.entries}

    def tap_backlog(self) -> int:
        tap = self.dp.tap
        return tap.backlog if tap is not None else 0

    # -- views of flows ---------------------------------------------------------------------------------

    def _wall(self, loop_time: float) -> float:
        return time.time() - (self.dp.loop.time() - loop_time)

    def view(
        self,
        flow: Flow,
        *,
        full: bool = True,
        local: bool | None = None,
        state: str | None = None,
        wall_offset: float | None = None,
    ) -> ConnectionView:
        """A flow as the API shows it. `full` adds what costs system calls: the local address (also alone
        with `local`) and TCP_INFO. `wall_offset` (wall minus loop clock) may be read once per listing."""
        if wall_offset is None:
            wall_offset = time.time() - self.dp.loop.time()
        local_address, local_port = _local(flow) if (full if local is None else local) else ("", 0)
        tcp = None
        if isinstance(flow, TcpConn):
            rtt_us = retransmits = 0
            if full and flow.sock is not None:
                try:
                    info = flow.sock.info()
                    rtt_us, retransmits = info.rtt_us, info.retransmits
                except (OSError, AttributeError):
                    pass
            tcp = TcpDetailsView(
                guest_srtt_seconds=flow.srtt,
                guest_rto_seconds=flow.rto,
                retransmits_to_guest=flow.total_retransmits,
                window_from_guest=min(flow.wnd_from_tap, 2**32 - 1),
                window_to_guest=min(flow.wnd_to_tap, 2**32 - 1),
                mss_to_guest=flow.mss_to_tap,
                host_rtt_us=rtt_us,
                host_retransmits=retransmits,
            )
        return ConnectionView(
            id=flow.flow_id,
            protocol=PROTO_NAMES.get(flow.proto, f"ip{flow.proto}"),
            state=state if state is not None else flow_state(flow),
            direction="guest" if flow.guest_initiated else "host",
            guest_address=_addr(flow.guest_addr),
            guest_port=flow.guest_port,  # ICMP echo: the echo identifier
            remote_address=_addr(flow.remote_addr),
            remote_port=flow.remote_port,
            local_address=local_address,
            local_port=local_port,
            bytes_from_guest=flow.bytes_from_guest,
            bytes_to_guest=flow.bytes_to_guest,
            packets_from_guest=flow.packets_from_guest,
            packets_to_guest=flow.packets_to_guest,
            created_time=flow.created + wall_offset,
            last_activity_time=flow.last_active + wall_offset,
            tcp=tcp,
        )

    def _matches(self, flow: Flow, flt: ConnectionFilter, packed: tuple[bytes, ...]) -> bool:
        """ConnectionFilter.matches on the flow's own fields, without building a view (the walk over a
        large table is mostly this). `packed` is the filter address in 4- and 16-byte form."""
        if flt.protocol and PROTO_NAMES.get(flow.proto, "") != flt.protocol:
            return False
        if flt.direction and flow.guest_initiated != (flt.direction == "guest"):
            return False
        if packed and flow.guest_addr not in packed and flow.remote_addr not in packed:
            return False
        if flt.port and flt.port not in (flow.guest_port, flow.remote_port) and _local(flow)[1] != flt.port:
            return False
        return not flt.state or flow_state(flow) == flt.state

    async def _matching(self, flt: ConnectionFilter, after_id: int = 0) -> list[Flow]:
        """Matching flows with id > after_id, sorted by id. The table may change while this yields, so it
        walks a snapshot of the flows (a list copy: C speed, ~5 µs per thousand)."""
        out: list[Flow] = []
        everything = flt.empty
        packed = _packed_forms(flt.address) if flt.address else ()
        pause = self.share.pause
        for flow in list(self.dp.flows):
            await pause()
            if flow.flow_id > after_id and (everything or self._matches(flow, flt, packed)):
                out.append(flow)
        out.sort(key=lambda f: f.flow_id)
        return out

    # -- ControlAPI ---------------------------------------------------------------------------------------

    async def status(self) -> StatusView:
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
        by_state: Counter[tuple[str, str]] = Counter()
        async with self._walk:
            self.share.start()
            for flow in list(dp.flows):
                await self.share.pause()
                by_state[PROTO_NAMES.get(flow.proto, f"ip{flow.proto}"), flow_state(flow)] += 1
        flows: Counter[str] = Counter()
        states: dict[str, dict[str, int]] = {}
        for (proto, state), n in sorted(by_state.items()):
            flows[proto] += n
            states.setdefault(proto, {})[state] = n
        return StatusView(
            version=__version__,
            mode=cfg.mode,
            uptime=time.monotonic() - self.started,
            backend=backend,
            config=config,
            counters=counters,
            flows=dict(flows),
            limits=limits_view(dp, flows, LimitView(max=MAX_WATCHERS, in_use=self._watchers)),
            flow_states=states,
            rate_limits=self.rate_limits(),
        )

    async def list_connections(
        self, flt: ConnectionFilter, after_id: int, limit: int
    ) -> tuple[list[ConnectionView], int]:
        async with self._walk:
            self.share.start()
            flows = await self._matching(flt, after_id)
            page = flows[:limit]
            views: list[ConnectionView] = []
            offset = time.time() - self.dp.loop.time()  # both clocks run at the same pace meanwhile
            for flow in page:
                await self.share.pause()
                views.append(self.view(flow, wall_offset=offset))
        more = len(flows) > limit
        return views, (page[-1].flow_id if more and page else 0)

    def watch(self, flt: ConnectionFilter) -> EventQueue:
        if self._watchers >= MAX_WATCHERS:
            raise ResourceExhausted(f"too many connection watchers (limit {MAX_WATCHERS})")
        watchers = self.dp.watchers

        last = [0.0]  # the previous stamp: wall-clock stamps never go back within one stream

        def on_event(event: FlowEvent) -> None:
            view = self.view(event.flow, full=False, state=event.state)
            if not flt.matches(view):
                return
            kind = event.kind if event.kind in ("opened", "state", "closed", "denied") else "state"
            # Events are offered in the order the data path emitted them; the stamp follows that order
            # even if the wall clock steps back (NTP) between two of them.
            stamp = last[0] = max(last[0], self._wall(event.time))
            queue.offer(
                ConnectionEventView(
                    kind=kind,  # type: ignore[arg-type]
                    time=stamp,
                    connection=view,
                    reason=event.reason,
                )
            )

        def unsubscribe() -> None:
            self._watchers -= 1
            if on_event in watchers:
                watchers.remove(on_event)

        queue = EventQueue(WATCH_QUEUE, unsubscribe)
        watchers.append(on_event)
        self._watchers += 1
        return queue

    async def reset_connections(
        self, ids: Sequence[int] | None, flt: ConnectionFilter
    ) -> list[ConnectionView]:
        flows: Iterable[Flow]
        if ids is not None:
            found = [self.dp.flows.by_id(i) for i in ids]
            missing = [i for i, f in zip(ids, found, strict=True) if f is None]
            if missing:
                raise NotFound(f"no connection with id {', '.join(map(str, missing))}")
            flows = [f for f in found if f is not None]
        out: list[ConnectionView] = []
        async with self._walk:
            self.share.start()
            if ids is None:
                flows = await self._matching(flt)
            for flow in flows:
                await self.share.pause()
                if self.dp.flows.by_id(flow.flow_id) is not flow:
                    continue  # closed on its own while we yielded
                view = self.view(flow)
                if self.dp.reset_flow(flow.flow_id, "reset_by_api") is not None:
                    out.append(view)
        return out

    def _tables(self) -> ForwardTables:
        tables = self.dp.forward
        if tables.mode != self.config.mode:  # the dataplane starts as passt until the policy is set
            tables = ForwardTables(self.config.mode)
        return tables

    def port_policy(self) -> tuple[ForwardTableView, ...]:
        tables = self._tables()
        fwd = self.dp.forwarding
        sets = {"tcp_in": fwd.tcp, "udp_in": fwd.udp, "tcp_out": fwd.tcp_ns, "udp_out": fwd.udp_ns}
        return tuple(
            table_view(d, tables.policy(d), sets[d], fwd.book, fwd.tallies) for d in FORWARD_DIRECTIONS
        )

    def _forward_change(
        self, op: ForwardOp, direction: ForwardDirection, spec: str, ids: Sequence[int]
    ) -> Callable[[ForwardTables], ForwardTables]:
        """The change as a function of the tables it applies to (the transaction runs it under its lock)."""
        mode = self.config.mode

        def change(tables: ForwardTables) -> ForwardTables:
            if tables.mode != mode:  # the dataplane starts as passt until the policy is set
                tables = ForwardTables(mode)
            try:
                if ids:
                    return self.dp.forwarding.book.without(tables, ids)
                if op == "replace":
                    return tables.replace(direction, spec)
                if op == "add":
                    return tables.add(direction, spec)
                return tables.delete(direction, spec)
            except ConfigError as exc:
                raise InvalidArgument(f"{'ids' if ids else 'spec'}: {exc}") from None

        return change

    async def change_forward(
        self,
        op: ForwardOp,
        direction: ForwardDirection,
        spec: str,
        *,
        dry_run: bool = False,
        ids: Sequence[int] = (),
    ) -> PortPolicyChangeView:
        """Apply one table change as a transaction (`Forwarding.transact_async`): the binds run in slices
        with the data path served between them; if one that counts fails, nothing changes."""
        if op not in ("replace", "add", "delete"):
            raise InvalidArgument(f"op: {quote(op)} is not replace, add or delete")
        if ids and op != "delete":
            raise InvalidArgument("ids: only RemoveForward takes rule ids")
        tables = self._tables()
        if ids:
            entry = self.dp.forwarding.book.by_id(ids[0])
            if entry is None:
                raise InvalidArgument(f"ids: no forwarding rule with id {ids[0]}")
            direction = entry.direction
        if direction not in OPTION_OF:
            raise InvalidArgument(f"direction: {quote(direction)} is not one of {', '.join(OPTION_OF)}")
        option = OPTION_OF[direction]
        if direction.endswith("_out") and tables.mode == "passt":
            raise FailedPrecondition(f"{option}: only valid in pasta mode")
        change = self._forward_change(op, direction, spec, ids)
        self._check_descriptors(option, change(tables))  # refuses a bad spec or id too, before any bind
        tx: Transaction = await self.dp.forwarding.transact_async(change, dry_run=dry_run)
        starved = [r for r in tx.fatal if r.errno_name in RESOURCE_ERRNOS]
        if starved:
            raise ResourceExhausted(
                f"{option}: {len(starved)} of {len(tx.results)} listening sockets could not be opened "
                f"({starved[0].errno_name}: {starved[0].message}); the change was undone"
            )
        fwd = self.dp.forwarding
        previous = table_view(direction, tx.previous.policy(direction), None, tx.previous_book, fwd.tallies)
        after = tx.tables if tx.committed or dry_run else tx.previous
        current = table_view(
            direction, after.policy(direction), None, tx.book if after is tx.tables else tx.previous_book,
            fwd.tallies,
        )  # fmt: skip
        view = PortPolicyChangeView.build(previous, current, [_bind_view(r) for r in tx.results])
        return replace(
            view, committed=tx.committed, dry_run=dry_run, failure=transaction_failure(tx),
            added_ids=tx.added, removed_ids=tx.removed,
        )  # fmt: skip

    def forward_tables(self) -> ForwardTables:
        """The four port tables as they are now (the pesto server reads and replaces them whole)."""
        return self._tables()

    async def transact_forward_tables(
        self, change: Callable[[ForwardTables], ForwardTables], *, tolerate: Tolerate | None = None
    ) -> Transaction:
        """All four tables as one transaction (pesto's commit): every bind that counts, or nothing."""
        mode = self.config.mode

        def in_mode(tables: ForwardTables) -> ForwardTables:
            return change(tables if tables.mode == mode else ForwardTables(mode))  # as `_tables`

        return await self.dp.forwarding.transact_async(in_mode, tolerate=tolerate)

    def set_forward_tables(self, tables: ForwardTables) -> list[BindResult]:
        """Replace all four tables at once (pesto's commit and its rollback); one result per socket tried."""
        return self.dp.set_forwarding(tables)

    def _new_sockets(self, new: ForwardTables) -> int:
        """Listening sockets `new` would open beyond those open now (retargets reuse theirs)."""
        dp, eph = self.dp, local_port_range()
        pairs: list[tuple[ListenerSet | None, set[Listener]]] = [
            (dp.forwarding.tcp, new.tcp_in.listeners(eph)),
            (dp.forwarding.udp, new.udp_in.listeners(eph)),
        ]
        if dp.netns_fd is not None:
            pairs.append((dp.forwarding.tcp_ns, on_loopback(new.tcp_out.listeners(eph))))
            pairs.append((dp.forwarding.udp_ns, on_loopback(new.udp_out.listeners(eph))))
        needed = 0
        for current, wanted in pairs:
            have = {lst.key for lst in current.listeners} if current is not None else set()
            # A listener without an address is two sockets (0.0.0.0 and ::); one with an address is one.
            needed += sum(1 if lst.bind_addr is not None else 2 for lst in wanted if lst.key not in have)
        return needed

    def _check_descriptors(self, option: str, new: ForwardTables) -> None:
        """Refuse, before any bind, a policy whose new listening sockets do not fit the room the descriptor
        pool leaves listeners (core/limits.py: the reserve for the control socket and the flows' floor stay
        free): the change would otherwise half-apply, every port past the room reported as failed."""
        needed = self._new_sockets(new)
        pool = self.dp.fd_pool
        room = pool.listener_room()
        if needed > room:
            raise ResourceExhausted(
                f"{option}: needs {needed} new listening sockets but only {room} descriptors are free for "
                f"listeners (limit {pool.open_files}, {pool.reserved} reserved, {pool.listeners} listening, "
                f"{pool.flows} held by flows); nothing changed"
            )

    def timeouts(self) -> TimeoutsView:
        return TimeoutsView(**asdict(self.dp.timeouts))

    def set_timeouts(self, values: Mapping[str, float]) -> TimeoutsView:
        new = checked_timeouts(self.dp.timeouts, values)
        if new != self.dp.timeouts:
            self.dp.set_timeouts(new)
        return self.timeouts()

    # -- egress -------------------------------------------------------------------------------------------

    def egress(self) -> EgressView:
        return egress_view(self.dp.egress)

    def set_egress(
        self, rules: Sequence[EgressRuleView], default_action: str, reset_existing: bool
    ) -> EgressView:
        egress = self.dp.egress
        with _invalid_argument():
            allow = parse_action(default_action, "default_action")
            ids = assign_ids((r.id for r in rules), egress.next_id)
            built = [rule_from_view(r, f"rules[{i}]", ids[i]) for i, r in enumerate(rules)]
            policy = make_policy(built, allow)
        return self._apply_egress(policy, reset_existing)

    def add_egress_rule(self, rule: EgressRuleView, position: int, reset_existing: bool) -> EgressView:
        egress = self.dp.egress
        with _invalid_argument():
            if rule.id and rule.id in egress.current.ids():
                raise EgressError("rule.id", f"rule {rule.id} exists already")
            if position > len(egress.current.rules) + 1:
                count = len(egress.current.rules)
                raise EgressError("position", f"{position} is past the end of the {count} rules")
            built = rule_from_view(rule, "rule", rule.id or egress.next_id)
            policy = egress.current.with_rule(built, position - 1)
        return self._apply_egress(policy, reset_existing)

    def remove_egress_rule(self, rule_id: int) -> EgressView:
        egress = self.dp.egress
        if rule_id not in egress.current.ids():
            raise NotFound(f"id: no egress rule {rule_id}")
        return self._apply_egress(egress.current.without_rule(rule_id), False)

    def set_egress_default(self, action: str, reset_existing: bool) -> EgressView:
        with _invalid_argument():
            allow = parse_action(action, "action")
        return self._apply_egress(self.dp.egress.current.with_default(allow), reset_existing)

    def _apply_egress(self, policy: EgressPolicy, reset_existing: bool) -> EgressView:
        reset = self.dp.set_egress(policy, reset_existing)
        return egress_view(self.dp.egress, reset)

    # -- rate limits ----------------------------------------------------------------------------------------

    def rate_limits(self) -> RateLimitsView:
        return rate_limits_view(self.dp)

    def set_rate_limits(self, egress: RateLimitView | None, ingress: RateLimitView | None) -> RateLimitsView:
        shaper = self.dp.shaper
        new_egress = checked_rate("egress", egress) if egress is not None else _spec_of(shaper.egress)
        new_ingress = checked_rate("ingress", ingress) if ingress is not None else _spec_of(shaper.ingress)
        self.dp.set_rate_limits(new_egress, new_ingress)
        return self.rate_limits()


@contextlib.contextmanager
def _invalid_argument() -> Iterator[None]:
    """EgressError (the core's checks) → InvalidArgument naming the field."""
    try:
        yield
    except EgressError as exc:
        raise InvalidArgument(str(exc)) from None


def rule_from_view(view: EgressRuleView, field_name: str, rule_id: int) -> EgressRule:
    """A request's rule, checked by the core's parsers; EgressError names `field_name`.<field>."""
    try:
        return make_rule(
            rule_id,
            parse_action(view.action, "action"),
            parse_network(view.destination, "destination"),
            parse_proto(view.protocol, "protocol"),
            check_ports(view.ports, "ports"),
        )
    except EgressError as exc:
        raise EgressError(f"{field_name}.{exc.field}", str(exc).split(": ", 1)[1]) from None


def egress_view(egress: Egress, flows_reset: int = 0) -> EgressView:
    policy = egress.current
    return EgressView(
        rules=tuple(
            EgressRuleView(
                id=r.rule_id,
                action=r.action,
                destination=str(r.network) if r.network is not None else "",
                protocol=r.proto_name,
                ports=r.ports,
                matches=egress.matches.get(r.rule_id, 0),
            )
            for r in policy.rules
        ),
        default_action="allow" if policy.default_allow else "deny",
        default_matches=egress.matches.get(DEFAULT_ID, 0),
        denied={PROTO_NAMES[p]: n for p, n in egress.denied.items()},
        flows_reset=flows_reset,
        flows_reset_total=egress.reset_flows,
    )


def checked_rate(name: str, view: RateLimitView) -> RateSpec | None:
    """One direction of a rate-limit change: None for rate 0 (unlimited); InvalidArgument names the field."""
    if not view.rate:
        if view.burst:
            raise InvalidArgument(f"{name}.burst: a burst needs a rate (rate 0 means unlimited)")
        return None
    try:
        return RateSpec.of(view.rate, view.burst)
    except ValueError as exc:
        field = "burst" if str(exc).startswith("burst") else "rate"
        raise InvalidArgument(f"{name}.{field}: {exc}") from None


def _spec_of(bucket: TokenBucket | None) -> RateSpec | None:
    return bucket.spec() if bucket is not None else None


def rate_limits_view(dp: Dataplane) -> RateLimitsView:
    shaper = dp.shaper
    eg, ing = shaper.egress, shaper.ingress
    return RateLimitsView(
        egress=RateLimitView(rate=eg.rate, burst=eg.burst) if eg is not None else RateLimitView(),
        ingress=RateLimitView(rate=ing.rate, burst=ing.burst) if ing is not None else RateLimitView(),
        counters=dict(shaper.counters),
    )
