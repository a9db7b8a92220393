"""A real guest kernel on a vhost-user NIC (qemu 10, shared memfd memory) served by the dataplane with the
vhost-user back-end: DHCP, ping, TCP both ways with sha256-checked transfers, UDP. The guest's virtio-net
driver negotiates the offloads, so TCP super-segments and partial checksums cross the rings both ways.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from functools import partialmethod

import pytest

from tests.qemu import test_guest, test_guest_tcp
from tests.qemu.conftest import DEFAULT_PASSTD_ARGS, GATEWAY4, GUEST4, QEMU, SLAAC_PING6, GuestNet
from tests.qemu.image import DHCP_MARKER

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _qemu_major() -> int:
    try:
        out = subprocess.run(
            [QEMU, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return 0
    m = re.search(r"version (\d+)\.", out)
    return int(m.group(1)) if m else 0


needs_qemu10 = pytest.mark.skipif(
    _qemu_major() < 10,
    reason="qemu < 10 segfaults on vhost-user under TCG (make deb installs it from backports)",
)


@needs_qemu10
def test_dhcp_and_ping_over_vhost_user(guest_net: GuestNet) -> None:
    script = f"""
echo "ADDR=$(ip -4 -o addr show dev eth0 | awk '{{print $4}}')"
echo "OFFLOADS=$(cat /sys/class/net/eth0/features 2>/dev/null)"
ping -c 2 -W 5 {GATEWAY4} > /tmp/ping.out 2>&1
echo "PING_RC=$?"
cat /tmp/ping.out
"""
    result = guest_net.run_guest(script, vhost_user=True, timeout=60).check()
    assert result.value(DHCP_MARKER) == "ok", result.describe()
    assert result.value("ADDR=").startswith(f"{GUEST4}/"), result.describe()
    assert result.value("PING_RC=") == "0", result.describe()
    assert "ring_drops=0" in result.passtd_output, result.describe()  # no chain of a real driver was refused


@needs_qemu10
def test_tcp_both_ways_and_udp_over_vhost_user(guest_net: GuestNet) -> None:
    """4 MiB each way through the rings, checked by sha256 on both ends; then one UDP exchange."""
    guest_net.spawn(
        "socat",
        "-u",
        "TCP-LISTEN:5001,bind=127.0.0.1,reuseaddr",
        f"SYSTEM:sha256sum > {guest_net.sockets}/up.sum",
    )
    guest_net.spawn(
        "sh", "-c", f"head -c 4194304 /dev/urandom > {guest_net.sockets}/down.bin; "
        f"sha256sum < {guest_net.sockets}/down.bin > {guest_net.sockets}/down.sum; "
        f"exec socat -u OPEN:{guest_net.sockets}/down.bin TCP-LISTEN:5002,bind=127.0.0.1,reuseaddr",
    )  # fmt: skip
    guest_net.spawn("socat", "UDP-LISTEN:5003,bind=127.0.0.1,reuseaddr", "EXEC:cat")
    script = f"""
head -c 4194304 /dev/urandom > /tmp/up.bin
echo "UP_SUM=$(sha256sum < /tmp/up.bin | cut -d' ' -f1)"
socat -u OPEN:/tmp/up.bin TCP:{GATEWAY4}:5001
echo "UP_RC=$?"
socat -u TCP:{GATEWAY4}:5002 CREATE:/tmp/down.bin
echo "DOWN_RC=$?"
echo "DOWN_SUM=$(sha256sum < /tmp/down.bin | cut -d' ' -f1)"
echo "UDP=$(echo datagram | socat -t 2 - UDP:{GATEWAY4}:5003)"
"""
    result = guest_net.run_guest(script, vhost_user=True, timeout=90).check()
    assert result.value("UP_RC=") == "0" and result.value("DOWN_RC=") == "0", result.describe()
    up = (guest_net.sockets / "up.sum").read_text().split()[0]
    down = (guest_net.sockets / "down.sum").read_text().split()[0]
    assert result.value("UP_SUM=") == up, result.describe()
    assert result.value("DOWN_SUM=") == down, result.describe()
    assert result.value("UDP=") == "datagram", result.describe()
    assert "ring_drops=0" in result.passtd_output, result.describe()


@needs_qemu10
def test_qemu_restarted_while_the_backend_keeps_running(guest_net: GuestNet) -> None:
    """A second qemu connects to the same vhost-user socket after the first one quit: the listener accepts
    it, the device starts fresh, and the new guest gets its lease and reaches the host."""
    sock = guest_net.sockets / "kept.sock"
    log = guest_net.logs / "kept-server.log"
    proc = guest_net.popen(
        [
            sys.executable,
            "-m",
            "passtd",
            "passt",
            "-f",
            "-s",
            str(sock),
            "--vhost-user",
            *DEFAULT_PASSTD_ARGS,
        ],
        log,
    )
    script = f"""
ping -c 1 -W 5 {GATEWAY4} > /dev/null 2>&1
echo "PING_RC=$?"
"""
    for _ in range(2):
        result = guest_net.run_guest(script, vhost_user=True, timeout=60, server=(proc, sock, log)).check()
        assert result.value(DHCP_MARKER) == "ok", result.describe()
        assert result.value("PING_RC=") == "0", result.describe()
        assert proc.poll() is None, result.describe()
    assert log.read_text().count("ring_drops=0") == 2


@needs_qemu10
def test_ipv6_slaac_and_ping6_over_vhost_user(guest_net: GuestNet) -> None:
    """NDP (router advertisement, neighbour solicitation) and ICMPv6 echo through the rings."""
    script = SLAAC_PING6
    args = [*DEFAULT_PASSTD_ARGS, "-a", "fd00:2::15"]
    result = guest_net.run_guest(script, args, vhost_user=True, timeout=60).check()
    assert result.value("ADDR6=").startswith("fd00:2::"), result.describe()
    assert result.value("PING6_RC=") == "0", result.describe()
    assert "ring_drops=0" in result.passtd_output, result.describe()


class VhostUserGuestNet(GuestNet):
    """The same namespace and image; every guest boots on a vhost-user NIC."""

    run_guest = partialmethod(GuestNet.run_guest, vhost_user=True)


@pytest.fixture
def vhost_user_net(guest_net: GuestNet) -> GuestNet:
    guest_net.__class__ = VhostUserGuestNet
    return guest_net


# The stream back-end's guest checks, unchanged, over vhost-user: the DHCP lease (address, router, MTU, DNS),
# upload and download with the host's answer after the guest's half-close, a -t forwarded port both ways, UDP
# echo through the gateway.
STREAM_CHECKS: list[Callable[[GuestNet], None]] = [
    test_guest.test_dhcp_configures_address_router_mtu_and_dns,
    test_guest_tcp.test_guest_to_host_tcp_upload_and_download,
    test_guest_tcp.test_host_to_guest_through_forwarded_port,
    test_guest_tcp.test_udp_echo_through_the_gateway,
]


@needs_qemu10
@pytest.mark.parametrize("check", STREAM_CHECKS, ids=[c.__name__ for c in STREAM_CHECKS])
def test_stream_tier_checks_over_vhost_user(
    vhost_user_net: GuestNet, check: Callable[[GuestNet], None]
) -> None:
    check(vhost_user_net)
