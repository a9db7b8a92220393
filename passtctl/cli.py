"""passtctl: query a running passtd over its control socket.

Exit status: 0 success, 1 the call failed (or `health` is not SERVING), 2 bad usage. Errors are one line on
stderr, `passtctl: error: ...`, so that scripts can log them as they are.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Final, NoReturn

from passtctl import limits
from passtctl.client import (
    ADDRESS_ENV,
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    ControlClient,
    ControlError,
    Tls,
    socket_path,
)
from passtctl.egress import add_commands as add_egress_commands
from passtctl.render import (
    render_connections,
    render_event,
    render_forward_rules,
    render_json,
    render_json_line,
    render_policy_change,
    render_port_policy,
    render_status_table,
    render_timeouts,
)
from passtd import __version__
from passtd.control.pb import passt_pb2
from passtd.paths import default_control_address, derived_control_path

PROG = "passtctl"
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as one line (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {text!r}")
    return value


def _address(text: str) -> str:
    try:
        socket_path(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _port(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port number (1-65535): {text!r}")
    return int(text)


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1: {text!r}")
    return int(text)


def _rule_id(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"not a rule id: {text!r}")
    return int(text)


def _conn_id(text: str) -> int:
    if not text.isdigit() or int(text) == 0:
        raise argparse.ArgumentTypeError(f"not a connection id: {text!r}")
    return int(text)


_UNITS: Final = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_VALUE: Final = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(ms|s|m|h)?")
TIMEOUT_KEYS: Final = tuple(f.name for f in passt_pb2.Timeouts.DESCRIPTOR.fields)


def parse_duration(text: str) -> float:
    """`2s`, `500ms`, `1.5m`, `2h`, or a bare number of seconds."""
    match = _VALUE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad duration {text!r} (write e.g. 30s, 500ms, 5m, 2h)")
    return float(match.group(1)) * _UNITS[match.group(2) or ""]


def parse_assignment(text: str) -> tuple[str, float]:
    """`KEY=VALUE` for `timeouts set`: a duration, or a plain count for tcp_max_retransmits."""
    key, eq, value = text.partition("=")
    if not eq:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {text!r}")
    if key not in TIMEOUT_KEYS:
        raise argparse.ArgumentTypeError(f"unknown timeout {key!r} (known: {', '.join(TIMEOUT_KEYS)})")
    try:
        if key == "tcp_max_retransmits":
            if not value.isdigit():
                raise ValueError(f"a count, not {value!r}")
            return key, float(value)
        return key, parse_duration(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{key}: {exc}") from None


_PROTOCOLS: Final = {
    "tcp": passt_pb2.PROTOCOL_TCP,
    "udp": passt_pb2.PROTOCOL_UDP,
    "icmp": passt_pb2.PROTOCOL_ICMP,
}
_FORWARD_DIRECTIONS: Final = {
    "tcp_in": passt_pb2.FORWARD_DIRECTION_TCP_IN,
    "udp_in": passt_pb2.FORWARD_DIRECTION_UDP_IN,
    "tcp_out": passt_pb2.FORWARD_DIRECTION_TCP_OUT,
    "udp_out": passt_pb2.FORWARD_DIRECTION_UDP_OUT,
}


# The states a flow can show (passtd.dataplane.core.tcp.states.TcpState, then SPLICED/CONNECTING for
# socket-to-socket flows and ACTIVE for datagram flows); tests/control/test_cli.py checks the list stays so.
STATES: Final = (
    "CLOSED", "TAP_SYN_SENT", "SOCK_SYN_SENT", "TAP_SYN_RCVD", "ESTABLISHED", "ESTABLISHED_SOCK_FIN",
    "CLOSE_WAIT", "FIN_WAIT_1", "LAST_ACK", "SPLICED", "CONNECTING", "ACTIVE",
)  # fmt: skip


def _state(text: str) -> str:
    """A flow state in any case (`established`, as JSON shows it, or ESTABLISHED); refused by name."""
    if text.upper() not in STATES:
        raise argparse.ArgumentTypeError(
            f"unknown state {text!r} (known: {', '.join(s.lower() for s in STATES)})"
        )
    return text.upper()


def _proto(text: str) -> str:
    if text.lower() not in _PROTOCOLS:
        raise argparse.ArgumentTypeError(f"unknown protocol {text!r} (known: {', '.join(_PROTOCOLS)})")
    return text.lower()


def _filter_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--proto", type=_proto, metavar="PROTO", help="only this protocol: tcp, udp or icmp")
    parser.add_argument(
        "--state", type=_state, metavar="STATE", help="only flows in this state, e.g. established, fin_wait_1"
    )
    parser.add_argument(
        "--port", type=_port, metavar="N", help="only flows with this guest, remote or local port"
    )
    parser.add_argument("--address", metavar="ADDR", help="only flows with this guest or remote address")


def _filter(args: argparse.Namespace) -> passt_pb2.ConnectionFilter:
    return passt_pb2.ConnectionFilter(
        protocol=_PROTOCOLS[args.proto] if args.proto else passt_pb2.PROTOCOL_UNSPECIFIED,
        state=args.state or "",
        port=args.port or 0,
        address=args.address or "",
    )


JSON_HELP: Final = """\
-o json is for scripts: field names as in passt.proto, every field present, counters and ids as JSON numbers
(never strings), enums and states as the lower-case words the options take (protocol "tcp", state
"established", direction "tcp_in", event kind "closed", reason "fin"); `conns watch -o json` prints one
object a line.

Exit status: 0 success, 1 the call failed (or the daemon went away during `conns watch`), 2 a mistake in
the command line (an unknown --state or --proto value among them). Errors are one line on stderr."""


def build_parser() -> argparse.ArgumentParser:
    default = os.environ.get(ADDRESS_ENV) or default_control_address(os.environ)
    parser = _Parser(
        prog=PROG,
        description="Query a running passtd over its control socket.",
        epilog=JSON_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "-c",
        "--control",
        metavar="ADDR",
        type=_address,
        default=default,
        help=f"control socket, PATH or unix:PATH (default: ${ADDRESS_ENV}, else {DEFAULT_ADDRESS}, "
        "or under $XDG_RUNTIME_DIR/passtd for an ordinary user)",
    )
    # An instance started as passt/pasta (libvirt, qemu, Podman) has its control socket next to its guest
    # socket or PID file (passtd.paths.derived_control_path): found from what the integrator knows.
    where.add_argument(
        "--pid",
        metavar="FILE",
        dest="pid_file",
        help="the instance whose PID file is FILE (FILE.pid → FILE.control)",
    )
    where.add_argument(
        "--socket",
        metavar="PATH",
        dest="guest_socket",
        help="the instance serving guest socket PATH (→ .control)",
    )
    parser.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_positive_seconds,
        default=DEFAULT_TIMEOUT,
        help=f"give up on a call after this long (default: {DEFAULT_TIMEOUT:g})",
    )
    tls = parser.add_argument_group("TCP control (-c tcp:HOST:PORT)")
    tls.add_argument("--tls-ca", metavar="FILE", help="CA certificate(s) the server's certificate chains to")
    tls.add_argument("--tls-cert", metavar="FILE", help="our client certificate")
    tls.add_argument("--tls-key", metavar="FILE", help="our client certificate's private key")
    tls.add_argument("--insecure", action="store_true", help="plaintext (a server on loopback started so)")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    status = commands.add_parser("status", help="show the daemon's state, configuration and counters")
    status.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json (proto3 JSON mapping) for scripts",
    )
    status.set_defaults(run=_status)

    health = commands.add_parser(
        "health", help="print the health status; exit 0 only when SERVING", description="Exit 0 if SERVING."
    )
    health.add_argument(
        "--service", default="", metavar="NAME", help='service to check (default: "", the whole server)'
    )
    health.set_defaults(run=_health)

    conns = commands.add_parser("conns", help="list, watch and reset connections (flows)")
    conns_cmds = conns.add_subparsers(
        dest="conns_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    listing = conns_cmds.add_parser("list", help="list open connections")
    _filter_options(listing)
    listing.add_argument(
        "-o",
        "--output",
        choices=("table", "wide", "json"),
        default="table",
        help="table (default), wide, json",
    )
    listing.set_defaults(run=_conns_list)
    watch = conns_cmds.add_parser("watch", help="print connection events as they happen (Ctrl-C stops)")
    _filter_options(watch)
    watch.add_argument(
        "-o", "--output", choices=("text", "json"), default="text", help="text, or one JSON object a line"
    )
    watch.add_argument("--existing", action="store_true", help="first list the connections open now")
    watch.add_argument("--count", type=_count, metavar="N", help="stop after N events")
    watch.add_argument(
        "--reconnect",
        action="store_true",
        help="when the daemon goes away, wait for it to come back and watch again (else exit 1)",
    )
    watch.add_argument(
        "--for", dest="duration", type=_positive_seconds, metavar="SECONDS", help="stop after this long"
    )
    watch.set_defaults(run=_conns_watch)
    top = conns_cmds.add_parser(
        "top",
        help="live view of flows sorted by throughput (q or Ctrl-C quits)",
        description="Flows sorted by throughput, refreshed in place; rates from successive byte counters.",
    )
    _filter_options(top)
    top.add_argument(
        "-d", "--delay", dest="interval", type=_positive_seconds, default=1.0, metavar="SECONDS",
        help="seconds between refreshes (default 1)",
    )  # fmt: skip
    top.add_argument("-n", "--iterations", type=_count, metavar="N", help="stop after N refreshes")
    top.set_defaults(run=_conns_top)
    reset = conns_cmds.add_parser(
        "reset",
        help="reset connections: RST to both sides",
        description="Reset connections by id, all of them (--all), or those matching --port/--proto/...",
    )
    reset.add_argument("ids", nargs="*", type=_conn_id, metavar="ID", help="connection ids (from conns list)")
    reset.add_argument("--all", action="store_true", help="every connection (with filters: every match)")
    _filter_options(reset)
    reset.set_defaults(run=_conns_reset)

    ports = commands.add_parser("ports", help="show or change port forwarding (-t/-u/-T/-U)")
    ports_cmds = ports.add_subparsers(
        dest="ports_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    for name, text, run in (
        ("list", "show the four forwarding tables", _ports_list),
        ("add", "forward the ports of SPEC too", _ports_change),
        ("remove", "stop forwarding the ports of SPEC (established connections stay)", _ports_change),
        ("set", "replace the table with SPEC ('none' clears it)", _ports_change),
    ):
        sub = ports_cmds.add_parser(name, help=text, description=text)
        if name != "list":
            sub.add_argument(
                "spec", metavar="SPEC", nargs="?" if name == "remove" else None,
                help="a passt port spec: 8080, 8000-8010:9000-9010, ~22, none",
            )  # fmt: skip
            sub.add_argument(
                "--dry-run", action="store_true",
                help="check only: parse, conflicts, and a trial bind of each new socket (closed at once)",
            )  # fmt: skip
            if name == "remove":
                sub.add_argument(
                    "--id", dest="ids", type=_rule_id, action="append", metavar="ID",
                    help="remove the rule with this id (from `ports list`; repeatable)",
                )  # fmt: skip
            which = sub.add_mutually_exclusive_group()
            which.add_argument(
                "--dir", choices=tuple(_FORWARD_DIRECTIONS), help="table to change (default tcp_in)"
            )
            for flag, direction in (("-t", "tcp_in"), ("-u", "udp_in"), ("-T", "tcp_out"), ("-U", "udp_out")):
                which.add_argument(
                    flag, dest="dir", action="store_const", const=direction, help=f"= --dir {direction}"
                )
        else:
            sub.add_argument(
                "-o", "--output", choices=("table", "json"), default="table", help="table or json"
            )
        sub.set_defaults(run=run, op=name)

    timeouts = commands.add_parser("timeouts", help="show or change the dataplane's timeouts")
    t_cmds = timeouts.add_subparsers(
        dest="timeouts_command", metavar="ACTION", required=True, parser_class=_Parser
    )
    t_get = t_cmds.add_parser("get", help="show every timeout")
    t_get.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table or json")
    t_get.set_defaults(run=_timeouts_get)
    t_set = t_cmds.add_parser(
        "set",
        help="change timeouts: KEY=VALUE... (e.g. udp_idle=2s tcp_ack_interval=10ms)",
        description=f"Keys: {', '.join(TIMEOUT_KEYS)}. Values: 30s, 500ms, 5m, 2h, or seconds.",
    )
    t_set.add_argument("assignments", nargs="+", type=parse_assignment, metavar="KEY=VALUE")
    t_set.set_defaults(run=_timeouts_set)
    add_egress_commands(commands)
    limits.register(commands)
    return parser


def _status(client: ControlClient, args: argparse.Namespace) -> int:
    status = client.status()
    sys.stdout.write(render_json(status) if args.output == "json" else render_status_table(status))
    return EXIT_OK


def _health(client: ControlClient, args: argparse.Namespace) -> int:
    name = client.health(args.service)
    sys.stdout.write(name + "\n")
    return EXIT_OK if name == "SERVING" else EXIT_FAILED


def _conns_list(client: ControlClient, args: argparse.Namespace) -> int:
    conns = list(client.connections(_filter(args)))
    if args.output == "json":
        sys.stdout.write(render_json(passt_pb2.ListConnectionsResponse(connections=conns)))
    else:
        sys.stdout.write(render_connections(conns, time.time(), wide=args.output == "wide"))
    return EXIT_OK


RECONNECT_POLL: Final = 0.5


def _conns_watch(client: ControlClient, args: argparse.Namespace) -> int:
    """Events until --count or --for; the daemon going away is an error (exit 1) unless --reconnect, which
    waits for it to serve again and subscribes anew (what happened meanwhile is missed, and said so)."""
    deadline = None if args.duration is None else time.monotonic() + args.duration
    seen = 0
    existing = args.existing

    def ready() -> None:
        sys.stderr.write(f"{PROG}: watching connections (Ctrl-C to stop)\n")
        sys.stderr.flush()

    try:
        while True:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return EXIT_OK
            events = client.watch(_filter(args), existing=existing, duration=left, on_ready=ready)
            try:
                for event in events:
                    sys.stdout.write(
                        render_json_line(event) if args.output == "json" else render_event(event)
                    )
                    sys.stdout.flush()
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        return EXIT_OK
                return EXIT_OK  # --for elapsed
            except ControlError as exc:
                if not args.reconnect:
                    raise
                sys.stderr.write(f"{PROG}: {exc}; waiting for the daemon to come back (--reconnect)\n")
                sys.stderr.flush()
            finally:
                events.close()
            if not _wait_for_daemon(client, deadline):
                return EXIT_OK  # --for elapsed while waiting
            sys.stderr.write(f"{PROG}: reconnected; events while the daemon was away were missed\n")
            existing = True  # what opened meanwhile is listed first, so nothing open goes unseen
    except KeyboardInterrupt:
        return EXIT_OK


def _wait_for_daemon(client: ControlClient, deadline: float | None) -> bool:
    """Poll the health service on a fresh channel until SERVING; False when the deadline passes first."""
    while deadline is None or time.monotonic() < deadline:
        time.sleep(RECONNECT_POLL)
        client.reconnect()
        try:
            if client.health() == "SERVING":
                return True
        except ControlError:
            pass
    return False


def _conns_top(client: ControlClient, args: argparse.Namespace) -> int:
    from passtctl.top import run_top

    flt = _filter(args)
    return run_top(lambda: list(client.connections(flt)), interval=args.interval, iterations=args.iterations)


def _conns_reset(client: ControlClient, args: argparse.Namespace) -> int:
    flt = _filter(args)
    filtered = flt != passt_pb2.ConnectionFilter()
    if args.ids and (args.all or filtered):
        raise UsageError("give connection ids, or --all/--port/..., not both")
    if not args.ids and not (args.all or filtered):
        raise UsageError("give connection ids, --all, or a filter such as --port N")
    gone: list[passt_pb2.Connection] = []
    if args.ids:
        for conn_id in args.ids:
            gone += client.reset(conn_id)
    else:
        gone = client.reset_matching(flt, everything=args.all)
    sys.stdout.write(f"reset {len(gone)} connection{'s' if len(gone) != 1 else ''}")
    sys.stdout.write((": " + " ".join(str(c.id) for c in gone) if gone else "") + "\n")
    return EXIT_OK


def _ports_list(client: ControlClient, args: argparse.Namespace) -> int:
    policy = client.port_policy()
    if args.output == "json":
        sys.stdout.write(render_json(policy))
        return EXIT_OK
    sys.stdout.write(render_port_policy(policy))
    rules = render_forward_rules(policy)
    sys.stdout.write("\n" + rules if rules else "")
    return EXIT_OK


def _ports_change(client: ControlClient, args: argparse.Namespace) -> int:
    direction = _FORWARD_DIRECTIONS[args.dir or "tcp_in"]
    ids: list[int] = getattr(args, "ids", None) or []
    if ids and args.spec:
        raise UsageError("give a SPEC or --id, not both")
    if not ids and not args.spec:
        raise UsageError("give a SPEC" + (" or --id N" if args.op == "remove" else ""))
    change = client.change_forward(args.op, direction, args.spec or "", dry_run=args.dry_run, ids=ids)
    sys.stdout.write(render_policy_change(change))
    if change.failure:
        sys.stderr.write(f"{PROG}: error: not applied: {change.failure}\n")
        return EXIT_FAILED
    # Servers before binds_total/binds_failed listed every socket: count the list then.
    failed = change.binds_failed or sum(not b.ok for b in change.binds)
    total = change.binds_total or len(change.binds)
    if failed:
        sys.stderr.write(f"{PROG}: error: {failed} of {total} sockets could not be bound\n")
        return EXIT_FAILED
    return EXIT_OK


def _timeouts_get(client: ControlClient, args: argparse.Namespace) -> int:
    timeouts = client.timeouts()
    sys.stdout.write(render_json(timeouts) if args.output == "json" else render_timeouts(timeouts))
    return EXIT_OK


def _timeouts_set(client: ControlClient, args: argparse.Namespace) -> int:
    values = dict(args.assignments)
    if len(values) != len(args.assignments):
        raise UsageError("a timeout is named twice")
    sys.stdout.write(render_timeouts(client.set_timeouts(values)))
    return EXIT_OK


class UsageError(Exception):
    """Arguments argparse cannot check alone; exit status 2."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors; keep main() returning a status
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    run: Callable[[ControlClient, argparse.Namespace], int] = args.run
    if args.pid_file is not None or args.guest_socket is not None:
        args.control = derived_control_path(args.guest_socket, args.pid_file)
    tls = Tls(ca=args.tls_ca, cert=args.tls_cert, key=args.tls_key, insecure=args.insecure)
    if bool(tls.cert) != bool(tls.key):
        sys.stderr.write(f"{PROG}: error: --tls-cert and --tls-key go together (a certificate and its key)\n")
        return EXIT_USAGE
    if tls.insecure and (tls.ca or tls.cert):
        sys.stderr.write(f"{PROG}: error: --insecure is plaintext: it cannot be combined with --tls-*\n")
        return EXIT_USAGE
    try:
        with ControlClient(args.control, timeout=args.timeout, tls=tls) as client:
            return run(client, args)
    except UsageError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    except ControlError as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return EXIT_FAILED
    except BrokenPipeError:  # `passtctl status | head -1`: the reader left, which is not our error
        sys.stderr.close()
        return EXIT_FAILED
