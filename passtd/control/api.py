"""The narrow facade the control plane sees of a running daemon, and the plain values it returns.

The gRPC servicer talks only to `ControlAPI`; the daemon implements it over the dataplane, tests implement it
with a literal. The views are frozen dataclasses of plain Python types (str, int, bool, float, tuples and
mappings) that mirror proto/passt.proto field by field, so that conversion to protobuf (convert.py) is a pure
function and nothing here imports the dataplane, grpc or protobuf.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

Mode = Literal["passt", "pasta"]
BackendKind = Literal["unix-stream", "tap"]


def _empty() -> Mapping[str, int]:
    return {}


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
class LimitsView:
    """passt.v1.Limits: configured limits."""

    max_flows: int


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


class ControlAPI(Protocol):
    """What the control plane may ask of the daemon. Called on the dataplane's loop; must not block."""

    def status(self) -> StatusView:
        """A fresh snapshot; never walks the flow table."""
        ...
