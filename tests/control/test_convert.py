"""StatusView -> passt_pb2.Status, without gRPC."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from passtd.control.api import (
    BackendView,
    ConfigView,
    CountersView,
    DescriptorsView,
    LimitsView,
    LimitView,
    RateLimitsView,
    RateLimitView,
    StatusView,
)
from passtd.control.convert import status_to_pb
from passtd.control.pb import passt_pb2
from tests.control.samples import BARE, SAMPLE


def test_sample_field_by_field() -> None:
    pb = status_to_pb(SAMPLE)
    assert pb.version == "0.1.0"
    assert pb.mode == passt_pb2.MODE_PASST
    assert pb.uptime_seconds == 3723.75
    assert pb.backend.kind == "unix-stream"
    assert pb.backend.path == "/run/passtd/passtd.socket"
    assert pb.backend.ifname == ""
    assert pb.backend.guest_connected is True
    assert pb.backend.guest_mac == "52:54:00:12:34:56"
    assert list(pb.backend.guest_addresses) == ["10.0.2.15", "2001:db8::2"]
    c = pb.config
    assert (c.ipv4_address, c.ipv4_prefix_length, c.ipv4_gateway) == ("10.0.2.15", 24, "10.0.2.2")
    assert (c.ipv6_address, c.ipv6_prefix_length, c.ipv6_gateway) == ("2001:db8::2", 64, "fe80::1")
    assert c.ipv6_link_local == "fe80::9855:9aff:fe55:9a55"
    assert list(c.dns) == ["10.0.2.3", "2001:db8::3"]
    assert list(c.search) == ["example.com", "lab.example"]
    assert c.mtu == 65520
    assert c.our_mac == "9a:55:9a:55:9a:55"
    assert (c.dhcp, c.dhcpv6, c.ndp, c.ra, c.icmp, c.map_gateway) == (True, False, True, True, True, False)
    n = pb.counters
    assert (n.frames_from_guest, n.bytes_from_guest) == (1234, 1572864)
    assert (n.frames_to_guest, n.bytes_to_guest) == (987, 12000)
    assert dict(n.dropped) == {"ipv4.bad_checksum": 2, "arp.truncated": 1}
    assert dict(pb.flows) == {"tcp": 3, "udp": 2}
    assert pb.limits.max_flows == 4096


def test_bare_pasta() -> None:
    pb = status_to_pb(BARE)
    assert pb.mode == passt_pb2.MODE_PASTA
    assert (pb.backend.kind, pb.backend.path, pb.backend.ifname) == ("tap", "", "tap0")
    assert not pb.backend.guest_connected
    assert pb.backend.guest_mac == ""
    assert list(pb.backend.guest_addresses) == []
    assert pb.config.ipv6_address == ""
    assert pb.config.ipv6_prefix_length == 0
    assert not any((pb.config.dhcp, pb.config.dhcpv6, pb.config.ndp, pb.config.ra, pb.config.icmp))
    assert dict(pb.counters.dropped) == {}
    assert dict(pb.flows) == {}
    # Submessages are always present, even when every field in them is zero.
    assert pb.HasField("counters")
    assert pb.HasField("limits")


def test_wire_round_trip() -> None:
    pb = status_to_pb(SAMPLE)
    again = passt_pb2.Status.FromString(pb.SerializeToString())
    assert again == pb


def test_counters_beyond_32_bits() -> None:
    big = 2**40 + 7
    view = dataclasses.replace(SAMPLE, counters=CountersView(bytes_to_guest=big, dropped={"x": big}))
    pb = status_to_pb(view)
    assert pb.counters.bytes_to_guest == big
    assert pb.counters.dropped["x"] == big


def test_negative_counter_is_rejected() -> None:
    view = dataclasses.replace(SAMPLE, counters=CountersView(frames_from_guest=-1))
    with pytest.raises(ValueError, match="out of range"):
        status_to_pb(view)


# Every proto field must be reachable from the views: build a view where nothing is at its default and check
# that every field of every message came out set. A field added to the .proto but not to convert.py fails.
FULL = StatusView(
    version="v",
    mode="pasta",
    uptime=1.0,
    backend=BackendView(
        kind="tap", path="p", ifname="i", guest_connected=True, guest_mac="m", guest_addresses=("a",)
    ),
    config=ConfigView(
        ipv4_address="a",
        ipv4_prefix_length=1,
        ipv4_gateway="g",
        ipv6_address="a",
        ipv6_prefix_length=1,
        ipv6_gateway="g",
        ipv6_link_local="l",
        dns=("d",),
        search=("s",),
        mtu=1,
        our_mac="m",
    ),
    counters=CountersView(
        frames_from_guest=1, bytes_from_guest=1, frames_to_guest=1, bytes_to_guest=1, dropped={"r": 1}
    ),
    flows={"tcp": 1},
    limits=LimitsView(
        max_flows=1,
        flows=LimitView(max=1, in_use=1),
        flows_by_protocol={"tcp": LimitView(max=1, in_use=1)},
        guest_addresses=LimitView(max=1, in_use=1),
        pending_syns=LimitView(max=1, in_use=1),
        watch_streams=LimitView(max=1, in_use=1),
        concurrent_rpcs=LimitView(max=1, in_use=1),
        descriptors=DescriptorsView(soft_limit=1, hard_limit=1, reserved=1, in_use=1),
    ),
    flow_states={"tcp": {"ESTABLISHED": 1}},
    rate_limits=RateLimitsView(
        egress=RateLimitView(rate=1, burst=1),
        ingress=RateLimitView(rate=1, burst=1),
        counters={"egress.bytes": 1},
    ),
)


def _unset_fields(message: Any, prefix: str = "") -> list[str]:
    descriptor: Descriptor = message.DESCRIPTOR
    present = {field.name for field, _ in message.ListFields()}
    missing = [prefix + f.name for f in descriptor.fields if f.name not in present]
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE and not field.message_type.GetOptions().map_entry:
            missing += _unset_fields(value, f"{prefix}{field.name}.")
    return missing


def test_every_proto_field_is_converted() -> None:
    assert _unset_fields(status_to_pb(FULL)) == []


@pytest.mark.parametrize(
    ("view_type", "message"),
    [
        (BackendView, passt_pb2.Backend),
        (ConfigView, passt_pb2.Config),
        (CountersView, passt_pb2.Counters),
        (LimitsView, passt_pb2.Limits),
        (LimitView, passt_pb2.Limit),
        (DescriptorsView, passt_pb2.Descriptors),
    ],
)
def test_views_mirror_proto_names(view_type: type[Any], message: type[Any]) -> None:
    view_names = [f.name for f in dataclasses.fields(view_type)]
    proto_names = [f.name for f in message.DESCRIPTOR.fields]
    assert view_names == proto_names


def test_status_view_mirrors_proto_names() -> None:
    view_names = [f.name for f in dataclasses.fields(StatusView)]
    proto_names = [f.name for f in passt_pb2.Status.DESCRIPTOR.fields]
    # The one deliberate difference: the proto spells out the unit.
    assert [("uptime_seconds" if n == "uptime" else n) for n in view_names] == proto_names


def test_views_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        SAMPLE.version = "x"  # type: ignore[misc]


# -- fwdtx: rule ids and counters ---------------------------------------------------------------------------


def test_rule_ids_are_checked_and_name_the_field() -> None:
    from passtd.control.api import InvalidArgument
    from passtd.control.convert import rule_ids_from_pb

    assert rule_ids_from_pb([3, 1], "") == (3, 1)
    assert rule_ids_from_pb([], "8080") == ()
    for ids, spec, message in (
        ([0], "", r"^ids: 0 is not a rule id"),
        ([2, 2], "", r"^ids: 2 named twice"),
        ([1], "8080", r"^ids: give either a spec or rule ids, not both"),
        (list(range(1, 70000)), "", r"^ids: 69999 ids \(at most 65536"),
    ):
        with pytest.raises(InvalidArgument, match=message):
            rule_ids_from_pb(ids, spec)


def test_forward_table_and_change_carry_every_fwdtx_field() -> None:
    from passtd.control.api import (
        ForwardCountersView,
        ForwardRuleView,
        ForwardTableView,
        PortPolicyChangeView,
    )
    from passtd.control.convert import forward_table_to_pb, policy_change_to_pb

    counters = ForwardCountersView(connections=1, datagrams=2, bytes_in=3, bytes_out=4)
    rule = ForwardRuleView(bind_address="127.0.0.1", ifname="lo", first=80, last=81, target_first=90,
                           id=5, counters=counters, target_address="10.0.2.5")  # fmt: skip
    table = ForwardTableView(direction="tcp_in", spec="s", mode="spec", rules=(rule,), excluded=(1,),
                             auto_bound=(2,), rule_id=6, counters=counters)  # fmt: skip
    pb_table = forward_table_to_pb(table)
    present = {f.name for f, _ in pb_table.ListFields()}
    assert [f.name for f in pb_table.DESCRIPTOR.fields if f.name not in present] == []
    assert _unset_fields(pb_table.rules[0]) == [] and _unset_fields(pb_table.counters) == []
    change = dataclasses.replace(
        PortPolicyChangeView.build(table, table, ()), committed=True, dry_run=True, failure="f",
        added_ids=(5,), removed_ids=(4,),
    )  # fmt: skip
    pb = policy_change_to_pb(change)
    assert (pb.committed, pb.dry_run, pb.failure, list(pb.added_ids), list(pb.removed_ids)) == (
        True, True, "f", [5], [4]
    )  # fmt: skip
    assert pb.current.rules[0].counters.bytes_out == 4 and pb.current.rules[0].id == 5
