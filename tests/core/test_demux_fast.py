"""Demux's fast paths for TCP frames decide exactly as the general, layer-by-layer path does."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from passtd.dataplane.core.context import Guest
from passtd.dataplane.core.demux import Demux
from passtd.dataplane.core.flowtable import FlowTable
from passtd.dataplane.core.services.ndp import NdpResponder
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.packets.ethernet import ETH_P_IP, ETH_P_IPV6, build_ethernet
from passtd.dataplane.packets.tcp import SegmentBuilder, TcpHeader, syn_options
from passtd.dataplane.packets.udp import UdpHeader, build_udp4, build_udp6
from passtd.errors import MalformedFrame
from tests.helpers.tcpfake import CTX, GUEST4, GW4

GUEST6 = bytes.fromhex("fd770000000000000000000000000010")
GW6 = CTX.ip6.gateway.packed if CTX.ip6 is not None else b""
MAC = bytes.fromhex("9a0000000001")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def tap_segment(self, v6: bool, src: bytes, dst: bytes, tcp: TcpHeader, now: float) -> None:
        t = tcp
        fields = (t.sport, t.dport, t.seq, t.ack, t.flags, t.window, t.mss, t.ws)
        self.calls.append((v6, bytes(src), bytes(dst), *fields, bytes(t.payload), now))

    def udp(self, v6: bool, src: bytes, dst: bytes, udp: UdpHeader, now: float) -> None:
        self.calls.append(
            ("udp", v6, bytes(src), bytes(dst), udp.sport, udp.dport, udp.length, bytes(udp.payload), now)
        )


def run(frame: bytes, general: bool) -> tuple[Any, ...]:
    rec = Recorder()
    guest = Guest()
    stats = Stats()
    demux = Demux(CTX, guest, stats, FlowTable(), NdpResponder(CTX), rec.tap_segment, rec.udp)
    handle = demux.handle_general if general else demux.handle_frame
    try:
        handle(memoryview(frame), 1.5, [], [])
        error = ""
    except MalformedFrame as exc:
        error = exc.reason
    return rec.calls, error, dict(stats.dropped), guest.mac, guest.addrs4, guest.addrs6


@settings(max_examples=1000)
@given(
    v6=st.booleans(),
    flags=st.integers(0, 0xFF),
    with_options=st.booleans(),
    payload=st.binary(max_size=64),
    cut=st.one_of(st.just(0), st.integers(1, 140)),
    flips=st.lists(st.tuples(st.sampled_from(range(12, 80)), st.integers(0, 255)), max_size=3),
    pad=st.binary(max_size=8),
)
def test_fast_path_matches_the_general_path(
    v6: bool,
    flags: int,
    with_options: bool,
    payload: bytes,
    cut: int,
    flips: list[tuple[int, int]],
    pad: bytes,
) -> None:
    src, dst = (GUEST6, GW6) if v6 else (GUEST4, GW4)
    options = syn_options(1400, 7) if with_options else b""
    packet = SegmentBuilder(src, dst, 40000, 80).build(123, 456, flags, 999, payload, options)
    frame = bytearray(build_ethernet(bytes(6), MAC, ETH_P_IPV6 if v6 else ETH_P_IP, packet) + pad)
    for pos, value in flips:
        if pos < len(frame):
            frame[pos] = value
    frame = frame[: max(0, len(frame) - cut)]
    assert run(bytes(frame), general=False) == run(bytes(frame), general=True)


def test_plain_segments_take_the_fast_path() -> None:
    """The fast path really is taken for ordinary segments (the general one would do too, so check it)."""
    for src, dst, ethertype in ((GUEST4, GW4, ETH_P_IP), (GUEST6, GW6, ETH_P_IPV6)):
        packet = SegmentBuilder(src, dst, 40000, 80).build(1, 2, 0x18, 3, b"data")
        frame = memoryview(build_ethernet(bytes(6), MAC, ethertype, packet))
        rec = Recorder()
        demux = Demux(CTX, Guest(), Stats(), FlowTable(), NdpResponder(CTX), rec.tap_segment, rec.udp)
        demux.handle_frame(frame, 0.0, [], [])
        udp = (build_udp6 if ethertype == ETH_P_IPV6 else build_udp4)(src, dst, 40000, 53, b"dg")
        demux.handle_frame(memoryview(build_ethernet(bytes(6), MAC, ethertype, udp)), 0.0, [], [])
        assert rec.calls[0][-2] == b"data" and rec.calls[1][-2] == b"dg"
        assert demux.general_frames == 0
        with pytest.raises(MalformedFrame):  # a length that does not add up goes the general way
            demux.handle_frame(frame[:-1], 0.0, [], [])
        assert demux.general_frames == 1


def single_byte_changes(base: bytes, end: int, values: tuple[int, ...]) -> list[bytes]:
    """Every truncation of `base`, and `base` with one byte from offset 12 up to `end` set to each value."""
    variants = [base[:n] for n in range(len(base))]
    for pos in range(12, min(len(base), end)):
        for value in values:
            frame = bytearray(base)
            frame[pos] = value
            variants.append(bytes(frame))
    return variants


def decided_alike(variants: list[bytes]) -> int:
    """Both paths agree on every variant; returns how many were checked."""
    for frame in variants:
        assert run(frame, general=False) == run(frame, general=True), frame.hex()
    return len(variants)


def test_every_single_byte_change_of_the_headers_is_decided_alike() -> None:
    """Exhaustive over one changed header byte (and every truncation), for both families and the flag sets
    that matter; hypothesis above covers combinations."""
    checked = 0
    for v6 in (False, True):
        src, dst = (GUEST6, GW6) if v6 else (GUEST4, GW4)
        for flags, options in (
            (0x10, b""),
            (0x18, b""),
            (0x02, syn_options(1400, 7)),
            (0x02, b""),
            (0x11, b""),
        ):
            packet = SegmentBuilder(src, dst, 40000, 80).build(123, 456, flags, 999, b"payload", options)
            base = build_ethernet(bytes(6), MAC, ETH_P_IPV6 if v6 else ETH_P_IP, packet)
            values = (0x00, 0x01, 0x06, 0x20, 0x40, 0x45, 0x50, 0x86, 0xFF)
            checked += decided_alike(single_byte_changes(base, 90, values))
    assert checked > 5000


def test_every_single_byte_change_of_a_udp_frame_is_decided_alike() -> None:
    for v6 in (False, True):
        src, dst = (GUEST6, GW6) if v6 else (GUEST4, GW4)
        for dport in (53, 67, 547, 5000):
            build = build_udp6 if v6 else build_udp4
            base = build_ethernet(
                bytes(6), MAC, ETH_P_IPV6 if v6 else ETH_P_IP, build(src, dst, 40000, dport, b"dg")
            )
            values = (0x00, 0x01, 0x06, 0x11, 0x20, 0x40, 0x45, 0xE0, 0xFF)
            decided_alike([base + b"pad", *single_byte_changes(base, len(base), values)])
