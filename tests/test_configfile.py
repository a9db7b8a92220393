"""--config FILE: keys are long options, the command line wins, every kind of mistake has one exact line."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

import pytest

from passtd.__main__ import main
from passtd.configfile import OptionSpec
from passtd.dataplane.core.ratelimit import RateSpec
from passtd.dataplane.core.timeouts import Timeouts
from passtd.dataplane.io.hostview import HostView
from passtd.errors import ConfigError
from passtd.options import option_specs, parse_args

REPO = Path(__file__).resolve().parents[1]
HOST = HostView(
    ifname4="eth0",
    addr4=IPv4Address("192.0.2.2"),
    prefix4=24,
    gw4=IPv4Address("192.0.2.1"),
    ifname6="eth0",
    addr6=IPv6Address("fd00::2"),
    prefix6=64,
    gw6=IPv6Address("fe80::1"),
    nameservers=(IPv4Address("192.0.2.53"),),
    search=("example.org",),
)
ENV = {"XDG_RUNTIME_DIR": "/run/user/1000"}
GOOD = """
mode = "passt"
address = "10.0.2.15"
netmask = 24
gateway = "10.0.2.2"
dns = ["10.0.2.3"]
tcp-ports = ["8080", "2222:22"]
mtu = 1500
foreground = true

[timeouts]
tcp_activity = 3600
tcp_max_retransmits = 5
"""


def write(tmp_path: Path, text: str, name: str = "g.toml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def parse(*argv: str) -> object:
    return parse_args(list(argv), HOST, env=ENV)


# --------------------------------------------------------------------------- good files


def test_file_gives_every_option_and_the_mode(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    cfg = parse_args(["--config", path], HOST, env=ENV)
    assert cfg.mode == "passt"
    assert cfg.ctx.ip4 is not None
    assert (str(cfg.ctx.ip4.addr), cfg.ctx.ip4.prefix_len, str(cfg.ctx.ip4.gateway)) == (
        "10.0.2.15",
        24,
        "10.0.2.2",
    )
    assert [str(d) for d in cfg.ctx.ip4.dns] == ["10.0.2.3"]
    assert cfg.ctx.mtu == 1500
    assert cfg.foreground is True
    assert cfg.forward is not None and cfg.forward.tcp_in.to_spec() == "2222:22,8080"
    assert cfg.timeouts == Timeouts(tcp_activity=3600.0, tcp_max_retransmits=5)
    assert isinstance(cfg.timeouts.tcp_activity, float)
    assert cfg.config_file == path
    assert cfg.argv == ("--config", path)  # SIGHUP parses exactly this again


def test_command_line_wins_option_by_option(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    cfg = parse_args(["passt", "--config", path, "-m", "9000", "-t", "80"], HOST, env=ENV)
    assert cfg.ctx.mtu == 9000
    assert cfg.forward is not None and cfg.forward.tcp_in.to_spec() == "80"  # replaced, not merged
    assert cfg.ctx.ip4 is not None and str(cfg.ctx.ip4.addr) == "10.0.2.15"  # not on the command line


def test_command_line_mode_wins_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, 'mode = "passt"\nmtu = 1500\n')
    cfg = parse_args(["pasta", "--config", path, "--netns", "x"], HOST, env=ENV)
    assert (cfg.mode, cfg.netns, cfg.ctx.mtu) == ("pasta", "x", 1500)


def test_strings_integers_and_single_values_are_accepted(tmp_path: Path) -> None:
    path = write(
        tmp_path, 'address = "10.0.2.15"\nnetmask = "255.255.255.0"\nmax-flows = 1000\ntcp-ports = 22\n'
    )
    cfg = parse("passt", "--config", path)
    assert cfg.max_flows == 1000  # type: ignore[attr-defined]
    assert cfg.ctx.ip4.prefix_len == 24  # type: ignore[attr-defined]
    assert cfg.forward.tcp_in.to_spec() == "22"  # type: ignore[attr-defined]


def test_a_false_flag_is_the_default(tmp_path: Path) -> None:
    path = write(tmp_path, "foreground = false\nno-dhcp = false\n")
    cfg = parse("passt", "--config", path)
    assert cfg.foreground is False and cfg.ctx.dhcp is True  # type: ignore[attr-defined]


@pytest.mark.parametrize("example", sorted((REPO / "examples").glob("*.toml")), ids=lambda p: p.name)
def test_examples_parse(example: Path) -> None:
    cfg = parse_args(["--config", str(example)], HOST, env=ENV)
    assert cfg.config_file == str(example)
    assert cfg.forward is not None and cfg.forward.tcp_in.to_spec() not in ("", "none")


def test_every_long_option_is_a_key_with_its_modes() -> None:
    specs = option_specs()
    assert specs["tcp-ports"] == OptionSpec("tcp-ports", "tcp_ports", "list", frozenset({"passt", "pasta"}))
    assert specs["socket"].modes == frozenset({"passt"})
    assert specs["netns"].modes == frozenset({"pasta"})
    assert specs["one-off"].kind == "flag"
    assert specs["mtu"].kind == "value"
    assert not {"config", "help", "version"} & set(specs)


# --------------------------------------------------------------------------- one test per kind of error

ERRORS = [
    ("unreadable", None, "cannot read: No such file or directory"),
    ("toml_syntax", "mtu = \n", "not valid TOML: Invalid value (at line 1, column 7)"),
    ("unknown_key_close", "mtux = 1\n", "key 'mtux': unknown key (did you mean 'mtu'?)"),
    ("unknown_key", "zzz = 1\n", "key 'zzz': unknown key"),
    ("flag_type", 'foreground = "yes"\n', "key 'foreground': expected true or false, got a string"),
    ("value_type", "mtu = 1.5\n", "key 'mtu': expected a string, got a float"),
    ("list_type", "dns = { a = 1 }\n", "key 'dns': expected a string or an array of strings, got a table"),
    ("list_item_type", "dns = [true]\n", "key 'dns': expected an array of strings, got a boolean in it"),
    ("empty_list", "dns = []\n", "key 'dns': expected at least one value, got an empty array"),
    ("bad_value", "mtu = 99999\n", "key 'mtu': 99999 is out of range 68..65520"),
    ("bad_port_spec", 'tcp-ports = ["99999"]\n', "key 'tcp-ports': bad port range '99999' (port above 65535)"),  # noqa: E501
    ("bad_address", 'address = "10.0.2"\n', "key 'address': '10.0.2' is not an IPv4 or IPv6 address"),
    ("conflict", 'address = "10.0.2.15"\ngateway = "10.0.2.15"\n', "key 'gateway': 10.0.2.15 is also the guest address"),  # noqa: E501
    ("wrong_mode_key", 'netns = "x"\n', "key 'netns': only valid in pasta mode"),
    ("bad_mode", 'mode = "qemu"\n', "key 'mode': 'qemu' is not a mode: use passt or pasta"),
    ("mode_type", "mode = 1\n", "key 'mode': expected a string, got an integer"),
    ("timeouts_type", "timeouts = 5\n", "key 'timeouts': expected a table, got an integer"),
    ("timeout_unknown", "[timeouts]\ntcp_synn = 5\n", "key 'timeouts.tcp_synn': unknown key (did you mean 'timeouts.tcp_syn'?)"),  # noqa: E501
    ("timeout_value_type", '[timeouts]\ntcp_syn = "5"\n', "key 'timeouts.tcp_syn': expected a number of seconds, got a string"),  # noqa: E501
    ("timeout_int", "[timeouts]\ntcp_max_retransmits = 2.5\n", "key 'timeouts.tcp_max_retransmits': expected an integer, got a float"),  # noqa: E501
    ("timeout_range", "[timeouts]\ntcp_syn = 0.5\n", "key 'timeouts.tcp_syn': 0.5 is out of range 1..3600"),
    ("timeout_order", "[timeouts]\ntcp_rto_min = 30\ntcp_rto_max = 10\n", "key 'timeouts.tcp_rto_min': 30 is above tcp_rto_max (10)"),  # noqa: E501
    ("limits_type", "limits = 5\n", "key 'limits': expected a table, got an integer"),
    ("limits_unknown", '[limits]\negres = "1M"\n', "key 'limits.egres': unknown key (did you mean 'limits.egress'?)"),  # noqa: E501
    ("limits_value", '[limits]\negress = "fast"\n', "key 'limits.egress': 'fast' is not a number with an optional k, M, G or T suffix"),  # noqa: E501
    ("limits_range", "[limits]\ningress = 5\n", "key 'limits.ingress': rate 5 bit/s is out of range 1000..1000000000000 (0: unlimited)"),  # noqa: E501
    ("limits_burst", '[limits]\negress = "1M"\negress_burst = 10\n', "key 'limits.egress_burst': burst 10 bytes is out of range 1500..1073741824"),  # noqa: E501
    ("limits_burst_alone", "[limits]\ningress_burst = 5000\n", "key 'limits.ingress_burst': needs limits.ingress"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(("text", "reason"), [(t, r) for _, t, r in ERRORS], ids=[k for k, _, _ in ERRORS])
def test_error_is_one_exact_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str | None, reason: str
) -> None:
    path = str(tmp_path / "missing.toml") if text is None else write(tmp_path, text)
    extra = [] if "address" in (text or "") else ["-a", "10.9.0.5", "-g", "10.9.0.1"]
    assert main(["passt", "--config", path, *extra]) == 2
    assert capsys.readouterr().err == f"passtd: error: {path}: {reason}\n"


def test_mode_is_required_without_one_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "mtu = 1500\n")
    assert main(["--config", path]) == 2
    assert (
        capsys.readouterr().err
        == f"passtd: error: {path}: key 'mode': required when the command line names no mode\n"
    )


def test_command_line_errors_keep_their_option_name(tmp_path: Path) -> None:
    """An option given on the command line is blamed on the command line, even with a file."""
    path = write(tmp_path, "mtu = 1500\n")
    with pytest.raises(ConfigError, match=r"^--mtu: 70000 is out of range 68\.\.65520$"):
        parse("passt", "--config", path, "-m", "70000")


def test_config_needs_a_value() -> None:
    with pytest.raises(ConfigError, match=r"^--config: expects a value$"):
        parse("--config")


def test_limits_table(tmp_path: Path) -> None:
    path = write(tmp_path, '[limits]\negress = "10M"\ningress = 2500000000\ningress_burst = "1.5M"\n')
    cfg = parse("passt", "--config", path)
    assert cfg.rate_limits == (RateSpec(10_000_000, 25_000), RateSpec(2_500_000_000, 1_500_000))  # type: ignore[attr-defined]
    path = write(tmp_path, '[limits]\negress = "none"\n', "n.toml")
    assert parse("passt", "--config", path).rate_limits == (None, None)  # type: ignore[attr-defined]
    assert parse("passt", "-a", "10.9.0.5", "-g", "10.9.0.1").rate_limits is None  # type: ignore[attr-defined]
