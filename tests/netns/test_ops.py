"""Operations: systemd units, sd_notify, signals (SIGTERM, SIGHUP reload), make install, --interface.

The notify and SIGTERM tests run passt mode on UNIX sockets in tmp_path only (no root needed); the reload
test with a live transfer and the --interface test use namespaces the fixtures create.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from passtd.notify import Notifier, notify_address, watchdog_interval
from tests.netns.conftest import Topology, sh, wait_for
from tests.netns.test_tcp import connect, digest, serve

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("*.service"))
PASSTD_BIN = Path(sys.executable).with_name("passtd")
MiB = 1024 * 1024


# --------------------------------------------------------------------------- systemd units


def test_there_are_units_for_both_modes() -> None:
    assert {u.name for u in UNITS} >= {"passtd@.service", "pasta@.service"}


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze (Debian package 'systemd')")
    if not PASSTD_BIN.exists():
        pytest.skip(f"needs the passtd console script at {PASSTD_BIN} (make setup)")
    # verify checks that ExecStart= is executable: point it at this checkout's passtd.
    text = unit.read_text()
    assert "/usr/local/bin/passtd" in text
    (tmp_path / unit.name).write_text(text.replace("/usr/local/bin/passtd", str(PASSTD_BIN)))
    instance = tmp_path / unit.name.replace("@.", "@test.")
    proc = subprocess.run(
        # --man=no: Documentation= names passt(1), whose page is there only with Debian's passt package.
        ["systemd-analyze", "verify", "--man=no", str(instance)],
        capture_output=True, text=True, timeout=60, check=False, cwd=tmp_path,
    )  # fmt: skip
    # Unknown keys and bad values are only warnings (exit 0): any line about our unit fails the test.
    ours = [line for line in (proc.stdout + proc.stderr).splitlines() if unit.name.split("@")[0] in line]
    assert proc.returncode == 0 and not ours, proc.stdout + proc.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_are_hardened(unit: Path) -> None:
    keys = dict(
        line.split("=", 1)
        for line in unit.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert keys["Type"] == "notify"
    assert keys["RuntimeDirectory"] == "passtd"
    assert "/etc/passtd/%i.toml" in keys["ExecStart"] and "--foreground" in keys["ExecStart"]
    for key, value in {
        "NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes", "PrivateTmp": "yes",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK", "SystemCallArchitectures": "native",
        "LockPersonality": "yes",
    }.items():  # fmt: skip
        assert keys[key] == value, key
    if unit.name.startswith("passtd@"):
        assert keys["CapabilityBoundingSet"] == "" and keys["PrivateDevices"] == "yes"


def test_make_install_respects_prefix_and_destdir(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    dest = tmp_path / "root"
    proc = subprocess.run(
        ["make", "-s", "install", f"DESTDIR={dest}", "PREFIX=/opt/pd", "INSTALL_PYTHON=0"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for unit in UNITS:
        installed = (dest / "opt/pd/lib/systemd/system" / unit.name).read_text()
        assert "ExecStart=/opt/pd/bin/passtd " in installed and "/usr/local" not in installed
    examples = {p.name for p in (REPO / "examples").glob("*.toml")}
    assert {p.name for p in (dest / "opt/pd/share/doc/passtd/examples").iterdir()} == examples
    assert {p.name for p in (dest / "etc/passtd").iterdir()} == {f"{n}.example" for n in examples}


# --------------------------------------------------------------------------- sd_notify


def test_notify_address_forms() -> None:
    assert notify_address({}) is None
    assert notify_address({"NOTIFY_SOCKET": "/run/systemd/notify"}) == "/run/systemd/notify"
    assert notify_address({"NOTIFY_SOCKET": "@/org/x"}) == b"\0/org/x"
    assert notify_address({"NOTIFY_SOCKET": "vsock:2:1"}) is None


def test_watchdog_interval_is_half_and_only_for_us() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}, pid=5) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "5"}, pid=5) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "6"}, pid=5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "x"}, pid=5) is None
    assert watchdog_interval({}, pid=5) is None


def test_notifier_without_socket_is_a_no_op() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready("x") and not n.stopping()


class NotifyListener:
    """The service manager's side: a datagram socket we own, collecting every message."""

    def __init__(self, tmp_path: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"passtd-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            path = tmp_path / "notify"
            self.sock.bind(str(path))
            self.env = str(path)
        self.messages: list[dict[str, str]] = []

    def wait(self, key: str, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(message)
            if key in message:
                return message
        raise AssertionError(f"no {key} within {timeout}s; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def notify(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path, request.param)
    yield listener
    listener.close()


def start_passt(
    tmp_path: Path, env_extra: dict[str, str], *args: str
) -> tuple[subprocess.Popen[bytes], Path]:
    log = tmp_path / "passtd.log"
    env = {**os.environ, **env_extra}
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "passtd", "passt", "-f", "-s", str(tmp_path / "g.socket"),
             "--control", str(tmp_path / "g.control"), "--pid", str(tmp_path / "g.pid"),
             "-a", "10.0.2.15", "-n", "24", "-g", "10.0.2.2", "-t", "none", "-u", "none", *args],
            stdout=out, stderr=out, env=env,
        )  # fmt: skip
    return proc, log


def kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def test_ready_when_sockets_accept_then_stopping_on_sigterm(tmp_path: Path, notify: NotifyListener) -> None:
    proc, log = start_passt(tmp_path, {"NOTIFY_SOCKET": notify.env, "WATCHDOG_USEC": "300000"})
    try:
        ready = notify.wait("READY", 30)
        assert ready["READY"] == "1" and ready["MAINPID"] == str(proc.pid)
        assert ready["STATUS"].startswith(f"waiting for a guest: {tmp_path / 'g.socket'}")
        # READY=1 means both sockets accept now: the first connect must succeed, no retry.
        for name in ("g.socket", "g.control"):
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(tmp_path / name))
            client.close()
        watchdog = [notify.wait("WATCHDOG", 2), notify.wait("WATCHDOG", 2)]  # every 150 ms
        assert all(m["WATCHDOG"] == "1" for m in watchdog)
        assert (tmp_path / "g.pid").read_text().strip() == str(proc.pid)

        proc.send_signal(signal.SIGHUP)  # no --config: logged, nothing changes
        wait_for(lambda: "config.reload.skipped" in log.read_text(), 10, "the reload to be skipped")
        assert proc.poll() is None

        proc.send_signal(signal.SIGTERM)
        stopping = notify.wait("STOPPING", 10)
        assert stopping["STOPPING"] == "1"
        assert proc.wait(15) == 0, log.read_text()
        for name in ("g.socket", "g.control", "g.pid"):
            assert not (tmp_path / name).exists(), name
    finally:
        kill(proc)


def test_sigint_is_graceful_too(tmp_path: Path, notify: NotifyListener) -> None:
    proc, log = start_passt(tmp_path, {"NOTIFY_SOCKET": notify.env})
    try:
        notify.wait("READY", 30)
        proc.send_signal(signal.SIGINT)
        notify.wait("STOPPING", 10)
        assert proc.wait(15) == 0, log.read_text()
        assert not (tmp_path / "g.socket").exists()
    finally:
        kill(proc)


def test_bad_config_on_sighup_keeps_the_old_one(tmp_path: Path, notify: NotifyListener) -> None:
    conf = tmp_path / "g.toml"
    conf.write_text("mtu = 1500\n")
    proc, log = start_passt(tmp_path, {"NOTIFY_SOCKET": notify.env}, "--config", str(conf))
    try:
        notify.wait("READY", 30)
        conf.write_text("mtu = 1\n")
        proc.send_signal(signal.SIGHUP)
        assert "RELOADING" in notify.wait("RELOADING", 10)
        again = notify.wait("READY", 10)
        assert again["STATUS"] == (
            f"reload failed, previous configuration kept: {conf}: key 'mtu': 1 is out of range 68..65520"
        )
        text = log.read_text()
        assert "config.reload.failed" in text and "kept=previous" in text
        assert proc.poll() is None
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(tmp_path / "g.socket"))
        client.close()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(15)
        kill(proc)


# --------------------------------------------------------------------------- SIGHUP with live traffic


@pytest.mark.netns
def test_sighup_adds_a_port_while_a_transfer_continues(topo: Topology) -> None:
    conf = topo.tmp / "app.toml"
    base = (
        f'mode = "pasta"\nnetns = "{topo.guest}"\nns-ifname = "eth0"\nconfig-net = true\nforeground = true\n'
    )
    conf.write_text(base + 'tcp-ports = ["20001"]\n')
    daemon = topo.passtd("--config", str(conf), wait_tap="eth0")
    topo.wait_link_local("eth0")

    # A 32 MiB transfer host → guest on 20001 whose guest reader stalls 3 s: in flight during the reload.
    slow = serve(topo, topo.guest, "0.0.0.0", 20001, first="read", size=10, seed=21, pause=3)
    upload = connect(topo, topo.host, "127.0.0.1", 20001, size=32 * MiB, seed=22)
    time.sleep(0.5)

    conf.write_text(base + 'tcp-ports = ["20001", "20002"]\n[timeouts]\ntcp_activity = 600\n')
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "config.reloaded" in daemon.output(), 10, "the reload")
    assert "forward.tcp.changed" in daemon.output()

    quick = serve(topo, topo.guest, "0.0.0.0", 20002, size=1000, seed=23)
    probe = connect(topo, topo.host, "127.0.0.1", 20002, first="read")
    assert probe.result() == {"rx_len": 1000, "rx_sha": digest(1000, 23)}
    quick.result()
    assert slow.proc.poll() is None  # still stalled: the reload did not disturb it

    assert upload.result() == {"rx_len": 10, "rx_sha": digest(10, 21)}
    assert slow.result()["rx_sha"] == digest(32 * MiB, 22)
    assert "tcp.flow" not in daemon.output() or "reset" not in daemon.output()
    assert daemon.stop() == 0


# --------------------------------------------------------------------------- --interface


@pytest.mark.netns
def test_interface_selects_the_host_defaults(topo: Topology) -> None:
    """-i copies address and prefix from that interface, not from the default-route one."""
    # A second interface with its own address and no default route (a veth pair: no dummy module here).
    sh("ip", "-n", topo.host, "link", "add", "pd-dummy0", "type", "veth", "peer", "name", "pd-dummy1")
    sh("ip", "-n", topo.host, "addr", "add", "10.99.0.5/26", "dev", "pd-dummy0")
    sh("ip", "-n", topo.host, "link", "set", "pd-dummy0", "up")
    code = (
        "from passtd.options import parse_args; import sys; c = parse_args(sys.argv[1:]);"
        "print(c.ctx.ip4.addr, c.ctx.ip4.prefix_len, c.ctx.ip4.gateway, c.interface)"
    )
    out = sh(
        sys.executable, "-c", code, "passt", "-i", "pd-dummy0", "-4", ns=topo.host, timeout=60
    ).stdout.split()
    assert out == ["10.99.0.5", "26", "10.99.0.1", "pd-dummy0"]  # no default route there: first other host
    default = sh(sys.executable, "-c", code, "passt", "-4", ns=topo.host, timeout=60).stdout.split()
    assert default[:3] == ["10.77.0.1", "24", "10.77.0.2"]
    bad = sh(sys.executable, "-m", "passtd", "passt", "-i", "nope0", ns=topo.host, check=False, timeout=60)
    assert bad.returncode == 2 and bad.stderr == "passtd: error: --interface: no interface named 'nope0'\n"
