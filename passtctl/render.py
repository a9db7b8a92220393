"""Pure rendering of control replies: an aligned key/value table for people, proto JSON for scripts.

No I/O and no gRPC here, so every output can be tested against exact text.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor
from google.protobuf.message import Message

from passtd.control.pb import passt_pb2

_BYTE_UNITS: Final = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
_GAP: Final = "  "  # between the key column and the value column
_NONE: Final = "-"

Row = tuple[str, str]


def format_bytes(n: int) -> str:
    """Binary units with one decimal: 512 B, 1.5 KiB, 11.7 MiB (IEC 80000-13 prefixes)."""
    if n < 1024:
        return f"{n} B"
    value = n / 1024
    for unit in _BYTE_UNITS[:-1]:
        if round(value, 1) < 1024:  # so that 1048575 B is "1.0 MiB", not "1024.0 KiB"
            return f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} {_BYTE_UNITS[-1]}"


def format_duration(seconds: float) -> str:
    """Whole seconds, largest unit first, zero leading units left out: 45s, 2m 5s, 1d 0h 0m 3s."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    parts = ((days, "d"), (hours, "h"), (minutes, "m"), (secs, "s"))
    first = next((i for i, (value, _) in enumerate(parts) if value), len(parts) - 1)
    return " ".join(f"{value}{unit}" for value, unit in parts[first:])


def render_table(rows: Iterable[Row]) -> str:
    """Keys left-aligned in one column, values after a two-space gap; no trailing spaces."""
    rows = list(rows)
    width = max((len(key) for key, _ in rows), default=0)
    return "".join(f"{key:<{width}}{_GAP}{value}".rstrip() + "\n" for key, value in rows)


def _join(items: Sequence[str]) -> str:
    return ", ".join(items) if items else _NONE


def _network(address: str, prefix_length: int, gateway: str) -> str:
    if not address:
        return "disabled"
    text = f"{address}/{prefix_length}"
    return f"{text}, gateway {gateway}" if gateway else text


def _breakdown(counts: Mapping[str, int]) -> list[Row]:
    """One indented row per key, sorted by name so that output is stable."""
    return [(f"  {name}", str(counts[name])) for name in sorted(counts)]


def _flow_breakdown(status: passt_pb2.Status) -> list[Row]:
    """One row per protocol, with its states: "  tcp  3 (ESTABLISHED 2, FIN_WAIT_1 1)"."""
    rows: list[Row] = []
    for proto in sorted(status.flows):
        text = str(status.flows[proto])
        if proto in status.flow_states:
            states = status.flow_states[proto].states
            text += " (" + ", ".join(f"{name} {states[name]}" for name in sorted(states)) + ")"
        rows.append((f"  {proto}", text))
    return rows


def _mode(mode: passt_pb2.Mode.ValueType) -> str:
    if mode == passt_pb2.MODE_PASST:
        return "passt"
    if mode == passt_pb2.MODE_PASTA:
        return "pasta"
    return f"unknown ({int(mode)})"


def _services(config: passt_pb2.Config) -> str:
    flags = (
        ("dhcp", config.dhcp),
        ("dhcpv6", config.dhcpv6),
        ("ndp", config.ndp),
        ("ra", config.ra),
        ("icmp", config.icmp),
        ("map-gateway", config.map_gateway),
    )
    on = [name for name, enabled in flags if enabled]
    off = [name for name, enabled in flags if not enabled]
    text = " ".join(on) if on else "none"
    return f"{text} (off: {' '.join(off)})" if on and off else text


def _traffic(frames: int, size: int) -> str:
    return f"{frames} frames, {format_bytes(size)}"


def _limit(limit: passt_pb2.Limit) -> str:
    return f"{limit.in_use} of {limit.max} max" if limit.max else f"{limit.in_use} (no limit of its own)"


def _limit_rows(limits: passt_pb2.Limits) -> list[Row]:
    """The limits section; absent for a server that reports only max_flows."""
    fds = limits.descriptors
    if not fds.soft_limit and not fds.in_use:
        return []
    per_proto = ", ".join(
        f"{proto} {lim.in_use}/{lim.max}" if lim.max else f"{proto} {lim.in_use}/-"
        for proto, lim in sorted(limits.flows_by_protocol.items())
    )
    hard = f", hard {fds.hard_limit}" if fds.hard_limit and fds.hard_limit != fds.soft_limit else ""
    return [
        ("flows by protocol", per_proto or _NONE),
        ("learned addresses", _limit(limits.guest_addresses)),
        ("pending SYNs", _limit(limits.pending_syns)),
        ("watch streams", _limit(limits.watch_streams)),
        ("control calls", _limit(limits.concurrent_rpcs)),
        (
            "descriptors",
            f"{fds.in_use} open, {fds.reserved} reserved, limit {fds.soft_limit or 'none'}{hard}",
        ),
    ]


def status_rows(status: passt_pb2.Status) -> list[Row]:
    """GetStatus as (key, value) rows, in the order a person reads them."""
    backend, config, counters = status.backend, status.config, status.counters
    ipv6 = _network(config.ipv6_address, config.ipv6_prefix_length, config.ipv6_gateway)
    if config.ipv6_address and config.ipv6_link_local:
        ipv6 += f", link-local {config.ipv6_link_local}"
    flows_total = sum(status.flows.values())
    endpoint = " ".join(part for part in (backend.kind, backend.path or backend.ifname) if part)
    return [
        ("version", status.version or _NONE),
        ("mode", _mode(status.mode)),
        ("uptime", format_duration(status.uptime_seconds)),
        ("backend", endpoint or _NONE),
        ("guest", "connected" if backend.guest_connected else "not connected"),
        ("guest MAC", backend.guest_mac or _NONE),
        ("guest addresses", _join(backend.guest_addresses)),
        ("IPv4", _network(config.ipv4_address, config.ipv4_prefix_length, config.ipv4_gateway)),
        ("IPv6", ipv6),
        ("DNS", _join(config.dns)),
        ("DNS search", _join(config.search)),
        ("MTU", str(config.mtu)),
        ("our MAC", config.our_mac or _NONE),
        ("services", _services(config)),
        ("from guest", _traffic(counters.frames_from_guest, counters.bytes_from_guest)),
        ("to guest", _traffic(counters.frames_to_guest, counters.bytes_to_guest)),
        ("dropped", f"{sum(counters.dropped.values())} frames"),
        *_breakdown(counters.dropped),
        ("flows", f"{flows_total} of {status.limits.max_flows} max"),
        *_flow_breakdown(status),
        *_limit_rows(status.limits),
    ]


def render_status_table(status: passt_pb2.Status) -> str:
    return render_table(status_rows(status))


_INT64_TYPES: Final = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
# String fields and map keys that hold a flow state: shown lower-case, as `--state` takes them.
_STATE_FIELDS: Final = frozenset({"state"})
_STATE_MAPS: Final = frozenset({"states"})


def enum_word(enum: EnumDescriptor, number: int) -> str:
    """An enum value as the lower-case word the CLI's options take: PROTOCOL_TCP → tcp,
    FORWARD_DIRECTION_TCP_IN → tcp_in, EVENT_KIND_CLOSED → closed (the type's prefix dropped)."""
    value = enum.values_by_number.get(number)
    if value is None:
        return str(number)
    prefix = enum.values[0].name.removesuffix("UNSPECIFIED") if enum.values else ""
    name = value.name
    return (name[len(prefix) :] if prefix and name.startswith(prefix) else name).lower()


def _scalar(field: FieldDescriptor, value: Any) -> Any:
    if field.enum_type is not None:
        return enum_word(field.enum_type, value)
    if field.type in _INT64_TYPES:
        return int(value)
    if field.name in _STATE_FIELDS and isinstance(value, str):
        return value.lower()
    return value


def _script_form(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    """json_format's dict in .proto field order, maps sorted by key, made safe to parse: 64-bit integers
    as JSON numbers (not the proto3 mapping's strings), enums and flow states as the lower-case words the
    filters take (`tcp`, `established`, `tcp_in`)."""
    out: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            value_field = kind.fields_by_name["value"]
            lower = field.name in _STATE_MAPS
            items = {
                (k.lower() if lower else k): (
                    _script_form(value_field.message_type, v)
                    if value_field.message_type is not None and isinstance(v, dict)
                    else _scalar(value_field, v)
                )
                for k, v in value.items()
            }
            value = dict(sorted(items.items()))
        elif kind is not None and isinstance(value, dict):
            value = _script_form(kind, value)
        elif kind is not None and isinstance(value, list):
            value = [_script_form(kind, item) if isinstance(item, dict) else item for item in value]
        elif isinstance(value, list):
            value = [_scalar(field, item) for item in value]
        else:
            value = _scalar(field, value)
        out[field.name] = value
    return out


def _json_data(message: Message) -> dict[str, Any]:
    data = json_format.MessageToDict(
        message,
        preserving_proto_field_name=True,
        always_print_fields_with_no_presence=True,
        use_integers_for_enums=True,
    )
    descriptor = cast(Descriptor, message.DESCRIPTOR)  # the stubs also allow upb's twin class
    return _script_form(descriptor, data)


def render_json(message: Message) -> str:
    """JSON for scripts: proto field names, every field present, in .proto order. Unlike the proto3 JSON
    mapping, 64-bit counters are numbers and enums the lower-case words the options take (see --help)."""
    return json.dumps(_json_data(message), indent=2) + "\n"


# -- tables with columns -------------------------------------------------------------------------------


def render_columns(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Iterable[int] = ()) -> str:
    """A header line and rows, columns two spaces apart; columns in `right` (numbers) right-aligned."""
    body = [list(headers), *(list(row) for row in rows)]
    widths = [max(len(row[i]) for row in body) for i in range(len(headers))]
    right_set = set(right)
    lines = []
    for row in body:
        cells = [
            cell.rjust(widths[i]) if i in right_set else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append(_GAP.join(cells).rstrip() + "\n")
    return "".join(lines)


def format_seconds(value: float) -> str:
    """A timeout or a time: milliseconds below one second, else seconds, shortest exact form."""
    if 0 < value < 1:
        return f"{value * 1000:g} ms"
    return f"{value:g} s"


def endpoint(address: str, port: int) -> str:
    if not address:
        return _NONE
    shown = f"[{address}]" if ":" in address else address
    return f"{shown}:{port}" if port else address


_PROTOCOL_NAMES: Final = {
    passt_pb2.PROTOCOL_TCP: "tcp",
    passt_pb2.PROTOCOL_UDP: "udp",
    passt_pb2.PROTOCOL_ICMP: "icmp",
}
_DIRECTION_NAMES: Final = {
    passt_pb2.DIRECTION_GUEST_INITIATED: "out",
    passt_pb2.DIRECTION_HOST_INITIATED: "in",
}


def protocol_name(value: passt_pb2.Protocol.ValueType) -> str:
    return _PROTOCOL_NAMES.get(value, "?")


def _guest(conn: passt_pb2.Connection) -> str:
    if conn.protocol == passt_pb2.PROTOCOL_ICMP:  # the "port" is the echo identifier
        return f"{conn.guest_address} id {conn.guest_port}" if conn.guest_address else _NONE
    return endpoint(conn.guest_address, conn.guest_port)


CONN_HEADERS: Final = (
    "ID",
    "PROTO",
    "STATE",
    "DIR",
    "GUEST",
    "REMOTE",
    "FROM GUEST",
    "TO GUEST",
    "AGE",
    "IDLE",
)
CONN_WIDE_HEADERS: Final = (*CONN_HEADERS, "LOCAL", "PKTS IN", "PKTS OUT", "RTT", "RETRANS", "WINDOW", "MSS")
_CONN_RIGHT: Final = (0, 6, 7, 8, 9)
_CONN_WIDE_RIGHT: Final = (*_CONN_RIGHT, 11, 12, 13, 14, 15, 16)


def connection_row(conn: passt_pb2.Connection, now: float, wide: bool = False) -> list[str]:
    row = [
        str(conn.id),
        protocol_name(conn.protocol),
        conn.state or _NONE,
        _DIRECTION_NAMES.get(conn.direction, "?"),
        _guest(conn),
        endpoint(conn.remote_address, conn.remote_port),
        format_bytes(conn.bytes_from_guest),
        format_bytes(conn.bytes_to_guest),
        format_duration(now - conn.created_time),
        format_duration(now - conn.last_activity_time),
    ]
    if wide:
        tcp = conn.tcp if conn.HasField("tcp") else None
        row += [
            endpoint(conn.local_address, conn.local_port),
            str(conn.packets_from_guest),
            str(conn.packets_to_guest),
            f"{tcp.host_rtt_us / 1000:.2f} ms" if tcp is not None else _NONE,
            str(tcp.retransmits_to_guest) if tcp is not None else _NONE,
            format_bytes(tcp.window_from_guest) if tcp is not None else _NONE,
            str(tcp.mss_to_guest) if tcp is not None else _NONE,
        ]
    return row


def render_connections(conns: Iterable[passt_pb2.Connection], now: float, wide: bool = False) -> str:
    """`passtctl conns list`: one row per flow; FROM/TO GUEST are payload bytes, AGE and IDLE durations."""
    rows = [connection_row(c, now, wide) for c in conns]
    if wide:
        return render_columns(CONN_WIDE_HEADERS, rows, _CONN_WIDE_RIGHT)
    return render_columns(CONN_HEADERS, rows, _CONN_RIGHT)


_EVENT_NAMES: Final = {
    passt_pb2.EVENT_KIND_OPENED: "opened",
    passt_pb2.EVENT_KIND_STATE_CHANGED: "state",
    passt_pb2.EVENT_KIND_CLOSED: "closed",
    passt_pb2.EVENT_KIND_EXISTING: "existing",
    passt_pb2.EVENT_KIND_DENIED: "denied",
}


def render_event(event: passt_pb2.ConnectionEvent) -> str:
    """One line per event: time, kind, id, protocol, state, tuple; closed events add reason and bytes."""
    conn = event.connection
    stamp = time.strftime("%H:%M:%S", time.localtime(event.time)) + f".{int(event.time * 1000) % 1000:03d}"
    parts = [
        stamp,
        f"{_EVENT_NAMES.get(event.kind, '?'):<8}",
        str(conn.id),
        protocol_name(conn.protocol),
        conn.state or _NONE,
        f"{_guest(conn)} {'->' if conn.direction != passt_pb2.DIRECTION_HOST_INITIATED else '<-'} "
        f"{endpoint(conn.remote_address, conn.remote_port)}",
    ]
    if event.kind == passt_pb2.EVENT_KIND_DENIED:
        parts.append(f"reason {event.reason_detail or '-'}")
    if event.kind == passt_pb2.EVENT_KIND_CLOSED:
        parts.append(f"reason {event.reason_detail or '-'}")
        parts.append(
            f"from guest {format_bytes(conn.bytes_from_guest)}, to guest {format_bytes(conn.bytes_to_guest)}"
        )
    line = " ".join(parts)
    if event.dropped_before:
        line = f"(missed {event.dropped_before} events)\n" + line
    return line + "\n"


def render_json_line(message: Message) -> str:
    """The same form as render_json, on one line: for streams (`conns watch -o json`)."""
    return json.dumps(_json_data(message), separators=(",", ":")) + "\n"


# -- port policy and timeouts ----------------------------------------------------------------------------

DIRECTION_OPTION: Final = {
    passt_pb2.FORWARD_DIRECTION_TCP_IN: ("tcp_in", "-t"),
    passt_pb2.FORWARD_DIRECTION_UDP_IN: ("udp_in", "-u"),
    passt_pb2.FORWARD_DIRECTION_TCP_OUT: ("tcp_out", "-T"),
    passt_pb2.FORWARD_DIRECTION_UDP_OUT: ("udp_out", "-U"),
}


def _port_list(ports: Sequence[int]) -> str:
    """Ascending ports with runs folded: 22,80,8000-8002."""
    out: list[str] = []
    i = 0
    while i < len(ports):
        j = i
        while j + 1 < len(ports) and ports[j + 1] == ports[j] + 1:
            j += 1
        out.append(str(ports[i]) if i == j else f"{ports[i]}-{ports[j]}")
        i = j + 1
    return ",".join(out)


def render_port_policy(policy: passt_pb2.PortPolicy) -> str:
    """One row per table; with an `auto` table, a BOUND column shows the ports auto has bound now."""
    if not any(t.mode == "auto" for t in policy.tables):
        rows = [[*DIRECTION_OPTION.get(t.direction, ("?", "?")), t.spec] for t in policy.tables]
        return render_columns(("DIRECTION", "OPTION", "SPEC"), rows)
    rows = [
        [
            *DIRECTION_OPTION.get(t.direction, ("?", "?")),
            t.spec,
            (_port_list(list(t.auto_bound)) or _NONE) if t.mode == "auto" else "",
        ]
        for t in policy.tables
    ]
    return render_columns(("DIRECTION", "OPTION", "SPEC", "BOUND"), rows)


def render_forward_rules(policy: passt_pb2.PortPolicy) -> str:
    """fwdtx: one row per forwarding rule with its id and counters ("" when the server has no ids)."""
    rows: list[list[str]] = []
    for table in policy.tables:
        name = DIRECTION_OPTION.get(table.direction, ("?", "?"))[0]
        if table.rule_id:
            c = table.counters
            rows.append([str(table.rule_id), name, table.spec, str(c.connections), str(c.datagrams),
                         format_bytes(c.bytes_in), format_bytes(c.bytes_out)])  # fmt: skip
        for rule in table.rules:
            if not rule.id:
                continue
            c = rule.counters
            rows.append([str(rule.id), name, _rule_text(rule), str(c.connections), str(c.datagrams),
                         format_bytes(c.bytes_in), format_bytes(c.bytes_out)])  # fmt: skip
    if not rows:
        return ""
    return render_columns(("ID", "DIRECTION", "RULE", "CONNS", "DGRAMS", "IN", "OUT"), rows, (3, 4, 5, 6))


def _rule_text(rule: passt_pb2.ForwardRule) -> str:
    """A rule as a spec item with its scope: 127.0.0.1/8080:80, 22, 80:10.0.2.5/8080."""
    scope = rule.bind_address + (f"%{rule.ifname}" if rule.ifname else "")
    text = (f"{scope}/" if scope else "") + (
        str(rule.first) if rule.first == rule.last else f"{rule.first}-{rule.last}"
    )
    last = rule.target_first + rule.last - rule.first
    target = str(rule.target_first) if rule.first == rule.last else f"{rule.target_first}-{last}"
    if rule.target_address:
        shown = f"[{rule.target_address}]" if ":" in rule.target_address else rule.target_address
        return f"{text}:{shown}/{target}"
    return text if rule.target_first == rule.first else f"{text}:{target}"


def render_policy_change(change: passt_pb2.PortPolicyChange) -> str:
    name, option = DIRECTION_OPTION.get(change.current.direction, ("?", "?"))
    out = f"{name} ({option}): {change.previous.spec} -> {change.current.spec}\n"
    if change.dry_run:
        out = "dry run, nothing changed: " + out
    elif change.failure:
        out = f"{name} ({option}): {change.previous.spec} (unchanged; the change was not applied)\n"
    if change.added_ids or change.removed_ids:
        verb = " would be" if change.dry_run else ""
        parts = [f"rule ids{verb} added: {' '.join(map(str, change.added_ids))}"] if change.added_ids else []
        parts += [f"removed: {' '.join(map(str, change.removed_ids))}"] if change.removed_ids else []
        out += "  " + "; ".join(parts) + "\n"
    rows = [
        ["ok" if b.ok else "FAILED", b.error or "", b.message or endpoint(b.address, b.port)]
        for b in change.binds
    ]
    if rows:
        out += "".join("  " + line for line in render_columns(("", "", ""), rows).splitlines(True)[1:])
    unlisted = change.binds_total - len(change.binds)
    if unlisted > 0:
        out += f"  ... and {unlisted} more (of {change.binds_total} sockets, {change.binds_failed} failed)\n"
    return out


def timeouts_rows(timeouts: passt_pb2.Timeouts) -> list[Row]:
    rows: list[Row] = []
    for field in passt_pb2.Timeouts.DESCRIPTOR.fields:
        value = getattr(timeouts, field.name)
        if field.name == "tcp_max_retransmits":
            rows.append((field.name, str(value)))
        else:
            rows.append((field.name, format_seconds(value)))
    return rows


def render_timeouts(timeouts: passt_pb2.Timeouts) -> str:
    return render_table(timeouts_rows(timeouts))
