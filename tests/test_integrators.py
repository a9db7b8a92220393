"""The command lines that QEMU and libvirt build (shared/INTEGRATORS.md), run against the `passt` alias, and
the start-up failures a user of any of them must see as one line and a non-zero exit.

No namespaces needed: the guest is this test, speaking qemu's stream framing over a socketpair or the UNIX
socket, and the only host sockets are on loopback. Pasta's integrators (Podman, RootlessKit) are in
tests/netns/test_integrators.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from passtd.paths import derived_control_path
from tests.io.vhost_frontend import FrontEnd

GUEST_MAC = bytes.fromhex("02000000aa05")
OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST4, GATEWAY4 = "192.0.2.5", "192.0.2.1"
TIMEOUT = 30


def alias(mode: str, *args: str) -> list[str]:
    """The `passt`/`pasta` console script, as an integrator execs it."""
    code = f"import sys; from passtd.compat import {mode}_main as m; sys.exit(m())"
    return [sys.executable, "-c", code, *args]


def kill_pid_file(path: Path) -> None:
    """End the daemon a test started (by the PID it wrote), if it is still there."""
    try:
        pid = int(path.read_text())
    except (OSError, ValueError):
        return
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def wait_gone(pid: int, timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


def arp_request(target: str) -> bytes:
    """A broadcast ARP who-has (RFC 826) from the guest, framed as qemu's stream does (4-byte length)."""
    frame = (
        b"\xff" * 6
        + GUEST_MAC
        + b"\x08\x06"
        + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1)
        + GUEST_MAC
        + socket.inet_aton(GUEST4)
        + bytes(6)
        + socket.inet_aton(target)
    )
    return struct.pack("!I", len(frame)) + frame


def read_frame(sock: socket.socket) -> bytes:
    sock.settimeout(TIMEOUT)
    head = b""
    while len(head) < 4:
        chunk = sock.recv(4 - len(head))
        assert chunk, "the stream closed"
        head += chunk
    (length,) = struct.unpack("!I", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        assert chunk, "the stream closed mid-frame"
        body += chunk
    return body


def assert_arp_reply(frame: bytes, sender: str) -> None:
    assert frame[12:14] == b"\x08\x06"
    op = struct.unpack("!H", frame[20:22])[0]
    assert op == 2, f"ARP op {op}"
    assert frame[22:28] == OUR_MAC and frame[28:32] == socket.inet_aton(sender)


@pytest.fixture
def workdir(tmp_path: Path) -> Iterator[Path]:
    """A short directory (sun_path is 107 bytes) whose PID files are killed whatever the test does."""
    yield tmp_path
    for pid_file in tmp_path.glob("*.pid"):
        kill_pid_file(pid_file)


# --------------------------------------------------------------------------- QEMU -netdev passt


def test_qemu_netdev_passt_fd_3(workdir: Path) -> None:
    """QEMU 10.1's line: fd 3 is one end of a socketpair; the starter exits 0 once the PID file is written,
    frames then flow over the inherited descriptor, and closing it ends passt (qemu respawns it)."""
    pid_file = workdir / "passt.pid"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = alias("passt", "--quiet", "--mtu", "1500", "--address", GUEST4, "--netmask", "24",
                 "--mac-addr", "9a:55:9a:55:9a:55", "--gateway", GATEWAY4, "--dns", "192.0.2.53",
                 "--fqdn", "vm.example.org", "--no-dhcp-dns", "--no-dhcp-search", "--map-host-loopback",
                 GATEWAY4, "--map-guest-addr", "192.0.2.99", "--dns-forward", "192.0.2.53",
                 "--dns-host", "127.0.0.1", "--no-icmp", "--no-ndp", "--no-dhcpv6", "--no-ra", "--freebind",
                 "--ipv6-only", "--ipv4-only", "--search", "a.example b.example", "--tcp-ports", "none",
                 "--udp-ports", "none", "--control", "none", "--pid", str(pid_file), "--fd", "3")  # fmt: skip
    # fd 3 exactly, as qemu passes it: the shell moves our end from stdin to 3
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" 3<&0 </dev/null', "sh", *argv],
        stdin=theirs,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    theirs.close()
    try:
        assert (proc.returncode, proc.stderr) == (0, "")
        pid = int(pid_file.read_text())  # written before the starter returned
        ours.sendall(arp_request(GATEWAY4))
        assert_arp_reply(read_frame(ours), GATEWAY4)
        ours.close()  # qemu went away: passt follows (--fd implies --one-off)
        assert wait_gone(pid), "passt kept running after its guest closed fd 3"
        assert not pid_file.exists()
    finally:
        ours.close()


def test_fd_that_is_not_a_socket_is_one_line(workdir: Path) -> None:
    proc = subprocess.run(
        ["sh", "-c", 'exec "$@" 3</dev/null', "sh", *alias("passt", "-f", "--fd", "3", "--control", "none")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("passtd: error: --fd 3: not") and proc.stderr.count("\n") == 1


# --------------------------------------------------------------------------- libvirt


def test_libvirt_line_starter_pid_file_and_control(workdir: Path) -> None:
    """libvirt's line: --one-off --socket --pid, repeated --tcp-ports accumulating; it waits for the starter,
    reads the PID file, and qemu connects once. The control socket is found from the PID file."""
    sock, pid_file, log = workdir / "vm-net0.socket", workdir / "vm-net0.pid", workdir / "passt.log"
    log.touch()  # libvirt creates the log file itself
    port1, port2 = _free_port(), _free_port()
    argv = alias("passt", "--one-off", "--socket", str(sock), "--pid", str(pid_file), "--mtu", "1500",
                 "--log-file", str(log), "--hostname", "vm1", "--fqdn", "vm1.example.org",
                 "--address", GUEST4, "--netmask", "24", "--mac-addr", "52:54:00:aa:bb:cc",
                 "--tcp-ports", f"127.0.0.1/{port1}:22", "--tcp-ports", f"127.0.0.1/{port2}:80",
                 "--udp-ports", "none")  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    pid = int(pid_file.read_text())
    os.kill(pid, 0)
    control = derived_control_path(None, str(pid_file))
    assert control is not None and control == derived_control_path(str(sock), None)
    assert Path(control).exists()
    ctl = subprocess.run(
        [sys.executable, "-m", "passtctl", "--pid", str(pid_file), "ports", "list", "-o", "json"],
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert ctl.returncode == 0, ctl.stderr
    tcp_in = next(t for t in json.loads(ctl.stdout)["tables"] if t["direction"] == "tcp_in")
    assert tcp_in["spec"].startswith("127.0.0.1/")
    assert f"{port1}:22" in tcp_in["spec"] and f"{port2}:80" in tcp_in["spec"]
    for port in (port1, port2):  # both repeated --tcp-ports are listening
        with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
            pass
    guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.connect(str(sock))  # no retry: ready once the starter returned
    guest.sendall(arp_request(GATEWAY4))
    reply = read_frame(guest)
    assert_arp_reply(reply[:22] + OUR_MAC + reply[28:], GATEWAY4)
    assert reply[22:28] == bytes.fromhex("525400aabbcc")  # -M/--mac-addr is our address toward the guest
    guest.close()  # --one-off
    assert wait_gone(pid)
    assert not pid_file.exists() and not sock.exists() and not Path(control).exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- failures: one line, non-zero


def _one_line_failure(argv: list[str], code: int = 1) -> str:
    """Exactly one line with -q (without it, the info lines logged before the failure come first)."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("passtd: error: "), proc.stderr
    return proc.stderr


@pytest.mark.parametrize("foreground", [True, False])
def test_socket_under_a_file_is_one_line(workdir: Path, foreground: bool) -> None:
    flags = ["-f"] if foreground else []
    err = _one_line_failure(alias("passt", *flags, "--socket", "/dev/null/x.socket", "--control", "none"))
    assert "/dev/null/x.socket" in err


@pytest.mark.parametrize("foreground", [True, False])
def test_pid_file_under_a_file_is_one_line(workdir: Path, foreground: bool) -> None:
    flags = ["-f"] if foreground else []
    sock = workdir / "p.socket"
    err = _one_line_failure(
        alias("passt", *flags, "-q", "-s", str(sock), "--pid", "/dev/null/x.pid", "--control", "none")
    )
    assert "--pid: cannot write /dev/null/x.pid" in err
    assert not sock.exists()


def test_socket_in_a_missing_directory_is_refused_not_created(workdir: Path) -> None:
    missing = workdir / "missing"
    err = _one_line_failure(alias("passt", "-s", str(missing / "x.socket"), "--control", "none"))
    assert f"--socket {missing}/x.socket: directory {missing} does not exist" in err
    assert not missing.exists()


@pytest.mark.parametrize("foreground", [True, False])
def test_control_path_in_use_fails_the_starter(workdir: Path, foreground: bool) -> None:
    """The starter used to say "listening" and exit 0 while the daemon died: now it waits for the verdict."""
    used = workdir / "used.control"
    holder = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    holder.bind(str(used))
    holder.listen(1)
    sock, pid_file = workdir / "s.socket", workdir / "s.pid"
    flags = ["-f"] if foreground else []
    try:
        err = _one_line_failure(
            alias("passt", *flags, "-q", "-s", str(sock), "-P", str(pid_file), "--control", str(used))
        )
        assert "in use" in err
        time.sleep(0.2)
        assert not pid_file.exists() and not sock.exists()  # the daemon cleaned up and is gone
    finally:
        holder.close()


def vhost_arp_exchange(client: socket.socket, gateway: str = GATEWAY4) -> None:
    """Play qemu on a vhost-user socket: negotiate, share memory, post receive buffers, send an ARP request;
    the daemon's ARP reply must come back through the receive ring."""
    fe = FrontEnd(client, lambda: time.sleep(0.002))
    client.settimeout(TIMEOUT)
    try:
        fe.setup()
        fe.post_rx(16, 4096)
        fe.tx(arp_request(gateway)[4:])  # the frame without the stream's length prefix
        fe.kick_queue(1)
        deadline = time.monotonic() + TIMEOUT
        frames: list[bytes] = []
        while not frames and time.monotonic() < deadline:
            time.sleep(0.01)
            frames = [frame for _, frame in fe.read_rx() if frame[12:14] == b"\x08\x06"]
        assert frames, "no ARP reply through the receive ring"
        assert_arp_reply(frames[0], gateway)
    finally:
        fe.close()


def test_libvirt_vhost_user_line(workdir: Path) -> None:
    """libvirt's <interface type='vhostuser'><backend type='passt'/> line (and KubeVirt's, less its
    --interface eth0 and --tcp-ports all): the starter returns once the socket accepts, qemu speaks
    vhost-user on it, and --one-off ends passt when qemu goes."""
    sock, pid_file = workdir / "vm-net0.socket", workdir / "vm-net0.pid"
    argv = alias("passt", "--vhost-user", "--one-off", "--socket", str(sock), "--pid", str(pid_file),
                 "--mtu", "1500", "--address", GUEST4, "--netmask", "24", "--gateway", GATEWAY4,
                 "--tcp-ports", "none", "--udp-ports", "none")  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stderr
    pid = int(pid_file.read_text())
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        client.connect(str(sock))
        vhost_arp_exchange(client)
    finally:
        client.close()
    assert wait_gone(pid), "passt kept running after qemu closed the vhost-user socket (--one-off)"
    assert not pid_file.exists() and not sock.exists()


def test_qemu_netdev_passt_vhost_user_fd_3(workdir: Path) -> None:
    """QEMU's `-netdev passt,vhost-user=on`: --vhost-user --fd 3, the vhost-user protocol on fd 3."""
    pid_file = workdir / "passt.pid"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    argv = alias("passt", "--vhost-user", "--quiet", "--address", GUEST4, "--netmask", "24", "--gateway",
                 GATEWAY4, "--tcp-ports", "none", "--udp-ports", "none", "--control", "none",
                 "--pid", str(pid_file), "--fd", "3")  # fmt: skip
    proc = subprocess.run(["sh", "-c", 'exec "$@" 3<&0 </dev/null', "sh", *argv], stdin=theirs,
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    theirs.close()
    try:
        assert (proc.returncode, proc.stderr) == (0, "")
        pid = int(pid_file.read_text())
        vhost_arp_exchange(ours)
    finally:
        ours.close()
    assert wait_gone(pid), "passt kept running after qemu closed fd 3"


def test_pesto_socket_round_trip(workdir: Path) -> None:
    """-c/--conf-path: passtd's `pesto` adds, shows and deletes a forwarded port on a running passt; the port
    really listens while the rule is there, and passtctl sees the same table."""
    sock, pid_file, conf = workdir / "p.socket", workdir / "p.pid", workdir / "pesto.sock"
    port = _free_port()
    proc = subprocess.run(alias("passt", "-q", "-s", str(sock), "-P", str(pid_file), "-t", "none",
                                "-u", "none", "-c", str(conf)),
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pesto = [sys.executable, "-m", "passtd.pesto_cli"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*pesto, *args, str(conf)], capture_output=True, text=True, timeout=TIMEOUT,
                              check=False)  # fmt: skip

    added = run("-A", "-t", f"127.0.0.1/{port}:22")
    assert added.returncode == 0, added.stderr
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT):
        pass
    shown = run("-s")
    assert shown.returncode == 0 and str(port) in shown.stdout, shown.stdout + shown.stderr
    ctl = subprocess.run([sys.executable, "-m", "passtctl", "--pid", str(pid_file), "ports", "list"],
                         capture_output=True, text=True, timeout=TIMEOUT, check=False)  # fmt: skip
    assert ctl.returncode == 0 and f"{port}:22" in ctl.stdout, ctl.stdout + ctl.stderr
    deleted = run("-D", "-t", f"127.0.0.1/{port}:22")
    assert deleted.returncode == 0, deleted.stderr
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT).close()


def test_unknown_option_has_getopts_words_and_exit_2() -> None:
    """Podman retries without --map-guest-addr when stderr says exactly this; we must say it for others."""
    err = _one_line_failure(alias("pasta", "--no-such-option", "--netns", "x"), code=2)
    assert "unrecognized option '--no-such-option'" in err


def test_print_capabilities_and_version() -> None:
    proc = subprocess.run(alias("passt", "--print-capabilities"), capture_output=True, text=True,
                          timeout=TIMEOUT, check=False)  # fmt: skip
    assert (proc.returncode, proc.stderr) == (0, "")
    assert json.loads(proc.stdout) == {"type": "net"}
    for mode in ("passt", "pasta"):
        proc = subprocess.run(alias(mode, "--version"), capture_output=True, text=True, timeout=TIMEOUT,
                              check=False)  # fmt: skip
        assert proc.returncode == 0 and proc.stdout.splitlines()[0].startswith(f"{mode} ")


# --------------------------------------------------------------------------- start-up order


def test_guest_socket_listens_before_the_slow_imports(tmp_path: Path) -> None:
    """libvirt may start qemu a few ms after passt: the socket must accept before uvloop, pyroute2 and grpc
    are loaded (they took 200-450 ms)."""
    path = tmp_path / "early.socket"
    code = (
        "import sys; from passtd.__main__ import _bind_early; from passtd.options import parse\n"
        f"listener = _bind_early(parse(['passt', '-s', {str(path)!r}]))\n"
        "import socket; c = socket.socket(socket.AF_UNIX); c.connect(listener.path); c.close()\n"
        "heavy = ('uvloop', 'pyroute2', 'grpc', 'structlog', 'asyncio', 'passtd.daemon', 'passtd.config')\n"
        "print(sorted(m for m in heavy if m in sys.modules)); listener.close()"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT,
                          check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


# --------------------------------------------------------------------------- as an ordinary user (14.11)

NOBODY = 65534
SITE = Path(sys.prefix) / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
REPO = Path(__file__).resolve().parent.parent


def as_nobody(runtime: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`setpriv` to 65534 with a private $XDG_RUNTIME_DIR; Debian's python3 (the venv's interpreter lives
    under /root), our sources and the venv's packages on PYTHONPATH, interpreted."""
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an ordinary user")
    python = "/usr/bin/python3"
    if not os.access(python, os.X_OK):
        pytest.skip("needs Debian's python3")
    env = {"PATH": "/usr/bin:/bin", "XDG_RUNTIME_DIR": str(runtime), "PYTHONPATH": f"{REPO}:{SITE}",
           "PASSTD_NATIVE": "0", "HOME": str(runtime)}  # fmt: skip
    cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-c",
           "import sys; from passtd.__main__ import main; sys.exit(main())", *args]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd="/", check=False)


@pytest.fixture
def runtime() -> Iterator[Path]:
    """$XDG_RUNTIME_DIR for 65534 (pytest's own tmp dirs are private to root), removed afterwards."""
    base = Path(tempfile.mkdtemp(prefix="passtd-user-"))
    try:
        base.chmod(0o755)
        runtime = base / "run-user"
        runtime.mkdir(mode=0o700)
        os.chown(runtime, NOBODY, NOBODY)
        yield runtime
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_ordinary_user_pasta_uses_xdg_runtime_dir(runtime: Path) -> None:
    """pasta as an ordinary user: its own user namespace, the control socket under $XDG_RUNTIME_DIR, and the
    command's exit status as ours."""
    if not os.stat("/dev/net/tun").st_mode & 0o006:
        pytest.skip("/dev/net/tun is not open to ordinary users on this machine (mode 0600)")
    proc = as_nobody(
        runtime, "pasta", "-q", "--config-net", "--", "sh", "-c", 'ls "$XDG_RUNTIME_DIR/passtd"; exit 7'
    )
    assert proc.returncode == 7, proc.stderr
    assert ".control" in proc.stdout
    assert list((runtime / "passtd").iterdir()) == []  # removed on exit


def test_ordinary_user_control_socket_failure_is_one_line(runtime: Path) -> None:
    root_owned = runtime.parent / "root-owned"
    root_owned.mkdir(mode=0o755)
    proc = as_nobody(runtime, "passt", "-q", "--control", str(root_owned / "c.control"))
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("passtd: error: control socket"), (
        proc.stderr
    )
    assert not (runtime / "passtd" / "passtd.socket").exists()


def test_pasta_control_socket_failure_is_not_the_commands_status(tmp_path: Path) -> None:
    """The command ran, but passtd could not start its control socket: an error, not the command's 7."""
    if os.geteuid() != 0 or not os.path.exists("/dev/net/tun"):
        pytest.skip("needs root and /dev/net/tun for pasta's namespace")
    proc = subprocess.run(
        alias("pasta", "-q", "--config-net", "--control", str(tmp_path / "missing" / "c.control"), "--",
              "sh", "-c", "exit 7"),
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr, proc.stderr


def test_ordinary_user_passt_defaults_under_xdg_runtime_dir(runtime: Path) -> None:
    pid_file = runtime / "passt.pid"
    proc = as_nobody(runtime, "passt", "-q", "--pid", str(pid_file), "-a", GUEST4, "-g", GATEWAY4)
    try:
        assert proc.returncode == 0, proc.stderr
        assert (runtime / "passtd" / "passtd.socket").exists()
        assert (runtime / "passtd" / "passtd.control").exists()
        status = subprocess.run(
            [sys.executable, "-m", "passtctl", "-c", str(runtime / "passtd" / "passtd.control"), "health"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert status.returncode == 0, status.stderr
    finally:
        kill_pid_file(pid_file)


def test_runas_drops_to_the_user_with_no_capability(workdir: Path) -> None:
    """--runas nobody: the sockets and the PID file are set up as root, then the daemon is nobody with an
    empty capability set, and still serves its guest."""
    if os.geteuid() != 0:
        pytest.skip("needs root to change user")
    sock, pid_file = workdir / "r.socket", workdir / "r.pid"
    proc = subprocess.run(
        alias("passt", "-q", "--runas", "nobody", "-1", "-s", str(sock), "-P", str(pid_file), "-a", GUEST4,
              "-g", GATEWAY4),
        capture_output=True, text=True, timeout=TIMEOUT, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    pid = int(pid_file.read_text())
    status = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["Groups"].strip() == ""
    guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    guest.connect(str(sock))
    guest.sendall(arp_request(GATEWAY4))
    assert_arp_reply(read_frame(guest), GATEWAY4)
    guest.close()
    assert wait_gone(pid)
