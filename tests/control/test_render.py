"""The table and JSON renderers on fixed inputs, compared as exact text."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from passtctl.render import format_bytes, format_duration, render_json, render_status_table, render_table
from passtd.control.convert import status_to_pb
from passtd.control.pb import passt_pb2
from tests.control.samples import BARE, SAMPLE

SAMPLE_TABLE = """\
version              0.1.0
mode                 passt
uptime               1h 2m 3s
backend              unix-stream /run/passtd/passtd.socket
guest                connected
guest MAC            52:54:00:12:34:56
guest addresses      10.0.2.15, 2001:db8::2
IPv4                 10.0.2.15/24, gateway 10.0.2.2
IPv6                 2001:db8::2/64, gateway fe80::1, link-local fe80::9855:9aff:fe55:9a55
DNS                  10.0.2.3, 2001:db8::3
DNS search           example.com, lab.example
MTU                  65520
our MAC              9a:55:9a:55:9a:55
services             dhcp ndp ra icmp (off: dhcpv6 map-gateway)
from guest           1234 frames, 1.5 MiB
to guest             987 frames, 11.7 KiB
dropped              3 frames
  arp.truncated      1
  ipv4.bad_checksum  2
flows                5 of 4096 max
  tcp                3
  udp                2
"""

BARE_TABLE = """\
version          0.1.0
mode             pasta
uptime           0s
backend          tap tap0
guest            not connected
guest MAC        -
guest addresses  -
IPv4             192.0.2.10/24
IPv6             disabled
DNS              -
DNS search       -
MTU              1500
our MAC          9a:55:9a:55:9a:55
services         none
from guest       0 frames, 0 B
to guest         0 frames, 0 B
dropped          0 frames
flows            0 of 128 max
"""


def test_sample_table() -> None:
    assert render_status_table(status_to_pb(SAMPLE)) == SAMPLE_TABLE


def test_bare_table() -> None:
    assert render_status_table(status_to_pb(BARE)) == BARE_TABLE


def test_empty_status_does_not_crash() -> None:
    text = render_status_table(passt_pb2.Status())
    assert "mode             unknown (0)\n" in text
    assert "backend          -\n" in text


def test_all_services_on_lists_no_off_part() -> None:
    config = passt_pb2.Config(dhcp=True, dhcpv6=True, ndp=True, ra=True, icmp=True, map_gateway=True)
    text = render_status_table(passt_pb2.Status(config=config))
    assert "services         dhcp dhcpv6 ndp ra icmp map-gateway\n" in text


def test_render_table_alignment_and_no_trailing_space() -> None:
    assert render_table([("a", "1"), ("longer", ""), ("k", "v w")]) == "a       1\nlonger\nk       v w\n"
    assert render_table([]) == ""


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1048575, "1.0 MiB"),  # rounds up into the next unit rather than "1024.0 KiB"
        (1048576, "1.0 MiB"),
        (5 * 2**30, "5.0 GiB"),
        (3 * 2**40, "3.0 TiB"),
        (2**70, "1024.0 EiB"),  # the last unit absorbs everything beyond
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.9, "0s"),
        (-5, "0s"),
        (59, "59s"),
        (60, "1m 0s"),
        (3600, "1h 0m 0s"),
        (3723.75, "1h 2m 3s"),
        (86403, "1d 0h 0m 3s"),
        (90061, "1d 1h 1m 1s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_json_round_trips_and_is_in_proto_order() -> None:
    status = status_to_pb(SAMPLE)
    text = render_json(status)
    assert text.endswith("}\n")
    data = json.loads(text)
    assert list(data) == [f.name for f in passt_pb2.Status.DESCRIPTOR.fields]
    assert list(data["config"]) == [f.name for f in passt_pb2.Config.DESCRIPTOR.fields]
    assert data["mode"] == "MODE_PASST"
    assert data["counters"]["bytes_from_guest"] == "1572864"  # proto3 JSON: 64-bit integers are strings
    assert list(data["counters"]["dropped"]) == ["arp.truncated", "ipv4.bad_checksum"]
    assert data["flows"] == {"tcp": 3, "udp": 2}
    assert json_format.Parse(text, passt_pb2.Status()) == status


def test_json_prints_default_fields() -> None:
    data = json.loads(render_json(status_to_pb(BARE)))
    assert data["backend"]["guest_connected"] is False
    assert data["backend"]["guest_addresses"] == []
    assert data["config"]["ipv6_address"] == ""
    assert data["counters"]["dropped"] == {}
    assert data["flows"] == {}
