"""A real kernel's DHCP client, IPv6 autoconfiguration and ping against passtd in passt mode.

Each test boots one guest (about 3 s under TCG). The guest script prints `KEY=value` lines that the test
reads back; the guest's /init has already run udhcpc, whose lease line is in `result.lease`.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.qemu.conftest import DEFAULT_PASSTD_ARGS, DNS4, GATEWAY4, GUEST4, PREFIX4, SLAAC_PING6, GuestNet
from tests.qemu.image import DHCP_MARKER

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

GUEST_MAC = "52:54:00:12:34:56"  # qemu's default for the first NIC
GUEST6 = "fd00:2::15"

SHOW_CONFIG = """
echo "ADDR=$(ip -4 -o addr show dev eth0 | awk '{print $4}')"
echo "MTU=$(cat /sys/class/net/eth0/mtu)"
echo "ROUTE=$(ip -4 route show default)"
echo "RESOLV=$(grep nameserver /etc/resolv.conf)"
"""


def test_dhcp_configures_address_router_mtu_and_dns(guest_net: GuestNet) -> None:
    result = guest_net.run_guest(SHOW_CONFIG).check()
    assert result.value(DHCP_MARKER) == "ok", result.describe()
    assert result.value("ADDR=") == f"{GUEST4}/{PREFIX4}"
    assert result.value("MTU=") == "65520"
    assert result.value("ROUTE=").split()[:5] == ["default", "via", GATEWAY4, "dev", "eth0"]
    assert result.value("RESOLV=") == f"nameserver {DNS4}"
    lease = result.lease
    assert (lease["ip"], lease["mask"], lease["router"], lease["dns"], lease["mtu"]) == (
        GUEST4,
        str(PREFIX4),
        GATEWAY4,
        DNS4,
        "65520",
    )


def test_dhcp_mtu_follows_passtd_option(guest_net: GuestNet) -> None:
    result = guest_net.run_guest(SHOW_CONFIG, [*DEFAULT_PASSTD_ARGS, "-m", "1500"]).check()
    assert result.lease["mtu"] == "1500"
    assert result.value("MTU=") == "1500"


def test_ping_gateway_is_answered_by_host_loopback(guest_net: GuestNet) -> None:
    """Echo to the gateway goes out of a ping socket to the namespace's 127.0.0.1 and comes back."""
    script = f"""
ping -c 2 -W 5 {GATEWAY4} > /tmp/ping.out 2>&1
echo "PING_RC=$?"
cat /tmp/ping.out
echo "PING_STATS=$(grep 'packets transmitted' /tmp/ping.out)"
"""
    result = guest_net.run_guest(script).check()
    assert result.value("PING_RC=") == "0", result.describe()
    assert result.value("PING_STATS=").startswith("2 packets transmitted, 2 packets received")
    assert len([line for line in result.console_output.splitlines() if f"bytes from {GATEWAY4}" in line]) == 2


def test_ping_unreachable_address_gets_no_reply(guest_net: GuestNet) -> None:
    """An address the host namespace cannot reach stays silent: passtd does not invent echo replies."""
    script = """
ping -c 1 -W 1 10.0.2.99 > /tmp/ping.out 2>&1
echo "PING_RC=$?"
cat /tmp/ping.out
"""
    result = guest_net.run_guest(script).check()
    assert result.value("PING_RC=") != "0", result.describe()
    assert "bytes from" not in result.console_output


def test_ipv6_slaac_address_and_ping_gateway(guest_net: GuestNet) -> None:
    """A router advertisement gives the guest a SLAAC address in passtd's prefix and a default route."""
    script = SLAAC_PING6
    result = guest_net.run_guest(script, [*DEFAULT_PASSTD_ARGS, "-a", GUEST6], timeout=45).check()
    addr = ipaddress.IPv6Interface(result.value("ADDR6="))
    assert addr.network == ipaddress.IPv6Network("fd00:2::/64"), result.describe()
    # RFC 4862 + RFC 4291 appendix A: modified EUI-64 from the MAC (U/L bit flipped, ff:fe inserted).
    mac = bytes.fromhex(GUEST_MAC.replace(":", ""))
    iid = bytes([mac[0] ^ 2, *mac[1:3], 0xFF, 0xFE, *mac[3:]])
    assert addr.ip.packed[8:] == iid
    assert ipaddress.IPv6Address(result.value("GW6=")).is_link_local
    assert result.value("PING6_RC=") == "0", result.describe()
