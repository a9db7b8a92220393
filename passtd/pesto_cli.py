"""`pesto`: change a running passt/pasta's (or passtd's) port forwarding, as upstream's pesto(1) does.

    pesto [-d] [-s] [-A|-D] [-C PIF] [-t|-u|-T|-U SPEC]... PATH

It connects to the `-c/--conf-path` socket PATH, reads the server's tables (protocol version 2, see
`control/pesto_wire.py`), edits them in the order the options are given, and sends them back whole. Without
-A/-D the first -t/-u (or -T/-U) clears its pif's table, so the specs given replace it; -A adds, -D deletes
(a rule must be given exactly as it is listed), -C PIF clears a pif. With no change requested it prints the
tables. Messages and exit codes follow upstream: 0 done, 1 with one line on stderr for anything refused
(upstream prints its usage after a bad option, so does this). passtd's server also says whether the change
was applied; a bind that failed there is printed and exits 1 (the server restored the previous tables).
"""

from __future__ import annotations

import getopt
import re
import socket
import struct
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import ip_address
from typing import Final, NoReturn

from passtd import __version__
from passtd.control import pesto_wire as wire
from passtd.dataplane.core.fwd import Direction, parse_spec
from passtd.errors import ConfigError

SHORT: Final = "dhADC:t:u:T:U:s"
LONG: Final = [
    "debug", "help", "version", "add", "delete", "clear=", "tcp-ports=", "udp-ports=", "tcp-ns=", "udp-ns=",
    "show",
]  # fmt: skip
PORTS_THEN_TARGET: Final = re.compile(r"[0-9]+(-[0-9]+)?:")  # "8080:10.89.0.5/80": no scope before the '/'
RESULT_TIMEOUT: Final = 5.0
IO_TIMEOUT: Final = 10.0

USAGE: Final = """Usage: {prog} [OPTION]... PATH

  -A, --add		Add following specifiers to forwards
  -D, --delete		Delete following specifiers instead
  -C, --clear PIF	Clear forwarding table for given PIF
  -t, --tcp-ports SPEC	TCP inbound port forwarding
    can be specified multiple times
    SPEC can be:
      'none': don't forward any ports
      [ADDR[%IFACE]/]PORTS: forward specific ports
        PORTS is either 'all' (forward all unbound, non-ephemeral
        ports), or a comma-separated list of ports, optionally
        ranged with '-' and optional target ports after ':'.
        A target address may precede target ports: PORT:ADDR[/PORT]
        Ranges can be reduced by excluding ports or ranges
        prefixed by '~'.
        The 'auto' keyword may be given to only forward
        ports which are bound in the target namespace
        Examples:
        -t 22		Forward local port 22 to 22
        -t 22:23	Forward local port 22 to 23
        -t 22-80:32-90	Forward ports 22 to 80 to
			corresponding port numbers plus 10
        -t 0.0.0.0/8080:10.89.0.5/80  Forward IPv4 port 8080 to
			port 80 of 10.89.0.5
        -t 5-25,~10-20	Forward ports 5 to 9, and 21 to 25
        -t ~25		Forward all ports except for 25
        -t auto	Forward all ports bound in namespace
  -u, --udp-ports SPEC	UDP inbound port forwarding
    SPEC is as described for TCP above
  -T, --tcp-ns SPEC	TCP port forwarding to init namespace
    SPEC is as described above
  -U, --udp-ns SPEC	UDP port forwarding to init namespace
    SPEC is as described above
  -s, --show		Show configuration before and after
  -d, --debug		Print debugging messages
  -h, --help		Display this help message and exit
  --version		Show version and exit
"""


class Die(Exception):
    """One line for stderr, exit 1 (upstream's die())."""


def die(msg: str) -> NoReturn:
    raise Die(msg)


@dataclass(slots=True)
class Session:
    path: str
    debug: bool = False

    def say(self, msg: str) -> None:
        if self.debug:
            print(msg, file=sys.stderr)


def ephemeral_range() -> tuple[int, int]:
    """The host's ephemeral ports (upstream's fwd_probe_ephemeral), left out of "all" and "auto"."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(x) for x in f.read().split())
            return lo, hi
    except (OSError, ValueError):
        return (49152, 65535)  # RFC 6335, as upstream when it cannot read the sysctl


# -- talking to the server --------------------------------------------------------------------------------


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            die("Error reading from control socket")
        buf += chunk
    return bytes(buf)


def read_tables(sock: socket.socket, s: Session) -> list[wire.PifTable]:
    """The server's hello and tables; refuses anything but protocol version 2."""
    try:
        wire.check_hello(recv_exact(sock, wire.HELLO.size))
    except wire.PestoError as exc:
        die(str(exc))
    tables: list[wire.PifTable] = []
    while (pif := recv_exact(sock, 1)[0]) != wire.PIF_NONE:
        if len(tables) >= 3:
            die("passt has more pifs than pesto can manage (max 3)")
        try:
            name, caps, count = wire.unpack_pif_info(recv_exact(sock, wire.PIF_INFO.size))
        except wire.PestoError as exc:
            die(str(exc))
        if count > wire.MAX_RULES:
            die("Too many forwarding rules")
        if any(t.pif == pif for t in tables):
            die("Received duplicate interface identifier")
        if any(t.name == name for t in tables):
            die("Received duplicate interface name")
        s.say(f"PIF {pif}: {name}, {count} rules, capabilities 0x{caps:x}")
        table = wire.PifTable(pif, name, caps)
        for _ in range(count):
            try:
                table.rules.append(wire.unpack_rule(recv_exact(sock, wire.RULE.size)))
            except wire.PestoError as exc:
                die(f"Bad rule from server: {exc}")
        tables.append(table)
    return tables


def read_result(sock: socket.socket) -> tuple[int, str] | None:
    """passtd's answer after a commit; None from a server that sends none (upstream passt/pasta)."""
    sock.settimeout(RESULT_TIMEOUT)
    try:
        head = sock.recv(wire.RESULT.size, socket.MSG_WAITALL)
        if len(head) < wire.RESULT.size:
            return None
        magic, status, length = wire.RESULT.unpack(head)
        if magic != wire.RESULT_MAGIC or length > wire.MAX_RESULT_TEXT:
            return None
        body = sock.recv(length, socket.MSG_WAITALL) if length else b""
    except (TimeoutError, OSError):
        return None
    return status, body.decode(errors="replace")


# -- editing the tables (upstream fwd_rule_parse / fwd_rule_add / fwd_rule_del) ----------------------------


def show(tables: Sequence[wire.PifTable]) -> None:
    for table in tables:
        print(f"  {table.name}")
        for rule in table.rules:
            print(f"    {rule.fmt()}")
    sys.stdout.flush()


def spec_rules(opt: str, spec: str, caps: int, ephemeral: tuple[int, int]) -> list[wire.Rule]:
    """The rules one -t/-u/-T/-U SPEC stands for, one per included range as upstream makes them."""
    direction: Direction = {"t": "tcp_in", "u": "udp_in", "T": "tcp_out", "U": "udp_out"}[opt]  # type: ignore[assignment]
    splice = opt in "TU"
    words: list[str] = []
    for word in spec.split():
        head, slash, rest = word.partition("/")
        prefix, body = (head + "/", rest) if slash and not PORTS_THEN_TARGET.match(word) else ("", word)
        items = body.split(",")
        excl = [i for i in items if i.startswith("~")]
        incl = [i for i in items if not i.startswith("~")]
        if len(incl) <= 1 or any(i in ("all", "auto", "none") for i in incl):
            words.append(word)
        else:
            words += [prefix + ",".join([i, *excl]) for i in incl]
    rules: list[wire.Rule] = []
    for word in words:
        try:
            policy = parse_spec(word, option=f"-{opt}", allow_auto=bool(caps & wire.CAP_SCAN), allow_all=True)
        except ConfigError as exc:
            die(str(exc))
        for rule in wire.policy_rules(
            direction, policy, ephemeral, splice_ifname=bool(caps & wire.CAP_IFNAME)
        ):
            rules.extend(_for_caps(rule, caps, splice, opt, spec))
    return rules


def _for_caps(rule: wire.Rule, caps: int, splice: bool, opt: str, spec: str) -> list[wire.Rule]:
    """Upstream's choices for the server's capabilities: one family only, or no SO_BINDTODEVICE."""
    v4, v6 = bool(caps & wire.CAP_IPV4), bool(caps & wire.CAP_IPV6)
    if splice and not caps & wire.CAP_IFNAME:
        out = []
        for on, lo in ((v4, "127.0.0.1"), (v6, "::1")):
            if on:
                out.append(_with_addr(rule, lo))
        return out
    if rule.addr is None and not (v4 and v6):
        return [_with_addr(rule, "0.0.0.0" if v4 else "::")]
    if rule.ifname and not splice and not caps & wire.CAP_IFNAME:
        die(f"Device binding for '-{opt} {spec}' unsupported (requires kernel 5.7+)")
    return [rule]


def _with_addr(rule: wire.Rule, addr: str) -> wire.Rule:
    return wire.Rule(ip_address(addr), rule.taddr, "" if addr in ("127.0.0.1", "::1") else rule.ifname,
                     rule.first, rule.last, rule.to, rule.proto, rule.flags)  # fmt: skip


def add_rule(table: wire.PifTable, new: wire.Rule) -> None:
    for old in table.rules:
        if new.conflicts(old):
            print(f"Forwarding configuration conflict: {new.fmt()} versus {old.fmt()}", file=sys.stderr)
            die(f"Unable to add rule {new.fmt()}")
    table.rules.append(new)


def del_rule(table: wire.PifTable, gone: wire.Rule) -> None:
    for i, old in enumerate(table.rules):
        if old == gone:
            del table.rules[i]
            return
        if gone.conflicts(old):
            print(
                f"Specifier {gone.fmt()} conflicts with rule {old.fmt()}, but doesn't match it, can't delete",
                file=sys.stderr,
            )
            die(f"Unable to delete rule {gone.fmt()}")
    print(f"Couldn't find forwarding rule to delete: {gone.fmt()}", file=sys.stderr)
    die(f"Unable to delete rule {gone.fmt()}")


def edit(tables: list[wire.PifTable], opts: list[tuple[str, str]]) -> None:
    """Apply the options in order, as upstream's second getopt pass."""
    by_name = {t.name: t for t in tables}
    inbound, outbound = by_name.get("HOST"), by_name.get("SPLICE")
    mode = "clear"
    cleared: set[str] = set()
    ephemeral = ephemeral_range()
    for opt, arg in opts:
        if opt in ("-A", "--add"):
            mode = "add"
        elif opt in ("-D", "--delete"):
            mode = "del"
        elif opt in ("-C", "--clear"):
            if arg not in by_name:
                die(f"Unsupported pif name {arg}")
            by_name[arg].rules.clear()
            cleared.add(arg)
        elif opt in ("-t", "-u", "-T", "-U", "--tcp-ports", "--udp-ports", "--tcp-ns", "--udp-ns"):
            letter = {"--tcp-ports": "t", "--udp-ports": "u", "--tcp-ns": "T", "--udp-ns": "U"}.get(
                opt, opt[1:]
            )
            table = inbound if letter in "tu" else outbound
            if table is None:
                die(f"Can't use -{letter}, no {'inbound' if letter in 'tu' else 'outbound'} interface")
            if mode == "clear" and table.name not in cleared:
                table.rules.clear()
                cleared.add(table.name)
            proto = wire.IPPROTO_TCP if letter in "tT" else wire.IPPROTO_UDP
            if arg.strip() == "none":
                if any(r.proto == proto for r in table.rules):
                    die(f"-{letter} none conflicts with previous options")
                continue
            for rule in spec_rules(letter, arg, table.caps, ephemeral):
                (del_rule if mode == "del" else add_rule)(table, rule)


def run(argv: Sequence[str]) -> int:
    prog = "pesto"
    try:
        opts, args = getopt.gnu_getopt(list(argv), SHORT, LONG)
    except getopt.GetoptError as exc:
        print(f"{prog}: {exc.msg}", file=sys.stderr)
        print(USAGE.format(prog=prog), file=sys.stderr, end="")
        return 1
    s = Session("")
    update = showing = False
    for opt, _ in opts:
        if opt in ("-h", "--help"):
            print(USAGE.format(prog=prog), end="")
            return 0
        if opt == "--version":
            print(f"pesto {__version__} (passtd; pesto protocol version {wire.VERSION})")
            return 0
        if opt in ("-d", "--debug"):
            s.debug = True
        elif opt in ("-s", "--show"):
            showing = True
        else:
            update = True
    if len(args) != 1:
        print(USAGE.format(prog=prog), file=sys.stderr, end="")
        return 1
    s.path = args[0]
    if len(s.path.encode()) > 107:
        die(f'Invalid socket path "{s.path}"')
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(IO_TIMEOUT)
        try:
            sock.connect(s.path)
        except OSError as exc:
            die(f"Failed to connect to {s.path}: {exc.strerror}")
        s.say("Connected to passt/pasta control socket")
        try:
            tables = read_tables(sock, s)
        except (TimeoutError, OSError, struct.error) as exc:
            die(f"Couldn't read server greeting: {exc}")
        if not update:
            print(f"passt/pasta configuration ({s.path})")
            show(tables)
            return 0
        if showing:
            print(f"Previous configuration ({s.path})")
            show(tables)
        edit(tables, opts)
        if showing:
            print(f"Updated configuration ({s.path})")
            show(tables)
        try:
            sock.sendall(wire.pack_client_tables(tables))
            sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            die(f"Error writing to control socket: {exc.strerror}")
        except wire.PestoError as exc:
            die(str(exc))
        result = read_result(sock)
    if result is not None and result[0] != wire.STATUS_APPLIED:
        print(result[1], file=sys.stderr)
        return 1
    if result is not None:
        s.say(result[1])
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except Die as exc:
        print(exc, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
