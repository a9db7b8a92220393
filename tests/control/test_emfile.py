"""The control socket under descriptor exhaustion: a server with no descriptor left cannot accept, but it
must neither die nor stop listening; once descriptors are free again, passtctl gets in (issue 14.9)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from passtd.control.pb import passt_pb2, passt_pb2_grpc

SERVER = [sys.executable, "-m", "tests.control.emfile_server"]


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def _status(path: Path, timeout: float) -> grpc.StatusCode:
    with grpc.insecure_channel(f"unix:{path}") as channel:
        try:
            passt_pb2_grpc.ControlStub(channel).GetStatus(passt_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_accept_survives_emfile(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.Popen(
        [*SERVER, str(path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=root
    )
    try:
        assert _line(proc) == "ready", proc.stderr.read() if proc.stderr else ""
        assert _status(path, 5) == grpc.StatusCode.OK
        proc.send_signal(signal.SIGUSR1)
        assert _line(proc).startswith("full ")
        time.sleep(0.3)  # the first call's connection is closed by now, and its descriptor taken too
        assert _status(path, 1.5) == grpc.StatusCode.DEADLINE_EXCEEDED  # no descriptor to accept with
        assert proc.poll() is None
        proc.send_signal(signal.SIGUSR2)
        assert _line(proc) == "freed"
        deadline = time.monotonic() + 10
        code = _status(path, 3)
        while code != grpc.StatusCode.OK and time.monotonic() < deadline:
            code = _status(path, 3)
        assert code == grpc.StatusCode.OK  # the listener kept retrying and serves again
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()
        if proc.stderr is not None:
            proc.stderr.close()


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
