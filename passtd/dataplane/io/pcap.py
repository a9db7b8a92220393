"""Capture of every frame in both directions, in classic pcap format (what tshark and tcpdump read)."""

from __future__ import annotations

import struct
import time
from typing import BinaryIO, Final

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
LINKTYPE_ETHERNET: Final = 1
SNAPLEN: Final = 65535 + 14


class PcapWriter:
    def __init__(self, path: str) -> None:
        self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - lives as long as the daemon
        self._file.write(_GLOBAL.pack(0xA1B2C3D4, 2, 4, 0, 0, SNAPLEN, LINKTYPE_ETHERNET))
        self._file.flush()

    def write(self, frame: bytes | bytearray | memoryview) -> None:
        now = time.time()
        sec = int(now)
        usec = int((now - sec) * 1_000_000)
        n = len(frame)
        self._file.write(_RECORD.pack(sec, usec, min(n, SNAPLEN), n))
        self._file.write(frame[:SNAPLEN])

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
