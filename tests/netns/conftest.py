"""Real-namespace fixtures: a host namespace where passtd runs, a remote host behind a veth pair, a guest.

The topology itself (tests/helpers/topology.py) is shared with bench/run.py. Nothing here touches the
machine's own network, and everything is torn down in `finally`, also when a test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.topology import (  # noqa: F401 - the tests import the addresses from here
    FAR4,
    FAR6,
    HOST4,
    HOST6,
    HOST_DNS,
    HOST_SEARCH,
    REMOTE4,
    REMOTE6,
    namespaces,
)

PASSTD = [sys.executable, "-m", "passtd"]
OUR_LL = "fe80::9855:9aff:fe55:9a55"


def sh(
    *cmd: str, timeout: float = 30, check: bool = True, ns: str | None = None
) -> subprocess.CompletedProcess[str]:
    argv = ["ip", "netns", "exec", ns, *cmd] if ns else list(cmd)
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc


def ip_json(ns: str, *args: str) -> Any:
    return json.loads(sh("ip", "-n", ns, "-j", *args).stdout or "[]")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def needs_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("needs /dev/net/tun")
    if shutil.which("ip") is None:
        pytest.skip("needs iproute2")


@dataclass
class Passtd:
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                raise AssertionError(f"passtd ignored SIGTERM for {timeout}s:\n{self.output()}") from None
        return self.proc.returncode


@dataclass
class Topology:
    tmp: Path
    host: str
    remote: str
    guest: str
    veth: str
    daemons: list[Passtd] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    def popen(self, *argv: str, ns: str | None = None) -> subprocess.Popen[str]:
        """Start a helper (inside `ns` when given) with its output piped; the fixture ends it by its own pid
        and closes its pipes, also when the test fails."""
        cmd = ["ip", "netns", "exec", ns, *argv] if ns is not None else list(argv)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    def passtd(self, *args: str, wait_tap: str | None = None) -> Passtd:
        """Start passtd inside the host namespace; wait until the guest's tap exists when asked."""
        log = self.tmp / f"passtd-{len(self.daemons)}.log"
        env = dict(os.environ, XDG_RUNTIME_DIR=str(self.tmp))  # default sockets go under the test's tmp dir
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.host, *PASSTD, *args], stdout=out, stderr=out, env=env
            )
        daemon = Passtd(proc, log)
        self.daemons.append(daemon)
        if wait_tap is not None:

            def tap_up() -> bool:
                if proc.poll() is not None:
                    raise AssertionError(f"passtd exited with {proc.returncode}:\n{daemon.output()}")
                links = ip_json(self.guest, "link", "show")
                return any(link["ifname"] == wait_tap and "UP" in link["flags"] for link in links)

            wait_for(tap_up, 15, f"tap {wait_tap} in {self.guest}")
        return daemon

    def wait_link_local(self, ifname: str) -> None:
        """IPv6 clients need a non-tentative link-local address first."""

        def ready() -> bool:
            for link in ip_json(self.guest, "-6", "addr", "show", "dev", ifname):
                for a in link.get("addr_info", []):
                    if a["local"].startswith("fe80") and not a.get("tentative"):
                        return True
            return False

        wait_for(ready, 10, "link-local address")

    def dhclient(self, ifname: str, *args: str) -> str:
        """Run ISC dhclient once in the guest (`-1`: one attempt, then exit) and return its lease file.

        dhclient forks a daemon after binding, so its pid file is read back and the pid handed to the
        fixture's clean-up; every call gets lease and pid files of its own.
        """
        n = sum(1 for _ in self.tmp.glob("dhclient-*.lease"))
        lease, pidfile = self.tmp / f"dhclient-{n}.lease", self.tmp / f"dhclient-{n}.pid"
        try:
            proc = sh(
                "dhclient",
                "-1",
                "-v",
                "-lf",
                str(lease),
                "-pf",
                str(pidfile),
                *args,
                ifname,
                ns=self.guest,
                timeout=40,
            )
        finally:
            if pidfile.exists() and pidfile.read_text().strip():
                self.pids.append(int(pidfile.read_text().split()[0]))
        text = lease.read_text() if lease.exists() else ""
        assert "bound to" in proc.stderr.lower() or text, proc.stderr
        return text


@pytest.fixture
def topo(tmp_path: Path) -> Iterator[Topology]:
    needs_root()
    with namespaces("pd") as names:
        t = Topology(tmp_path, names.host, names.remote, names.guest, names.veth)
        try:
            sh("sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647", ns=t.host)
            yield t
        finally:
            for daemon in t.daemons:
                if daemon.proc.poll() is None:
                    daemon.proc.terminate()  # graceful first: it removes its sockets
                    try:
                        daemon.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        daemon.proc.kill()
                        daemon.proc.wait(5)
            for proc in t.procs:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate(timeout=10)
            for pid in t.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
