"""The real grpc.aio control server on a UNIX socket in tmp_path, under uvloop, with a fake ControlAPI."""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from passtd.control import service
from passtd.control.api import (
    ConnectionFilter,
    ConnectionView,
    FailedPrecondition,
    InvalidArgument,
    LimitView,
)
from passtd.control.convert import connection_to_pb, status_to_pb
from passtd.control.pb import passt_pb2, passt_pb2_grpc
from passtd.control.server import start_control_server, stop_control_server
from passtd.control.service import MAX_RPCS
from passtd.errors import BackendError, ConfigError, PasstError
from tests.control.samples import CONN_TCP, CONN_UDP, SAMPLE, FakeControlAPI

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
    rpcs = LimitView(max=MAX_RPCS, in_use=1)  # the servicer counts the calls it serves, this one
    assert reply == status_to_pb(replace(SAMPLE, limits=replace(SAMPLE.limits, concurrent_rpcs=rpcs)))
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
        # passt.proto and the one well-known type it imports (FieldMask, for SetTimeouts).
        assert len(protos) == 2
        assert b"passt.v1" in protos[0]
        assert b"GetStatus" in protos[0]
        assert b"WatchConnections" in protos[0]
        assert b"google/protobuf/field_mask.proto" in protos[1]


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


# -- connections, port policy and timeouts through the real server and a fake API -------------------------


async def _code(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value.code(), info.value.details() or ""


@in_loop
async def test_list_connections_pages(tmp_path: Path) -> None:
    async with serving(tmp_path / "ctl.sock") as channel:
        stub = passt_pb2_grpc.ControlStub(channel)
        ids: list[int] = []
        token = ""
        pages = 0
        while True:
            reply = await stub.ListConnections(
                passt_pb2.ListConnectionsRequest(page_size=2, page_token=token), timeout=TIMEOUT
            )
            ids += [c.id for c in reply.connections]
            pages += 1
            token = reply.next_page_token
            if not token:
                break
        assert (ids, pages) == ([7, 9, 12], 2)
        only = await stub.ListConnections(
            passt_pb2.ListConnectionsRequest(
                filter=passt_pb2.ConnectionFilter(protocol=passt_pb2.PROTOCOL_UDP)
            ),
            timeout=TIMEOUT,
        )
        assert [c.id for c in only.connections] == [9]
        assert only.connections[0] == connection_to_pb(CONN_UDP)
        bad = passt_pb2.ListConnectionsRequest(filter=passt_pb2.ConnectionFilter(port=65536))
        assert await _code(stub.ListConnections(bad, timeout=TIMEOUT)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "filter.port: 65536 is out of range 1..65535"
        )  # fmt: skip
        bad = passt_pb2.ListConnectionsRequest(page_token="zzz")
        code, details = await _code(stub.ListConnections(bad, timeout=TIMEOUT))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("page_token:")


@in_loop
async def test_watch_streams_events_and_counts_drops(tmp_path: Path) -> None:
    api = FakeControlAPI(queue_size=4)
    async with serving(tmp_path / "ctl.sock", api) as channel:
        stub = passt_pb2_grpc.ControlStub(channel)
        call = stub.WatchConnections(passt_pb2.WatchConnectionsRequest(include_existing=True))
        await call.initial_metadata()  # subscribed
        existing = [await call.read() for _ in range(3)]
        assert [(e.kind, e.connection.id) for e in existing] == [
            (passt_pb2.EVENT_KIND_EXISTING, 7), (passt_pb2.EVENT_KIND_EXISTING, 9),
            (passt_pb2.EVENT_KIND_EXISTING, 12),
        ]  # fmt: skip
        # A burst the client does not read: 4 fit in the queue, the other 6 are dropped and counted; the
        # emitter (the dataplane) never waits.
        for _ in range(10):
            api.emit("opened", CONN_TCP)
        got = [await call.read() for _ in range(4)]
        assert all(e.dropped_before == 0 for e in got)
        api.emit("closed", CONN_TCP, "rst_from_guest")
        last = await call.read()
        assert (last.kind, last.reason, last.dropped_before) == (
            passt_pb2.EVENT_KIND_CLOSED, passt_pb2.CLOSE_REASON_RST_FROM_GUEST, 6
        )  # fmt: skip
        call.cancel()
        for _ in range(50):  # the servicer's finally closes the queue once the cancellation lands
            if api.queues[0].closed:
                break
            await asyncio.sleep(0.01)
        assert api.queues[0].closed


@in_loop
async def test_watch_limit_and_shutdown(tmp_path: Path) -> None:
    api = FakeControlAPI(max_watchers=1)
    path = tmp_path / "ctl.sock"
    server = await start_control_server(api, str(path))
    try:
        async with grpc.aio.insecure_channel(f"unix:{path}") as channel:
            stub = passt_pb2_grpc.ControlStub(channel)
            first = stub.WatchConnections(passt_pb2.WatchConnectionsRequest())
            await first.initial_metadata()
            second = stub.WatchConnections(passt_pb2.WatchConnectionsRequest())
            code, details = await _code(second.read())
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert details == "too many connection watchers (limit 1)"
            api.emit("opened", CONN_TCP)
            assert (await first.read()).connection.id == 7
            # Shutdown ends the stream cleanly at once rather than cancelling it after the grace period.
            stopping = asyncio.create_task(stop_control_server(server, 5))
            assert await first.read() == grpc.aio.EOF
            assert await first.code() == grpc.StatusCode.OK
            await stopping
    finally:
        await stop_control_server(server, 0)


@in_loop
async def test_reset(tmp_path: Path) -> None:
    api = FakeControlAPI()
    async with serving(tmp_path / "ctl.sock", api) as channel:
        stub = passt_pb2_grpc.ControlStub(channel)
        reply = await stub.ResetConnection(passt_pb2.ResetConnectionRequest(id=9), timeout=TIMEOUT)
        assert [c.id for c in reply.connections] == [9]
        assert await _code(stub.ResetConnection(passt_pb2.ResetConnectionRequest(id=9), timeout=TIMEOUT)) == (
            grpc.StatusCode.NOT_FOUND, "no connection with id 9"
        )  # fmt: skip
        code, details = await _code(
            stub.ResetConnections(passt_pb2.ResetConnectionsRequest(), timeout=TIMEOUT)
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details == "filter: empty; set 'all' to reset every connection"
        by_port = passt_pb2.ResetConnectionsRequest(filter=passt_pb2.ConnectionFilter(port=5001))
        assert [c.id for c in (await stub.ResetConnections(by_port, timeout=TIMEOUT)).connections] == [7]
        everything = passt_pb2.ResetConnectionsRequest(all=True)
        assert [c.id for c in (await stub.ResetConnections(everything, timeout=TIMEOUT)).connections] == [12]
        assert api.reset_log == [9, 7, 12]


@in_loop
async def test_port_policy(tmp_path: Path) -> None:
    api = FakeControlAPI()
    async with serving(tmp_path / "ctl.sock", api) as channel:
        stub = passt_pb2_grpc.ControlStub(channel)
        policy = await stub.GetPortPolicy(passt_pb2.GetPortPolicyRequest(), timeout=TIMEOUT)
        assert [(t.direction, t.spec) for t in policy.tables] == [
            (passt_pb2.FORWARD_DIRECTION_TCP_IN, "22,80:8080"), (passt_pb2.FORWARD_DIRECTION_UDP_IN, "none"),
            (passt_pb2.FORWARD_DIRECTION_TCP_OUT, "none"), (passt_pb2.FORWARD_DIRECTION_UDP_OUT, "none"),
        ]  # fmt: skip
        assert [(r.first, r.target_first) for r in policy.tables[0].rules] == [(22, 22), (80, 8080)]
        udp = passt_pb2.FORWARD_DIRECTION_UDP_IN
        change = await stub.AddForward(passt_pb2.AddForwardRequest(direction=udp, spec="53"), timeout=TIMEOUT)
        assert (change.previous.spec, change.current.spec) == ("none", "53")
        assert [(b.ok, b.error) for b in change.binds] == [(True, ""), (False, "EADDRINUSE")]
        await stub.RemoveForward(passt_pb2.RemoveForwardRequest(direction=udp, spec="53"), timeout=TIMEOUT)
        await stub.SetPortPolicy(passt_pb2.SetPortPolicyRequest(direction=udp, spec="none"), timeout=TIMEOUT)
        assert api.changes == [
            ("add", "udp_in", "53"),
            ("delete", "udp_in", "53"),
            ("replace", "udp_in", "none"),
        ]
        no_dir = passt_pb2.SetPortPolicyRequest(spec="22")
        code, details = await _code(stub.SetPortPolicy(no_dir, timeout=TIMEOUT))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("direction: 0 is not one of")
        no_spec = passt_pb2.SetPortPolicyRequest(direction=udp)
        code, details = await _code(stub.SetPortPolicy(no_spec, timeout=TIMEOUT))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and details.startswith("spec: empty")
        api.error = FailedPrecondition("-T: namespace-to-host forwarding is not supported yet")
        out = passt_pb2.SetPortPolicyRequest(direction=passt_pb2.FORWARD_DIRECTION_TCP_OUT, spec="80")
        assert await _code(stub.SetPortPolicy(out, timeout=TIMEOUT)) == (
            grpc.StatusCode.FAILED_PRECONDITION, "-T: namespace-to-host forwarding is not supported yet"
        )  # fmt: skip


@in_loop
async def test_timeouts(tmp_path: Path) -> None:
    api = FakeControlAPI()
    async with serving(tmp_path / "ctl.sock", api) as channel:
        stub = passt_pb2_grpc.ControlStub(channel)
        got = await stub.GetTimeouts(passt_pb2.GetTimeoutsRequest(), timeout=TIMEOUT)
        assert (got.udp_idle, got.tcp_max_retransmits) == (180.0, 12)
        request = passt_pb2.SetTimeoutsRequest(timeouts=passt_pb2.Timeouts(udp_idle=2.0, tcp_syn=1.0))
        request.update_mask.paths.append("udp_idle")  # tcp_syn is not in the mask: not changed
        new = await stub.SetTimeouts(request, timeout=TIMEOUT)
        assert (new.udp_idle, new.tcp_syn) == (2.0, 240.0)
        request = passt_pb2.SetTimeoutsRequest(timeouts=passt_pb2.Timeouts(udp_idle=0.5))
        code, _ = await _code(stub.SetTimeouts(request, timeout=TIMEOUT))
        assert code == grpc.StatusCode.INVALID_ARGUMENT  # empty mask
        request.update_mask.paths.append("udp_idle")
        assert await _code(stub.SetTimeouts(request, timeout=TIMEOUT)) == (
            grpc.StatusCode.INVALID_ARGUMENT, "timeouts.udp_idle: 0.5 s is out of range 1..86400 s"
        )  # fmt: skip
        assert api.current_timeouts.udp_idle == 2.0


class _SlowAPI(FakeControlAPI):
    """list_connections waits until released: calls pile up as a flood of clients would make them."""

    def __init__(self) -> None:
        super().__init__(max_watchers=100)
        self.release = asyncio.Event()

    async def list_connections(
        self, flt: ConnectionFilter, after_id: int, limit: int
    ) -> tuple[list[ConnectionView], int]:
        await self.release.wait()
        return await super().list_connections(flt, after_id, limit)


@in_loop
async def test_calls_beyond_the_cap_are_refused(tmp_path: Path) -> None:
    api = _SlowAPI()
    cap = 3
    original = service.MAX_RPCS
    service.MAX_RPCS = cap
    try:
        async with serving(tmp_path / "ctl.sock", api) as channel:
            stub = passt_pb2_grpc.ControlStub(channel)
            waiting = [
                asyncio.ensure_future(
                    stub.ListConnections(passt_pb2.ListConnectionsRequest(), timeout=TIMEOUT)
                )
                for _ in range(cap - 1)
            ]
            watch = stub.WatchConnections(passt_pb2.WatchConnectionsRequest())
            await watch.initial_metadata()  # a stream holds a slot too
            await asyncio.sleep(0.1)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetStatus(passt_pb2.GetStatusRequest(), timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert info.value.details() == f"too many control calls at once (limit {cap})"
            api.release.set()
            assert all(len(r.connections) == 3 for r in await asyncio.gather(*waiting))
            watch.cancel()
            await asyncio.sleep(0.1)
            status = await stub.GetStatus(passt_pb2.GetStatusRequest(), timeout=TIMEOUT)  # slots given back
            assert (status.limits.concurrent_rpcs.max, status.limits.concurrent_rpcs.in_use) == (cap, 1)
    finally:
        service.MAX_RPCS = original


@in_loop
async def test_huge_bad_value_is_not_echoed_whole(tmp_path: Path) -> None:
    async with serving(tmp_path / "ctl.sock") as channel:
        stub = passt_pb2_grpc.ControlStub(channel)
        huge = passt_pb2.ConnectionFilter(address="2001:db8::" + "f" * 100_000)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListConnections(passt_pb2.ListConnectionsRequest(filter=huge), timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # not RESOURCE_EXHAUSTED
        details = info.value.details() or ""
        assert details.startswith("filter.address: '2001:db8::fff") and "…" in details
        assert len(details) < 200
        mask = passt_pb2.SetTimeoutsRequest(update_mask={"paths": ["x" * 100_000]})
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.SetTimeouts(mask, timeout=TIMEOUT)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("update_mask: unknown timeout 'xxx")
        assert len(info.value.details() or "") < 400


@in_loop
async def test_error_messages_are_cut_as_a_last_guard(tmp_path: Path) -> None:
    api = FakeControlAPI(error=InvalidArgument("spec: " + "9" * 50_000))
    async with serving(tmp_path / "ctl.sock", api) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await passt_pb2_grpc.ControlStub(channel).GetStatus(passt_pb2.GetStatusRequest(), timeout=TIMEOUT)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    assert details.startswith("spec: 999") and len(details) == service.MESSAGE_MAX and details.endswith("…")
