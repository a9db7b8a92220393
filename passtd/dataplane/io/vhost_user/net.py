"""virtio-net over one queue pair (virtio 1.2 §5.1): frames out of the transmit ring, into the receive ring.

Every buffer starts with a virtio-net header (§5.1.6): 12 bytes once VERSION_1 or MRG_RXBUF is negotiated
(the last field, num_buffers, counts the receive chains one frame spans), 10 before. On transmit the guest's
header may ask for offloads we negotiated (a partial checksum, a TSO super-segment): the dataplane takes such
frames as they are, as from a tap with TUNSETOFFLOAD (it never checks a guest's checksum, and its TCP and UDP
flows read the payload only), so the header is skipped. On receive, the dataplane's 10-byte header (see
`packets/vnet.py`) passes through with num_buffers appended. The dataplane offloads before the guest has
negotiated anything, so for a guest that did not take the offloads the work is done here: a partial checksum
is completed, and a TCP super-segment is cut into MSS-sized frames (`segment_tcp`, the caller's job, so each
piece queues on its own); any other segmentation request is refused and counted.

Frames are copied between guest memory and our buffers: a transmit frame into a preallocated slot that
stays ours until the next batch (the guest cannot change it under the parsers, and the chain goes back at
once), a receive frame straight from the dataplane's parts into the guest's chains.
"""

from __future__ import annotations

import struct
from typing import Final

from passtd.dataplane.io.vhost_user.virtqueue import BAD_CHAIN, NO_CHAIN, Virtqueue
from passtd.dataplane.packets.checksum import checksum, l4_checksum4, l4_checksum6, ones_sum

# Feature bits (virtio 1.2 §5.1.3, §6).
NET_F_CSUM: Final = 0
NET_F_GUEST_CSUM: Final = 1
NET_F_MTU: Final = 3
NET_F_GUEST_TSO4: Final = 7
NET_F_GUEST_TSO6: Final = 8
NET_F_HOST_TSO4: Final = 11
NET_F_HOST_TSO6: Final = 12
NET_F_MRG_RXBUF: Final = 15
F_ANY_LAYOUT: Final = 27
RING_F_INDIRECT_DESC: Final = 28
F_PROTOCOL_FEATURES: Final = 30  # vhost-user's own bit in the virtio feature word
F_VERSION_1: Final = 32

HDR_F_NEEDS_CSUM: Final = 1
GSO_NONE: Final = 0
GSO_TCPV4: Final = 1
GSO_TCPV6: Final = 4
GSO_ECN: Final = 0x80

HDR_LEN: Final = 12
LEGACY_HDR_LEN: Final = 10
MIN_FRAME: Final = 14
MAX_FRAME: Final = 65535 + 14 + 4  # the largest IP packet, an Ethernet header and a VLAN tag
RX_CHAIN_LIMIT: Final = 1 << 20  # bytes counted per receive chain; a frame never needs more

QUEUE_RX: Final = 0
QUEUE_TX: Final = 1

_HDR = struct.Struct("<BBHHHH")
_U16 = struct.Struct("<H")
_U16BE = struct.Struct("!H")
_U32 = struct.Struct("!I")
ETH_HLEN: Final = 14
TCP_FIN: Final = 0x01
TCP_PSH: Final = 0x08
TCP_CWR: Final = 0x80
_ZERO10: Final = bytes(10)

# put() results
PUT_OK: Final = 0
PUT_FULL: Final = 1  # no receive buffers now: keep the frame for the guest's next refill
PUT_DROPPED: Final = 2


def _drop(drops: dict[str, int], reason: str) -> None:
    drops[reason] = drops.get(reason, 0) + 1


class NetQueues:
    """The receive and transmit queues of one virtio-net queue pair and the negotiated header layout."""

    def __init__(self, drops: dict[str, int]) -> None:
        self.drops = drops
        self.rx = Virtqueue(QUEUE_RX, drops)
        self.tx = Virtqueue(QUEUE_TX, drops)
        self.hdr_len = LEGACY_HDR_LEN
        self.mergeable = False
        self.guest_csum = False
        self.guest_tso4 = False
        self.guest_tso6 = False
        self._slots: list[bytearray] = []
        self._views: list[memoryview] = []
        self._segs: list[tuple[memoryview, int, int]] = []
        # receive chains taken for a frame that did not fit; the next frame starts with them
        self._held: list[tuple[int, int, int]] = []  # head, first index in _held_segs, capacity
        self._held_segs: list[tuple[memoryview, int, int]] = []

    def must_segment(self, vnet: bytes) -> bool:
        """Whether a frame with this header is a TCP super-segment the guest cannot take whole."""
        gso = vnet[1] & ~GSO_ECN
        if gso == GSO_TCPV4:
            return not self.guest_tso4
        return gso == GSO_TCPV6 and not self.guest_tso6

    def set_features(self, features: int) -> None:
        self.mergeable = bool(features >> NET_F_MRG_RXBUF & 1)
        self.hdr_len = HDR_LEN if self.mergeable or features >> F_VERSION_1 & 1 else LEGACY_HDR_LEN
        self.guest_csum = bool(features >> NET_F_GUEST_CSUM & 1)
        self.guest_tso4 = bool(features >> NET_F_GUEST_TSO4 & 1)
        self.guest_tso6 = bool(features >> NET_F_GUEST_TSO6 & 1)
        indirect = bool(features >> RING_F_INDIRECT_DESC & 1)
        self.rx.indirect = self.tx.indirect = indirect

    # -- guest → us ----------------------------------------------------------------------------------------

    def tx_frames(self, limit: int) -> list[memoryview]:
        """Up to `limit` frames the guest transmitted (bad chains count towards `limit` too, to bound work);
        views of our slots, valid until the next call. The used entries are published before returning."""
        tx = self.tx
        frames: list[memoryview] = []
        n = tx.available()
        if n == 0:
            return frames
        n = min(n, limit)
        while len(self._slots) < n:
            slot = bytearray(MAX_FRAME)
            self._slots.append(slot)
            self._views.append(memoryview(slot))
        hdr_len = self.hdr_len
        segs = self._segs
        drops = self.drops
        for _ in range(n):
            segs.clear()
            head = tx.pop(False, hdr_len + MAX_FRAME, segs)
            if head == NO_CHAIN:
                break
            if head == BAD_CHAIN:
                continue
            tx.push(head, 0)
            view = self._views[len(frames)]
            skip = hdr_len
            pos = 0
            for region, off, length in segs:
                if skip:
                    if length <= skip:
                        skip -= length
                        continue
                    off += skip
                    length -= skip
                    skip = 0
                view[pos : pos + length] = region[off : off + length]
                pos += length
            if pos < MIN_FRAME:
                _drop(drops, "vhost.tx_short")
                continue
            frames.append(view[:pos])
        segs.clear()
        tx.publish()
        return frames

    # -- us → guest ----------------------------------------------------------------------------------------

    def put(self, vnet: bytes | None, parts: tuple[bytes | bytearray | memoryview, ...]) -> int:
        """Write one frame (its parts in order, `vnet` the dataplane's 10-byte header or None) into receive
        chains; the used entries are pushed, `publish_rx` makes them visible."""
        rx = self.rx
        if not rx.ready:
            return PUT_FULL
        size = 0
        for part in parts:
            size += len(part)
        if vnet is None:
            vnet = _ZERO10
        elif vnet[1] != GSO_NONE or vnet[0] & HDR_F_NEEDS_CSUM:
            gso = vnet[1] & ~GSO_ECN
            if gso != GSO_NONE and not (
                (gso == GSO_TCPV4 and self.guest_tso4) or (gso == GSO_TCPV6 and self.guest_tso6)
            ):
                _drop(self.drops, "vhost.rx_gso_refused")
                return PUT_DROPPED
            if vnet[0] & HDR_F_NEEDS_CSUM and not self.guest_csum:
                parts = (_complete_checksum(vnet, parts),)
                vnet = _ZERO10
        need = self.hdr_len + size
        got = self._gather(need)
        if got != PUT_OK:
            return got
        held = self._held
        segs = self._held_segs
        used = 0  # chains this frame spans (held ones beyond stay held for the next frame)
        have = 0
        while have < need:
            have += held[used][2]
            used += 1
        hdr = vnet + _U16.pack(used) if self.hdr_len == HDR_LEN else vnet
        # Copy the header and the parts across the chains' buffers, in order.
        chain = 0
        head = held[0][0]
        next_first = held[1][1] if used > 1 else -1
        written = 0
        seg_i = 0
        seg_view, seg_off, seg_len = segs[0]
        seg_pos = 0
        for src in (hdr, *parts):
            src_len = len(src)
            src_pos = 0
            while src_pos < src_len:
                if seg_pos == seg_len:
                    seg_i += 1
                    seg_view, seg_off, seg_len = segs[seg_i]
                    seg_pos = 0
                    if seg_i == next_first:
                        rx.push(head, written)
                        chain += 1
                        head = held[chain][0]
                        next_first = held[chain + 1][1] if chain + 1 < used else -1
                        written = 0
                n = min(src_len - src_pos, seg_len - seg_pos)
                start = seg_off + seg_pos
                seg_view[start : start + n] = src[src_pos : src_pos + n]
                src_pos += n
                seg_pos += n
                written += n
        rx.push(head, written)
        if used < len(held):
            base = held[used][1]
            self._held = [(h, first - base, cap) for h, first, cap in held[used:]]
            del segs[:base]
        else:
            held.clear()
            segs.clear()
        return PUT_OK

    def _gather(self, need: int) -> int:
        """Hold receive chains until they can take `need` bytes (one chain unless mergeable): PUT_OK,
        PUT_FULL (wait for the guest's refill) or PUT_DROPPED (a frame larger than a whole chain, without
        mergeable buffers: the chain stays held for the next frame)."""
        rx = self.rx
        segs = self._held_segs
        have = 0
        for _, _, cap in self._held:
            have += cap
        avail = 0  # chains known to be available (the avail index is read again only when they run out)
        while have < need:
            if self._held and not self.mergeable:
                _drop(self.drops, "vhost.rx_buffer_small")
                return PUT_DROPPED
            if avail == 0:
                avail = rx.available()
                if avail == 0:
                    return PUT_FULL
            avail -= 1
            mark = len(segs)
            head = rx.pop(True, RX_CHAIN_LIMIT, segs)
            if head == NO_CHAIN:
                return PUT_FULL
            if head == BAD_CHAIN:
                # a bad chain went back between held ones: give the held ones back too, so what we hold is
                # always the run of entries just before `last_avail` (what GET_VRING_BASE reports)
                self.release_held()
                have = 0
                continue
            cap = 0
            for i in range(mark, len(segs)):
                cap += segs[i][2]
            if cap == 0:
                rx.push(head, 0)
                _drop(self.drops, "vhost.rx_empty_chain")
                continue
            self._held.append((head, mark, cap))
            have += cap
        return PUT_OK

    def release_held(self) -> None:
        """Return held receive chains unused (length 0)."""
        for head, _, _ in self._held:
            self.rx.push(head, 0)
        self._held.clear()
        self._held_segs.clear()

    def held_count(self) -> int:
        return len(self._held)

    def forget_held(self) -> None:
        """The ring stopped: held chains are not ours any more (GET_VRING_BASE reported them as unused)."""
        self._held.clear()
        self._held_segs.clear()


def _complete_checksum(vnet: bytes, parts: tuple[bytes | bytearray | memoryview, ...]) -> bytearray:
    """The frame with the checksum a NEEDS_CSUM header left to the receiver filled in (virtio §5.1.6.2).
    The field holds the pseudo-header sum, so the sum from csum_start on, field included, is the whole
    sum; a result of 0 is sent as 0xFFFF, its ones'-complement equal, because 0 means "none" in UDP."""
    frame = bytearray().join(parts)
    _, _, _, _, start, offset = _HDR.unpack_from(vnet)
    at = start + offset
    if at + 2 <= len(frame):
        value = ~ones_sum(frame[start:]) & 0xFFFF
        frame[at : at + 2] = (value or 0xFFFF).to_bytes(2, "big")
    return frame


def segment_tcp(vnet: bytes, parts: tuple[bytes | bytearray | memoryview, ...]) -> list[bytearray]:
    """Cut a TCP super-segment into the frames a guest without TSO expects (what the kernel's GSO does,
    RFC 9293 §3.1 and RFC 791/8200 for the fields): every piece carries the headers with its own sequence
    number, IP length (IPv4: identification + i and header checksum) and a complete TCP checksum; FIN and
    PSH only on the last piece, CWR only on the first. Headers are located from the virtio-net header
    (csum_start is the TCP header); the frame is the dataplane's own, an Ethernet + IP + TCP frame."""
    frame = bytearray().join(parts)
    _, gso_type, _, mss, tcp_at, _ = _HDR.unpack_from(vnet)
    v6 = gso_type & ~GSO_ECN == GSO_TCPV6
    if tcp_at + 20 > len(frame) or mss <= 0:
        return []
    hdrs = tcp_at + (frame[tcp_at + 12] >> 4) * 4
    if hdrs > len(frame):
        return []
    (seq,) = _U32.unpack_from(frame, tcp_at + 4)
    flags = frame[tcp_at + 13]
    ip_id = 0 if v6 else _U16BE.unpack_from(frame, ETH_HLEN + 4)[0]
    src = bytes(frame[ETH_HLEN + 8 : ETH_HLEN + 24] if v6 else frame[ETH_HLEN + 12 : ETH_HLEN + 16])
    dst = bytes(frame[ETH_HLEN + 24 : ETH_HLEN + 40] if v6 else frame[ETH_HLEN + 16 : ETH_HLEN + 20])
    head = frame[:hdrs]
    out: list[bytearray] = []
    payload_len = len(frame) - hdrs
    for i, off in enumerate(range(0, payload_len, mss)):
        seg = head + frame[hdrs + off : hdrs + min(off + mss, payload_len)]
        _U32.pack_into(seg, tcp_at + 4, (seq + off) & 0xFFFFFFFF)
        f = flags if off + mss >= payload_len else flags & ~(TCP_FIN | TCP_PSH)
        seg[tcp_at + 13] = f if i == 0 else f & ~TCP_CWR
        if v6:
            _U16BE.pack_into(seg, ETH_HLEN + 4, len(seg) - ETH_HLEN - 40)
        else:
            _U16BE.pack_into(seg, ETH_HLEN + 2, len(seg) - ETH_HLEN)
            _U16BE.pack_into(seg, ETH_HLEN + 4, (ip_id + i) & 0xFFFF)
            _U16BE.pack_into(seg, ETH_HLEN + 10, 0)
            _U16BE.pack_into(seg, ETH_HLEN + 10, checksum(seg[ETH_HLEN:tcp_at]))
        _U16BE.pack_into(seg, tcp_at + 16, 0)
        l4 = memoryview(seg)[tcp_at:]
        csum = l4_checksum6(src, dst, 6, l4) if v6 else l4_checksum4(src, dst, 6, l4)
        l4.release()
        _U16BE.pack_into(seg, tcp_at + 16, csum)
        out.append(seg)
    return out
