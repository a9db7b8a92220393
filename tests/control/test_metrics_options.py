"""--metrics-listen and the control-listen mistakes as options: parsed values, one-line errors, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from passtd.errors import ConfigError
from passtd.options import parse_args
from tests.test_options import HOST


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("9464", ("127.0.0.1", 9464)),
        (":9464", ("127.0.0.1", 9464)),
        ("127.0.0.2:80", ("127.0.0.2", 80)),
        ("[::1]:9464", ("::1", 9464)),
        ("0.0.0.0:9464", ("0.0.0.0", 9464)),  # the operator's explicit choice (README)
        ("localhost:1", ("localhost", 1)),
    ],
)
def test_metrics_listen_forms(value: str, expected: tuple[str, int]) -> None:
    assert parse_args(["passt", "--metrics-listen", value], HOST, env={}).metrics_listen == expected


def test_metrics_listen_off_by_default() -> None:
    assert parse_args(["passt"], HOST, env={}).metrics_listen is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("99999", "--metrics-listen: bad port '99999' (0..65535)"),
        ("x:", "--metrics-listen: bad port '' (0..65535)"),
        ("::1:80", "--metrics-listen: write IPv6 addresses in brackets, e.g. [::1]:80"),
        ("example.org:80", "--metrics-listen: 'example.org' is not an IP address"),
    ],
)
def test_metrics_listen_refused(value: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_args(["passt", "--metrics-listen", value], HOST, env={})
    assert str(info.value) == message


def test_metrics_listen_from_the_config_file(tmp_path: Path) -> None:
    conf = tmp_path / "p.toml"
    conf.write_text('metrics-listen = "9465"\n')
    assert parse_args(["passt", "--config", str(conf)], HOST, env={}).metrics_listen == ("127.0.0.1", 9465)


def test_control_insecure_off_loopback_is_a_usage_error() -> None:
    """A mistake in the options: one line, exit 2, before anything starts (it used to be exit 1)."""
    out = subprocess.run(
        [sys.executable, "-m", "passtd", "passt", "-f", "--control-listen", "0.0.0.0:0",
         "--control-insecure"],
        capture_output=True, text=True, timeout=20, check=False,
    )  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "passtd: error: --control-insecure: only allowed on a loopback address, not '0.0.0.0' "
        "(use --control-cert, --control-key and --control-client-ca)"
    ]
