"""Pasta's integrators, with their exact command lines (shared/INTEGRATORS.md) against the `pasta` alias.

- Podman: `--netns PATH` of a namespace it created; pasta forks once ready (the starter's exit), a published
  port carries a connection, and pasta exits when the namespace at PATH is deleted.
- RootlessKit: `--userns=/proc/PID/ns/user --netns=/proc/PID/ns/net` (or a bare PID) of a process that
  unshared a user and a network namespace; pasta joins both, creates and configures the tap, and exits when
  that process does.
- KubeVirt's passtBinding: passt as uid 107 in the pod's namespace with `--vhost-user --one-off` and
  `--tcp-ports all --udp-ports all`, under the machine's descriptor limit.

Everything runs in the namespaces of the `topo` fixture (documentation addresses for the guest side).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.conftest import REMOTE4, Topology, ip_json, sh, wait_for
from tests.test_integrators import REPO, SITE, vhost_arp_exchange

TIMEOUT = 30


def pasta_alias(*args: str) -> list[str]:
    code = "import sys; from passtd.compat import pasta_main as m; sys.exit(m())"
    return [sys.executable, "-c", code, *args]


class Daemons:
    """Finds the detached pasta processes a test started by a marker in their environment, and ends them."""

    def __init__(self, tmp: Path) -> None:
        self.mark = f"PASSTD_TEST_MARK={secrets.token_hex(8)}"
        self.env = dict(os.environ, XDG_RUNTIME_DIR=str(tmp), PASSTD_TEST_MARK=self.mark.split("=", 1)[1])

    def pids(self) -> list[int]:
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                environ = Path(f"/proc/{entry}/environ").read_bytes()
            except OSError:
                continue
            if self.mark.encode() in environ.split(b"\0"):
                found.append(int(entry))
        return found

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Daemons]:
    d = Daemons(tmp_path)
    try:
        yield d
    finally:
        d.kill_all()


def start(topo: Topology, daemons: Daemons, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the pasta line in the host namespace and wait for the starter, as Podman and RootlessKit do."""
    return subprocess.run(
        ["ip", "netns", "exec", topo.host, *pasta_alias(*args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=daemons.env,
        check=False,
    )


def addresses(ns_args: list[str], ifname: str) -> list[str]:
    cmd = [*ns_args, "ip", "-j", "addr", "show", "dev", ifname]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT, check=True).stdout
    return [a["local"] for link in json.loads(out or "[]") for a in link.get("addr_info", [])]


# --------------------------------------------------------------------------- Podman


def test_podman_pasta_line(topo: Topology, daemons: Daemons) -> None:
    port_host, port_ns = 40000 + secrets.randbelow(10000), 8080
    proc = start(
        topo,
        daemons,
        "--config-net",
        "-t",
        f"{port_host}:{port_ns}",
        "--dns-forward",
        "169.254.1.1",
        "-T",
        "none",
        "-U",
        "none",
        "--no-map-gw",
        "--quiet",
        "--netns",
        f"/run/netns/{topo.guest}",
        "--map-guest-addr",
        "169.254.1.2",
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr  # forked once ready
    (pid,) = daemons.pids()
    links = {link["ifname"]: link for link in ip_json(topo.guest, "link", "show")}
    assert "UP" in links[topo.veth]["flags"]  # pasta names the tap after the host's template interface
    server = subprocess.Popen(
        [
            "ip",
            "netns",
            "exec",
            topo.guest,
            "socat",
            "-T5",
            f"TCP4-LISTEN:{port_ns},reuseaddr",
            "SYSTEM:echo published",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:

        def reply() -> str:
            out = sh("socat", "-T5", "-", f"TCP4:127.0.0.1:{port_host}", ns=topo.host, check=False)
            return out.stdout.strip()

        assert wait_for(reply, 10, "a connection through the published port") == "published"
    finally:
        server.kill()
        server.wait(5)
    sh("ip", "netns", "del", topo.guest)  # podman's teardown: pasta follows the namespace
    wait_for(lambda: not daemons.pids(), 10, "pasta to exit after its namespace was deleted")
    assert pid not in daemons.pids()


def test_podman_no_netns_quit_keeps_running(topo: Topology, daemons: Daemons) -> None:
    proc = start(
        topo,
        daemons,
        "--config-net",
        "-t",
        "none",
        "-u",
        "none",
        "-T",
        "none",
        "-U",
        "none",
        "--quiet",
        "--no-netns-quit",
        "--netns",
        f"/run/netns/{topo.guest}",
    )
    assert proc.returncode == 0, proc.stderr
    (pid,) = daemons.pids()
    sh("ip", "netns", "del", topo.guest)
    time.sleep(1.5)  # three times the namespace poll interval
    assert daemons.pids() == [pid]


def test_podman_retry_wording(topo: Topology, daemons: Daemons) -> None:
    """What Podman greps for before retrying without an option an older pasta lacks."""
    proc = start(topo, daemons, "--config-net", "--map-guest-adr", "169.254.1.2", "--netns", "x")
    assert proc.returncode == 2
    assert proc.stderr == "passtd: error: unrecognized option '--map-guest-adr'\n"
    assert daemons.pids() == []


# --------------------------------------------------------------------------- RootlessKit


@pytest.mark.parametrize("form", ["userns-netns", "pid"])
def test_rootlesskit_pasta_line(topo: Topology, daemons: Daemons, form: str) -> None:
    child = subprocess.Popen(
        ["ip", "netns", "exec", topo.host, "unshare", "--user", "--map-root-user", "--net", "sleep", "60"]
    )
    try:
        pid = child.pid  # unshare execs sleep: same process

        def unshared() -> bool:
            try:
                return os.stat(f"/proc/{pid}/ns/user").st_ino != os.stat("/proc/self/ns/user").st_ino
            except OSError:
                return False

        wait_for(unshared, 10, "the child's user namespace")
        target = (
            [f"--userns=/proc/{pid}/ns/user", f"--netns=/proc/{pid}/ns/net"]
            if form == "userns-netns"
            else [str(pid)]
        )
        proc = start(
            topo,
            daemons,
            "--stderr",
            "--ns-ifname=tap0",
            "--mtu=65520",
            "--config-net",
            "--address=192.0.2.100",
            "--netmask=24",
            "--gateway=192.0.2.2",
            "--dns-forward=192.0.2.3",
            "--no-map-gw",
            "--ipv4-only",
            "--tcp-ports=none",
            "--udp-ports=none",
            *target,
        )
        assert proc.returncode == 0, proc.stderr
        (daemon,) = daemons.pids()
        inside = ["nsenter", "-t", str(pid), "-n"]
        assert "192.0.2.100" in addresses(inside, "tap0")
        subprocess.run(
            [*inside, "ping", "-c1", "-W1", "192.0.2.2"], capture_output=True, timeout=TIMEOUT, check=False
        )
        neigh = subprocess.run(
            [*inside, "ip", "neigh", "show", "192.0.2.2"],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=True,
        ).stdout
        assert "9a:55:9a:55:9a:55" in neigh  # pasta answered the guest's ARP for its gateway
        child.kill()
        child.wait(5)
        wait_for(lambda: daemon not in daemons.pids(), 10, "pasta to exit with its target process")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(5)


# --------------------------------------------------------------------------- KubeVirt

QEMU_UID = 107  # the pod's user in KubeVirt's virt-launcher


def listening(ns: str, flag: str) -> set[int]:
    """Ports with a listening socket in `ns` (`flag`: -t or -u)."""
    out = sh("ss", "-Hln", flag, ns=ns).stdout
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in out.splitlines() if line.split()}


def test_kubevirt_passt_binding_line(topo: Topology, daemons: Daemons) -> None:
    """virt-launcher's line (shared/INTEGRATORS.md), as uid 107 with the pod's two sysctls: every port is
    forwarded, TCP and UDP alike, even where the hard descriptor limit cannot hold them all (the room is
    shared fairly, low ports first); the guest NIC answers through the vhost-user rings, and --one-off ends
    passt when qemu closes the socket. The interface is the namespace's veth, the pod's eth0."""
    if shutil.which("setpriv") is None or not os.access("/usr/bin/python3", os.X_OK):
        pytest.skip("needs setpriv and Debian's python3")
    sh("sysctl", "-qw", "net.ipv4.ip_unprivileged_port_start=0", ns=topo.host)
    sh("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647", ns=topo.host)
    run = Path(tempfile.mkdtemp(prefix="passtd-kubevirt-"))  # pytest's tmp dirs are private to root
    try:
        run.chmod(0o755)
        os.chown(run, QEMU_UID, QEMU_UID)
        sock, pid_file, log = run / "default-net.socket", run / "default-net.pid", run / "passt.log"
        env = dict(daemons.env, PATH="/usr/bin:/bin", PYTHONPATH=f"{REPO}:{SITE}", PASSTD_NATIVE="0",
                   HOME=str(run), XDG_RUNTIME_DIR=str(run))  # fmt: skip
        code = "import sys; from passtd.compat import passt_main as m; sys.exit(m())"
        argv = ["ip", "netns", "exec", topo.host, "setpriv", f"--reuid={QEMU_UID}", f"--regid={QEMU_UID}",
                "--clear-groups", "/usr/bin/python3", "-c", code,
                "--vhost-user", "--one-off", "--socket", str(sock), "--pid", str(pid_file),
                "--interface", topo.veth, "--log-file", str(log),
                "--tcp-ports", "all", "--udp-ports", "all"]  # fmt: skip
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, env=env, cwd="/",
                              check=False)  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        pid = int(pid_file.read_text())
        assert os.stat(f"/proc/{pid}").st_uid == QEMU_UID
        wanted_tcp, wanted_udp = {1, 22, 80, 443}, {1, 53, 123}

        def low_ports_listen() -> bool:
            return wanted_tcp <= listening(topo.host, "-t") and wanted_udp <= listening(topo.host, "-u")

        wait_for(low_ports_listen, TIMEOUT, "listeners for the low TCP and UDP ports")
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            client.connect(str(sock))
            vhost_arp_exchange(client, REMOTE4)  # the guest's gateway is the pod's default router
        finally:
            client.close()
        wait_for(lambda: pid not in daemons.pids(), TIMEOUT, "passt to exit after qemu closed (--one-off)")
        assert log.read_text().strip(), "nothing in --log-file"
    finally:
        shutil.rmtree(run, ignore_errors=True)
