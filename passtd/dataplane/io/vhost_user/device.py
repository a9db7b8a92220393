"""The vhost-user device state machine: what each front-end message does to the device (vhost-user.rst).

Rules kept here, in one place:
- Features: GET_FEATURES offers `FEATURES`; SET_FEATURES must be a subset (VhostUserError otherwise). The
  same for protocol features. The negotiated set fixes the virtio-net header layout and indirect tables.
- A ring is usable when it has a size (SET_VRING_NUM, a power of two up to 32768), mapped addresses
  (SET_VRING_ADDR, in front-end user addresses, resolved against the current memory table), a kick
  descriptor (SET_VRING_KICK starts it) and is enabled: by SET_VRING_ENABLE once PROTOCOL_FEATURES was
  negotiated, at once otherwise. GET_VRING_BASE stops it and answers the next avail index to process.
- SET_MEM_TABLE replaces the whole table; rings are re-resolved against the new one and the old mappings go.
  Ring addresses may come before the first table (they wait for it), but not outside an existing one.
- RESET_OWNER / RESET_DEVICE: rings and virtio features go back to a new connection's; the memory table and
  protocol features stay (the front end sets up again). A new connection always gets a new device.
- Replies: GET_* messages answer; any other message with NEED_REPLY gets a u64 ack (0: done) once REPLY_ACK
  was negotiated. A message we do not implement is acked with 1 and otherwise ignored, so an optional
  request of a newer front end does not cost the connection.
- Descriptors: each handler takes what it keeps; whatever a message still carries afterwards is closed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable
from typing import Final

from passtd.dataplane.io.vhost_user import protocol as p
from passtd.dataplane.io.vhost_user.memory import MemoryTable, Region, map_region
from passtd.dataplane.io.vhost_user.net import (
    F_ANY_LAYOUT,
    F_PROTOCOL_FEATURES,
    F_VERSION_1,
    NET_F_CSUM,
    NET_F_GUEST_CSUM,
    NET_F_GUEST_TSO4,
    NET_F_GUEST_TSO6,
    NET_F_HOST_TSO4,
    NET_F_HOST_TSO6,
    NET_F_MRG_RXBUF,
    NET_F_MTU,
    RING_F_INDIRECT_DESC,
    NetQueues,
)
from passtd.dataplane.io.vhost_user.virtqueue import MAX_QUEUE_SIZE, Virtqueue

FEATURES: Final = sum(
    1 << bit
    for bit in (
        NET_F_CSUM,
        NET_F_GUEST_CSUM,
        NET_F_MTU,
        NET_F_GUEST_TSO4,
        NET_F_GUEST_TSO6,
        NET_F_HOST_TSO4,
        NET_F_HOST_TSO6,
        NET_F_MRG_RXBUF,
        F_ANY_LAYOUT,
        RING_F_INDIRECT_DESC,
        F_PROTOCOL_FEATURES,
        F_VERSION_1,
    )
)
# CONFIG is not offered: qemu's virtio-net keeps its config space itself and warns about a back-end that
# offers it; GET_CONFIG/SET_CONFIG are still answered for front ends that send them.
PROTOCOL_FEATURES: Final = sum(
    1 << bit for bit in (p.PROTOCOL_F_REPLY_ACK, p.PROTOCOL_F_NET_MTU, p.PROTOCOL_F_RESET_DEVICE)
)
NET_CONFIG_SIZE: Final = 12  # virtio_net_config up to mtu: mac[6], status, max_virtqueue_pairs, mtu (§5.1.4)
NET_S_LINK_UP: Final = 1
MIN_MTU: Final = 68
MAX_MTU: Final = 65535

_NO_REPLY: Final = b""
_CONFIG_TAIL = struct.Struct("<HHH")  # status, max_virtqueue_pairs, mtu


class VhostUserDevice:
    """Device state changed only by `handle` (one message in, the reply bytes out, b"" for none)."""

    def __init__(self, mtu: int = 65520, mac: bytes = bytes(6)) -> None:
        self.drops: dict[str, int] = {}
        self.net = NetQueues(self.drops)
        self.queues: tuple[Virtqueue, Virtqueue] = (self.net.rx, self.net.tx)
        self.mem = MemoryTable()
        self.features = 0
        self.protocol_features = 0
        self.owner = False
        self.mtu = mtu
        self.mac = mac
        self.messages = 0
        self.unsupported = 0
        self._handlers: dict[int, Callable[[p.Message], bytes | None]] = {
            p.GET_FEATURES: self._get_features,
            p.SET_FEATURES: self._set_features,
            p.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            p.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            p.SET_OWNER: self._set_owner,
            p.RESET_OWNER: self._reset_owner,
            p.RESET_DEVICE: self._reset_device,
            p.SET_MEM_TABLE: self._set_mem_table,
            p.SET_VRING_NUM: self._set_vring_num,
            p.SET_VRING_ADDR: self._set_vring_addr,
            p.SET_VRING_BASE: self._set_vring_base,
            p.GET_VRING_BASE: self._get_vring_base,
            p.SET_VRING_KICK: self._set_vring_kick,
            p.SET_VRING_CALL: self._set_vring_call,
            p.SET_VRING_ERR: self._set_vring_err,
            p.SET_VRING_ENABLE: self._set_vring_enable,
            p.GET_QUEUE_NUM: self._get_queue_num,
            p.NET_SET_MTU: self._net_set_mtu,
            p.GET_CONFIG: self._get_config,
            p.SET_CONFIG: self._set_config,
            p.SEND_RARP: self._ignore,
        }

    def handle(self, msg: p.Message) -> bytes:
        """Apply one message; VhostUserError when the front end broke the protocol."""
        self.messages += 1
        try:
            if msg.flags & p.FLAG_VERSION_MASK != p.VERSION:
                raise p.VhostUserError(f"{msg.name}: protocol version {msg.flags & p.FLAG_VERSION_MASK}")
            handler = self._handlers.get(msg.request)
            if handler is None:
                self.unsupported += 1
                return self._ack(msg, 1)
            reply = handler(msg)
        finally:
            msg.close_fds()
        if reply is None:
            return self._ack(msg, 0)
        return p.encode_reply(msg.request, reply)

    def _ack(self, msg: p.Message, status: int) -> bytes:
        if msg.need_reply and self.protocol_features >> p.PROTOCOL_F_REPLY_ACK & 1:
            return p.encode_reply(msg.request, p.U64.pack(status))
        return _NO_REPLY

    def _queue(self, index: int, msg: p.Message) -> Virtqueue:
        if not 0 <= index < len(self.queues):
            raise p.VhostUserError(f"{msg.name}: queue {index} (one queue pair: 0 and 1)")
        return self.queues[index]

    # -- features -------------------------------------------------------------------------------------------

    def _get_features(self, msg: p.Message) -> bytes:
        return p.U64.pack(FEATURES)

    def _set_features(self, msg: p.Message) -> None:
        features = msg.u64()
        if features & ~FEATURES:
            raise p.VhostUserError(f"SET_FEATURES: {features & ~FEATURES:#x} was not offered")
        self.features = features
        self.net.set_features(features)
        if not features >> F_PROTOCOL_FEATURES & 1:
            for vq in self.queues:
                vq.enabled = True  # without PROTOCOL_FEATURES rings are enabled from the start

    def _get_protocol_features(self, msg: p.Message) -> bytes:
        return p.U64.pack(PROTOCOL_FEATURES)

    def _set_protocol_features(self, msg: p.Message) -> None:
        features = msg.u64()
        if features & ~PROTOCOL_FEATURES:
            raise p.VhostUserError(
                f"SET_PROTOCOL_FEATURES: {features & ~PROTOCOL_FEATURES:#x} was not offered"
            )
        self.protocol_features = features

    def _get_queue_num(self, msg: p.Message) -> bytes:
        return p.U64.pack(1)

    # -- ownership and reset --------------------------------------------------------------------------------

    def _set_owner(self, msg: p.Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: p.Message) -> None:
        self.reset()
        self.owner = False

    def _reset_device(self, msg: p.Message) -> None:
        self.reset()

    def reset(self) -> None:
        """Back to the state of a new connection, but for the memory table and protocol features."""
        for vq in self.queues:
            vq.reset()
        self.net.forget_held()
        self.features = 0
        self.net.set_features(0)

    def close(self) -> None:
        for vq in self.queues:
            vq.reset()
        self.net.forget_held()
        self.mem.close()

    # -- memory ---------------------------------------------------------------------------------------------

    def _set_mem_table(self, msg: p.Message) -> None:
        payload = msg.payload
        if len(payload) < p.MEMORY_HEADER.size:
            raise p.VhostUserError("SET_MEM_TABLE: short payload")
        count, _ = p.MEMORY_HEADER.unpack_from(payload)
        if count > p.MAX_REGIONS or len(payload) < p.MEMORY_HEADER.size + count * p.MEMORY_REGION.size:
            raise p.VhostUserError(f"SET_MEM_TABLE: {count} regions in {len(payload)} bytes")
        if len(msg.fds) != count:
            raise p.VhostUserError(f"SET_MEM_TABLE: {count} regions, {len(msg.fds)} descriptors")
        regions: list[Region] = []
        try:
            for i in range(count):
                gpa, size, uva, offset = p.MEMORY_REGION.unpack_from(
                    payload, p.MEMORY_HEADER.size + i * p.MEMORY_REGION.size
                )
                regions.append(map_region(msg.fds[i], gpa, size, uva, offset))
        except p.VhostUserError:
            MemoryTable(regions).close()
            raise
        old, self.mem = self.mem, MemoryTable(regions)
        # held receive chains are views of the old mapping: give them back (unused) while it is still there
        if self.net.held_count() and self.net.rx.mapped:
            self.net.release_held()
            self.net.rx.publish()
        self.net.forget_held()
        for vq in self.queues:
            if vq.map(self.mem) and not old.regions:
                vq.sync_used_index()  # addresses given before the first table
        old.close()

    # -- rings ----------------------------------------------------------------------------------------------

    def _set_vring_num(self, msg: p.Message) -> None:
        index, num = msg.vring_state()
        vq = self._queue(index, msg)
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise p.VhostUserError(f"SET_VRING_NUM: size {num} is not a power of two up to {MAX_QUEUE_SIZE}")
        vq.num = num
        vq.map(self.mem)

    def _set_vring_addr(self, msg: p.Message) -> None:
        if len(msg.payload) < p.VRING_ADDR.size:
            raise p.VhostUserError("SET_VRING_ADDR: short payload")
        index, _flags, desc, used, avail, _log = p.VRING_ADDR.unpack_from(msg.payload)
        vq = self._queue(index, msg)
        vq.desc_uva, vq.used_uva, vq.avail_uva = desc, used, avail
        vq.addr_set = True
        if vq.map(self.mem):
            vq.sync_used_index()
        elif self.mem.regions:  # before any table the areas are resolved when it comes (SET_MEM_TABLE)
            raise p.VhostUserError(f"SET_VRING_ADDR: queue {index} areas are not in the memory table")

    def _set_vring_base(self, msg: p.Message) -> None:
        index, base = msg.vring_state()
        vq = self._queue(index, msg)
        if base > 0xFFFF:
            raise p.VhostUserError(f"SET_VRING_BASE: {base}")
        vq.last_avail = base

    def _get_vring_base(self, msg: p.Message) -> bytes:
        index, _ = msg.vring_state()
        vq = self._queue(index, msg)
        base = vq.last_avail
        if vq is self.net.rx:
            base = (base - self.net.held_count()) & 0xFFFF  # held chains were never used: the next start
            self.net.forget_held()  # takes them again
        vq.allow_kicks()  # whoever runs the ring next must get them
        vq.started = False
        vq.set_kick(-1)
        return p.VRING_STATE.pack(index, base)

    def _ring_fd(self, msg: p.Message) -> tuple[Virtqueue, int]:
        value = msg.u64()
        vq = self._queue(value & p.VRING_IDX_MASK, msg)
        if value & p.VRING_NOFD_MASK:
            return vq, -1
        return vq, msg.take_fd()

    def _set_vring_kick(self, msg: p.Message) -> None:
        vq, fd = self._ring_fd(msg)
        if fd < 0:
            raise p.VhostUserError("SET_VRING_KICK without a descriptor: polling mode is not supported")
        os.set_blocking(fd, False)
        vq.set_kick(fd)
        vq.allow_kicks()  # a flag a previous back-end left in the ring would keep them away
        vq.started = True
        vq.broken = False
        if not self.features >> F_PROTOCOL_FEATURES & 1:
            vq.enabled = True

    def _set_vring_call(self, msg: p.Message) -> None:
        vq, fd = self._ring_fd(msg)
        if fd >= 0:
            os.set_blocking(fd, False)
        if vq.call_fd >= 0:
            os.close(vq.call_fd)
        vq.call_fd = fd

    def _set_vring_err(self, msg: p.Message) -> None:
        _, fd = self._ring_fd(msg)
        if fd >= 0:
            os.close(fd)  # we never report ring errors through it

    def _set_vring_enable(self, msg: p.Message) -> None:
        index, enable = msg.vring_state()
        self._queue(index, msg).enabled = bool(enable)

    # -- net config -----------------------------------------------------------------------------------------

    def _net_set_mtu(self, msg: p.Message) -> None:
        mtu = msg.u64()
        if not MIN_MTU <= mtu <= MAX_MTU:
            raise p.VhostUserError(f"NET_SET_MTU: {mtu}")
        self.mtu = mtu

    def config_space(self) -> bytes:
        return self.mac + _CONFIG_TAIL.pack(NET_S_LINK_UP, 1, min(self.mtu, MAX_MTU))

    def _get_config(self, msg: p.Message) -> bytes:
        if len(msg.payload) < p.CONFIG_HEADER.size:
            raise p.VhostUserError("GET_CONFIG: short payload")
        offset, size, flags = p.CONFIG_HEADER.unpack_from(msg.payload)
        if size > p.MAX_PAYLOAD - p.CONFIG_HEADER.size:
            raise p.VhostUserError(f"GET_CONFIG: {size} bytes")
        space = self.config_space()
        data = space[offset : offset + size] if offset < len(space) else b""
        return p.CONFIG_HEADER.pack(offset, size, flags) + data + bytes(size - len(data))

    def _set_config(self, msg: p.Message) -> None:
        if len(msg.payload) < p.CONFIG_HEADER.size:
            raise p.VhostUserError("SET_CONFIG: short payload")
        # The only writable field (the MAC, legacy drivers) is qemu's to keep; nothing here depends on it.

    def _ignore(self, msg: p.Message) -> None:
        pass
