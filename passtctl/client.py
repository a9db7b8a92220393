"""A small synchronous client for passtd's control socket; every failure becomes one `ControlError` line.

Synchronous on purpose: a command-line tool makes one call and exits, so an event loop would only add start-up
time. Imports grpc, protobuf and the generated modules, nothing of the daemon.
"""

from __future__ import annotations

from types import TracebackType
from typing import Final, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from passtd.control.pb import passt_pb2, passt_pb2_grpc

DEFAULT_ADDRESS: Final = "/run/passtd/passtd.control"
ADDRESS_ENV: Final = "PASSTCTL_CONTROL"
DEFAULT_TIMEOUT: Final = 5.0

# grpc's text when no connection could be made, e.g. "failed to connect to all addresses; last error:
# FAILED_PRECONDITION: unix:/x: connect failed: addr: unix:/x error: No such file or directory"
_CONNECT_FAILED: Final = "failed to connect to all addresses"
_OS_ERROR: Final = " error: "


class ControlError(Exception):
    """A failed call, already phrased for the user as one line."""


def socket_path(address: str) -> str:
    """The socket path in `address`: a plain path, `unix:PATH` or `unix:///ABSOLUTE/PATH`.

    Raises ValueError when no path is left.
    """
    if address.startswith("unix://"):
        path = address[len("unix://") :]
    elif address.startswith("unix:"):
        path = address[len("unix:") :]
    else:
        path = address
    if not path:
        raise ValueError(f"no socket path in {address!r}")
    return path


def describe_rpc_error(exc: grpc.RpcError, path: str, timeout: float) -> str:
    """One line for `exc`: the server's own message where there is one, else what went wrong on the way."""
    code = exc.code()
    details = exc.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and details.startswith(_CONNECT_FAILED):
        _, found, reason = details.rpartition(_OS_ERROR)
        reason = " ".join(reason.split()).lower()
        return f"cannot connect to {path}" + (f": {reason}" if found and reason else "")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return f"no answer from {path} within {timeout:g} s"
    if details:
        return " ".join(details.split())
    return f"{path}: {code.name.lower().replace('_', ' ')}"


class ControlClient:
    """Calls on passt.v1.Control and grpc.health.v1.Health over one channel to `unix:PATH`."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.path = socket_path(address)
        self.timeout = timeout
        self._channel = grpc.insecure_channel(f"unix:{self.path}")
        self._control = passt_pb2_grpc.ControlStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def status(self) -> passt_pb2.Status:
        try:
            reply: passt_pb2.Status = self._control.GetStatus(
                passt_pb2.GetStatusRequest(), timeout=self.timeout
            )
        except grpc.RpcError as exc:
            raise ControlError(describe_rpc_error(exc, self.path, self.timeout)) from None
        return reply

    def health(self, service: str = "") -> str:
        """The serving status name of `service` ("" is the whole server): "SERVING", "NOT_SERVING" ..."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise ControlError(f"unknown service {service!r}") from None
            raise ControlError(describe_rpc_error(exc, self.path, self.timeout)) from None
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return name
