"""The narrow facade the control plane sees of a running daemon, and the plain values it returns.

The gRPC servicer talks only to `ControlAPI`; the daemon implements it over the dataplane, tests implement it
with a literal. The views are frozen dataclasses of plain Python types (str, int, bool, float, tuples and
mappings) that mirror proto/passt.proto field by field, so that conversion to protobuf (convert.py) is a pure
function and nothing here imports the dataplane, grpc or protobuf.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, Literal, Protocol

from passtd.errors import ConfigError, PasstError

Mode = Literal["passt", "pasta"]
BackendKind = Literal["unix-stream", "tap"]


def _empty() -> Mapping[str, int]:
    return {}


def _empty_nested() -> Mapping[str, Mapping[str, int]]:
    return {}


QUOTE_MAX: Final = 100  # characters of a request value an error message repeats


def clip(text: str, limit: int = QUOTE_MAX) -> str:
    """`text` cut to `limit` characters with an ellipsis: a 100 kB bad value must not come back whole in an
    error message (it would turn INVALID_ARGUMENT into a reply too large to receive)."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def quote(value: object, limit: int = QUOTE_MAX) -> str:
    """`repr(value)` for an error message, clipped like `clip`."""
    return clip(repr(value), limit)


class LoopShare:
    """Keeps a long control call's share of the event loop small while the data path is busy.

    A call that walks thousands of flows calls `pause()` often. Every `slice` seconds of its own work it
    yields once; if the loop then turns out to have had other work waiting (the yield took longer than
    `busy`: an empty turn of the loop costs ~0.1 ms of CPU here, a batch of frames more), it also sleeps
    long enough that its own work stays under `share` of the time, so a client looping ListConnections
    cannot take more than that from a transfer. On an idle loop nothing waits.
    One instance is shared by every call, so several clients together still get one share. Time is the
    thread's CPU time: what the loop did meanwhile counts, the kernel giving the CPU to other processes does
    not (on a loaded host that would make an idle loop look busy).
    """

    def __init__(
        self,
        share: float = 0.1,
        slice_seconds: float = 0.001,
        busy: float = 0.00025,
        clock: Callable[[], float] = time.thread_time,
    ) -> None:
        self.share = share
        self.slice = slice_seconds
        self.busy = busy
        self._clock = clock
        self._started = clock()
        self.yields = 0
        self.slept = 0.0

    def start(self) -> None:
        """Begin timing a slice (at the start of a call, and after anything else awaited)."""
        self._started = self._clock()

    async def pause(self) -> None:
        """Yield if this slice has run long enough; cheap to call per flow."""
        now = self._clock()
        used = now - self._started
        if used < self.slice:
            return
        self.yields += 1
        await asyncio.sleep(0)
        waited = self._clock() - now
        if waited > self.busy:
            rest = used * (1 / self.share - 1) - waited
            if rest > 0:
                self.slept += rest
                await asyncio.sleep(rest)
        self._started = self._clock()


# -- errors: each maps to one gRPC status code in service.py ---------------------------------------------


class InvalidArgument(ConfigError):
    """A request field is wrong; the message starts with the field's name (INVALID_ARGUMENT)."""


class NotFound(PasstError):
    """No flow with that id (NOT_FOUND)."""


class FailedPrecondition(PasstError):
    """Valid, but not possible in the daemon's present state or mode (FAILED_PRECONDITION)."""


class ResourceExhausted(PasstError):
    """A limit is reached, e.g. too many watchers (RESOURCE_EXHAUSTED)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class BackendView:
    """passt.v1.Backend: the guest-facing side and what was learned about the guest."""

    kind: BackendKind
    path: str = ""  # unix-stream: socket path the guest connects to
    ifname: str = ""  # tap: interface name in the namespace
    guest_connected: bool = False
    guest_mac: str = ""  # "52:54:00:12:34:56"; "" until the guest has sent a frame
    guest_addresses: tuple[str, ...] = ()  # sources the guest used, sorted


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigView:
    """passt.v1.Config: what passtd presents to the guest. A disabled family has "" addresses and prefix 0."""

    ipv4_address: str = ""
    ipv4_prefix_length: int = 0
    ipv4_gateway: str = ""
    ipv6_address: str = ""
    ipv6_prefix_length: int = 0
    ipv6_gateway: str = ""
    ipv6_link_local: str = ""  # our link-local, source of NDP and DHCPv6
    dns: tuple[str, ...] = ()
    search: tuple[str, ...] = ()
    mtu: int
    our_mac: str
    dhcp: bool = True
    dhcpv6: bool = True
    ndp: bool = True
    ra: bool = True
    icmp: bool = True
    map_gateway: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class CountersView:
    """passt.v1.Counters: frames and bytes (whole Ethernet frames) each way, drops by reason."""

    frames_from_guest: int = 0
    bytes_from_guest: int = 0
    frames_to_guest: int = 0
    bytes_to_guest: int = 0
    dropped: Mapping[str, int] = field(default_factory=_empty)  # reason -> count


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitView:
    """passt.v1.Limit: a cap (0: none of its own) and its present use."""

    max: int = 0
    in_use: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DescriptorsView:
    """passt.v1.Descriptors: RLIMIT_NOFILE, the descriptors kept free, and those open now."""

    soft_limit: int = 0
    hard_limit: int = 0
    reserved: int = 0
    in_use: int = 0


def _no_limits() -> Mapping[str, LimitView]:
    return {}


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsView:
    """passt.v1.Limits: the limits that protect the host, each with its use."""

    max_flows: int
    flows: LimitView = LimitView()
    flows_by_protocol: Mapping[str, LimitView] = field(default_factory=_no_limits)
    guest_addresses: LimitView = LimitView()
    pending_syns: LimitView = LimitView()
    watch_streams: LimitView = LimitView()
    concurrent_rpcs: LimitView = LimitView()
    descriptors: DescriptorsView = DescriptorsView()


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusView:
    """passt.v1.Status: one snapshot of the daemon, cheap enough to build on every GetStatus call."""

    version: str
    mode: Mode
    uptime: float  # seconds since start-up
    backend: BackendView
    config: ConfigView
    counters: CountersView
    flows: Mapping[str, int] = field(default_factory=_empty)  # protocol -> open flows
    limits: LimitsView
    flow_states: Mapping[str, Mapping[str, int]] = field(default_factory=_empty_nested)  # proto -> state -> n
    rate_limits: RateLimitsView | None = None  # the guest's rate limits and their counters


# -- connections ---------------------------------------------------------------------------------------

ConnDirection = Literal["guest", "host"]  # which side opened the flow
EventKind = Literal["opened", "state", "closed", "existing", "denied"]
PROTOCOLS: Final = ("tcp", "udp", "icmp")


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpDetailsView:
    """passt.v1.TcpDetails."""

    guest_srtt_seconds: float = 0.0
    guest_rto_seconds: float = 0.0
    retransmits_to_guest: int = 0
    window_from_guest: int = 0
    window_to_guest: int = 0
    mss_to_guest: int = 0
    host_rtt_us: int = 0
    host_retransmits: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionView:
    """passt.v1.Connection: one flow. Addresses are text ("" when unknown), times are wall-clock seconds."""

    id: int
    protocol: str  # "tcp", "udp", "icmp"
    state: str
    direction: ConnDirection
    guest_address: str = ""
    guest_port: int = 0
    remote_address: str = ""
    remote_port: int = 0
    local_address: str = ""
    local_port: int = 0
    bytes_from_guest: int = 0
    bytes_to_guest: int = 0
    packets_from_guest: int = 0
    packets_to_guest: int = 0
    created_time: float = 0.0
    last_activity_time: float = 0.0
    tcp: TcpDetailsView | None = None


def _norm_address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionFilter:
    """passt.v1.ConnectionFilter, validated: every set field must match; unset ones match everything."""

    protocol: str = ""  # "" or one of PROTOCOLS
    state: str = ""  # upper case, "" for any
    address: str = ""  # normalised text of an IP address; guest or remote
    port: int = 0  # guest, remote or host socket local port
    direction: ConnDirection | Literal[""] = ""

    @classmethod
    def build(
        cls, *, protocol: str = "", state: str = "", address: str = "", port: int = 0, direction: str = ""
    ) -> ConnectionFilter:
        """A filter from loose values; raises InvalidArgument naming the bad field."""
        if protocol and protocol not in PROTOCOLS:
            raise InvalidArgument(f"filter.protocol: {quote(protocol)} is not one of {', '.join(PROTOCOLS)}")
        if not 0 <= port <= 65535:
            raise InvalidArgument(f"filter.port: {port} is out of range 1..65535")
        if address:
            try:
                address = str(ipaddress.ip_address(address.strip("[]")))
            except ValueError:
                raise InvalidArgument(f"filter.address: {quote(address)} is not an IP address") from None
        if direction not in ("", "guest", "host"):
            raise InvalidArgument(f"filter.direction: {quote(direction)} is not 'guest' or 'host'")
        return cls(protocol=protocol, state=state.upper(), address=address, port=port, direction=direction)  # type: ignore[arg-type]

    @property
    def empty(self) -> bool:
        return self == ConnectionFilter()

    @property
    def needs_local_port(self) -> bool:
        """Matching may need the host socket's local port (a system call per flow)."""
        return self.port != 0

    def matches(self, view: ConnectionView) -> bool:
        if self.protocol and view.protocol != self.protocol:
            return False
        if self.state and view.state != self.state:
            return False
        if self.direction and view.direction != self.direction:
            return False
        if self.address and self.address not in (
            _norm_address(view.guest_address),
            _norm_address(view.remote_address),
        ):
            return False
        return not self.port or self.port in (view.guest_port, view.remote_port, view.local_port)


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectionEventView:
    """passt.v1.ConnectionEvent."""

    kind: EventKind
    time: float
    connection: ConnectionView
    reason: str = ""  # the dataplane's name: "fin", "rst_from_guest", "timeout", "reset_by_api"...
    dropped_before: int = 0


class EventQueue:
    """One watcher's bounded queue. `offer` never blocks: when full the event is dropped and counted, and
    the count rides on the next event that does get in (`dropped_before`), so the client sees the gap where
    it happened. The dataplane calls `offer` synchronously; the servicer awaits `get`.
    """

    def __init__(self, maxsize: int, on_close: Callable[[], None] = lambda: None) -> None:
        self._queue: asyncio.Queue[ConnectionEventView | None] = asyncio.Queue(maxsize)
        self._on_close = on_close
        self._pending_drops = 0
        self.dropped = 0  # total since the watch started
        self.closed = False

    def offer(self, event: ConnectionEventView) -> None:
        if self.closed:
            return
        if self._queue.full():
            self._pending_drops += 1
            self.dropped += 1
            return
        if self._pending_drops:
            event = replace(event, dropped_before=self._pending_drops)
            self._pending_drops = 0
        self._queue.put_nowait(event)

    async def get(self) -> ConnectionEventView | None:
        """The next event, or None once the queue is closed (server shutdown)."""
        if self.closed and self._queue.empty():
            return None
        return await self._queue.get()

    def close(self) -> None:
        """Unsubscribe, and wake a pending `get` with None. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._on_close()
        while True:  # make room for the wake-up; whatever is still queued is not read any more
            try:
                self._queue.put_nowait(None)
                return
            except asyncio.QueueFull:
                self._queue.get_nowait()


# -- port forwarding --------------------------------------------------------------------------------------

ForwardDirection = Literal["tcp_in", "udp_in", "tcp_out", "udp_out"]
FORWARD_DIRECTIONS: Final[tuple[ForwardDirection, ...]] = ("tcp_in", "udp_in", "tcp_out", "udp_out")
ForwardOp = Literal["replace", "add", "delete"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardCountersView:
    """passt.v1.ForwardCounters: what came in through one rule (see the proto)."""

    connections: int = 0
    datagrams: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardRuleView:
    bind_address: str = ""
    ifname: str = ""
    first: int
    last: int
    target_first: int
    id: int = 0  # never reused in a daemon's life
    counters: ForwardCountersView = ForwardCountersView()
    target_address: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardTableView:
    """passt.v1.ForwardTable: one direction's policy."""

    direction: ForwardDirection
    spec: str
    mode: str  # none, auto, all, spec
    rules: tuple[ForwardRuleView, ...] = ()
    excluded: tuple[int, ...] = ()
    auto_bound: tuple[int, ...] = ()  # mode auto: ports bound now, following the other side's listeners
    rule_id: int = 0  # modes all/auto: the table is one rule
    counters: ForwardCountersView = ForwardCountersView()


@dataclass(frozen=True, slots=True, kw_only=True)
class BindResultView:
    address: str
    ifname: str = ""
    port: int
    target_port: int
    ok: bool
    error: str = ""
    message: str = ""


BIND_RESULTS_MAX: Final = 1000  # bind results listed in one reply (a 64k-port range would not fit 4 MB)


@dataclass(frozen=True, slots=True, kw_only=True)
class PortPolicyChangeView:
    """passt.v1.PortPolicyChange. `binds` may be a part (then failures first); the counts cover them all."""

    previous: ForwardTableView
    current: ForwardTableView
    binds: tuple[BindResultView, ...] = ()
    binds_total: int = 0
    binds_failed: int = 0
    committed: bool = True  # False: nothing changed (a dry run, or a bind failed: `failure` says which)
    dry_run: bool = False
    failure: str = ""
    added_ids: tuple[int, ...] = ()
    removed_ids: tuple[int, ...] = ()

    @classmethod
    def build(
        cls, previous: ForwardTableView, current: ForwardTableView, binds: Sequence[BindResultView]
    ) -> PortPolicyChangeView:
        """The reply for `binds`, all counted, at most BIND_RESULTS_MAX listed with the failures first;
        `dataclasses.replace` adds the transaction's fields."""
        failed = [b for b in binds if not b.ok]
        listed = list(binds)
        if len(listed) > BIND_RESULTS_MAX:  # the failures are what the caller must see
            listed = (failed + [b for b in binds if b.ok])[:BIND_RESULTS_MAX]
        return cls(
            previous=previous,
            current=current,
            binds=tuple(listed),
            binds_total=len(binds),
            binds_failed=len(failed),
        )


# -- timeouts ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TimeoutsView:
    """passt.v1.Timeouts: seconds, except tcp_max_retransmits (a count)."""

    tcp_syn: float
    tcp_fin: float
    tcp_activity: float
    tcp_ack_interval: float
    tcp_rto_initial: float
    tcp_rto_min: float
    tcp_rto_max: float
    tcp_max_retransmits: int
    udp_idle: float
    icmp_idle: float


# -- rate limits ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitView:
    """passt.v1.RateLimit: `rate` in bit/s (0: unlimited), `burst` in bytes (0 in a request: the default)."""

    rate: int = 0
    burst: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class RateLimitsView:
    """passt.v1.RateLimits: both directions and what the limits did (core/ratelimit.py `Shaper` counters)."""

    egress: RateLimitView = RateLimitView()
    ingress: RateLimitView = RateLimitView()
    counters: Mapping[str, int] = field(default_factory=_empty)


class ControlAPI(Protocol):
    """What the control plane may ask of the daemon. Called on the dataplane's loop; must not block.

    The async methods walk the flow table in slices and keep to a share of a busy loop (LoopShare). Errors
    are the classes above (or any PasstError); anything else is a bug.

    No call needs a guest to be attached: an orchestrator sets ports and timeouts before the VM boots,
    and flows left over from a guest that went away can still be listed and reset (the host side gets its
    RST, the guest side has nobody to tell). So FAILED_PRECONDITION means "not in this mode" (-T/-U specs,
    namespace tables in passt mode), never "no guest".
    """

    async def status(self) -> StatusView:
        """A fresh snapshot (counts flows by protocol and state, yielding on large tables)."""
        ...

    async def list_connections(
        self, flt: ConnectionFilter, after_id: int, limit: int
    ) -> tuple[list[ConnectionView], int]:
        """Up to `limit` matching flows with id > after_id, by id; and the last id returned when more
        matching flows may follow, else 0."""
        ...

    def watch(self, flt: ConnectionFilter) -> EventQueue:
        """Subscribe to flow events matching `flt`; the caller must close() the queue. ResourceExhausted
        when too many watchers are open."""
        ...

    async def reset_connections(
        self, ids: Sequence[int] | None, flt: ConnectionFilter
    ) -> list[ConnectionView]:
        """Reset the flows with these ids (NotFound if one is unknown, nothing reset then), or, when `ids`
        is None, every flow matching `flt`. Returns the flows as they were just before."""
        ...

    def port_policy(self) -> tuple[ForwardTableView, ...]:
        """The four tables, in FORWARD_DIRECTIONS order."""
        ...

    async def change_forward(
        self,
        op: ForwardOp,
        direction: ForwardDirection,
        spec: str,
        *,
        dry_run: bool = False,
        ids: Sequence[int] = (),
    ) -> PortPolicyChangeView:
        """Replace, add to or delete from one table (op "delete" with `ids`: those rules, from any table),
        as one transaction: every bind succeeds, or nothing changes and the reply says which failed.
        `dry_run`: check and trial-bind only. Listeners follow, flows are untouched."""
        ...

    def timeouts(self) -> TimeoutsView: ...

    def set_timeouts(self, values: Mapping[str, float]) -> TimeoutsView:
        """Change the named timeouts, all or nothing; InvalidArgument names the first bad field."""
        ...

    # -- egress (see EgressView) --------------------------------------------------------------------------

    def egress(self) -> EgressView:
        """The egress rules in force, with their counters."""
        ...

    def set_egress(
        self, rules: Sequence[EgressRuleView], default_action: str, reset_existing: bool
    ) -> EgressView:
        """Replace the list and the default as one swap; InvalidArgument names the bad field
        ("rules[2].destination"), and nothing changes then."""
        ...

    def add_egress_rule(self, rule: EgressRuleView, position: int, reset_existing: bool) -> EgressView:
        """Insert one rule (position 1-based, 0 at the end); its id is assigned when 0."""
        ...

    def remove_egress_rule(self, rule_id: int) -> EgressView:
        """NotFound when no rule has that id."""
        ...

    def set_egress_default(self, action: str, reset_existing: bool) -> EgressView: ...

    def rate_limits(self) -> RateLimitsView: ...

    def set_rate_limits(self, egress: RateLimitView | None, ingress: RateLimitView | None) -> RateLimitsView:
        """Change one or both directions (None: unchanged), all or nothing; InvalidArgument names the field
        ("egress.rate: ...")."""
        ...


# -- egress -----------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressRuleView:
    """passt.v1.EgressRule: action "allow"/"deny", destination a prefix ("" any), protocol "tcp", "udp",
    "icmp" or "any", ports (first, last) ranges (() every port). In a request, id 0 means "assign one"."""

    id: int = 0
    action: str
    destination: str = ""
    protocol: str = "any"
    ports: tuple[tuple[int, int], ...] = ()
    matches: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class EgressView:
    """passt.v1.EgressPolicy: the rules in order, the default, what they decided, what a change reset."""

    rules: tuple[EgressRuleView, ...] = ()
    default_action: str = "allow"
    default_matches: int = 0
    denied: Mapping[str, int] = field(default_factory=_empty)  # "tcp", "udp", "icmp" → new flows refused
    flows_reset: int = 0
    flows_reset_total: int = 0
