"""What a live passtd says: the start-up summary, every flow's open and close at -d, what `auto` binds (in the
log and in `passtctl ports list`), and nothing at all inside an interactive pasta shell unless asked."""

from __future__ import annotations

import os
import pty
import select
import signal
import sys
import time
from pathlib import Path

import pytest

from tests.netns.conftest import HOST4, HOST_DNS, HOST_SEARCH, PASSTD, REMOTE4, Topology, sh, wait_for
from tests.netns.test_control_live import IF, TOOL, line, passtctl, spawn, start  # noqa: F401

pytestmark = pytest.mark.netns


def test_startup_summary_and_debug_flow_lines(topo: Topology) -> None:
    ctl = start(topo, "-d", "-t", "5151")
    daemon = topo.daemons[-1]

    def summary_line() -> str:  # the daemon may still be writing it when its control socket answers
        return next((x for x in daemon.output().splitlines() if "passtd.started" in x), "")

    summary = wait_for(summary_line, 10, "the start-up summary")
    for part in (f"address4={HOST4}/24", "mode=pasta", "backend='tap eth0'", "mtu=65520", f"control={ctl}",
                 f"dns4=['{HOST_DNS}']", f"search=['{HOST_SEARCH}']", "services=dhcp,ndp,dhcpv6,ra",
                 "tcp_in=5151", "[info"):  # fmt: skip
        assert part in summary, (part, summary)
    server = spawn(topo, topo.host, sys.executable, TOOL, "serve", "127.0.0.1", "5152", "--first", "read",
                   "--size", "1000", "--timeout", "20")  # fmt: skip
    assert line(server) == "ready"
    sh(sys.executable, TOOL, "connect", REMOTE4, "5152", "--size", "5000", "--timeout", "20", ns=topo.guest)

    def closed_line() -> str:
        return next((x for x in daemon.output().splitlines() if "flow.closed" in x and ":5152" in x), "")

    closed = wait_for(closed_line, 10, "the flow's close logged")
    opened = next(x for x in daemon.output().splitlines() if "flow.opened" in x and ":5152" in x)
    for text in (opened, closed):
        assert f"guest={HOST4}:" in text and f"remote={REMOTE4}:5152" in text and "proto=tcp" in text, text
        assert "initiated_by=guest" in text and "[debug" in text, text
    for part in (
        "reason=fin",
        "bytes_from_guest=5000",
        "bytes_to_guest=1000",
        "local=127.0.0.1:",
    ):  # the gateway maps to the host loopback
        assert part in closed, (part, closed)


def test_no_flow_lines_without_debug(topo: Topology) -> None:
    start(topo)
    daemon = topo.daemons[-1]
    server = spawn(topo, topo.host, sys.executable, TOOL, "serve", "127.0.0.1", "5153", "--first", "read",
                   "--size", "10", "--timeout", "20")  # fmt: skip
    assert line(server) == "ready"
    sh(sys.executable, TOOL, "connect", REMOTE4, "5153", "--size", "10", "--timeout", "20", ns=topo.guest)
    time.sleep(0.5)
    assert "flow." not in daemon.output() and "passtd.started" in daemon.output()


LISTEN = """
import socket, sys, time
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(); print("listening", flush=True)
time.sleep(30)  # killed by the test once it has seen the bind
"""


def test_auto_binds_are_logged_and_listed(topo: Topology) -> None:
    """pasta's default `auto`: a listener in the namespace makes passtd bind that port on the host, which
    the log says at info level and `passtctl ports list` shows; closing it undoes both."""
    ctl = start(topo)  # no -t: auto
    daemon = topo.daemons[-1]
    listener = spawn(topo, topo.guest, sys.executable, "-c", LISTEN, "5161")
    assert line(listener) == "listening"
    try:
        wait_for(lambda: "forward.auto.bound" in daemon.output(), 10, "the auto bind logged")
    except AssertionError:
        raise AssertionError(daemon.output() + passtctl("-c", ctl, "ports", "list").stdout) from None
    bound = next(x for x in daemon.output().splitlines() if "forward.auto.bound" in x and "port=5161" in x)
    assert "direction=tcp_in" in bound and "[info" in bound, bound
    ports = passtctl("-c", ctl, "ports", "list")
    assert ports.returncode == 0, ports.stderr
    row = next(x for x in ports.stdout.splitlines() if x.startswith("tcp_in"))
    assert row.split()[2:] == ["auto", "5161"], ports.stdout
    listener.kill()
    listener.wait(10)
    wait_for(lambda: "forward.auto.unbound" in daemon.output(), 10, "the auto unbind logged")
    row = next(x for x in passtctl("-c", ctl, "ports", "list").stdout.splitlines() if x.startswith("tcp_in"))
    assert row.split()[2:] == ["auto", "-"]


def _run_on_pty(topo: Topology, *args: str, timeout: float = 30) -> tuple[int, bytes]:
    """passtd pasta with a command, its stdin/stdout/stderr on a fresh terminal, as a user would run it."""
    pid, fd = pty.fork()
    if pid == 0:
        os.environ["XDG_RUNTIME_DIR"] = str(topo.tmp)
        argv = ["ip", "netns", "exec", topo.host, *PASSTD, *args]
        os.execvp(argv[0], argv)
    topo.pids.append(pid)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    chunk = b""
                out += chunk
                if not chunk:
                    break
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return os.waitstatus_to_exitcode(status), bytes(out)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status), bytes(out)
    finally:
        os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_interactive_pasta_prints_only_the_command(topo: Topology) -> None:
    code, out = _run_on_pty(topo, "pasta", "--config-net", "--", "sh", "-c", "echo from-the-shell")
    assert code == 0
    assert out.replace(b"\r\n", b"\n").strip() == b"from-the-shell", out
    code, out = _run_on_pty(topo, "pasta", "-d", "--config-net", "--", "sh", "-c", "echo from-the-shell")
    assert code == 0
    assert b"from-the-shell" in out and b"passtd.started" in out  # asked for: -d brings the log back


def test_interactive_pasta_logs_to_a_file_when_asked(topo: Topology, tmp_path: Path) -> None:
    log = tmp_path / "pasta.log"
    code, out = _run_on_pty(topo, "pasta", "--config-net", "-l", str(log), "--", "sh", "-c", "echo x")
    assert code == 0 and out.replace(b"\r\n", b"\n").strip() == b"x"
    assert "passtd.started" in log.read_text()
