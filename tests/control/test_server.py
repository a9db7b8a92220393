"""The real grpc.aio control server on a UNIX socket in tmp_path, under uvloop, with a fake ControlAPI."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from passtd.control.convert import status_to_pb
from passtd.control.pb import passt_pb2, passt_pb2_grpc
from passtd.control.server import start_control_server, stop_control_server
from passtd.errors import BackendError, ConfigError, PasstError
from tests.control.samples import SAMPLE, FakeControlAPI

T = TypeVar("T")
TIMEOUT = 5.0


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 30))


@asynccontextmanager
async def serving(
    path: Path, api: FakeControlAPI | None = None, group: str | None = None
) -> AsyncIterator[grpc.aio.Channel]:
    """A started server and a channel to it; both torn down even when the test fails."""
    server = await start_control_server(api or FakeControlAPI(), str(path), group=group)
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            yield channel
    finally:
        await stop_control_server(server, 0)


def in_loop(test: Callable[[Path], Awaitable[None]]) -> Callable[[Path], None]:
    def wrapper(tmp_path: Path) -> None:
        async def main() -> None:
            await test(tmp_path)

        run(main())

    wrapper.__name__ = test.__name__
    return wrapper


@in_loop
async def test_get_status(tmp_path: Path) -> None:
    api = FakeControlAPI()
    async with serving(tmp_path / "ctl.sock", api) as channel:
        reply = await passt_pb2_grpc.ControlStub(channel).GetStatus(
            passt_pb2.GetStatusRequest(), timeout=TIMEOUT
        )
    assert reply == status_to_pb(SAMPLE)
    assert api.calls == 1


@in_loop
async def test_health_serving(tmp_path: Path) -> None:
    async with serving(tmp_path / "ctl.sock") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "passt.v1.Control"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def _reflect(channel: grpc.aio.Channel, request: reflection_pb2.ServerReflectionRequest) -> Any:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(iter([request]), timeout=TIMEOUT)
    replies = [reply async for reply in call]
    assert len(replies) == 1
    return replies[0]


@in_loop
async def test_reflection(tmp_path: Path) -> None:
    async with serving(tmp_path / "ctl.sock") as channel:
        listed = await _reflect(channel, reflection_pb2.ServerReflectionRequest(list_services=""))
        names = {service.name for service in listed.list_services_response.service}
        assert {"passt.v1.Control", "grpc.health.v1.Health"} <= names
        found = await _reflect(
            channel, reflection_pb2.ServerReflectionRequest(file_containing_symbol="passt.v1.Control")
        )
        protos = found.file_descriptor_response.file_descriptor_proto
        assert len(protos) == 1
        assert b"passt.v1" in protos[0]
        assert b"GetStatus" in protos[0]


@in_loop
async def test_socket_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    async with serving(path):
        st = path.stat()
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600


@in_loop
async def test_socket_mode_0660_with_group(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    gid = os.getgid()
    async with serving(path, group=grp.getgrgid(gid).gr_name):
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o660
        assert st.st_gid == gid


@in_loop
async def test_unknown_group(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    with pytest.raises(BackendError, match="unknown group 'no-such-group-passtd'"):
        await start_control_server(FakeControlAPI(), str(path), group="no-such-group-passtd")
    assert not path.exists()


@in_loop
async def test_second_server_on_live_path_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    async with serving(path) as channel:
        with pytest.raises(BackendError) as info:
            await start_control_server(FakeControlAPI(), str(path))
        assert str(info.value) == f"control socket {path}: already in use by another server"
        # The running server kept its socket: gRPC alone would have unlinked it and bound a new one.
        reply = await passt_pb2_grpc.ControlStub(channel).GetStatus(
            passt_pb2.GetStatusRequest(), timeout=TIMEOUT
        )
        assert reply.version == SAMPLE.version
        async with grpc.aio.insecure_channel(f"unix:{path}") as fresh:
            again = await passt_pb2_grpc.ControlStub(fresh).GetStatus(
                passt_pb2.GetStatusRequest(), timeout=TIMEOUT
            )
        assert again.version == SAMPLE.version


@in_loop
async def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: what a killed daemon leaves behind
    assert path.exists()
    async with serving(path) as channel:
        reply = await passt_pb2_grpc.ControlStub(channel).GetStatus(
            passt_pb2.GetStatusRequest(), timeout=TIMEOUT
        )
    assert reply.mode == passt_pb2.MODE_PASST


@in_loop
async def test_regular_file_is_not_removed(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    path.write_text("precious")
    with pytest.raises(BackendError, match="exists and is not a socket; not removing it"):
        await start_control_server(FakeControlAPI(), str(path))
    assert path.read_text() == "precious"


@in_loop
async def test_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "absent" / "ctl.sock"
    with pytest.raises(BackendError, match=r"directory .*/absent does not exist"):
        await start_control_server(FakeControlAPI(), str(path))


@in_loop
async def test_path_too_long(tmp_path: Path) -> None:
    path = tmp_path / ("x" * 120)
    with pytest.raises(BackendError, match="path longer than 107 bytes"):
        await start_control_server(FakeControlAPI(), str(path))


@in_loop
async def test_stop_removes_socket_and_frees_path(tmp_path: Path) -> None:
    path = tmp_path / "ctl.sock"
    server = await start_control_server(FakeControlAPI(), str(path))
    assert path.exists()
    await stop_control_server(server, 0.5)
    assert not path.exists()
    # The path can be served again at once.
    async with serving(path) as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=TIMEOUT
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (BackendError("tap0 is gone"), grpc.StatusCode.UNAVAILABLE),
        (ConfigError("bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (PasstError("not ready"), grpc.StatusCode.FAILED_PRECONDITION),
    ],
)
def test_api_errors_map_to_status_codes(tmp_path: Path, error: PasstError, code: grpc.StatusCode) -> None:
    async def main() -> None:
        async with serving(tmp_path / "ctl.sock", FakeControlAPI(error=error)) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await passt_pb2_grpc.ControlStub(channel).GetStatus(
                    passt_pb2.GetStatusRequest(), timeout=TIMEOUT
                )
        assert info.value.code() == code
        assert info.value.details() == str(error)

    run(main())
