"""passtctl for scripts: every mistake exits 2 naming it, `conns watch` fails loudly when the daemon goes away
(or waits for it with --reconnect), TLS failures say which side lacks what. Real passtctl subprocesses against
a real control server (the fake API behind it is only the data)."""

from __future__ import annotations

import asyncio
import json
import select
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from passtctl.cli import STATES
from passtd.control.server import TcpListen, control_port, start_control_server, stop_control_server
from passtd.dataplane.core.tcp.states import TcpState
from tests.control.samples import FakeControlAPI
from tests.control.test_cli import PYTHON, ROOT, ServerThread, passtctl, server  # noqa: F401
from tests.control.test_server import run
from tests.control.test_tls import openssl, pki  # noqa: F401


def test_state_list_is_the_dataplanes() -> None:
    assert set(STATES) == {s.value for s in TcpState} | {"SPLICED", "CONNECTING", "ACTIVE"}


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("conns", "list", "--state", "BOGUS"), "argument --state: unknown state 'BOGUS'"),
        (("conns", "reset", "--all", "--state", "BOGUS"), "argument --state: unknown state 'BOGUS'"),
        (("conns", "watch", "--state", "nope"), "argument --state: unknown state 'nope'"),
        (("conns", "list", "--proto", "x"), "argument --proto: unknown protocol 'x' (known: tcp, udp, icmp)"),
        (("conns", "reset", "--proto", "sctp"), "argument --proto: unknown protocol 'sctp'"),
        (("conns", "watch", "--count", "0"), "argument --count: must be a whole number of at least 1: '0'"),
        (("conns", "list", "--port", "70000"), "argument --port: not a port number (1-65535): '70000'"),
    ],
)
def test_invalid_filter_values_exit_2_naming_them(
    server: ServerThread,  # noqa: F811
    args: tuple[str, ...],
    named: str,
) -> None:
    done = passtctl("-c", str(server.path), *args)
    assert done.returncode == 2, done
    assert done.stdout == ""
    assert done.stderr.startswith(f"passtctl: error: {named}"), done.stderr
    assert done.stderr.count("\n") == 1


def test_state_filter_takes_the_json_words(server: ServerThread) -> None:  # noqa: F811
    listed = passtctl("-c", str(server.path), "conns", "list", "-o", "json")
    every = json.loads(listed.stdout)["connections"]
    state = next(c["state"] for c in every if c["protocol"] == "udp")
    assert state == state.lower()
    for word in (state, state.upper()):
        done = passtctl(
            "-c", str(server.path), "conns", "list", "-o", "json", "--state", word, "--proto", "UDP"
        )
        assert done.returncode == 0, done.stderr
        found = json.loads(done.stdout)["connections"]
        assert found and all(c["state"] == state and c["protocol"] == "udp" for c in found)
        assert all(isinstance(c["id"], int) and isinstance(c["bytes_to_guest"], int) for c in found)


def test_help_says_what_json_holds() -> None:
    done = passtctl("--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert (
        "JSON numbers (never strings)" in text and 'protocol "tcp"' in text and 'direction "tcp_in"' in text
    )


def _line(stream: object, timeout: float = 15) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    assert ready, f"nothing within {timeout}s"
    return str(stream.readline())  # type: ignore[attr-defined]


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=10)


def _watch(path: Path, procs: list[subprocess.Popen[str]], *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [str(PYTHON), "-m", "passtctl", "-c", str(path), "conns", "watch", "-o", "json", *extra],
        cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs.append(proc)
    return proc


def test_watch_fails_when_the_daemon_goes_away(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    first = ServerThread(tmp_path / "ctl.sock", FakeControlAPI())
    first.start()
    try:
        watch = _watch(first.path, procs)
        assert "watching" in _line(watch.stderr)
    finally:
        first.stop()
    _, err = watch.communicate(timeout=15)
    assert watch.returncode == 1
    assert err == f"passtctl: error: {first.path}: the daemon ended the watch (it is stopping)\n"


def test_watch_reconnect_waits_and_resumes(tmp_path: Path, procs: list[subprocess.Popen[str]]) -> None:
    path = tmp_path / "ctl.sock"
    first = ServerThread(path, FakeControlAPI())
    first.start()
    try:
        watch = _watch(path, procs, "--reconnect", "--for", "30")
        assert "watching" in _line(watch.stderr)
    finally:
        first.stop()
    assert "waiting for the daemon to come back (--reconnect)" in _line(watch.stderr)
    time.sleep(1.0)  # it keeps waiting while nothing serves
    assert watch.poll() is None
    second = ServerThread(path, FakeControlAPI())
    second.start()
    try:
        assert "reconnected" in _line(watch.stderr)
        assert "watching" in _line(watch.stderr)
        # Resubscribed with the flows open now listed first: nothing open went unseen while away.
        event = json.loads(_line(watch.stdout))
        assert event["kind"] == "existing" and isinstance(event["connection"]["id"], int)
    finally:
        second.stop()
    watch.kill()


def test_tls_errors_name_the_side_that_lacks(pki: Path) -> None:  # noqa: F811
    """Each failed handshake is one line that says what to give, checked against a real TLS server."""
    other = pki / "other"
    other.mkdir(exist_ok=True)
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=other CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=other)  # fmt: skip
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-subj", "/CN=stranger",
            "-keyout", "c.key", "-out", "c.csr", cwd=other)  # fmt: skip
    openssl("x509", "-req", "-in", "c.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-out", "c.pem", cwd=other)  # fmt: skip
    listen = TcpListen("127.0.0.1", 0, str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))
    ca, cert, key = str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key")

    async def main() -> list[tuple[int, str]]:
        tls_server = await start_control_server(FakeControlAPI(), None, tcp=listen)
        out: list[tuple[int, str]] = []
        try:
            target = f"tcp:127.0.0.1:{control_port(tls_server)}"
            for flags in (
                ["--tls-ca", ca, "--tls-cert", cert, "--tls-key", key],
                ["--tls-ca", ca],
                ["--tls-ca", str(other / "ca.pem"), "--tls-cert", cert, "--tls-key", key],
                ["--tls-ca", ca, "--tls-cert", str(other / "c.pem"), "--tls-key", str(other / "c.key")],
                ["--insecure"],
                ["--tls-ca", ca, "--tls-cert", cert],
            ):
                proc = await asyncio.create_subprocess_exec(
                    str(PYTHON), "-m", "passtctl", "--timeout", "3", "-c", target, *flags, "health",
                    cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                _, err = await proc.communicate()
                out.append((proc.returncode or 0, err.decode()))
        finally:
            await stop_control_server(tls_server, 0)
        return out

    ok, no_cert, wrong_ca, stranger, plain, half = run(main())
    assert ok == (0, "")
    assert (
        no_cert[0] == 1
        and "passtctl sent no client certificate (give --tls-cert and --tls-key)" in no_cert[1]
    )
    assert "the server requires one" in no_cert[1]
    assert wrong_ca[0] == 1 and "the server's certificate does not chain to the CA in --tls-ca" in wrong_ca[1]
    assert stranger[0] == 1 and "the server refused our client certificate" in stranger[1]
    assert "--control-client-ca" in stranger[1]
    assert plain[0] == 1 and "it speaks TLS, and --insecure is plaintext" in plain[1]
    assert half[0] == 2 and "--tls-cert and --tls-key go together" in half[1]  # a mistake: exit 2
    for _, err in (no_cert, wrong_ca, stranger, plain, half):
        assert err.startswith("passtctl: error: ") and err.count("\n") == 1, err
