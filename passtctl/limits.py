"""`passtctl limits get|set`: the guest's rate limits (token buckets for its egress and ingress).

Rates are bit/s with an optional decimal suffix (k, M, G, T: 10M is 10 000 000 bit/s); `0` or `none`
clears a limit. Bursts are bytes with the same suffixes (64k is 64 000 bytes); left out, the daemon picks
20 ms at the rate, at least 16 KiB.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import TYPE_CHECKING, Any, Final

from passtctl.render import render_json, render_table
from passtd.control.pb import passt_pb2

if TYPE_CHECKING:
    from passtctl.client import ControlClient

SUFFIX: Final = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_NUMBER: Final = re.compile(r"(\d+(?:\.\d+)?)([kmgt]?)")
EXIT_OK: Final = 0
EXIT_USAGE: Final = 2


def parse_quantity(text: str, unit: str) -> int:
    """`10M` → 10000000; `none`/`0` → 0. Raises argparse.ArgumentTypeError (a usage error, exit 2)."""
    word = "".join(text.split()).lower()
    if word in ("none", "unlimited"):
        return 0
    for tail in ("bit/s", "bps", "b"):
        if word.endswith(tail) and len(word) > len(tail):
            word = word[: -len(tail)]
            break
    m = _NUMBER.fullmatch(word)
    if m is None:
        raise argparse.ArgumentTypeError(
            f"{text[:40]!r}: expected {unit} as a number with an optional k, M, G or T suffix, or 'none'"
        )
    value = float(m.group(1)) * SUFFIX[m.group(2)]
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: not a whole number of {unit}")
    if value >= 2**64:
        raise argparse.ArgumentTypeError(f"{text[:40]!r}: too large")
    return int(value)


def parse_rate(text: str) -> int:
    return parse_quantity(text, "bit/s")


def parse_burst(text: str) -> int:
    return parse_quantity(text, "bytes")


def format_rate(rate: int) -> str:
    """10000000 → `10 Mbit/s`; 0 → `unlimited`."""
    if not rate:
        return "unlimited"
    for suffix, scale in (("T", 10**12), ("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if rate >= scale:
            return f"{rate / scale:g} {suffix}bit/s"
    return f"{rate} bit/s"


def render_limits(reply: passt_pb2.RateLimits) -> str:
    rows: list[tuple[str, str]] = []
    for name, limit in (("egress", reply.egress), ("ingress", reply.ingress)):
        rows.append((name, format_rate(limit.rate) + (f", burst {limit.burst} bytes" if limit.rate else "")))
    rows.extend((name, str(n)) for name, n in sorted(reply.counters.items()))
    return render_table(rows)


def register(commands: Any) -> None:
    """Add `limits` to passtctl's subcommands (`commands`: its argparse subparsers object)."""
    limits = commands.add_parser("limits", help="show or change the guest's rate limits")
    cmds = limits.add_subparsers(dest="limits_command", metavar="ACTION", required=True)
    get = cmds.add_parser("get", help="show the rate limits and their counters")
    get.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table or json")
    get.set_defaults(run=_get)
    put = cmds.add_parser(
        "set",
        help="change the rate limits (e.g. --egress 10M --ingress 100M; 'none' clears one)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    put.add_argument("--egress", type=parse_rate, metavar="RATE", help="guest → network, bit/s")
    put.add_argument("--ingress", type=parse_rate, metavar="RATE", help="network → guest, bit/s")
    put.add_argument("--burst", type=parse_burst, metavar="BYTES", help="bucket size of the directions given")
    put.add_argument("--egress-burst", type=parse_burst, metavar="BYTES", help="egress bucket size")
    put.add_argument("--ingress-burst", type=parse_burst, metavar="BYTES", help="ingress bucket size")
    put.add_argument("-o", "--output", choices=("table", "json"), default="table", help="table or json")
    put.set_defaults(run=_set)


def _write(reply: passt_pb2.RateLimits, output: str) -> None:
    sys.stdout.write(render_json(reply) if output == "json" else render_limits(reply))


def _get(client: ControlClient, args: argparse.Namespace) -> int:
    _write(client.rate_limits(), args.output)
    return EXIT_OK


def _set(client: ControlClient, args: argparse.Namespace) -> int:
    if args.egress is None and args.ingress is None:
        sys.stderr.write("passtctl: error: limits set: give --egress and/or --ingress (a rate, or 'none')\n")
        return EXIT_USAGE
    request = passt_pb2.SetRateLimitsRequest()
    for name, rate, burst in (
        ("egress", args.egress, args.egress_burst),
        ("ingress", args.ingress, args.ingress_burst),
    ):
        if rate is None:
            if burst is not None:
                sys.stderr.write(f"passtctl: error: limits set: --{name}-burst needs --{name}\n")
                return EXIT_USAGE
            continue
        getattr(request, name).CopyFrom(
            passt_pb2.RateLimit(
                rate=rate, burst=(burst if burst is not None else args.burst or 0) if rate else 0
            )
        )
    _write(client.set_rate_limits(request), args.output)
    return EXIT_OK
