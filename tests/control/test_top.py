"""`passtctl conns top` through a real terminal: the real CLI runs on a pty against a real control server
(the fake API behind it supplies byte counters that grow), and the screen is read back from the pty."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import signal
import struct
import termios
import time
from dataclasses import replace
from pathlib import Path

import pytest

from passtctl.top import ALT_SCREEN_OFF, ALT_SCREEN_ON, rates, render_top
from passtd.control.convert import connection_to_pb
from tests.control.samples import CONN_TCP, CONN_UDP, FakeControlAPI
from tests.control.test_cli import PYTHON, ROOT, ServerThread


def test_rates_from_successive_counters() -> None:
    a, b = connection_to_pb(CONN_TCP), connection_to_pb(CONN_UDP)
    previous: dict[int, tuple[int, int]] = {}
    first = rates([a, b], previous, 0.0, CONN_TCP.created_time + 10)
    assert {r.conn.id for r in first} == {CONN_TCP.id, CONN_UDP.id}
    a2 = connection_to_pb(replace(CONN_TCP, bytes_to_guest=CONN_TCP.bytes_to_guest + 2000))
    b2 = connection_to_pb(replace(CONN_UDP, bytes_from_guest=CONN_UDP.bytes_from_guest + 8000))
    second = rates([a2, b2], previous, 2.0, 0.0)
    assert [(r.conn.id, r.from_guest, r.to_guest) for r in second] == [
        (CONN_UDP.id, 4000.0, 0.0),
        (CONN_TCP.id, 0.0, 1000.0),
    ]
    assert rates([b2], previous, 1.0, 0.0)[0].total == 0.0  # unchanged: 0/s; the gone flow is forgotten
    assert list(previous) == [CONN_UDP.id]


def test_render_fits_the_terminal() -> None:
    conns = [connection_to_pb(replace(CONN_TCP, id=i)) for i in range(1, 30)]
    rows = rates(conns, {}, 0.0, CONN_TCP.created_time + 1)
    screen = render_top(rows, width=60, height=10, stamp=0.0, interval=1.0)
    lines = screen.splitlines()
    assert len(lines) <= 10 and all(len(line) <= 60 for line in lines)
    assert lines[0].startswith("passtctl conns top") and "29 flows" in lines[0]
    assert lines[-1] == "... 23 more"


def _read_until(fd: int, wanted: bytes, buf: bytearray, timeout: float = 15) -> bytes:
    """Read the pty until `wanted` appears after what was already consumed; returns everything new."""
    deadline = time.monotonic() + timeout
    start = len(buf)
    while wanted not in buf[start:]:
        left = deadline - time.monotonic()
        assert left > 0, f"{wanted!r} not seen within {timeout}s; got {bytes(buf[start:])[-2000:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"the terminal closed before {wanted!r}: {bytes(buf[start:])[-2000:]!r}")
            buf += chunk
    return bytes(buf[start:])


def _spawn_top(path: Path) -> tuple[int, int]:
    pid, fd = pty.fork()
    if pid == 0:  # the child: passtctl with the pty as its controlling terminal
        os.chdir(ROOT)
        os.execv(str(PYTHON), [str(PYTHON), "-m", "passtctl", "-c", str(path), "conns", "top", "-d", "0.3"])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))  # a 120x30 terminal
    return pid, fd


def _finish(pid: int, fd: int, buf: bytearray) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            try:  # drain what it wrote last (the terminal restored)
                while select.select([fd], [], [], 0.2)[0] and (chunk := os.read(fd, 65536)):
                    buf += chunk
            except OSError:
                pass
            os.close(fd)
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    os.close(fd)
    raise AssertionError("passtctl conns top did not quit")


@pytest.mark.parametrize("quit_key", [b"q", b"\x03"])  # q, and Ctrl-C through the terminal's line discipline
def test_top_on_a_real_terminal(tmp_path: Path, quit_key: bytes) -> None:
    api = FakeControlAPI()
    server = ServerThread(tmp_path / "ctl.sock", api)
    server.start()
    pid = fd = -1
    try:
        pid, fd = _spawn_top(server.path)
        buf = bytearray()
        first = _read_until(fd, b"q quits", buf)
        assert ALT_SCREEN_ON.encode() in first
        _read_until(fd, b"\n", buf)
        # Now the UDP flow moves 1 MiB per refresh: it must climb to the top, its rate shown in MiB/s.
        for _ in range(20):
            api.connections = [
                replace(c, bytes_from_guest=c.bytes_from_guest + (1 << 20)) if c.id == CONN_UDP.id else c
                for c in api.connections
            ]
            # One whole screen: from after one summary line to the next summary line.
            screen = _read_until(fd, b"q quits", buf)
            rows = [line.split() for line in screen.split(b"\r\n") if line.strip()]
            table = [row for row in rows if row and row[0].isdigit()]
            assert [row[0] for row in rows if row[:2] == [b"ID", b"PROTO"]], screen  # the header is there
            if table and table[0][0] == str(CONN_UDP.id).encode() and b"MiB/s" in b" ".join(table[0]):
                break
        else:
            raise AssertionError(f"the busy flow never led: {bytes(buf)[-3000:]!r}")
        os.write(fd, quit_key)
        code = _finish(pid, fd, buf)
        pid = -1
        assert code == 0
        assert bytes(buf).rstrip().endswith(ALT_SCREEN_OFF.encode()), bytes(buf)[-200:]
    finally:
        if pid > 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(fd)
        server.stop()


def test_top_without_a_terminal_prints_screens(tmp_path: Path) -> None:
    import subprocess

    server = ServerThread(tmp_path / "ctl.sock", FakeControlAPI())
    server.start()
    try:
        done = subprocess.run(
            [str(PYTHON), "-m", "passtctl", "-c", str(server.path), "conns", "top", "-n", "2", "-d", "0.1",
             "--proto", "tcp"],
            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
        )  # fmt: skip
    finally:
        server.stop()
    assert done.returncode == 0, done.stderr
    assert "\x1b" not in done.stdout
    assert done.stdout.count("passtctl conns top") == 2
    assert " udp " not in done.stdout and " tcp " in done.stdout
