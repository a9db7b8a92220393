"""The config file's [[egress]] tables and egress_default: parsed into one policy, every problem one line
naming the key (exit 2). Applying it on SIGHUP is shown live in tests/netns/test_egress.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from passtd.__main__ import main
from passtd.dataplane.core.egress import PROTO_ANY
from passtd.dataplane.core.flowtable import PROTO_TCP, PROTO_UDP
from passtd.options import parse_args
from tests.test_configfile import ENV, HOST, write

BASE = 'mode = "passt"\naddress = "10.0.2.15"\nnetmask = 24\ngateway = "10.0.2.2"\n'


def test_rules_default_and_ids(tmp_path: Path) -> None:
    text = BASE + (
        'egress_default = "deny"\n'
        '[[egress]]\naction = "allow"\ndestination = "192.0.2.0/24"\n'
        'protocol = "tcp"\nports = ["443", 8000]\n'
        '[[egress]]\nid = 1\naction = "deny"\nprotocol = "udp"\nports = "53"\n'
        '[[egress]]\naction = "allow"\ndestination = "2001:db8::/32"\n'
    )
    cfg = parse_args(["--config", write(tmp_path, text)], HOST, env=ENV)
    policy = cfg.egress
    assert policy is not None and policy.default_allow is False
    assert policy.ids() == [2, 1, 3]  # the free numbers from 1 in file order; an explicit id is kept
    first, second, third = policy.rules
    assert (first.allow, str(first.network), first.proto) == (True, "192.0.2.0/24", PROTO_TCP)
    assert first.ports == ((443, 443), (8000, 8000))
    assert (second.allow, second.network, second.proto) == (False, None, PROTO_UDP)
    assert second.ports == ((53, 53),)
    assert (str(third.network), third.proto) == ("2001:db8::/32", PROTO_ANY)


def test_no_egress_keys_means_none(tmp_path: Path) -> None:
    """Without egress keys the file does not own the rules: a SIGHUP leaves run-time changes alone."""
    assert parse_args(["--config", write(tmp_path, BASE)], HOST, env=ENV).egress is None
    only_default = parse_args(
        ["--config", write(tmp_path, BASE + 'egress_default = "allow"\n')], HOST, env=ENV
    )
    assert only_default.egress is not None and only_default.egress.rules == ()


ERRORS = [
    ('egress_default = "maybe"\n', "key 'egress_default': 'maybe' is not allow or deny"),
    ("egress_default = 1\n", "key 'egress_default': expected a string, got an integer"),
    ("egress = 5\n", "key 'egress': expected [[egress]] tables"),
    ('[[egress]]\ndestination = "192.0.2.0/24"\n', "key 'egress[0].action': missing: allow or deny"),
    ('[[egress]]\naction = "deny"\nport = 22\n', "key 'egress[0].port': unknown key (did you mean 'egress[0].ports'?)"),  # noqa: E501
    ('[[egress]]\naction = "deny"\ndestination = "192.0.2.1/24"\n', "key 'egress[0].destination': '192.0.2.1/24' is not an IPv4 or IPv6 prefix (192.0.2.1/24 has host bits set)"),  # noqa: E501
    ('[[egress]]\naction = "deny"\nprotocol = "sctp"\n', "key 'egress[0].protocol': 'sctp' is not tcp, udp, icmp or any"),  # noqa: E501
    ('[[egress]]\naction = "deny"\nprotocol = "tcp"\nports = ["70000"]\n', "key 'egress[0].ports': port 70000 is not 1-65535"),  # noqa: E501
    ('[[egress]]\naction = "deny"\nports = 22\n', "key 'egress[0].ports': port ranges need protocol tcp or udp"),  # noqa: E501
    ('[[egress]]\naction = "deny"\nports = [true]\n', "key 'egress[0].ports': expected a port, a range \"first-last\" or an array of them"),  # noqa: E501
    ('[[egress]]\naction = "deny"\nid = 0\n', "key 'egress[0].id': expected a whole number of at least 1"),
    ('[[egress]]\naction = "deny"\nid = 4\n[[egress]]\naction = "deny"\nid = 4\n', "key 'egress[1].id': duplicate rule id 4"),  # noqa: E501
]  # fmt: skip


@pytest.mark.parametrize(("text", "reason"), ERRORS)
def test_error_is_one_line_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, reason: str
) -> None:
    path = write(tmp_path, BASE + text)
    assert main(["passt", "--config", path]) == 2
    assert capsys.readouterr().err == f"passtd: error: {path}: {reason}\n"


def test_egress_rules_and_rate_limits_in_one_file(tmp_path: Path) -> None:
    """The two policy tables of one file are read together (each helper's own test had only its own)."""
    from passtd.dataplane.core.ratelimit import RateSpec

    egress = 'egress_default = "deny"\n[[egress]]\naction = "allow"\nprotocol = "icmp"\n'
    text = BASE + egress + '[limits]\negress = "10M"\n'
    cfg = parse_args(["--config", write(tmp_path, text)], HOST, env=ENV)
    assert cfg.egress is not None and cfg.egress.default_allow is False and len(cfg.egress.rules) == 1
    assert cfg.rate_limits is not None and cfg.rate_limits[1] is None
    assert isinstance(cfg.rate_limits[0], RateSpec) and cfg.rate_limits[0].rate == 10_000_000
