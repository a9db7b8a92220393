"""The daemon's own messages as pure functions: reload naming the options that changed, the summary."""

from __future__ import annotations

from dataclasses import fields

from passtd.config import Config
from passtd.daemon import _LIVE_FIELDS, changed_options, startup_summary
from passtd.options import parse_args
from tests.test_options import HOST


def _changed(old: list[str], new: list[str]) -> list[str]:
    a, b = parse_args(old, HOST, env={}), parse_args(new, HOST, env={})
    names = [
        f.name
        for f in fields(Config)
        if f.name not in _LIVE_FIELDS and getattr(a, f.name) != getattr(b, f.name)
    ]
    return changed_options(a, b, names)


def test_reload_names_options_not_fields() -> None:
    assert _changed(["passt", "--mtu", "1500"], ["passt", "--mtu", "9000"]) == ["--mtu"]
    assert _changed(["passt"], ["passt", "--no-dhcpv6", "--no-ra", "-S", "example.org"]) == [
        "--no-dhcpv6", "--no-ra", "--search"
    ]  # fmt: skip
    assert _changed(["passt"], ["passt", "--max-flows", "100", "--pcap", "/tmp/x.pcap"]) == [
        "--max-flows",
        "--pcap",
    ]
    assert "ctx" not in " ".join(_changed(["passt"], ["passt", "-a", "10.0.2.20"]))


def test_startup_summary_of_passt() -> None:
    config = parse_args(["passt", "-s", "/tmp/p.sock", "--mtu", "1500", "-t", "2222:22", "--no-dhcpv6",
                         "--metrics-listen", "9464"], HOST, env={})  # fmt: skip
    summary = startup_summary(config)
    assert summary["mode"] == "passt" and summary["backend"] == "qemu stream /tmp/p.sock"
    assert summary["mtu"] == 1500 and summary["tcp_in"] == "2222:22"
    assert summary["services"] == "dhcp,ndp,ra"
    assert summary["metrics"] == "127.0.0.1:9464"
    assert str(summary["address4"]).endswith(f"/{config.ctx.ip4.prefix_len}")  # type: ignore[union-attr]
    assert "tcp_out" not in summary
