"""`passtctl egress list|add|remove|set-default`: the guest's egress rules (passt.v1 GetEgress and friends).

Rules are an ordered list, first match wins, else the default action; they decide each new flow the guest
opens (TCP, UDP, ICMP echo) by its destination as the guest addressed it (the gateway is the host). See the
README's "Egress rules". `list` shows each rule's id (for `remove`), and how many new flows it decided.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from passtctl.client import ControlClient
from passtctl.render import render_columns, render_json
from passtd.control.pb import passt_pb2

_ACTIONS = {"allow": passt_pb2.EGRESS_ACTION_ALLOW, "deny": passt_pb2.EGRESS_ACTION_DENY}
_ACTION_NAMES = {v: k for k, v in _ACTIONS.items()}
_PROTOCOLS = {
    "any": passt_pb2.PROTOCOL_UNSPECIFIED,
    "tcp": passt_pb2.PROTOCOL_TCP,
    "udp": passt_pb2.PROTOCOL_UDP,
    "icmp": passt_pb2.PROTOCOL_ICMP,
}
_PROTOCOL_NAMES = {v: k for k, v in _PROTOCOLS.items()}


def parse_ports(text: str) -> list[passt_pb2.EgressPortRange]:
    """ "22", "8000-8080", "22,443,8000-8080" → ranges; the daemon checks the values (1-65535, in order)."""
    out = []
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise argparse.ArgumentTypeError(f"not a port or a range first-last: {part!r}")
        out.append(passt_pb2.EgressPortRange(first=int(first), last=int(last) if dash else int(first)))
    return out


def _whole(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}")
    return int(text)


def add_commands(commands: Any) -> None:
    """Register `egress` on passtctl's sub-command table (cli.build_parser)."""
    egress = commands.add_parser("egress", help="show or change the guest's egress rules (allow/deny)")
    cmds = egress.add_subparsers(
        dest="egress_command", metavar="ACTION", required=True, parser_class=type(egress)
    )
    listing = cmds.add_parser("list", help="the rules in order, with ids and match counters")
    listing.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table or json")
    listing.set_defaults(run=_list)
    add = cmds.add_parser(
        "add",
        help="add a rule (e.g. add deny --proto tcp --ports 22 192.0.2.0/24)",
        description="Add a rule; the first rule that matches a new flow decides it. DESTINATION is a "
        "prefix or an address as the guest addresses it (the gateway address is the host), or any.",
    )
    add.add_argument("action", choices=tuple(_ACTIONS), help="allow or deny")
    # required (not nargs="?"): argparse fills an optional positional only from the words before the options
    add.add_argument("destination", metavar="DESTINATION", help="a prefix, an address, or any")
    add.add_argument("--proto", choices=tuple(_PROTOCOLS), default="any", help="tcp, udp, icmp or any")
    add.add_argument("--ports", type=parse_ports, default=[], help="22, 8000-8080 or 22,443 (tcp/udp only)")
    add.add_argument("--position", type=_whole, default=0, help="1-based place in the list (default: last)")
    add.add_argument("--id", type=_whole, default=0, help="the rule's id (default: the next free one)")
    add.add_argument(
        "--reset-existing", action="store_true", help="also close open flows the list now denies"
    )
    add.set_defaults(run=_add)
    remove = cmds.add_parser("remove", help="remove the rule with this id (see list)")
    remove.add_argument("id", type=_whole, metavar="ID")
    remove.set_defaults(run=_remove)
    default = cmds.add_parser("set-default", help="the action for flows no rule matches")
    default.add_argument("action", choices=tuple(_ACTIONS), help="allow or deny")
    default.add_argument("--reset-existing", action="store_true", help="also close open flows now denied")
    default.set_defaults(run=_set_default)


def render_egress(policy: passt_pb2.EgressPolicy) -> str:
    """A table of the rules in order, then the default and the denial counters."""
    rows = [
        (
            str(r.id),
            _ACTION_NAMES.get(r.action, "?"),
            _PROTOCOL_NAMES.get(r.protocol, "?"),
            ",".join(str(p.first) if p.first == p.last else f"{p.first}-{p.last}" for p in r.ports) or "*",
            r.destination or "any",
            str(r.matches),
        )
        for r in policy.rules
    ]
    rows.append(("-", _ACTION_NAMES.get(policy.default_action, "?"), "*", "*", "(default)",
                 str(policy.default_matches)))  # fmt: skip
    text = render_columns(("ID", "ACTION", "PROTO", "PORTS", "DESTINATION", "MATCHES"), rows, right=(5,))
    text += (
        f"denied: tcp {policy.denied_tcp}, udp {policy.denied_udp}, icmp {policy.denied_icmp}; "
        f"flows reset {policy.flows_reset} now, {policy.flows_reset_total} in all\n"
    )
    return text


def _list(client: ControlClient, args: argparse.Namespace) -> int:
    policy = client.call("GetEgress", passt_pb2.GetEgressRequest())
    sys.stdout.write(render_json(policy) if args.output == "json" else render_egress(policy))
    return 0


def _add(client: ControlClient, args: argparse.Namespace) -> int:
    rule = passt_pb2.EgressRule(
        id=args.id, action=_ACTIONS[args.action], destination=args.destination,
        protocol=_PROTOCOLS[args.proto], ports=args.ports,
    )  # fmt: skip
    request = passt_pb2.AddEgressRuleRequest(
        rule=rule, position=args.position, reset_existing=args.reset_existing
    )
    sys.stdout.write(render_egress(client.call("AddEgressRule", request)))
    return 0


def _remove(client: ControlClient, args: argparse.Namespace) -> int:
    sys.stdout.write(
        render_egress(client.call("RemoveEgressRule", passt_pb2.RemoveEgressRuleRequest(id=args.id)))
    )
    return 0


def _set_default(client: ControlClient, args: argparse.Namespace) -> int:
    request = passt_pb2.SetEgressDefaultRequest(
        action=_ACTIONS[args.action], reset_existing=args.reset_existing
    )
    sys.stdout.write(render_egress(client.call("SetEgressDefault", request)))
    return 0
