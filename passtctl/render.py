"""Pure rendering of control replies: an aligned key/value table for people, proto JSON for scripts.

No I/O and no gRPC here, so every output can be tested against exact text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Final, cast

from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor
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
        *_breakdown(status.flows),
    ]


def render_status_table(status: passt_pb2.Status) -> str:
    return render_table(status_rows(status))


def _in_field_order(descriptor: Descriptor, data: dict[str, Any]) -> dict[str, Any]:
    """json_format puts set fields before unset ones; people read fields in .proto order, maps sorted."""
    out: dict[str, Any] = {}
    for field in descriptor.fields:
        if field.name not in data:
            continue
        value = data[field.name]
        kind = field.message_type
        if kind is not None and kind.GetOptions().map_entry:
            value = dict(sorted(value.items()))
        elif kind is not None and isinstance(value, dict):
            value = _in_field_order(kind, value)
        elif kind is not None and isinstance(value, list):
            value = [_in_field_order(kind, item) if isinstance(item, dict) else item for item in value]
        out[field.name] = value
    return out


def render_json(message: Message) -> str:
    """The canonical proto3 JSON mapping with proto field names and every field present, in .proto order.

    As that mapping prescribes, 64-bit integers (the uint64 counters) are JSON strings and enums are names.
    """
    data = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    descriptor = cast(Descriptor, message.DESCRIPTOR)  # the stubs also allow upb's twin class
    return json.dumps(_in_field_order(descriptor, data), indent=2) + "\n"
