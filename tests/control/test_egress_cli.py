"""passtctl egress and the egress conversions, pure: what the command line builds, how replies and denied
events read, and the request checks done before the daemon is asked. The live daemon is exercised in
tests/netns/test_egress.py."""

from __future__ import annotations

import pytest

from passtctl.cli import build_parser
from passtctl.egress import render_egress
from passtctl.render import render_event
from passtd.control.api import EgressRuleView, EgressView, InvalidArgument
from passtd.control.convert import egress_rule_from_pb, egress_rules_from_pb, egress_to_pb
from passtd.control.pb import passt_pb2
from passtd.dataplane.core.egress import MAX_PORT_RANGES, MAX_RULES


def test_add_parses_the_issue_example() -> None:
    args = build_parser().parse_args(["egress", "add", "deny", "--proto", "tcp", "--ports", "22,8000-8080",
                                      "192.0.2.0/24", "--position", "2", "--reset-existing"])  # fmt: skip
    assert (args.action, args.destination, args.proto, args.position, args.reset_existing) == (
        "deny", "192.0.2.0/24", "tcp", 2, True
    )  # fmt: skip
    assert [(r.first, r.last) for r in args.ports] == [(22, 22), (8000, 8080)]
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["egress", "add", "block", "any"])
    assert info.value.code == 2


def test_rule_round_trip_and_table() -> None:
    request = passt_pb2.EgressRule(
        action=passt_pb2.EGRESS_ACTION_DENY, destination="2001:db8::/32", protocol=passt_pb2.PROTOCOL_UDP,
        ports=[passt_pb2.EgressPortRange(first=53), passt_pb2.EgressPortRange(first=5000, last=5010)],
    )  # fmt: skip
    view = egress_rule_from_pb(request, "rule")
    assert view == EgressRuleView(action="deny", destination="2001:db8::/32", protocol="udp",
                                  ports=((53, 53), (5000, 5010)))  # fmt: skip
    reply = egress_to_pb(EgressView(
        rules=(EgressRuleView(id=3, action="deny", destination="2001:db8::/32", protocol="udp",
                              ports=((53, 53), (5000, 5010)), matches=4),),
        default_action="deny", default_matches=9, denied={"tcp": 1, "udp": 4, "icmp": 0}, flows_reset_total=2,
    ))  # fmt: skip
    table = render_egress(reply)
    assert table.splitlines() == [
        "ID  ACTION  PROTO  PORTS         DESTINATION    MATCHES",
        "3   deny    udp    53,5000-5010  2001:db8::/32        4",
        "-   deny    *      *             (default)            9",
        "denied: tcp 1, udp 4, icmp 0; flows reset 0 now, 2 in all",
    ]


def test_requests_checked_before_the_daemon() -> None:
    with pytest.raises(InvalidArgument, match=r"^rule\.action: set allow or deny"):
        egress_rule_from_pb(passt_pb2.EgressRule(), "rule")
    with pytest.raises(InvalidArgument, match=r"^rules\[0\]\.protocol: unknown value 9"):
        egress_rules_from_pb([passt_pb2.EgressRule(action=passt_pb2.EGRESS_ACTION_DENY, protocol=9)])  # type: ignore[arg-type]
    many = [passt_pb2.EgressRule(action=passt_pb2.EGRESS_ACTION_DENY)] * (MAX_RULES + 1)
    with pytest.raises(InvalidArgument, match=r"^rules: 4097 rules, at most 4096"):
        egress_rules_from_pb(many)
    wide = passt_pb2.EgressRule(ports=[passt_pb2.EgressPortRange(first=1)] * (MAX_PORT_RANGES + 1))
    with pytest.raises(InvalidArgument, match=r"^rule\.ports: at most 64"):
        egress_rule_from_pb(wide, "rule")


def test_denied_event_line() -> None:
    event = passt_pb2.ConnectionEvent(
        kind=passt_pb2.EVENT_KIND_DENIED, time=0.0, reason_detail="egress_denied:rule=1",
        connection=passt_pb2.Connection(protocol=passt_pb2.PROTOCOL_TCP, state="DENIED",
                                        guest_address="10.0.2.15", guest_port=40000,
                                        remote_address="192.0.2.1", remote_port=22),
    )  # fmt: skip
    text = render_event(event)
    assert " denied " in text and "DENIED" in text and text.rstrip().endswith("reason egress_denied:rule=1")
    assert "192.0.2.1:22" in text


def test_debug_flow_log_names_a_denied_flow() -> None:
    """At -d the flow log writes one line per denied flow (FlowLog is the daemon's -d watcher)."""
    from passtd.daemon_api import FlowLog
    from passtd.dataplane.core.egress import Egress, make_policy, make_rule
    from passtd.dataplane.core.flowtable import PROTO_TCP, FlowEvent

    lines: list[tuple[str, dict[str, object]]] = []

    class Logger:
        def debug(self, event: str, **fields: object) -> object:
            lines.append((event, fields))
            return None

    egress = Egress()
    egress.set(make_policy([make_rule(1, False, None, PROTO_TCP, ())]))
    log = FlowLog(Logger())
    egress.on_denied = lambda flow, reason: log(FlowEvent("denied", flow, "DENIED", reason))
    assert not egress.check(PROTO_TCP, False, bytes((10, 0, 2, 15)), 40000, bytes((192, 0, 2, 1)), 22, 0.0)
    assert lines == [("flow.denied", {"proto": "tcp", "guest": "10.0.2.15:40000", "remote": "192.0.2.1:22",
                                      "reason": "egress_denied:rule=1"})]  # fmt: skip
