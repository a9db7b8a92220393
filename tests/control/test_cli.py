"""passtctl as a user runs it: a subprocess against a real control server serving from a background thread.

The thread exists only in the test, to stand in for the daemon's process; the daemon itself serves control
on its dataplane loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from passtctl.cli import main, parse_assignment, parse_duration
from passtctl.render import render_status_table
from passtd import __version__
from passtd.control.convert import status_to_pb
from passtd.control.server import start_control_server, stop_control_server
from passtd.errors import BackendError
from tests.control.samples import SAMPLE, FakeControlAPI

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"


class ServerThread:
    """A control server on its own uvloop loop in a thread; start() waits until it accepts calls."""

    def __init__(self, path: Path, api: FakeControlAPI) -> None:
        self.path = path
        self.api = api
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="control-server", daemon=True)

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = await start_control_server(self.api, str(self.path))
        try:
            self._ready.set()
            await self._stop.wait()
        finally:
            await stop_control_server(server, 0)

    def start(self) -> None:
        self._thread.start()
        assert self._ready.wait(10), "control server did not start"
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)
        assert not self._thread.is_alive(), "control server did not stop"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    thread = ServerThread(tmp_path / "ctl.sock", FakeControlAPI())
    thread.start()
    try:
        yield thread
    finally:
        thread.stop()


def passtctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k != "PASSTCTL_CONTROL"}
    full_env.update(env or {})
    return subprocess.run(
        [str(PYTHON), "-m", "passtctl", *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_status_json(server: ServerThread) -> None:
    done = passtctl("-c", str(server.path), "status", "-o", "json")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    data = json.loads(done.stdout)
    assert data["version"] == SAMPLE.version
    assert data["mode"] == "passt"
    assert data["backend"]["guest_mac"] == "52:54:00:12:34:56"
    assert data["counters"]["dropped"] == {"arp.truncated": 1, "ipv4.bad_checksum": 2}
    assert data["flows"] == {"tcp": 3, "udp": 2}
    limits = data["limits"]
    assert limits["max_flows"] == 4096
    assert limits["flows"] == {"max": 4096, "in_use": 5}  # numbers, not the proto3 mapping's strings
    assert limits["flows_by_protocol"]["tcp"] == {"max": 2048, "in_use": 3}
    assert limits["pending_syns"] == {"max": 512, "in_use": 0}
    assert limits["watch_streams"] == {"max": 32, "in_use": 1}
    assert limits["concurrent_rpcs"]["max"] == 128  # the server's own count replaces the sample's
    assert limits["descriptors"] == {
        "soft_limit": 1048576, "hard_limit": 1048576, "reserved": 256, "in_use": 40
    }  # fmt: skip


def test_status_table(server: ServerThread) -> None:
    done = passtctl("-c", f"unix:{server.path}", "status")
    assert done.returncode == 0, done.stderr
    assert done.stdout == render_status_table(status_to_pb(SAMPLE))


def test_health_serving(server: ServerThread) -> None:
    done = passtctl("-c", str(server.path), "health")
    assert (done.returncode, done.stdout, done.stderr) == (0, "SERVING\n", "")
    done = passtctl("-c", str(server.path), "health", "--service", "passt.v1.Control")
    assert (done.returncode, done.stdout) == (0, "SERVING\n")


def test_health_unknown_service(server: ServerThread) -> None:
    done = passtctl("-c", str(server.path), "health", "--service", "nope")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == "passtctl: error: unknown service 'nope'\n"


def test_address_from_environment(server: ServerThread) -> None:
    done = passtctl("health", env={"PASSTCTL_CONTROL": f"unix://{server.path}"})
    assert (done.returncode, done.stdout) == (0, "SERVING\n"), done.stderr


def test_server_error_is_one_line(server: ServerThread) -> None:
    server.api.error = BackendError("tap device tap0 vanished\nwhile reading")
    done = passtctl("-c", str(server.path), "status")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == "passtctl: error: tap device tap0 vanished while reading\n"


def test_nothing_listening(tmp_path: Path) -> None:
    path = tmp_path / "none.sock"
    done = passtctl("-c", str(path), "status")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr == f"passtctl: error: cannot connect to {path}: no such file or directory\n"


def test_timeout(tmp_path: Path) -> None:
    path = tmp_path / "mute.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as mute:
        mute.bind(str(path))
        mute.listen()  # connections complete in the backlog, and nobody ever speaks HTTP/2 on them
        done = passtctl("-c", str(path), "--timeout", "0.5", "status")
    assert done.returncode == 1
    assert done.stderr == f"passtctl: error: no answer from {path} within 0.5 s\n"


def test_nothing_listening_default_address() -> None:
    if Path("/run/passtd/passtd.control").exists():
        pytest.skip("a passtd control socket exists on this machine")
    done = passtctl("health")
    assert done.returncode == 1
    assert done.stderr.startswith("passtctl: error: cannot connect to /run/passtd/passtd.control")
    assert done.stderr.count("\n") == 1


def test_bad_subcommand() -> None:
    done = passtctl("frobnicate")
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.count("\n") == 1
    assert done.stderr.startswith("passtctl: error: argument COMMAND: invalid choice: 'frobnicate'")


@pytest.mark.parametrize(
    "args",
    [(), ("status", "-o", "yaml"), ("--timeout", "0", "health"), ("-c", "unix:", "health"), ("status", "x")],
)
def test_usage_errors_in_process(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(list(args)) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("passtctl: error: ")
    assert captured.err.count("\n") == 1


@pytest.mark.parametrize("args", [("--help",), ("status", "--help"), ("health", "--help")])
def test_help(args: tuple[str, ...]) -> None:
    done = passtctl(*args)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: passtctl")


def test_version() -> None:
    done = passtctl("--version")
    assert (done.returncode, done.stdout) == (0, f"passtctl {__version__}\n")


def test_cli_imports_no_daemon() -> None:
    code = (
        "import sys, passtctl.cli\n"
        "heavy = ('uvloop', 'pyroute2', 'structlog', 'passtd.dataplane', 'passtd.daemon', 'passtd.options')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy or m.startswith(heavy)))\n"
    )
    done = subprocess.run(
        [str(PYTHON), "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout == "[]\n"


# -- conns, ports, timeouts ----------------------------------------------------------------------------


def test_conns_list_json_and_filter(server: ServerThread) -> None:
    done = passtctl("-c", str(server.path), "conns", "list", "-o", "json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [c["id"] for c in data["connections"]] == [7, 9, 12]
    assert data["connections"][0]["tcp"]["mss_to_guest"] == 65480
    done = passtctl("-c", str(server.path), "conns", "list", "--proto", "udp")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ID  PROTO  STATE")
    assert len(lines) == 2 and lines[1].split()[:3] == ["9", "udp", "ACTIVE"]


def test_conns_reset(server: ServerThread) -> None:
    done = passtctl("-c", str(server.path), "conns", "reset", "7", "12")
    assert (done.returncode, done.stdout) == (0, "reset 2 connections: 7 12\n"), done.stderr
    done = passtctl("-c", str(server.path), "conns", "reset", "7")
    assert (done.returncode, done.stderr) == (1, "passtctl: error: no connection with id 7\n")
    done = passtctl("-c", str(server.path), "conns", "reset", "--port", "53")
    assert (done.returncode, done.stdout) == (0, "reset 1 connection: 9\n")
    done = passtctl("-c", str(server.path), "conns", "reset", "--all")
    assert (done.returncode, done.stdout) == (0, "reset 0 connections\n")
    assert server.api.reset_log == [7, 12, 9]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("conns", "reset"), "give connection ids, --all, or a filter such as --port N"),
        (("conns", "reset", "3", "--all"), "give connection ids, or --all/--port/..., not both"),
        (("conns", "reset", "x"), "argument ID: not a connection id: 'x'"),
        (("conns", "list", "--port", "0"), "argument --port: not a port number (1-65535): '0'"),
        (("timeouts", "set", "udp_idle"), "argument KEY=VALUE: expected KEY=VALUE, not 'udp_idle'"),
        (("timeouts", "set", "udp=2s"), "argument KEY=VALUE: unknown timeout 'udp'"),
        (("timeouts", "set", "udp_idle=2x"), "argument KEY=VALUE: udp_idle: bad duration '2x'"),
        (
            ("timeouts", "set", "tcp_max_retransmits=2s"),
            "argument KEY=VALUE: tcp_max_retransmits: a count, not '2s'",
        ),
        (("ports", "add", "22", "-t", "-u"), "argument -u: not allowed with argument -t"),
    ],
)
def test_cli_usage_errors(server: ServerThread, args: tuple[str, ...], message: str) -> None:
    done = passtctl("-c", str(server.path), *args)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"passtctl: error: {message}"), done.stderr
    assert done.stderr.count("\n") == 1
    assert server.api.reset_log == [] and server.api.changes == []


def test_ports(server: ServerThread) -> None:
    done = passtctl("-c", str(server.path), "ports", "list")
    assert done.returncode == 0
    assert done.stdout.splitlines()[1] == "tcp_in     -t      22,80:8080"
    # The fake reports one socket refused: the change is printed, the exit status says it failed.
    done = passtctl("-c", str(server.path), "ports", "add", "-u", "5353")
    assert done.returncode == 1
    assert done.stdout.startswith("udp_in (-u): none -> 5353\n")
    assert done.stderr == "passtctl: error: 1 of 2 sockets could not be bound\n"
    passtctl("-c", str(server.path), "ports", "remove", "5353", "--dir", "udp_in")
    passtctl("-c", str(server.path), "ports", "set", "none")
    assert server.api.changes == [
        ("add", "udp_in", "5353"),
        ("delete", "udp_in", "5353"),
        ("replace", "tcp_in", "none"),
    ]


def test_timeouts(server: ServerThread) -> None:
    done = passtctl(
        "-c", str(server.path), "timeouts", "set", "udp_idle=2s", "tcp_ack_interval=10ms", "tcp_fin=1.5m"
    )
    assert done.returncode == 0, done.stderr
    assert "udp_idle             2 s\n" in done.stdout
    current = server.api.current_timeouts
    assert (current.udp_idle, current.tcp_ack_interval, current.tcp_fin) == (2.0, 0.01, 90.0)
    done = passtctl("-c", str(server.path), "timeouts", "set", "udp_idle=0.5s")
    assert done.returncode == 1
    assert done.stderr == "passtctl: error: timeouts.udp_idle: 0.5 s is out of range 1..86400 s\n"
    done = passtctl("-c", str(server.path), "timeouts", "get", "-o", "json")
    assert json.loads(done.stdout)["udp_idle"] == 2


def test_watch_ends_after_duration(server: ServerThread) -> None:
    done = passtctl("-c", str(server.path), "conns", "watch", "--existing", "-o", "json", "--for", "1")
    assert done.returncode == 0, done.stderr
    assert done.stderr == "passtctl: watching connections (Ctrl-C to stop)\n"
    kinds = [json.loads(line)["kind"] for line in done.stdout.splitlines()]
    assert kinds == ["existing"] * 3
    done = passtctl("-c", str(server.path), "conns", "watch", "--existing", "--count", "2")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.splitlines()) == 2


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("2s", 2.0), ("500ms", 0.5), ("1.5m", 90.0), ("2h", 7200.0), ("3", 3.0), (".5s", 0.5)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "s", "2 s", "-1s", "1e3s", "2d", "1..2s"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ValueError, match="bad duration"):
        parse_duration(text)


def test_parse_assignment() -> None:
    assert parse_assignment("udp_idle=2s") == ("udp_idle", 2.0)
    assert parse_assignment("tcp_max_retransmits=5") == ("tcp_max_retransmits", 5.0)


@pytest.mark.parametrize(
    "args",
    [
        ("conns", "--help"),
        ("conns", "list", "--help"),
        ("conns", "watch", "--help"),
        ("conns", "reset", "--help"),
        ("ports", "--help"),
        ("ports", "add", "--help"),
        ("timeouts", "set", "--help"),
    ],
)
def test_help_everywhere(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(list(args)) == 0
    assert capsys.readouterr().out.startswith("usage: passtctl")
