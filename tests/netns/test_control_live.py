"""The gRPC control service of a live passtd, driven with passtctl."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from tests.netns.conftest import HOST4, Topology, sh, wait_for

pytestmark = pytest.mark.netns
PASSTCTL = [sys.executable, "-m", "passtctl"]


def passtctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*PASSTCTL, *args], capture_output=True, text=True, timeout=20, check=False)


def test_status_health_and_exclusive_socket(topo: Topology) -> None:
    ctl = str(topo.tmp / "ctl.sock")
    daemon = topo.passtd(
        "pasta", "-f", "-I", "eth0", "--netns", topo.guest, "--control", ctl, wait_tap="eth0"
    )
    wait_for(lambda: os.path.exists(ctl), 10, "control socket")
    assert stat.S_IMODE(os.stat(ctl).st_mode) == 0o600
    sh("ping", "-c", "1", "-W", "1", "10.77.0.2", ns=topo.guest, check=False)  # some guest traffic
    health = passtctl("-c", ctl, "health")
    assert health.returncode == 0 and "SERVING" in health.stdout
    out = passtctl("-c", ctl, "status", "-o", "json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["mode"] == "MODE_PASTA"
    assert status["backend"]["guest_connected"] is True
    assert status["config"]["ipv4_address"] == HOST4
    assert status["config"]["mtu"] == 65520
    assert int(status["counters"]["frames_from_guest"]) > 0
    # A second passtd on the same control path refuses to start and the first keeps serving.
    second = subprocess.run(
        ["ip", "netns", "exec", topo.host, sys.executable, "-m", "passtd", "passt", "-f",
         "-s", str(topo.tmp / "other.sock"), "--control", ctl],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert second.returncode == 1
    assert "in use" in second.stderr or "listening" in second.stderr, second.stderr
    assert passtctl("-c", ctl, "health").returncode == 0
    assert daemon.stop() == 0
    assert not os.path.exists(ctl)
