"""passtctl limits: quantities, rendering and usage errors (pure; the live command is in
tests/netns/test_ratelimit.py)."""

from __future__ import annotations

import argparse

import pytest

from passtctl.cli import main
from passtctl.limits import format_rate, parse_burst, parse_rate, render_limits
from passtd.control.pb import passt_pb2


@pytest.mark.parametrize(
    ("text", "value"),
    [("10M", 10_000_000), ("100k", 100_000), ("1G", 10**9), ("1.5m", 1_500_000), ("250", 250), ("none", 0),
     ("0", 0), ("2Mbit/s", 2_000_000), ("5 Mbps", 5_000_000), ("1T", 10**12)],
)  # fmt: skip
def test_rates(text: str, value: int) -> None:
    assert parse_rate(text) == value


@pytest.mark.parametrize("text", ["fast", "-1M", "1.0000001k", "", "1x", "M", "99999999999T", "1e3"])
def test_bad_rates_are_usage_errors(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_rate(text)


def test_burst_and_formatting() -> None:
    assert parse_burst("64k") == 64_000
    assert format_rate(0) == "unlimited"
    assert format_rate(10_000_000) == "10 Mbit/s"
    assert format_rate(1_500) == "1.5 kbit/s"
    reply = passt_pb2.RateLimits(egress=passt_pb2.RateLimit(rate=2_000_000, burst=16384), counters={"x": 3})
    assert render_limits(reply) == "egress   2 Mbit/s, burst 16384 bytes\ningress  unlimited\nx        3\n"


def test_set_needs_a_direction(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", "/nonexistent/ctl.sock", "limits", "set"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert main(["-c", "/nonexistent/ctl.sock", "limits", "set", "--egress", "lots"]) == 2
