"""--control-listen: TCP with mutual TLS, plaintext only on loopback with --control-insecure."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import grpc
import pytest

from passtd.control.pb import passt_pb2, passt_pb2_grpc
from passtd.control.server import (
    TcpListen,
    control_port,
    parse_listen,
    start_control_server,
    stop_control_server,
    tcp_credentials,
)
from passtd.errors import ConfigError
from tests.control.samples import SAMPLE, FakeControlAPI
from tests.control.test_server import TIMEOUT, run

ROOT = Path(__file__).resolve().parents[2]
PYTHON = ROOT / ".venv" / "bin" / "python"


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    if shutil.which("openssl") is None:
        pytest.skip("needs openssl")
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-days", "2",
            "-subj", "/CN=passtd test CA", "-keyout", "ca.key", "-out", "ca.pem", cwd=d)  # fmt: skip
    for name, ext in (("server", "subjectAltName=IP:127.0.0.1"), ("client", "extendedKeyUsage=clientAuth")):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                "-subj", f"/CN=passtd test {name}", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                cwd=d)  # fmt: skip
        (d / f"{name}.ext").write_text(ext + "\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)  # fmt: skip
    return d


def _listen(pki: Path) -> TcpListen:
    return TcpListen("127.0.0.1", 0, str(pki / "server.pem"), str(pki / "server.key"), str(pki / "ca.pem"))


def test_mutual_tls(pki: Path) -> None:
    async def main() -> None:
        server = await start_control_server(FakeControlAPI(), None, tcp=_listen(pki))
        try:
            port = control_port(server)
            assert port
            with_cert = grpc.ssl_channel_credentials(
                (pki / "ca.pem").read_bytes(),
                (pki / "client.key").read_bytes(),
                (pki / "client.pem").read_bytes(),
            )
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", with_cert) as channel:
                reply = await passt_pb2_grpc.ControlStub(channel).GetStatus(
                    passt_pb2.GetStatusRequest(), timeout=TIMEOUT
                )
            assert reply.version == SAMPLE.version
            # No client certificate: the handshake fails, no call gets through.
            without = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", without) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await passt_pb2_grpc.ControlStub(channel).GetStatus(
                        passt_pb2.GetStatusRequest(), timeout=TIMEOUT
                    )
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            # Plaintext to a TLS port gets nowhere either.
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                with pytest.raises(grpc.aio.AioRpcError):
                    await passt_pb2_grpc.ControlStub(channel).GetStatus(
                        passt_pb2.GetStatusRequest(), timeout=2
                    )
            # passtctl with its certificate.
            proc = await asyncio.create_subprocess_exec(
                str(PYTHON), "-m", "passtctl", "-c", f"tcp:127.0.0.1:{port}", "--tls-ca", str(pki / "ca.pem"),
                "--tls-cert", str(pki / "client.pem"), "--tls-key", str(pki / "client.key"), "health",
                cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            out, err = await proc.communicate()
            assert (proc.returncode, out) == (0, b"SERVING\n"), err
        finally:
            await stop_control_server(server, 0)

    run(main())


def test_insecure_only_on_loopback(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "ctl.sock"
        server = await start_control_server(
            FakeControlAPI(), str(path), tcp=TcpListen("127.0.0.1", 0, insecure=True)
        )
        try:
            port = control_port(server)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await passt_pb2_grpc.ControlStub(channel).GetStatus(
                    passt_pb2.GetStatusRequest(), timeout=TIMEOUT
                )
            assert reply.version == SAMPLE.version
            assert path.exists()  # both listeners on one server
        finally:
            await stop_control_server(server, 0)

    run(main())


REQUIRED = "--control-listen: TLS with client certificates is required; missing"


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        (TcpListen("0.0.0.0", 1, insecure=True), "--control-insecure: only allowed on a loopback address"),
        (TcpListen("192.0.2.1", 1, insecure=True), "--control-insecure: only allowed on a loopback address"),
        (TcpListen("::1", 1, "c", insecure=True), "--control-insecure: cannot be combined"),
        (TcpListen("::1", 1), f"{REQUIRED} --control-cert"),
        (TcpListen("::1", 1, "c", "k"), f"{REQUIRED} --control-client-ca"),
        (TcpListen("::1", 1, "/nonexistent/c", "/nonexistent/k", "/nonexistent/ca"),
         "--control-key /nonexistent/k"),
    ],
)  # fmt: skip
def test_refused_setups(listen: TcpListen, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        tcp_credentials(listen)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:50051", ("127.0.0.1", 50051)), ("[::1]:0", ("::1", 0)), ("localhost:9", ("localhost", 9))],
)
def test_parse_listen(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected
    assert TcpListen(*expected).target == (text if not text.startswith("[") else "[::1]:0")


@pytest.mark.parametrize("text", ["50051", ":50051", "::1:50051", "host:", "host:65536", "host:x"])
def test_parse_listen_refuses(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--control-listen: "):
        parse_listen(text)
