"""The TOML config file (`--config FILE`): the long options as keys, plus a `[timeouts]` table.

    mode = "passt"                 # or "pasta"; needed only when the command line names no mode
    socket = "/run/passtd/vm1.socket"
    address = "10.0.2.15"          # a list for one address per family: ["10.0.2.15", "fd00::15"]
    netmask = 24
    dns = ["10.0.2.3"]
    tcp-ports = ["8080", "2222:22"]
    mtu = 1500
    foreground = true

    [timeouts]                     # seconds; names and ranges of passtd/dataplane/core/timeouts.py
    tcp_activity = 3600

    egress_default = "deny"        # egress rules (README "Egress rules"): first match wins, else this
    [[egress]]
    action = "allow"
    destination = "192.0.2.0/24"   # as the guest addresses it; omitted: any. The gateway is the host.
    protocol = "tcp"               # tcp, udp, icmp or any (the default)
    ports = ["443", "8000-8080"]   # tcp and udp only; omitted: every port
    [limits]                       # rate limits, bit/s ("10M", "1G", "none"); bursts in bytes (optional)
    egress = "10M"
    ingress = "100M"
    egress_burst = "64k"

A key is a long option without its dashes and takes what the option takes: a flag is a boolean, a repeatable
option a string or an array of strings, any other option a string (numbers may be written as integers).
`config`, `help` and `version` are not keys. The command line wins over the file, option by option.

Every problem is one line naming the file and the key (`FILE: key 'mtu': 99999 is out of range 68..65520`),
so `systemctl status` shows what to fix. This module checks shapes and types; what a value means is checked by
the same code as the command line (options.py), whose messages are rewritten to name the key.
"""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Final, Literal

from passtd.dataplane.core.egress import (
    EgressError,
    EgressPolicy,
    assign_ids,
    make_policy,
    make_rule,
    parse_action,
    parse_network,
    parse_ports,
    parse_proto,
)
from passtd.dataplane.core.ratelimit import RateSpec, parse_quantity
from passtd.dataplane.core.timeouts import RANGES, Timeouts
from passtd.errors import ConfigError

Kind = Literal["flag", "value", "list"]
MODES: Final = ("passt", "pasta")
TIMEOUTS_TABLE: Final = "timeouts"
EGRESS_TABLES: Final = "egress"
EGRESS_DEFAULT: Final = "egress_default"
_EGRESS_KEYS: Final = ("id", "action", "destination", "protocol", "ports")
LIMITS_TABLE: Final = "limits"
LIMIT_KEYS: Final = ("egress", "ingress", "egress_burst", "ingress_burst")
RateLimits = tuple[RateSpec | None, RateSpec | None]  # (egress, ingress); None: unlimited
_INT_TIMEOUTS: Final = frozenset({"tcp_max_retransmits"})


@dataclass(frozen=True, slots=True)
class OptionSpec:
    """One config key: the argparse destination it fills, its shape and the modes that accept it."""

    key: str
    dest: str
    kind: Kind
    modes: frozenset[str]


@dataclass(frozen=True, slots=True)
class FileConfig:
    """A checked config file: values in the shape argparse would have produced, by destination."""

    path: str
    mode: str | None
    values: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # dest → key, for error messages
    modes: dict[str, frozenset[str]] = field(default_factory=dict)  # dest → modes accepting it
    timeouts: Timeouts = field(default_factory=Timeouts)
    # [[egress]] and egress_default; None when the file has neither (rules set at run time then stay)
    egress: EgressPolicy | None = None
    rate_limits: RateLimits | None = None  # the [limits] table; None when the file has none

    def check_mode(self, mode: str) -> None:
        """Reject keys of the other mode (a passt `socket` in a pasta file is a mistake, not a no-op)."""
        for dest, key in self.keys.items():
            if mode not in self.modes[dest]:
                other = " and ".join(sorted(self.modes[dest]))
                raise key_error(self.path, key, f"only valid in {other} mode")

    def key_of(self, dest: str) -> str:
        return self.keys[dest]


def key_error(path: str, key: str, reason: str) -> ConfigError:
    return ConfigError(f"{path}: key '{key}': {reason}")


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date or time"


def read_toml(path: str) -> dict[str, Any]:
    """The parsed document; unreadable files and syntax errors become one-line ConfigErrors."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8 text") from None


def _unknown(path: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return key_error(path, key, f"unknown key{hint}")


def _scalar(path: str, key: str, value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise key_error(path, key, f"expected a string, got {_type_name(value)}")


def _value(path: str, spec: OptionSpec, value: object) -> Any:
    key = spec.key
    if spec.kind == "flag":
        if not isinstance(value, bool):
            raise key_error(path, key, f"expected true or false, got {_type_name(value)}")
        return value
    if spec.kind == "value":
        return _scalar(path, key, value)
    if isinstance(value, list):
        if not value:
            raise key_error(path, key, "expected at least one value, got an empty array")
        out: list[str] = []
        for item in value:
            if not isinstance(item, str) and (isinstance(item, bool) or not isinstance(item, int)):
                raise key_error(path, key, f"expected an array of strings, got {_type_name(item)} in it")
            out.append(str(item))
        return out
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return [str(value)]
    raise key_error(path, key, f"expected a string or an array of strings, got {_type_name(value)}")


def _timeouts(path: str, table: object) -> Timeouts:
    if not isinstance(table, dict):
        raise key_error(path, TIMEOUTS_TABLE, f"expected a table, got {_type_name(table)}")
    names = [f.name for f in fields(Timeouts)]
    changes: dict[str, float | int] = {}
    for name, value in table.items():
        key = f"{TIMEOUTS_TABLE}.{name}"
        if name not in names:
            raise _unknown(path, key, [f"{TIMEOUTS_TABLE}.{n}" for n in names])
        if name in _INT_TIMEOUTS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise key_error(path, key, f"expected an integer, got {_type_name(value)}")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise key_error(path, key, f"expected a number of seconds, got {_type_name(value)}")
        low, high = RANGES[name]
        if not low <= value <= high:
            raise key_error(path, key, f"{value} is out of range {low:g}..{high:g}")
        changes[name] = value if name in _INT_TIMEOUTS else float(value)
    timeouts = replace(Timeouts(), **changes)  # type: ignore[arg-type]  # names and types checked above
    if timeouts.tcp_rto_min > timeouts.tcp_rto_max:
        raise key_error(
            path,
            f"{TIMEOUTS_TABLE}.tcp_rto_min",
            f"{timeouts.tcp_rto_min:g} is above tcp_rto_max ({timeouts.tcp_rto_max:g})",
        )
    return timeouts


def _egress(path: str, tables: object, default: object) -> EgressPolicy:
    """[[egress]] tables in order and the default; ids are `id` when given, else the next free number from
    1 in file order, so the same file read again gives the same ids (and a rule keeps its counter)."""
    allow = True
    if default is not None:
        if not isinstance(default, str):
            raise key_error(path, EGRESS_DEFAULT, f"expected a string, got {_type_name(default)}")
        try:
            allow = parse_action(default)
        except EgressError as exc:
            raise key_error(path, EGRESS_DEFAULT, str(exc).split(": ", 1)[1]) from None
    if tables is None:
        tables = []
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise key_error(path, EGRESS_TABLES, "expected [[egress]] tables")
    requested = [
        t["id"] if isinstance(t.get("id"), int) and not isinstance(t["id"], bool) else 0 for t in tables
    ]
    ids = assign_ids(requested)
    rules = []
    for i, table in enumerate(tables):
        where = f"{EGRESS_TABLES}[{i}]"
        for name in table:
            if name not in _EGRESS_KEYS:
                raise _unknown(path, f"{where}.{name}", [f"{where}.{k}" for k in _EGRESS_KEYS])
        for name in ("action", "destination", "protocol"):
            if name in table and not isinstance(table[name], str):
                raise key_error(path, f"{where}.{name}", f"expected a string, got {_type_name(table[name])}")
        if "action" not in table:
            raise key_error(path, f"{where}.action", "missing: allow or deny")
        rule_id = table.get("id")
        if rule_id is not None and (isinstance(rule_id, bool) or not isinstance(rule_id, int) or rule_id < 1):
            raise key_error(path, f"{where}.id", "expected a whole number of at least 1")
        ports = table.get("ports", [])
        ports = [ports] if isinstance(ports, str | int) and not isinstance(ports, bool) else ports
        if not isinstance(ports, list) or not all(
            isinstance(p, str | int) and not isinstance(p, bool) for p in ports
        ):
            raise key_error(
                path, f"{where}.ports", 'expected a port, a range "first-last" or an array of them'
            )
        try:
            rules.append(
                make_rule(
                    ids[i],
                    parse_action(table["action"]),
                    parse_network(table.get("destination", "")),
                    parse_proto(table.get("protocol", "any")),
                    parse_ports(",".join(str(p) for p in ports)),
                )
            )
        except EgressError as exc:
            raise key_error(path, f"{where}.{exc.field}", str(exc).split(": ", 1)[1]) from None
    try:
        return make_policy(rules, allow)
    except EgressError as exc:  # a duplicate id: "rules[3].id"
        raise key_error(path, f"{EGRESS_TABLES}[{exc.field[6:]}", str(exc).split(": ", 1)[1]) from None


def _rate_limits(path: str, table: object) -> RateLimits:
    """The [limits] table: egress/ingress rates (bit/s) and optional bursts (bytes)."""
    if not isinstance(table, dict):
        raise key_error(path, LIMITS_TABLE, f"expected a table, got {_type_name(table)}")
    values: dict[str, int] = {}
    for name, value in table.items():
        key = f"{LIMITS_TABLE}.{name}"
        if name not in LIMIT_KEYS:
            raise _unknown(path, key, [f"{LIMITS_TABLE}.{n}" for n in LIMIT_KEYS])
        try:
            values[name] = parse_quantity(value)
        except ValueError as exc:
            raise key_error(path, key, str(exc)) from None
    specs: list[RateSpec | None] = []
    for direction in ("egress", "ingress"):
        rate, burst = values.get(direction, 0), values.get(f"{direction}_burst", 0)
        if not rate:
            if burst:
                raise key_error(
                    path, f"{LIMITS_TABLE}.{direction}_burst", f"needs {LIMITS_TABLE}.{direction}"
                )
            specs.append(None)
            continue
        try:
            specs.append(RateSpec.of(rate, burst))
        except ValueError as exc:
            name = f"{direction}_burst" if str(exc).startswith("burst") else direction
            raise key_error(path, f"{LIMITS_TABLE}.{name}", str(exc)) from None
    return specs[0], specs[1]


def load(path: str, specs: Mapping[str, OptionSpec]) -> FileConfig:
    """Read and check `path` against the option table `specs` (key → spec)."""
    doc = read_toml(path)
    mode: str | None = None
    values: dict[str, Any] = {}
    keys: dict[str, str] = {}
    modes: dict[str, frozenset[str]] = {}
    timeouts = Timeouts()
    known = sorted([*specs, "mode", TIMEOUTS_TABLE, EGRESS_TABLES, EGRESS_DEFAULT, LIMITS_TABLE])
    egress = None
    if EGRESS_TABLES in doc or EGRESS_DEFAULT in doc:
        egress = _egress(path, doc.pop(EGRESS_TABLES, None), doc.pop(EGRESS_DEFAULT, None))
    rate_limits: RateLimits | None = None
    for key, value in doc.items():
        if key == "mode":
            if not isinstance(value, str):
                raise key_error(path, key, f"expected a string, got {_type_name(value)}")
            if value not in MODES:
                raise key_error(path, key, f"{value!r} is not a mode: use passt or pasta")
            mode = value
            continue
        if key == TIMEOUTS_TABLE:
            timeouts = _timeouts(path, value)
            continue
        if key == LIMITS_TABLE:
            rate_limits = _rate_limits(path, value)
            continue
        spec = specs.get(key)
        if spec is None:
            raise _unknown(path, key, known)
        values[spec.dest] = _value(path, spec, value)
        keys[spec.dest] = key
        modes[spec.dest] = spec.modes
    config = FileConfig(path, mode, values, keys, modes, timeouts, egress, rate_limits)
    if mode is not None:
        config.check_mode(mode)
    return config
