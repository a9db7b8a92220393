"""`passt`/`pasta` drop-ins: libvirt's command line, passt-only spellings, --log-file and its cap."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from passtd.config import LOG_SIZE_DEFAULT
from passtd.dataplane.io.hostview import HostView
from passtd.errors import ConfigError
from passtd.logging import CappedLogFile
from passtd.options import parse_args

HOST = HostView(
    ifname4="eth0",
    addr4=IPv4Address("192.0.2.2"),
    prefix4=24,
    gw4=IPv4Address("192.0.2.1"),
    nameservers=(IPv4Address("192.0.2.53"),),
)
ENV = {"XDG_RUNTIME_DIR": "/run/user/1000"}

# What libvirt's qemuPasstStart() builds for an interface with two addresses, an MTU, a source device, a log
# file and three <portForward> elements (an address+dev scoped range, an "all" UDP one is separate below).
LIBVIRT_ARGV = [
    "--one-off", "--socket", "/run/libvirt/qemu/passt/1-vm-net0.socket", "--mac-addr", "52:54:00:aa:bb:cc",
    "--pid", "/run/libvirt/qemu/passt/1-vm-net0.pid", "--mtu", "1500", "--interface", "eth0",
    "--log-file", "/tmp/passt.log", "--address", "10.0.0.5", "--netmask", "24", "--address", "fd00::5",
    "--tcp-ports", "2222:22", "--tcp-ports", "192.0.2.2%eth0/8000-8010:9000-9010",
    "--udp-ports", "~5353,5000-6000",
]  # fmt: skip


def test_libvirt_command_line_is_understood() -> None:
    cfg = parse_args(["passt", *LIBVIRT_ARGV], HOST, env=ENV)
    assert cfg.mode == "passt" and cfg.one_off
    assert cfg.socket_path == "/run/libvirt/qemu/passt/1-vm-net0.socket"
    assert cfg.pid_file == "/run/libvirt/qemu/passt/1-vm-net0.pid"
    assert cfg.ctx.our_mac == bytes.fromhex("525400aabbcc")
    assert cfg.ctx.mtu == 1500
    assert cfg.interface == "eth0"
    assert cfg.log_file == "/tmp/passt.log" and cfg.log_size == LOG_SIZE_DEFAULT
    assert cfg.ctx.ip4 is not None and (str(cfg.ctx.ip4.addr), cfg.ctx.ip4.prefix_len) == ("10.0.0.5", 24)
    assert cfg.ctx.ip6 is not None and cfg.ctx.ip6.addr == IPv6Address("fd00::5")
    assert cfg.forward is not None
    assert cfg.forward.tcp_in.to_spec() == "2222:22 192.0.2.2%eth0/8000-8010:9000-9010"
    assert cfg.forward.udp_in.to_spec() == "5000-5352,5354-6000"


@pytest.mark.parametrize(("spec", "mode"), [("all", "all"), ("none", "none"), ("~22", "all")])
def test_libvirt_port_keywords(spec: str, mode: str) -> None:
    """libvirt writes `all` for a <portForward> without ranges and `~N` for exclude='yes'."""
    cfg = parse_args(["passt", "--tcp-ports", spec], HOST, env=ENV)
    assert cfg.forward is not None
    assert cfg.forward.tcp_in.mode == mode
    assert (22 in {p for _, _, p, _ in cfg.forward.tcp_in.ports()}) is (spec == "all")


def test_passt_only_spellings_parse() -> None:
    """-e/--stderr are deprecated no-ops, --trace is our most verbose level: passt's spellings, unchanged."""
    cfg = parse_args(["passt", "-e", "--stderr", "--trace", "-f", "-s", "/tmp/x.socket"], HOST, env=ENV)
    assert cfg.debug and cfg.foreground and cfg.socket_path == "/tmp/x.socket"


def test_pasta_command_keeps_its_options() -> None:
    cfg = parse_args(["pasta", "-e", "-a", "10.0.0.1", "--trace", "sh", "-e"], HOST, env=ENV)
    assert cfg.command == ("sh", "-e") and cfg.debug
    cfg = parse_args(["pasta", "--stderr", "--", "sh", "--stderr"], HOST, env=ENV)
    assert cfg.command == ("sh", "--stderr")


def test_outbound_is_accepted_once_per_family() -> None:
    cfg = parse_args(["passt", "-o", "192.0.2.2", "--outbound", "fd00::2"], HOST, env=ENV)
    assert cfg.outbound == (IPv4Address("192.0.2.2"), IPv6Address("fd00::2"))
    with pytest.raises(ConfigError, match=r"^--outbound: given twice for IPv4 \(192.0.2.2 and 192.0.2.3\)$"):
        parse_args(["passt", "-o", "192.0.2.2", "-o", "192.0.2.3"], HOST, env=ENV)
    with pytest.raises(ConfigError, match=r"^--outbound: 'eth0' is not an IPv4 or IPv6 address$"):
        parse_args(["passt", "-o", "eth0"], HOST, env=ENV)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--log-size", "10k"], "--log-size: '10k' is not a number"),
        (["--log-size", "100"], "--log-size: 100 is below the minimum of 4096 bytes"),
        (
            ["--interface", "a/b"],
            "--interface: 'a/b' is not a valid interface name (contains one of '/%:,' or a blank)",
        ),
    ],
)
def test_bad_drop_in_options(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(["passt", *argv], HOST, env=ENV)
    assert str(info.value) == message


# --------------------------------------------------------------------------- --log-file / --log-size


def test_capped_log_file_never_exceeds_its_cap_and_keeps_the_newest_lines(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = CappedLogFile(str(path), 4096)
    try:
        for i in range(2000):
            log.write(f"line {i:05d} {'x' * (i % 50)}\n")
            assert path.stat().st_size <= 4096
    finally:
        log.close()
    lines = path.read_text().splitlines()
    assert lines[-1].startswith("line 01999 ")
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], 2000))  # whole lines, contiguous, oldest dropped
    assert len(path.read_bytes()) > 4096 * 0.5  # it trims a share, not everything


def test_capped_log_file_truncates_at_start_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "log"
    path.write_text("old run\n" * 100)
    log = CappedLogFile(str(path), 4096)
    log.write("new\n")
    log.close()
    assert path.read_text() == "new\n"
    fresh = tmp_path / "fresh"
    CappedLogFile(str(fresh), 4096).close()
    assert fresh.stat().st_mode & 0o777 == 0o600  # a new file is private; an existing one keeps its mode


def test_one_giant_line_keeps_its_end(tmp_path: Path) -> None:
    path = tmp_path / "log"
    log = CappedLogFile(str(path), 4096)
    log.write("a" * 5000 + "END\n")
    log.close()
    data = path.read_bytes()
    assert len(data) == 4096 and data.endswith(b"END\n")


# --------------------------------------------------------------------------- as libvirt starts it


def test_passt_daemonises_like_passt(tmp_path: Path) -> None:
    """libvirt runs `passt` without -f and waits for exit 0; the socket must already accept, the PID file
    must name the daemon, and --log-file gets the log. Only UNIX sockets in tmp_path are used."""
    sock, pid_file, log = tmp_path / "g.socket", tmp_path / "g.pid", tmp_path / "g.log"
    argv = ["--one-off", "--socket", str(sock), "--pid", str(pid_file), "--log-file", str(log),
            "--log-size", "65536", "--address", "10.0.0.5", "--netmask", "24", "--gateway", "10.0.0.1",
            "--tcp-ports", "none", "--udp-ports", "none", "-e"]  # fmt: skip
    code = f"import sys; from passtd.compat import passt_main; sys.exit(passt_main({argv!r}))"
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    pid = None
    try:
        assert proc.returncode == 0, proc.stderr
        pid = int(pid_file.read_text())
        os.kill(pid, 0)  # the daemon, still running after its starter exited
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(sock))  # no retry: ready when the parent returned
        client.close()  # --one-off: the guest left, so passtd leaves
        deadline = time.monotonic() + 10
        while pid_file.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not pid_file.exists() and not sock.exists()
        text = log.read_text()
        assert "passt.listening" in text and "passt.guest.connected" in text
        pid = None
    finally:
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
