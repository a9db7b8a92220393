"""Command line → parsed options, with passt(1)/pasta(1) option names so users and tools feel at home.

    passtd passt [OPTIONS]
    passtd pasta [OPTIONS] [--netns NAME|PATH | PID | [--] CMD [ARGS...]]

This module only parses: argparse, the `--config` file merged under the command line, and the one-line
errors. What the values mean is checked in `resolve.py`, the address plan is `plan.py`, the host's defaults
come from the io layer. No I/O here beyond reading the files named in argv, so it loads fast.

Every problem is reported as exactly one line, `passtd: error: <option>: <what is wrong>`, with exit code 2:
argparse's usage dump is suppressed because a wall of usage hides the one word that was wrong. An unknown
option reads as glibc's getopt words it for passt (`unrecognized option '--X'`), because Podman looks for
exactly that to retry without an option an older passt lacks. `--help`, `--version` and
`--print-capabilities` print and exit 0.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final, NoReturn

from passtd import __version__
from passtd.errors import ConfigError
from passtd.limits import LOG_SIZE_DEFAULT, MTU_DEFAULT, MTU_MAX, MTU_MIN

if TYPE_CHECKING:  # the config file, Config and the data path load only when needed: start-up time
    from passtd.config import Config
    from passtd.configfile import FileConfig, OptionSpec
    from passtd.dataplane.io.hostview import HostView

PROG: Final = "passtd"
MODES: Final = ("passt", "pasta")
VHOST_USER_CAPABILITIES: Final = '{"type":"net"}'  # the vhost-user back-end program convention

_ARGUMENT_RE: Final = re.compile(r"argument (\S+): (.*)", re.DOTALL)

_PASTA_USAGE: Final = "passtd pasta [OPTIONS] [--netns NAME|PATH | PID | [--] CMD [ARGS...]]"
_DEFAULTS_EPILOG: Final = (
    "Without -a/-n/-g, the guest copies the address, prefix and gateway of the host's default-route\n"
    "interface for each IP family; a family with no host default route is disabled unless -a is given.\n"
    "Without -D/-S, nameservers and search domains come from /etc/resolv.conf."
)


# --------------------------------------------------------------------------- argparse, one line per error


def _unknown_option(arg: str) -> str:
    """glibc getopt's words, which integrators match: `unrecognized option '--X'`, `invalid option -- 'x'`."""
    if arg.startswith("--") or len(arg) != 2:
        return f"unrecognized option '{arg}'"
    return f"invalid option -- '{arg[1:]}'"


def _one_line(message: str) -> str:
    """Rewrite argparse's wording into `<option>: <problem>`, always on one line."""
    message = " ".join(message.split())
    if message.startswith("unrecognized arguments: "):
        first = message.removeprefix("unrecognized arguments: ").split(" ", 1)[0]
        if first == "--":
            return "--: passt mode takes no command"
        if first.startswith("-"):
            return _unknown_option(first)
        return f"{first}: unexpected argument"
    if message.startswith("the following arguments are required"):
        return "a mode is required: passt or pasta"
    m = _ARGUMENT_RE.fullmatch(message)
    if m is None:
        return message
    names, problem = m.group(1), m.group(2)
    if names == "MODE":
        bad = re.search(r"invalid choice: ('[^']*')", problem)
        return f"{bad.group(1) if bad else names} is not a mode: use passt or pasta"
    option = names.split("/")[-1]
    if problem == "expected one argument":
        problem = "expects a value"
    return f"{option}: {problem}"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(_one_line(message))

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if status != 0:
            raise ConfigError(_one_line(message or "invalid arguments"))
        if message:
            sys.stderr.write(message)
        raise SystemExit(0)  # --help, --version


class _LastFamily(argparse._StoreTrueAction):
    """-4 and -6: the last one given wins, as in passt (a config file sees them as plain flags)."""

    def __init__(self, option_strings: Sequence[str], dest: str, other: str, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, **kwargs)
        self.other = other

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, True)
        setattr(namespace, self.other, False)


class _PrintAndExit(argparse.Action):
    """--print-capabilities: print a fixed text on stdout and exit 0, as --version does."""

    def __init__(self, option_strings: Sequence[str], dest: str, text: str = "", **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.text = text

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        sys.stdout.write(self.text + "\n")
        sys.stdout.flush()
        raise SystemExit(0)


def _add_common(p: argparse.ArgumentParser) -> None:
    """Options shared by both modes, with passt(1)'s names and meaning."""
    a = p.add_argument
    mode = p.prog.split()[-1]
    a("--version", action="version", version=f"{mode} {__version__} (passtd)")
    a("-a", "--address", action="append", metavar="ADDR", help="guest IPv4 or IPv6 address (once per family)")
    a("-n", "--netmask", metavar="MASK", help="guest IPv4 netmask, dotted or prefix length")
    a(
        "-g",
        "--gateway",
        action="append",
        metavar="ADDR",
        help="guest gateway, IPv4 or IPv6 (once per family)",
    )
    a("-m", "--mtu", metavar="MTU",
      help=f"MTU for the guest, {MTU_MIN}..{MTU_MAX}, or 0 for the default {MTU_DEFAULT}")  # fmt: skip
    a("-M", "--mac-addr", metavar="ADDR", help="our MAC address toward the guest (default 9a:55:9a:55:9a:55)")
    a("-D", "--dns", action="append", metavar="ADDR", help="nameserver for the guest, repeatable, or 'none'")
    a("-S", "--search", action="append", metavar="LIST", help="search domains, space-separated, or 'none'")
    a("-p", "--pcap", metavar="FILE", help="capture guest traffic to a pcap FILE")
    a("-P", "--pid", metavar="FILE", help="write our PID to FILE")
    a("-f", "--foreground", action="store_true", help="do not daemonise")
    a("-d", "--debug", action="store_true", help="debug logging")
    a("-q", "--quiet", action="store_true", help="log errors only")
    a(
        "-4",
        "--ipv4-only",
        action=_LastFamily,
        other="ipv6_only",
        help="disable IPv6 (the last of -4/-6 wins)",
    )
    a(
        "-6",
        "--ipv6-only",
        action=_LastFamily,
        other="ipv4_only",
        help="disable IPv4 (the last of -4/-6 wins)",
    )
    a("--no-dhcp", action="store_true", help="no DHCP server")
    a("--no-ndp", action="store_true", help="no NDP responses (implies --no-ra)")
    a("--no-dhcpv6", action="store_true", help="no DHCPv6 server")
    a("--no-ra", action="store_true", help="no router advertisements")
    a("--no-icmp", action="store_true", help="no ICMP/ICMPv6 echo translation")
    a("--no-map-gw", action="store_true", help="do not map the gateway address to the host's loopback")
    a("--log-format", metavar="FORMAT", help="console (default) or json")
    a("-t", "--tcp-ports", action="append", metavar="SPEC", help="TCP ports forwarded to the guest")
    a("-u", "--udp-ports", action="append", metavar="SPEC", help="UDP ports forwarded to the guest")
    a("--dns-forward", action="append", metavar="ADDR",
      help="DNS queries the guest sends to ADDR go to the host's first nameserver")  # fmt: skip
    a("--max-flows", metavar="N", help="bound on concurrent flows (default 262144)")
    a("--control", metavar="PATH", help="gRPC control socket (default: next to the socket), or 'none'")
    a("--control-group", metavar="GROUP", help="group allowed to use the control socket (mode 0660)")
    a("--control-listen", metavar="HOST:PORT", help="also serve the control API over TCP (TLS, client certs)")
    a("--control-cert", metavar="FILE", help="PEM certificate chain for --control-listen")
    a("--control-key", metavar="FILE", help="PEM private key for --control-listen")
    a("--control-client-ca", metavar="FILE", help="CA bundle that client certificates must chain to")
    a("--control-insecure", action="store_true", help="plaintext --control-listen, loopback only")
    a("--metrics-listen", metavar="[ADDR:]PORT",
      help="serve Prometheus metrics on http://ADDR:PORT/metrics (ADDR defaults to 127.0.0.1; a "
           "non-loopback ADDR exposes them to that network)")  # fmt: skip
    a("--config", metavar="FILE", help="TOML file with long options as keys; the command line wins")
    a("-l", "--log-file", metavar="PATH", help="log to PATH instead of stderr")
    a(
        "--log-size",
        metavar="SIZE",
        help=f"cap of the log file in bytes, oldest lines go first (default {LOG_SIZE_DEFAULT})",
    )
    a("-i", "--interface", metavar="NAME", help="copy addresses and routes from host interface NAME")
    a("-o", "--outbound", action="append", metavar="ADDR",
      help="source address for TCP and UDP sockets toward the network (one per family)")  # fmt: skip
    a("--outbound-if4", metavar="NAME", help="bind IPv4 sockets toward the network to interface NAME")
    a("--outbound-if6", metavar="NAME", help="bind IPv6 sockets toward the network to interface NAME")
    a("--map-host-loopback", metavar="ADDR",
      help="guest-side address reaching the host's loopback (default: the gateway), or 'none'")  # fmt: skip
    a("--map-guest-addr", metavar="ADDR", help="guest-side address that reaches the host's own address")
    a(
        "--dns-host",
        metavar="ADDR",
        help="where DNS queries to the --dns-forward address go (default: host's)",
    )
    a("--freebind", action="store_true", help="bind forwarded ports to addresses not (yet) on the host")
    a("--no-splice", action="store_true", help="no loopback shortcut between host and namespace")
    a("--no-tcp", action="store_true", help="no TCP translation")
    a("--no-udp", action="store_true", help="no UDP translation")
    a("-H", "--hostname", metavar="NAME", help="hostname offered to the guest by DHCP (option 12)")
    a("--fqdn", metavar="NAME", help="FQDN offered by DHCP (option 81) and DHCPv6 (option 39)")
    a("--runas", metavar="USER[:GROUP]", help="drop to USER (and GROUP) once sockets and files are open")
    a("-c", "--conf-path", metavar="PATH", help="serve the pesto forwarding protocol on UNIX socket PATH")
    a(
        "-e",
        "--stderr",
        action="store_true",
        help="deprecated, no effect (passtd logs to stderr or --log-file)",
    )
    a("--trace", action="store_true", help="as --debug (passtd's most verbose level)")


_MODE_HELP: Final = {"passt": "serve a qemu guest on a UNIX socket", "pasta": "connect a network namespace"}


def _mode_kwargs(mode: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "allow_abbrev": False,
        "epilog": _DEFAULTS_EPILOG,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }
    if mode == "pasta":
        kwargs["usage"] = _PASTA_USAGE
    return kwargs


def _build_parser() -> argparse.ArgumentParser:
    """The whole command line: `passtd [--version] MODE [OPTIONS]` (needed for --config and its keys)."""
    top = _Parser(prog=PROG, allow_abbrev=False, description="User-mode networking for VMs and namespaces.")
    top.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    modes = top.add_subparsers(dest="mode", required=True, metavar="MODE", parser_class=_Parser)
    for mode in MODES:
        _add_mode(modes.add_parser(mode, help=_MODE_HELP[mode], **_mode_kwargs(mode)), mode)
    return top


def _build_mode_parser(mode: str) -> argparse.ArgumentParser:
    """One mode's parser alone, the same as the subcommand: half the work of the whole, for start-up time."""
    parser = _Parser(prog=f"{PROG} {mode}", **_mode_kwargs(mode))
    _add_mode(parser, mode)
    return parser


def _add_mode(p: argparse.ArgumentParser, mode: str) -> None:
    _add_common(p)
    if mode == "passt":
        _add_passt(p)
    else:
        _add_pasta(p)


def _add_passt(passt: argparse.ArgumentParser) -> None:
    pa = passt.add_argument
    pa("-s", "--socket", "--socket-path", metavar="PATH", help="UNIX socket path for qemu")
    pa("-1", "--one-off", action="store_true", help="quit when the guest disconnects")
    pa(
        "-F",
        "--fd",
        metavar="FD",
        help="use FD, an already connected stream socket, as the guest (implies -1)",
    )
    pa("--no-dhcp-dns", action="store_true", help="offer no nameservers by DHCP, DHCPv6 or NDP")
    pa("--no-dhcp-search", action="store_true", help="offer no search domains by DHCP, DHCPv6 or NDP")
    pa("--vhost-user", action="store_true",
       help="speak vhost-user on the socket (or --fd): qemu shares the guest's memory")  # fmt: skip
    pa("--print-capabilities", action=_PrintAndExit, text=VHOST_USER_CAPABILITIES,
       help="print the vhost-user capabilities and exit")  # fmt: skip


def _add_pasta(pasta: argparse.ArgumentParser) -> None:
    pasta.add_argument("-I", "--ns-ifname", metavar="NAME", help="tap device name in the namespace")
    pasta.add_argument(
        "-T", "--tcp-ns", action="append", metavar="SPEC", help="namespace TCP ports to the host"
    )
    pasta.add_argument(
        "-U", "--udp-ns", action="append", metavar="SPEC", help="namespace UDP ports to the host"
    )
    pasta.add_argument(
        "--config-net", action="store_true", help="configure addresses and routes in the netns"
    )
    pasta.add_argument(
        "--netns", metavar="NAME|PATH", help="join an existing netns (/run/netns/NAME or a path)"
    )
    pt = pasta.add_argument
    pt("--userns", metavar="PATH", help="join this user namespace too (default with a PID: the PID's)")
    pt("--netns-only", action="store_true", help="join only the network namespace of a PID")
    pt("--no-netns-quit", action="store_true", help="keep running when the namespace is deleted")
    pt("--ns-mac-addr", metavar="ADDR", help="MAC address of the tap device in the namespace")
    pt("--host-lo-to-ns-lo", action="store_true", help="host loopback connections appear from ns loopback")
    pt("--dhcp-dns", action="store_true", help="offer nameservers by DHCP, DHCPv6 and NDP")
    pt("--dhcp-search", action="store_true", help="offer search domains by DHCP, DHCPv6 and NDP")
    pt("--no-copy-routes", action="store_true", help="deprecated, no effect")
    pt("--no-copy-addrs", action="store_true", help="deprecated, no effect")
    # REMAINDER matches pasta's getopt "+": options end at the first PID or command word.
    pasta.add_argument(
        "target",
        nargs=argparse.REMAINDER,
        metavar="PID|CMD",
        help="PID, or [--] CMD [ARGS...] (default: $SHELL)",
    )


# --------------------------------------------------------------------------- public API


def option_specs(parser: argparse.ArgumentParser | None = None) -> dict[str, OptionSpec]:
    """Config-file keys: every long option of either mode, with the modes that accept it."""
    from passtd.configfile import OptionSpec

    top = parser or _build_parser()
    found: dict[str, tuple[str, str, set[str]]] = {}
    for mode, sub in _subparsers(top).items():
        for action in sub._actions:
            longs = [o for o in action.option_strings if o.startswith("--")]
            if not longs or action.dest in _NOT_KEYS:
                continue
            key = longs[0][2:]
            kind = (
                "flag"
                if isinstance(action, argparse._StoreTrueAction)
                else "list"
                if isinstance(action, argparse._AppendAction)
                else "value"
            )
            found.setdefault(key, (action.dest, kind, set()))[2].add(mode)
    return {
        key: OptionSpec(key, dest, kind, frozenset(modes))  # type: ignore[arg-type]
        for key, (dest, kind, modes) in found.items()
    }


_NOT_KEYS: Final = frozenset({"help", "version", "config", "target", "print_capabilities"})


def _subparsers(top: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the top parser has the mode subcommands")


def options_with_values(mode: str) -> frozenset[str]:
    """Option strings of `mode` that take a separate value (-t, --tcp-ports, ...), for argv rewriters."""
    sub = _subparsers(_build_parser())[mode]
    return frozenset(
        o for a in sub._actions if a.nargs is None and a.option_strings for o in a.option_strings
    )


def _option_dests(top: argparse.ArgumentParser) -> dict[str, str]:
    """Every option string (-t, --tcp-ports) → its argparse destination, to name keys in errors."""
    out: dict[str, str] = {}
    for sub in _subparsers(top).values():
        for action in sub._actions:
            for option in action.option_strings:
                out[option] = action.dest
    return out


def _leading_config(argv: list[str]) -> str | None:
    """`passtd --config FILE [OPTIONS]`: the mode then comes from the file."""
    if not argv:
        return None
    if argv[0] == "--config":
        if len(argv) < 2:
            raise ConfigError("--config: expects a value")
        return argv[1]
    if argv[0].startswith("--config="):
        return argv[0].removeprefix("--config=")
    return None


def _merge(ns: argparse.Namespace, file: FileConfig) -> set[str]:
    """Fill what the command line left unset from the file; returns the destinations the file supplied."""
    taken: set[str] = set()
    for dest, value in file.values.items():
        if getattr(ns, dest, None) in (None, False):
            setattr(ns, dest, value)
            taken.add(dest)
    return taken


def _blame_file(exc: ConfigError, file: FileConfig, taken: set[str], dests: Mapping[str, str]) -> ConfigError:
    """Rewrite `--mtu: reason` as `FILE: key 'mtu': reason` when the file supplied that option."""
    message = str(exc)
    head, sep, reason = message.partition(": ")
    if not sep:
        return exc
    for option in head.split("/"):
        dest = dests.get(option)
        if dest is not None and dest in taken:
            from passtd.configfile import key_error

            return key_error(file.path, file.key_of(dest), reason)
    return exc


class Parsed:
    """argv parsed (and merged with its --config file) but not yet resolved against the host."""

    __slots__ = ("argv", "file", "ns", "taken")

    def __init__(
        self, argv: tuple[str, ...], ns: argparse.Namespace, file: FileConfig | None, taken: frozenset[str]
    ) -> None:
        self.argv = argv
        self.ns = ns
        self.file = file
        self.taken = taken  # destinations the file supplied, to blame it in errors

    def resolve(self, host: HostView | None = None, env: Mapping[str, str] | None = None) -> Config:
        """The Config; a ConfigError about a value the file supplied names the file and its key."""
        from passtd.resolve import resolve

        try:
            config = resolve(self.ns, host, env)
        except ConfigError as exc:
            if self.file is None:
                raise
            raise _blame_file(exc, self.file, set(self.taken), _option_dests(_build_parser())) from None
        from dataclasses import replace

        if self.file is None:
            return replace(config, argv=self.argv)
        return replace(config, argv=self.argv, config_file=self.file.path, timeouts=self.file.timeouts,
                       egress=self.file.egress, rate_limits=self.file.rate_limits)  # fmt: skip


def parse_args(
    argv: Sequence[str], host: HostView | None = None, *, env: Mapping[str, str] | None = None
) -> Config:
    """Parse and resolve argv (and the --config file it names) into a Config; raises a one-line ConfigError.

    `host` and `env` are injected by tests; by default they are read from the system (netlink, resolv.conf,
    os.environ). `--help`/`--version` print and raise SystemExit(0), as argparse does.
    """
    return parse(argv).resolve(host, env)


def parse(argv: Sequence[str]) -> Parsed:
    """Only the syntax: argv and its --config file; cheap, so the entry point binds the guest socket next."""
    original = tuple(argv)
    args = list(argv)
    if args and args[0] in MODES and not any(a == "--config" or a.startswith("--config=") for a in args):
        ns = _build_mode_parser(args[0]).parse_args(args[1:])  # the common case, without a config file
        ns.mode = args[0]
        return Parsed(original, ns, None, frozenset())
    parser = _build_parser()
    file: FileConfig | None = None
    leading = _leading_config(args)
    if leading is not None:
        from passtd.configfile import key_error, load

        file = load(leading, option_specs(parser))
        if file.mode is None:
            raise key_error(leading, "mode", "required when the command line names no mode")
        args = [file.mode, *args]
    ns = parser.parse_args(args)
    taken: set[str] = set()
    if ns.config is not None:
        from passtd.configfile import load

        if not ns.config or "\0" in ns.config:
            raise ConfigError("--config: expects a file name")
        if file is None or file.path != ns.config:
            file = load(ns.config, option_specs(parser))
        file.check_mode(ns.mode)
        taken = _merge(ns, file)
    return Parsed(original, ns, file, frozenset(taken))
