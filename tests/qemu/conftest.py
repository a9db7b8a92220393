"""Boot a real guest on passtd's passt-mode socket, inside a network namespace the test creates.

    ┌──────────────────────── namespace pdq-<random> (lo only, ping sockets allowed) ─────────────────────┐
    │  host-side services (spawn)   passtd passt -f -s SOCK --one-off      qemu (TCG) ── guest /init      │
    │  listen on 127.0.0.1/::1  ◄── gateway 10.0.2.2 maps to loopback ◄── UNIX SOCK ◄── virtio-net, DHCP  │
    └─────────────────────────────────────────────────────────────────────────────────────────────────────┘

Nothing the guest sends can leave the machine: passtd's host sockets live in a namespace with nothing but a
loopback. The guest runs one shell script (`/test/run.sh`, shipped in an initramfs tail) after DHCP and
prints `PDQ-EXIT=<status>`; the host collects the serial console.

To add a TCP/UDP test: start the host side with `guest_net.spawn("socat", "TCP-LISTEN:5000,bind=127.0.0.1",
...)`, then `guest_net.run_guest("socat - TCP:10.0.2.2:5000 ...")` and assert on the console.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

import pytest

from tests.qemu.image import (
    EXIT_MARKER,
    LEASE_MARKER,
    READY_MARKER,
    GuestImage,
    ImageError,
    ensure_image,
    write_initrd,
)

QEMU: Final = "qemu-system-x86_64"
QBOOT: Final = Path("/usr/share/qemu/qboot.rom")  # a minimal firmware: ~0.3 s faster than SeaBIOS here
GUEST4, PREFIX4, GATEWAY4, DNS4 = "10.0.2.15", 24, "10.0.2.2", "10.0.2.3"
DEFAULT_PASSTD_ARGS: Final = ("-a", GUEST4, "-n", str(PREFIX4), "-g", GATEWAY4, "-D", DNS4)
DEFAULT_TIMEOUT: Final = 30.0
# Guest script: wait for a SLAAC address and a default route from the router advertisement, ping the router.
SLAAC_PING6: Final = """
n=0
while [ "$n" -lt 100 ]; do
    a=$(ip -6 -o addr show dev eth0 scope global | grep -v tentative | awk '{print $4}' | head -n 1)
    gw=$(ip -6 route show default | awk '{print $3}' | head -n 1)
    [ -n "$a" ] && [ -n "$gw" ] && break
    usleep 100000
    n=$((n + 1))
done
echo "ADDR6=$a"
echo "GW6=$gw"
ping6 -c 2 -W 5 -I eth0 "$gw" > /tmp/ping.out 2>&1
echo "PING6_RC=$?"
cat /tmp/ping.out
"""
SOCKET_WAIT: Final = 20.0  # passtd imports grpc and uvloop before it listens
PASSTD_EXIT_WAIT: Final = 5.0
GUEST_MEM_MB: Final = 256

_ESCAPES: Final = re.compile(r"\x1b(?:\[[0-9;?]*[A-Za-z]|c)")
_EXIT_RE: Final = re.compile(rf"^{re.escape(EXIT_MARKER)}(\d+)$", re.MULTILINE)
_UPTIME_RE: Final = re.compile(rf"^{re.escape(READY_MARKER)} uptime=([0-9.]+)$", re.MULTILINE)

TIMINGS: dict[str, list[float]] = {"build": [], "boot": [], "run": []}


@dataclass(frozen=True, slots=True)
class GuestResult:
    """What one guest run left behind: its console (escape codes and CRs removed) and its script's status."""

    console_output: str
    exit_code: int | None  # None: the guest never printed PDQ-EXIT (timeout, panic, passtd died)
    passtd_output: str
    qemu_stderr: str
    seconds: float
    timed_out: bool

    def lines(self, prefix: str) -> list[str]:
        """Console lines starting with `prefix` (the guest script's own markers)."""
        return [line for line in self.console_output.splitlines() if line.startswith(prefix)]

    def value(self, prefix: str) -> str:
        """The rest of the single line starting with `prefix`; fails loudly if it is missing or repeated."""
        found = self.lines(prefix)
        assert len(found) == 1, f"expected one {prefix!r} line, got {found}\n{self.describe()}"
        return found[0][len(prefix) :].strip()

    @property
    def lease(self) -> dict[str, str]:
        """The DHCP lease as the guest's udhcpc event script saw it (ip, mask, router, dns, mtu, ...)."""
        found = self.lines(LEASE_MARKER)
        if not found:
            return {}
        return dict(kv.split("=", 1) for kv in found[-1].split()[1:] if "=" in kv)

    @property
    def boot_seconds(self) -> float | None:
        """Guest uptime when DHCP was done and the test script started."""
        m = _UPTIME_RE.search(self.console_output)
        return float(m.group(1)) if m else None

    def describe(self) -> str:
        return (
            f"exit_code={self.exit_code} timed_out={self.timed_out} seconds={self.seconds:.1f}\n"
            f"--- console ---\n{self.console_output}\n--- passtd ---\n{self.passtd_output}\n"
            f"--- qemu stderr ---\n{self.qemu_stderr}"
        )

    def check(self) -> GuestResult:
        """Assert that the guest script exited 0, with the whole story in the message when it did not."""
        assert self.exit_code == 0, self.describe()
        return self


def _kill_group(proc: subprocess.Popen[bytes], sig: int = signal.SIGKILL) -> None:
    """Signal a process we started in its own session, and whatever it forked (socat fork, shells)."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


def _stop(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; always reaps."""
    if proc.poll() is None:
        _kill_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
            return
        except subprocess.TimeoutExpired:
            pass
    _kill_group(proc)
    proc.wait(5)


def _sh(*argv: str, ns: str | None = None) -> None:
    full = ["ip", "netns", "exec", ns, *argv] if ns else list(argv)
    proc = subprocess.run(full, capture_output=True, text=True, timeout=30, check=False)
    if proc.returncode != 0:
        raise AssertionError(f"{full} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")


@dataclass
class GuestNet:
    """A namespace for passtd and host-side services, and a way to boot a guest against it."""

    name: str
    image: GuestImage
    logs: Path  # kept by pytest for post-mortems
    sockets: Path  # short path: sun_path holds 108 bytes
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    runs: int = 0

    def popen(
        self, argv: Sequence[str], log: Path, stdin: int | None = subprocess.DEVNULL
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside the namespace, in its own session (so its group can be killed), tracked."""
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.name, *argv],
                stdin=stdin,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        return proc

    def spawn(self, *argv: str) -> subprocess.Popen[bytes]:
        """A host-side service in the namespace (say `socat TCP-LISTEN:...`), killed at teardown."""
        return self.popen(argv, self.logs / f"spawn-{len(self.procs)}-{Path(argv[0]).name}.log")

    def run_guest(
        self,
        script: str,
        passtd_args: Sequence[str] = DEFAULT_PASSTD_ARGS,
        timeout: float = DEFAULT_TIMEOUT,
        files: Mapping[str, bytes | str] | None = None,
        vhost_user: bool = False,
        server: tuple[subprocess.Popen[bytes], Path, Path] | None = None,
    ) -> GuestResult:
        """Start a one-off passtd, boot the guest with `script` as /test/run.sh, return its console.

        `timeout` bounds the whole run (passtd start, boot, script); past it qemu and passtd are killed and
        the result says `timed_out`. passtd gets `-f -s SOCK --one-off` before `passtd_args`. With
        `vhost_user`, the guest's NIC is a vhost-user device and passtd gets `--vhost-user`.
        `server` (process, socket, log): boot against a server the test started and keeps running.
        """
        self.runs += 1
        tag = f"run{self.runs}"
        started = time.monotonic()
        deadline = started + timeout
        sock = self.sockets / f"{tag}.sock"
        initrd = write_initrd(self.image, self.sockets / f"{tag}.initrd", script, files)
        passtd_log, console, qemu_err = (
            self.logs / f"{tag}-{n}" for n in ("passtd.log", "console.log", "qemu.err")
        )
        if server is not None:  # a server the test keeps running across guests
            passtd, sock, passtd_log = server
        else:
            served = ["-m", "passtd", "passt", "-f", "-s", str(sock), "--one-off"]
            if vhost_user:
                served.append("--vhost-user")
            passtd = self.popen([sys.executable, *served, *passtd_args], passtd_log)  # fmt: skip
        qemu: subprocess.Popen[bytes] | None = None
        timed_out = False
        try:
            while not sock.exists():
                if passtd.poll() is not None:
                    raise AssertionError(f"passtd exited with {passtd.returncode}:\n{passtd_log.read_text()}")
                if time.monotonic() > min(deadline, started + SOCKET_WAIT):
                    raise AssertionError(f"passtd did not create {sock}:\n{passtd_log.read_text()}")
                time.sleep(0.05)
            with open(console, "wb") as out, open(qemu_err, "wb") as err:
                qemu = subprocess.Popen(
                    ["ip", "netns", "exec", self.name, *qemu_argv(self.image, initrd, sock, vhost_user)],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                )
            self.procs.append(qemu)
            try:
                qemu.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(qemu)
                qemu.wait(5)
            try:  # --one-off: passtd leaves when qemu's connection closes
                if server is None:
                    passtd.wait(
                        min(PASSTD_EXIT_WAIT, max(0.1, deadline + PASSTD_EXIT_WAIT - time.monotonic()))
                    )
            except subprocess.TimeoutExpired:
                _stop(passtd, 2)
        finally:
            if qemu is not None and qemu.poll() is None:
                _kill_group(qemu)
                qemu.wait(5)
            if server is None and passtd.poll() is None:
                _stop(passtd, 2)
            initrd.unlink(missing_ok=True)
        text = _ESCAPES.sub("", console.read_bytes().decode(errors="replace")).replace("\r", "")
        codes = _EXIT_RE.findall(text)
        result = GuestResult(
            console_output=text,
            exit_code=int(codes[-1]) if codes else None,
            passtd_output=passtd_log.read_text(errors="replace"),
            qemu_stderr=qemu_err.read_text(errors="replace"),
            seconds=time.monotonic() - started,
            timed_out=timed_out,
        )
        TIMINGS["run"].append(result.seconds)
        if result.boot_seconds is not None:
            TIMINGS["boot"].append(result.boot_seconds)
        return result

    def close(self) -> None:
        for proc in reversed(self.procs):
            _kill_group(proc)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


def qemu_argv(image: GuestImage, initrd: Path, sock: Path, vhost_user: bool = False) -> list[str]:
    """TCG (the nested KVM here is unusable), no default devices, serial console on stdout, exit on reboot.
    vhost-user shares the guest's memory with the back-end: it must be a shared memfd (qemu >= 10 here: 7.2
    segfaults on vhost-user under TCG)."""
    bios = ["-bios", str(QBOOT)] if QBOOT.is_file() else []
    netdev = (
        ["-object", f"memory-backend-memfd,id=mem0,size={GUEST_MEM_MB}M,share=on",
         "-machine", "memory-backend=mem0",
         "-chardev", f"socket,id=c0,path={sock}", "-netdev", "vhost-user,id=n0,chardev=c0"]
        if vhost_user
        else ["-netdev", f"stream,id=n0,server=off,addr.type=unix,addr.path={sock}"]
    )  # fmt: skip
    return [
        QEMU, *bios,
        "-accel", "tcg", "-cpu", "max", "-m", str(GUEST_MEM_MB),
        "-nographic", "-nodefaults", "-serial", "stdio", "-no-reboot",
        "-kernel", str(image.kernel), "-initrd", str(initrd),
        "-append", "console=ttyS0 quiet panic=-1",
        *netdev,
        "-device", "virtio-net-pci,netdev=n0,romfile=",
    ]  # fmt: skip


def _prerequisites() -> str | None:
    """Why this machine cannot run guests, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool, package in ((QEMU, "qemu-system-x86"), ("ip", "iproute2"), ("busybox", "busybox-static")):
        if shutil.which(tool) is None:
            return f"needs {tool} (Debian package {package})"
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        return "needs apt-get and dpkg-deb to fetch the guest kernel"
    return None


@pytest.fixture(scope="session")
def qemu_image() -> GuestImage:
    reason = _prerequisites()
    if reason is not None:
        pytest.skip(reason)
    try:
        image = ensure_image()
    except ImageError as e:
        pytest.fail(f"cannot build the qemu guest image: {e}")
    if image.build_seconds is not None:
        TIMINGS["build"].append(image.build_seconds)
    return image


@pytest.fixture
def guest_net(qemu_image: GuestImage, tmp_path: Path) -> Iterator[GuestNet]:
    name = f"pdq-{secrets.token_hex(4)}"
    sockets = Path(tempfile.mkdtemp(prefix="pdq-"))
    net = GuestNet(name, qemu_image, tmp_path, sockets)
    created = False
    try:
        _sh("ip", "netns", "add", name)
        created = True
        _sh("ip", "-n", name, "link", "set", "lo", "up")
        _sh(
            "sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647", ns=name
        )  # ICMP and ICMPv6 ping sockets
        yield net
    finally:
        net.close()
        if created:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10, check=False)
        shutil.rmtree(sockets, ignore_errors=True)


@pytest.fixture
def run_guest(guest_net: GuestNet) -> Callable[..., GuestResult]:
    """`run_guest(script, passtd_args=DEFAULT_PASSTD_ARGS, timeout=30, files=None) -> GuestResult`."""
    return guest_net.run_guest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """One line of qemu timings, so regressions in boot time are visible without digging."""
    runs, boots, builds = TIMINGS["run"], TIMINGS["boot"], TIMINGS["build"]
    if not runs:
        return
    built = f"image built in {builds[0]:.1f}s" if builds else "image from cache"
    boot = f", guest ready after {sum(boots) / len(boots):.2f}s uptime (mean)" if boots else ""
    terminalreporter.write_line(
        f"qemu: {built}; {len(runs)} guest runs, {sum(runs):.1f}s total, {max(runs):.1f}s slowest{boot}"
    )
