"""Pure conversion between the control API's views and protobuf messages (unit-tested without gRPC).

Requests are validated here on the way in: a bad field raises `InvalidArgument` whose message starts with
the field's proto name, which the servicer returns as INVALID_ARGUMENT.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import fields
from typing import Final

from passtd.control.api import (
    FORWARD_DIRECTIONS,
    BackendView,
    BindResultView,
    ConfigView,
    ConnDirection,
    ConnectionEventView,
    ConnectionFilter,
    ConnectionView,
    CountersView,
    EgressRuleView,
    EgressView,
    EventKind,
    ForwardCountersView,
    ForwardDirection,
    ForwardTableView,
    InvalidArgument,
    LimitsView,
    LimitView,
    Mode,
    PortPolicyChangeView,
    RateLimitsView,
    RateLimitView,
    StatusView,
    TcpDetailsView,
    TimeoutsView,
    quote,
)
from passtd.control.pb import passt_pb2
from passtd.dataplane.core.egress import MAX_PORT_RANGES as EGRESS_MAX_PORT_RANGES
from passtd.dataplane.core.egress import MAX_RULES as EGRESS_MAX_RULES

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


def limit_to_pb(view: LimitView) -> passt_pb2.Limit:
    return passt_pb2.Limit(max=view.max, in_use=view.in_use)


def limits_to_pb(view: LimitsView) -> passt_pb2.Limits:
    d = view.descriptors
    return passt_pb2.Limits(
        max_flows=view.max_flows,
        flows=limit_to_pb(view.flows),
        flows_by_protocol={proto: limit_to_pb(v) for proto, v in view.flows_by_protocol.items()},
        guest_addresses=limit_to_pb(view.guest_addresses),
        pending_syns=limit_to_pb(view.pending_syns),
        watch_streams=limit_to_pb(view.watch_streams),
        concurrent_rpcs=limit_to_pb(view.concurrent_rpcs),
        descriptors=passt_pb2.Descriptors(
            soft_limit=d.soft_limit, hard_limit=d.hard_limit, reserved=d.reserved, in_use=d.in_use
        ),
    )


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
        flow_states={
            proto: passt_pb2.FlowStates(states=dict(states)) for proto, states in view.flow_states.items()
        },
        rate_limits=rate_limits_to_pb(view.rate_limits or RateLimitsView()),
    )


# -- connections ----------------------------------------------------------------------------------------

PROTOCOL_TO_PB: Final[dict[str, passt_pb2.Protocol.ValueType]] = {
    "tcp": passt_pb2.PROTOCOL_TCP,
    "udp": passt_pb2.PROTOCOL_UDP,
    "icmp": passt_pb2.PROTOCOL_ICMP,
}
PROTOCOL_FROM_PB: Final = {v: k for k, v in PROTOCOL_TO_PB.items()}
DIRECTION_TO_PB: Final[dict[ConnDirection, passt_pb2.Direction.ValueType]] = {
    "guest": passt_pb2.DIRECTION_GUEST_INITIATED,
    "host": passt_pb2.DIRECTION_HOST_INITIATED,
}
DIRECTION_FROM_PB: Final = {v: k for k, v in DIRECTION_TO_PB.items()}
EVENT_KIND_TO_PB: Final[dict[EventKind, passt_pb2.EventKind.ValueType]] = {
    "opened": passt_pb2.EVENT_KIND_OPENED,
    "state": passt_pb2.EVENT_KIND_STATE_CHANGED,
    "closed": passt_pb2.EVENT_KIND_CLOSED,
    "existing": passt_pb2.EVENT_KIND_EXISTING,
    "denied": passt_pb2.EVENT_KIND_DENIED,
}
# The dataplane's reason names (FlowEvent.reason) → the proto enum; anything else is OTHER.
CLOSE_REASON_TO_PB: Final[dict[str, passt_pb2.CloseReason.ValueType]] = {
    "fin": passt_pb2.CLOSE_REASON_FIN,
    "rst_from_guest": passt_pb2.CLOSE_REASON_RST_FROM_GUEST,
    "rst_from_host": passt_pb2.CLOSE_REASON_RST_FROM_HOST,
    "timeout": passt_pb2.CLOSE_REASON_TIMEOUT,
    "reset_by_api": passt_pb2.CLOSE_REASON_RESET_BY_API,
    "limit": passt_pb2.CLOSE_REASON_LIMIT,
    "shutdown": passt_pb2.CLOSE_REASON_SHUTDOWN,
}


def filter_from_pb(message: passt_pb2.ConnectionFilter) -> ConnectionFilter:
    """Validate a filter; InvalidArgument names the field."""
    protocol = ""
    if message.protocol:
        if message.protocol not in PROTOCOL_FROM_PB:
            raise InvalidArgument(f"filter.protocol: unknown value {message.protocol}")
        protocol = PROTOCOL_FROM_PB[message.protocol]
    direction = ""
    if message.direction:
        if message.direction not in DIRECTION_FROM_PB:
            raise InvalidArgument(f"filter.direction: unknown value {message.direction}")
        direction = DIRECTION_FROM_PB[message.direction]
    return ConnectionFilter.build(
        protocol=protocol,
        state=message.state,
        address=message.address,
        port=message.port,
        direction=direction,
    )


def tcp_details_to_pb(view: TcpDetailsView) -> passt_pb2.TcpDetails:
    return passt_pb2.TcpDetails(
        guest_srtt_seconds=view.guest_srtt_seconds,
        guest_rto_seconds=view.guest_rto_seconds,
        retransmits_to_guest=view.retransmits_to_guest,
        window_from_guest=view.window_from_guest,
        window_to_guest=view.window_to_guest,
        mss_to_guest=view.mss_to_guest,
        host_rtt_us=view.host_rtt_us,
        host_retransmits=view.host_retransmits,
    )


def connection_to_pb(view: ConnectionView) -> passt_pb2.Connection:
    return passt_pb2.Connection(
        id=view.id,
        protocol=PROTOCOL_TO_PB.get(view.protocol, passt_pb2.PROTOCOL_UNSPECIFIED),
        state=view.state,
        direction=DIRECTION_TO_PB[view.direction],
        guest_address=view.guest_address,
        guest_port=view.guest_port,
        remote_address=view.remote_address,
        remote_port=view.remote_port,
        local_address=view.local_address,
        local_port=view.local_port,
        bytes_from_guest=view.bytes_from_guest,
        bytes_to_guest=view.bytes_to_guest,
        packets_from_guest=view.packets_from_guest,
        packets_to_guest=view.packets_to_guest,
        created_time=view.created_time,
        last_activity_time=view.last_activity_time,
        tcp=tcp_details_to_pb(view.tcp) if view.tcp is not None else None,
    )


def event_to_pb(view: ConnectionEventView) -> passt_pb2.ConnectionEvent:
    closed = view.kind == "closed"
    return passt_pb2.ConnectionEvent(
        kind=EVENT_KIND_TO_PB[view.kind],
        time=view.time,
        connection=connection_to_pb(view.connection),
        reason=CLOSE_REASON_TO_PB.get(view.reason, passt_pb2.CLOSE_REASON_OTHER)
        if closed
        else passt_pb2.CLOSE_REASON_UNSPECIFIED,
        reason_detail=view.reason,
        dropped_before=view.dropped_before,
    )


# Page tokens are the decimal id of the last flow returned: ids only grow, so "after this id" is stable
# across flows opening and closing between pages.


def page_token_from_pb(token: str) -> int:
    if not token:
        return 0
    if not token.isascii() or not token.isdigit() or len(token) > 20:
        raise InvalidArgument(f"page_token: {quote(token)} is not a token this server issued")
    return int(token)


def page_token_to_pb(after_id: int) -> str:
    return str(after_id) if after_id else ""


# -- port forwarding ----------------------------------------------------------------------------------

FORWARD_DIRECTION_TO_PB: Final[dict[ForwardDirection, passt_pb2.ForwardDirection.ValueType]] = {
    "tcp_in": passt_pb2.FORWARD_DIRECTION_TCP_IN,
    "udp_in": passt_pb2.FORWARD_DIRECTION_UDP_IN,
    "tcp_out": passt_pb2.FORWARD_DIRECTION_TCP_OUT,
    "udp_out": passt_pb2.FORWARD_DIRECTION_UDP_OUT,
}
FORWARD_DIRECTION_FROM_PB: Final = {v: k for k, v in FORWARD_DIRECTION_TO_PB.items()}
assert tuple(FORWARD_DIRECTION_TO_PB) == FORWARD_DIRECTIONS


def forward_direction_from_pb(value: int) -> ForwardDirection:
    if value not in FORWARD_DIRECTION_FROM_PB:
        raise InvalidArgument(
            f"direction: {value} is not one of FORWARD_DIRECTION_TCP_IN, _UDP_IN, _TCP_OUT, _UDP_OUT"
        )
    return FORWARD_DIRECTION_FROM_PB[value]  # type: ignore[index]


SPEC_MAX: Final = 4096


def spec_from_pb(spec: str) -> str:
    if not spec.strip():
        raise InvalidArgument("spec: empty; give a port spec such as '8080' or 'none'")
    if len(spec) > SPEC_MAX:
        raise InvalidArgument(f"spec: {quote(spec)} is longer than {SPEC_MAX} characters")
    return spec


def forward_counters_to_pb(view: ForwardCountersView) -> passt_pb2.ForwardCounters:
    return passt_pb2.ForwardCounters(
        connections=view.connections,
        datagrams=view.datagrams,
        bytes_in=view.bytes_in,
        bytes_out=view.bytes_out,
    )


def rule_ids_from_pb(ids: Sequence[int], spec: str) -> tuple[int, ...]:
    """RemoveForwardRequest.ids: positive, each once, and not together with a spec."""
    if not ids:
        return ()
    if spec.strip():
        raise InvalidArgument("ids: give either a spec or rule ids, not both")
    if len(ids) > IDS_MAX:
        raise InvalidArgument(f"ids: {len(ids)} ids (at most {IDS_MAX} in one request)")
    seen: set[int] = set()
    for rule_id in ids:
        if rule_id <= 0:
            raise InvalidArgument(f"ids: {rule_id} is not a rule id (ids start at 1)")
        if rule_id in seen:
            raise InvalidArgument(f"ids: {rule_id} named twice")
        seen.add(rule_id)
    return tuple(ids)


IDS_MAX: Final = 65536


def forward_table_to_pb(view: ForwardTableView) -> passt_pb2.ForwardTable:
    return passt_pb2.ForwardTable(
        direction=FORWARD_DIRECTION_TO_PB[view.direction],
        spec=view.spec,
        mode=view.mode,
        rules=[
            passt_pb2.ForwardRule(
                bind_address=r.bind_address,
                ifname=r.ifname,
                first=r.first,
                last=r.last,
                target_first=r.target_first,
                id=r.id,
                counters=forward_counters_to_pb(r.counters),
                target_address=r.target_address,
            )
            for r in view.rules
        ],
        excluded=view.excluded,
        auto_bound=view.auto_bound,
        rule_id=view.rule_id,
        counters=forward_counters_to_pb(view.counters),
    )


def bind_result_to_pb(view: BindResultView) -> passt_pb2.BindResult:
    return passt_pb2.BindResult(
        address=view.address,
        ifname=view.ifname,
        port=view.port,
        target_port=view.target_port,
        ok=view.ok,
        error=view.error,
        message=view.message,
    )


def policy_change_to_pb(view: PortPolicyChangeView) -> passt_pb2.PortPolicyChange:
    return passt_pb2.PortPolicyChange(
        previous=forward_table_to_pb(view.previous),
        current=forward_table_to_pb(view.current),
        binds=[bind_result_to_pb(b) for b in view.binds],
        binds_total=view.binds_total,
        binds_failed=view.binds_failed,
        committed=view.committed,
        dry_run=view.dry_run,
        failure=view.failure,
        added_ids=view.added_ids,
        removed_ids=view.removed_ids,
    )


# -- timeouts -------------------------------------------------------------------------------------------

TIMEOUT_NAMES: Final = tuple(f.name for f in fields(TimeoutsView))


def timeouts_to_pb(view: TimeoutsView) -> passt_pb2.Timeouts:
    return passt_pb2.Timeouts(**{name: getattr(view, name) for name in TIMEOUT_NAMES})


def timeouts_from_pb(message: passt_pb2.Timeouts, paths: list[str] | tuple[str, ...]) -> Mapping[str, float]:
    """The values named by an update mask; InvalidArgument for an empty mask, an unknown or repeated name,
    or a value that is not a finite number. Ranges are the daemon's to check."""
    if not paths:
        raise InvalidArgument(f"update_mask: empty; name the timeouts to change ({', '.join(TIMEOUT_NAMES)})")
    out: dict[str, float] = {}
    for path in paths:
        if path not in TIMEOUT_NAMES:
            raise InvalidArgument(
                f"update_mask: unknown timeout {quote(path)} (known: {', '.join(TIMEOUT_NAMES)})"
            )
        if path in out:
            raise InvalidArgument(f"update_mask: {quote(path)} named twice")
        value = float(getattr(message, path))
        if not math.isfinite(value):
            raise InvalidArgument(f"timeouts.{path}: {value} is not a finite number")
        out[path] = value
    return out


# -- egress -----------------------------------------------------------------------------------------------

EGRESS_ACTION_TO_PB: Final[dict[str, passt_pb2.EgressAction.ValueType]] = {
    "allow": passt_pb2.EGRESS_ACTION_ALLOW,
    "deny": passt_pb2.EGRESS_ACTION_DENY,
}
EGRESS_ACTION_FROM_PB: Final = {v: k for k, v in EGRESS_ACTION_TO_PB.items()}


def egress_action_from_pb(
    value: passt_pb2.EgressAction.ValueType, field_name: str, unspecified: str = ""
) -> str:
    """An EgressAction → "allow"/"deny"; UNSPECIFIED → `unspecified` ("" : InvalidArgument)."""
    if value == passt_pb2.EGRESS_ACTION_UNSPECIFIED and unspecified:
        return unspecified
    if value not in EGRESS_ACTION_FROM_PB:
        raise InvalidArgument(f"{field_name}: set allow or deny (got {value})")
    return EGRESS_ACTION_FROM_PB[value]


def egress_rules_from_pb(rules: Sequence[passt_pb2.EgressRule]) -> list[EgressRuleView]:
    """SetEgress's list, its length checked before anything is converted (a huge request costs one check)."""
    if len(rules) > EGRESS_MAX_RULES:
        raise InvalidArgument(f"rules: {len(rules)} rules, at most {EGRESS_MAX_RULES}")
    return [egress_rule_from_pb(r, f"rules[{i}]") for i, r in enumerate(rules)]


def egress_rule_from_pb(message: passt_pb2.EgressRule, field_name: str) -> EgressRuleView:
    """The request's rule as a view; the enums are checked here, the values by the daemon (core/egress)."""
    if len(message.ports) > EGRESS_MAX_PORT_RANGES:
        raise InvalidArgument(f"{field_name}.ports: at most {EGRESS_MAX_PORT_RANGES} port ranges")
    protocol = "any"
    if message.protocol:
        if message.protocol not in PROTOCOL_FROM_PB:
            raise InvalidArgument(f"{field_name}.protocol: unknown value {message.protocol}")
        protocol = PROTOCOL_FROM_PB[message.protocol]
    return EgressRuleView(
        id=message.id,
        action=egress_action_from_pb(message.action, f"{field_name}.action"),
        destination=message.destination,
        protocol=protocol,
        ports=tuple((r.first, r.last or r.first) for r in message.ports),
    )


def egress_to_pb(view: EgressView) -> passt_pb2.EgressPolicy:
    return passt_pb2.EgressPolicy(
        rules=[
            passt_pb2.EgressRule(
                id=r.id,
                action=EGRESS_ACTION_TO_PB[r.action],
                destination=r.destination,
                protocol=PROTOCOL_TO_PB.get(r.protocol, passt_pb2.PROTOCOL_UNSPECIFIED),
                ports=[passt_pb2.EgressPortRange(first=a, last=b) for a, b in r.ports],
                matches=r.matches,
            )
            for r in view.rules
        ],
        default_action=EGRESS_ACTION_TO_PB[view.default_action],
        default_matches=view.default_matches,
        denied_tcp=view.denied.get("tcp", 0),
        denied_udp=view.denied.get("udp", 0),
        denied_icmp=view.denied.get("icmp", 0),
        flows_reset=view.flows_reset,
        flows_reset_total=view.flows_reset_total,
    )


# -- rate limits ------------------------------------------------------------------------------------------

U64_MAX: Final = (1 << 64) - 1


def rate_limits_to_pb(view: RateLimitsView) -> passt_pb2.RateLimits:
    return passt_pb2.RateLimits(
        egress=passt_pb2.RateLimit(rate=view.egress.rate, burst=view.egress.burst),
        ingress=passt_pb2.RateLimit(rate=view.ingress.rate, burst=view.ingress.burst),
        counters={name: min(n, U64_MAX) for name, n in view.counters.items() if n > 0},
    )


def rate_limit_from_pb(request: passt_pb2.SetRateLimitsRequest, name: str) -> RateLimitView | None:
    """One direction of a SetRateLimits request; None when the field is unset (left unchanged). The ranges
    are the daemon's to check; a burst without a rate is refused here, naming the field."""
    if not request.HasField(name):  # type: ignore[arg-type]  # "egress" or "ingress"
        return None
    limit: passt_pb2.RateLimit = getattr(request, name)
    if limit.burst and not limit.rate:
        raise InvalidArgument(f"{name}.burst: a burst needs a rate (rate 0 means unlimited)")
    return RateLimitView(rate=limit.rate, burst=limit.burst)
