"""The table and JSON renderers on fixed inputs, compared as exact text."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import pytest

from passtctl.render import (
    format_bytes,
    format_duration,
    format_seconds,
    render_columns,
    render_connections,
    render_event,
    render_json,
    render_json_line,
    render_policy_change,
    render_port_policy,
    render_status_table,
    render_table,
    render_timeouts,
)
from passtd.control.api import ConnectionEventView
from passtd.control.convert import (
    connection_to_pb,
    event_to_pb,
    forward_table_to_pb,
    policy_change_to_pb,
    status_to_pb,
    timeouts_to_pb,
)
from passtd.control.pb import passt_pb2
from tests.control.samples import (
    BARE,
    CONN_ICMP,
    CONN_TCP,
    CONN_UDP,
    CONNECTIONS,
    SAMPLE,
    T0,
    TIMEOUTS,
    FakeControlAPI,
)

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
  tcp                3 (ESTABLISHED 2, FIN_WAIT_1 1)
  udp                2 (ACTIVE 2)
flows by protocol    tcp 3/2048, udp 2/1024
learned addresses    2 of 64 max
pending SYNs         0 of 512 max
watch streams        1 of 32 max
control calls        1 of 128 max
descriptors          40 open, 256 reserved, limit 1048576
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


def test_json_is_in_proto_order_with_numbers_and_words() -> None:
    status = status_to_pb(SAMPLE)
    text = render_json(status)
    assert text.endswith("}\n")
    data = json.loads(text)
    assert list(data) == [f.name for f in passt_pb2.Status.DESCRIPTOR.fields]
    assert list(data["config"]) == [f.name for f in passt_pb2.Config.DESCRIPTOR.fields]
    assert data["mode"] == "passt"  # the word the options take, not MODE_PASST
    assert data["counters"]["bytes_from_guest"] == 1572864  # a number, not the proto3 mapping's string
    assert list(data["counters"]["dropped"]) == ["arp.truncated", "ipv4.bad_checksum"]
    assert data["flows"] == {"tcp": 3, "udp": 2}
    # Every state word is what `--state` takes; the numbers are exact integers however large.
    assert data["flow_states"]["tcp"]["states"] == {"established": 2, "fin_wait_1": 1}
    big = passt_pb2.Counters(bytes_from_guest=2**64 - 1)
    assert json.loads(render_json(big))["bytes_from_guest"] == 2**64 - 1


def test_json_prints_default_fields() -> None:
    data = json.loads(render_json(status_to_pb(BARE)))
    assert data["backend"]["guest_connected"] is False
    assert data["backend"]["guest_addresses"] == []
    assert data["config"]["ipv6_address"] == ""
    assert data["counters"]["dropped"] == {}
    assert data["flows"] == {}


# -- connections, events, port policy, timeouts ------------------------------------------------------------

CONNS_TABLE = """\
ID  PROTO  STATE        DIR  GUEST             REMOTE               FROM GUEST  TO GUEST    AGE  IDLE
 7  tcp    ESTABLISHED  out  10.0.2.15:45678   10.0.2.2:5001           4.0 KiB   1.5 MiB  2m 5s    2s
 9  udp    ACTIVE       in   [2001:db8::2]:53  [2001:db8::1]:40000       100 B      50 B    10s   10s
12  icmp   ACTIVE       out  10.0.2.15 id 3    192.0.2.1                   0 B       0 B     0s    0s
"""
CONNS_WIDE_FIRST_ROWS = (
    "ID  PROTO  STATE        DIR  GUEST             REMOTE               FROM GUEST  TO GUEST    AGE  IDLE"
    "  LOCAL            PKTS IN  PKTS OUT      RTT  RETRANS    WINDOW    MSS\n"
    " 7  tcp    ESTABLISHED  out  10.0.2.15:45678   10.0.2.2:5001           4.0 KiB   1.5 MiB  2m 5s    2s"
    "  127.0.0.1:39000        5        30  0.04 ms        3  64.0 KiB  65480\n"
    " 9  udp    ACTIVE       in   [2001:db8::2]:53  [2001:db8::1]:40000       100 B      50 B    10s   10s"
    "  [::]:5353              1         1        -        -         -      -\n"
)


def _conns() -> list[passt_pb2.Connection]:
    return [connection_to_pb(c) for c in CONNECTIONS]


def test_connections_table() -> None:
    assert render_connections(_conns(), T0) == CONNS_TABLE


def test_connections_wide() -> None:
    assert render_connections(_conns(), T0, wide=True).startswith(CONNS_WIDE_FIRST_ROWS)


def test_connections_empty_is_just_the_header() -> None:
    assert render_connections([], T0) == (
        "ID  PROTO  STATE  DIR  GUEST  REMOTE  FROM GUEST  TO GUEST  AGE  IDLE\n"
    )


def test_render_columns_right_alignment() -> None:
    assert (
        render_columns(("A", "N"), [("x", "1"), ("yy", "100")], right=(1,)) == "A     N\nx     1\nyy  100\n"
    )


def test_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    try:
        closed = ConnectionEventView(kind="closed", time=T0 + 0.25, connection=CONN_TCP, reason="fin")
        assert render_event(event_to_pb(dataclasses.replace(closed, dropped_before=2))) == (
            "(missed 2 events)\n"
            "22:13:20.250 closed   7 tcp ESTABLISHED 10.0.2.15:45678 -> 10.0.2.2:5001 reason fin "
            "from guest 4.0 KiB, to guest 1.5 MiB\n"
        )
        opened = ConnectionEventView(kind="opened", time=T0, connection=CONN_UDP)
        assert render_event(event_to_pb(opened)) == (
            "22:13:20.000 opened   9 udp ACTIVE [2001:db8::2]:53 <- [2001:db8::1]:40000\n"
        )
    finally:
        monkeypatch.undo()
        time.tzset()


def test_event_json_line() -> None:
    event = event_to_pb(ConnectionEventView(kind="opened", time=T0, connection=CONN_ICMP))
    text = render_json_line(event)
    assert text.count("\n") == 1 and text.endswith("}\n")
    data = json.loads(text)
    assert (data["kind"], data["connection"]["id"], data["connection"]["protocol"]) == (
        "opened", 12, "icmp"
    )  # fmt: skip


def test_port_policy_and_change() -> None:
    api = FakeControlAPI()
    tables = passt_pb2.PortPolicy(tables=[forward_table_to_pb(t) for t in api.tables.values()])
    assert render_port_policy(tables) == (
        "DIRECTION  OPTION  SPEC\n"
        "tcp_in     -t      22,80:8080\n"
        "udp_in     -u      none\n"
        "tcp_out    -T      none\n"
        "udp_out    -U      none\n"
    )
    change = policy_change_to_pb(asyncio.run(api.change_forward("add", "tcp_in", "8080")))
    assert render_policy_change(change) == (
        "tcp_in (-t): 22,80:8080 -> 8080\n"
        "  ok                  tcp 0.0.0.0:8080: listening\n"
        "  FAILED  EADDRINUSE  tcp [::]:8080: Address already in use (another socket is bound to it)\n"
    )


def test_timeouts_table() -> None:
    assert render_timeouts(timeouts_to_pb(TIMEOUTS)) == (
        "tcp_syn              240 s\n"
        "tcp_fin              240 s\n"
        "tcp_activity         7200 s\n"
        "tcp_ack_interval     20 ms\n"
        "tcp_rto_initial      1 s\n"
        "tcp_rto_min          200 ms\n"
        "tcp_rto_max          60 s\n"
        "tcp_max_retransmits  12\n"
        "udp_idle             180 s\n"
        "icmp_idle            60 s\n"
    )


@pytest.mark.parametrize(
    ("seconds", "text"), [(0, "0 s"), (0.02, "20 ms"), (0.0015, "1.5 ms"), (1, "1 s"), (2.5, "2.5 s")]
)
def test_format_seconds(seconds: float, text: str) -> None:
    assert format_seconds(seconds) == text


def test_port_policy_shows_what_auto_bound() -> None:
    tcp_in = passt_pb2.ForwardTable(
        direction=passt_pb2.FORWARD_DIRECTION_TCP_IN,
        spec="auto",
        mode="auto",
        auto_bound=[22, 8000, 8001, 8002],
    )
    udp_in = passt_pb2.ForwardTable(direction=passt_pb2.FORWARD_DIRECTION_UDP_IN, spec="auto", mode="auto")
    tcp_out = passt_pb2.ForwardTable(direction=passt_pb2.FORWARD_DIRECTION_TCP_OUT, spec="none", mode="none")
    policy = passt_pb2.PortPolicy(tables=[tcp_in, udp_in, tcp_out])
    assert render_port_policy(policy) == (
        "DIRECTION  OPTION  SPEC  BOUND\n"
        "tcp_in     -t      auto  22,8000-8002\n"
        "udp_in     -u      auto  -\n"
        "tcp_out    -T      none\n"
    )
    assert json.loads(render_json(policy))["tables"][0]["auto_bound"] == [22, 8000, 8001, 8002]


def test_forward_rules_with_ids_and_counters() -> None:
    from passtctl.render import render_forward_rules

    counters = passt_pb2.ForwardCounters(connections=3, bytes_in=2048, bytes_out=10)
    policy = passt_pb2.PortPolicy(
        tables=[
            passt_pb2.ForwardTable(
                direction=passt_pb2.FORWARD_DIRECTION_TCP_IN, spec="s", mode="spec",
                rules=[
                    passt_pb2.ForwardRule(first=80, last=80, target_first=8080, id=4, counters=counters),
                    passt_pb2.ForwardRule(bind_address="127.0.0.1", first=90, last=91, target_first=90,
                                          target_address="10.0.2.5", id=7),
                ],
            ),
            passt_pb2.ForwardTable(direction=passt_pb2.FORWARD_DIRECTION_UDP_OUT, spec="auto", mode="auto",
                                   rule_id=2, counters=passt_pb2.ForwardCounters(datagrams=5)),
        ]
    )  # fmt: skip
    rows = [line.split() for line in render_forward_rules(policy).splitlines()[1:]]
    assert render_forward_rules(policy).split()[:7] == [
        "ID",
        "DIRECTION",
        "RULE",
        "CONNS",
        "DGRAMS",
        "IN",
        "OUT",
    ]
    assert rows == [
        ["4", "tcp_in", "80:8080", "3", "0", "2.0", "KiB", "10", "B"],
        ["7", "tcp_in", "127.0.0.1/90-91:10.0.2.5/90-91", "0", "0", "0", "B", "0", "B"],
        ["2", "udp_out", "auto", "0", "5", "0", "B", "0", "B"],
    ]
    assert render_forward_rules(passt_pb2.PortPolicy()) == ""


def test_policy_change_dry_run_and_refused() -> None:
    table = passt_pb2.ForwardTable(direction=passt_pb2.FORWARD_DIRECTION_TCP_IN, spec="22")
    after = passt_pb2.ForwardTable(direction=passt_pb2.FORWARD_DIRECTION_TCP_IN, spec="22,80")
    dry = passt_pb2.PortPolicyChange(previous=table, current=after, dry_run=True, added_ids=[9])
    assert render_policy_change(dry) == (
        "dry run, nothing changed: tcp_in (-t): 22 -> 22,80\n  rule ids would be added: 9\n"
    )
    refused = passt_pb2.PortPolicyChange(previous=table, current=table, failure="tcp 0.0.0.0:80: x [EACCES]")
    assert render_policy_change(refused) == "tcp_in (-t): 22 (unchanged; the change was not applied)\n"
