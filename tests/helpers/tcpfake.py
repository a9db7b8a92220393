"""A fake host socket and a guest-side script helper for TCP core tests (pure logic, no I/O)."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from passtd.dataplane.core.context import Context, Guest, Ip4Net, Ip6Net, link_local_from_mac
from passtd.dataplane.core.flowtable import FlowTable
from passtd.dataplane.core.stats import Stats
from passtd.dataplane.core.tcp.conn import TcpConn, TcpInfo
from passtd.dataplane.core.tcp.handler import TcpEnv, TcpHandler, TcpHooks
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.packets.ipv4 import parse_ipv4
from passtd.dataplane.packets.ipv6 import parse_ipv6
from passtd.dataplane.packets.tcp import SegmentBuilder, TcpHeader, parse_tcp, syn_options, tcp_checksum_ok

GUEST4 = IPv4Address("10.77.0.1").packed
GW4 = IPv4Address("10.77.0.2").packed
FAR4 = IPv4Address("10.88.0.1").packed
CTX = Context(
    ip4=Ip4Net(IPv4Address("10.77.0.1"), 24, IPv4Address("10.77.0.2")),
    ip6=Ip6Net(
        IPv6Address("fd77::1"), 64, IPv6Address("fd77::2"), link_local_from_mac(bytes.fromhex("9a559a559a55"))
    ),
    mtu=1500,
)


@dataclass
class FakeSock:
    rx: bytearray = field(default_factory=bytearray)  # received from the host peer, not yet discarded
    eof: bool = False
    tx: bytearray = field(default_factory=bytearray)  # what the core wrote
    capacity: int = 1 << 30  # bytes send() accepts from now on
    acked: int | None = None  # bytes the peer acknowledged; None: everything written
    snd_wnd: int = 1 << 20
    shut_wr: bool = False
    closed: bool = False
    was_reset: bool = False
    discarded: int = 0
    clamps: list[int] = field(default_factory=list)
    mss: int = 0
    fail: OSError | None = None
    sends: int = 0  # send calls (one per batch and flow)

    def peek(self, offset: int, size: int) -> memoryview | None:
        if self.fail:
            raise self.fail
        assert 0 <= offset <= len(self.rx), (offset, len(self.rx))
        if offset < len(self.rx):
            return memoryview(bytes(self.rx[offset : offset + size]))
        return memoryview(b"") if self.eof else None

    def discard(self, n: int) -> None:
        assert 0 < n <= len(self.rx), f"discarding {n} of {len(self.rx)}: never discard unsent bytes"
        del self.rx[:n]
        self.discarded += n

    def send(self, chunks: list[memoryview], more: bool) -> int:
        if self.fail:
            raise self.fail
        self.sends += 1
        data = b"".join(chunks)
        n = min(len(data), self.capacity)
        self.capacity -= n
        self.tx += data[:n]
        return n

    def shutdown_write(self) -> None:
        self.shut_wr = True

    def info(self) -> TcpInfo:
        acked = len(self.tx) if self.acked is None else self.acked
        return TcpInfo(bytes_acked=acked, snd_wnd=self.snd_wnd, sndbuf=1 << 22, rtt_us=100, retransmits=0)

    def set_window_clamp(self, size: int) -> None:
        self.clamps.append(size)

    def set_mss(self, mss: int) -> None:
        self.mss = mss

    def close(self) -> None:
        self.closed = True

    def reset(self) -> None:
        self.was_reset = True
        self.closed = True

    def getsockname(self) -> object:
        raise OSError(errno.ENOTSOCK, "a fake has no local name")


class FakeFactory:
    def __init__(self) -> None:
        self.socks: list[FakeSock] = []
        self.refuse: OSError | None = None
        self.forgotten: list[int] = []
        self.writers: dict[int, bool] = {}

    def connect(self, conn: TcpConn) -> FakeSock:
        if self.refuse is not None:
            raise self.refuse
        sock = FakeSock()
        self.socks.append(sock)
        return sock

    def forget(self, conn: TcpConn) -> None:
        self.forgotten.append(conn.flow_id)

    def want_write(self, conn: TcpConn, on: bool) -> None:
        self.writers[conn.flow_id] = on


@dataclass(frozen=True)
class Seg:
    """A segment the core sent to the guest, decoded."""

    src: bytes
    dst: bytes
    tcp: TcpHeader
    data: bytes

    @property
    def flags(self) -> int:
        return self.tcp.flags


class Rig:
    """A TcpHandler wired to fakes, plus a guest that speaks raw segments."""

    def __init__(self, ctx: Context = CTX, timeouts: Timeouts | None = None) -> None:
        self.flows = FlowTable()
        self.stats = Stats()
        self.factory = FakeFactory()
        self.sent: list[Seg] = []
        self.dst = GW4  # default destination of guest segments
        self.closed: list[tuple[int, str]] = []
        self.handler = TcpHandler(
            TcpEnv(ctx, Guest(), self.flows, self.stats, self.factory, self._to_tap, b"k" * 16),
            TcpHooks(timeouts or Timeouts(), on_close=lambda c, r: self.closed.append((c.flow_id, r))),
        )

    def _to_tap(
        self, ethertype: int, packet: bytes, offload: int = -1, payload: bytes | memoryview = b""
    ) -> None:
        assert offload == -1  # the rig runs without tap offloads: every checksum is complete
        packet = packet + bytes(payload)
        mv = memoryview(packet)
        ip = parse_ipv6(mv) if ethertype == 0x86DD else parse_ipv4(mv)
        assert tcp_checksum_ok(ip.src, ip.dst, ip.payload), "bad TCP checksum"
        tcp = parse_tcp(ip.payload)
        self.sent.append(Seg(ip.src, ip.dst, tcp, bytes(tcp.payload)))

    def take(self) -> list[Seg]:
        out, self.sent = self.sent, []
        return out

    def guest(
        self, flags: int, seq: int, ack: int = 0, data: bytes = b"", window: int = 65535, *, mss: int = 1460,
        ws: int = 7, sport: int = 40000, dport: int = 5000, src: bytes = GUEST4, dst: bytes | None = None,
        now: float = 0.0, flush: bool = True,
    ) -> None:  # fmt: skip
        dst = self.dst if dst is None else dst
        options = syn_options(mss, ws) if flags & 0x02 else b""
        seg = SegmentBuilder(src, dst, sport, dport).build(seq, ack, flags, window, data, options)
        ip = parse_ipv6(memoryview(seg)) if len(src) == 16 else parse_ipv4(memoryview(seg))
        self.handler.tap_segment(len(src) == 16, src, dst, parse_tcp(ip.payload), now)
        if flush:
            self.handler.flush(now)

    def conn(self) -> TcpConn:
        (conn,) = [f for f in self.flows if isinstance(f, TcpConn)]
        return conn
