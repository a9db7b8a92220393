"""A small synchronous client for passtd's control socket; every failure becomes one `ControlError` line.

Synchronous on purpose: a command-line tool makes one call and exits, so an event loop would only add start-up
time. Imports grpc, protobuf and the generated modules, nothing of the daemon.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

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


TCP_PREFIXES: Final = ("tcp://", "tcp:")


@dataclass(frozen=True, slots=True)
class Tls:
    """Client side of `--control-listen`: the CA that signed the server's certificate, and our own
    certificate and key (the server requires one). `insecure` is plaintext, for loopback tests only."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    insecure: bool = False


def tcp_target(address: str) -> str | None:
    """`tcp:HOST:PORT` or `tcp://HOST:PORT` → "HOST:PORT" (IPv6 in brackets); None for a UNIX address.

    Raises ValueError for a tcp: address without a port.
    """
    for prefix in TCP_PREFIXES:
        if address.startswith(prefix):
            rest = address[len(prefix) :]
            host, colon, port = rest.rpartition(":")
            if not colon or not host or not port.isdigit():
                raise ValueError(f"no HOST:PORT in {address!r}")
            return rest
    return None


def socket_path(address: str) -> str:
    """The socket path in `address`: a plain path, `unix:PATH` or `unix:///ABSOLUTE/PATH`; for a TCP
    address (`tcp:HOST:PORT`), HOST:PORT.

    Raises ValueError when no path is left.
    """
    target = tcp_target(address)
    if target is not None:
        return target
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


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ControlError(f"{path}: {exc.strerror}") from None


def _channel(address: str, tls: Tls | None) -> grpc.Channel:
    target = tcp_target(address)
    if target is None:
        return grpc.insecure_channel(f"unix:{socket_path(address)}")
    if tls is None or tls.insecure:
        return grpc.insecure_channel(target)
    if bool(tls.cert) != bool(tls.key):
        raise ControlError("--tls-cert and --tls-key go together (a certificate and its private key)")
    credentials = grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca) if tls.ca else None,
        private_key=_read(tls.key) if tls.key else None,
        certificate_chain=_read(tls.cert) if tls.cert else None,
    )
    return grpc.secure_channel(target, credentials)


# What grpc says when a TLS handshake fails, and who is to blame. The server closing the connection during
# the handshake ("Socket closed") is how a refused client certificate shows on the client's side.
_VERIFY_FAILED: Final = "CERTIFICATE_VERIFY_FAILED"
_NOT_TLS: Final = ("WRONG_VERSION_NUMBER", "Tls handshake failed")
_CLOSED: Final = "Socket closed"


def describe_tls_error(details: str, target: str, tls: Tls | None) -> str | None:
    """One line naming which side lacks what, for a failed connection over TCP; None if not a TLS matter."""
    if _VERIFY_FAILED in details:
        trusted = (
            f"the CA in --tls-ca {tls.ca}" if tls is not None and tls.ca else "the system's CAs (no --tls-ca)"
        )
        return (
            f"cannot connect to {target}: the server's certificate does not chain to {trusted}: "
            "give the CA that signed the server's --control-cert"
        )
    if tls is None or tls.insecure:
        if _CLOSED in details:
            return (
                f"cannot connect to {target}: the server closed the connection: it speaks TLS, and "
                "--insecure is plaintext (give --tls-ca, --tls-cert and --tls-key)"
            )
        return None
    if any(word in details for word in _NOT_TLS):
        return (
            f"cannot connect to {target}: TLS handshake failed (is the server plaintext, --control-insecure?)"
        )
    if _CLOSED in details:
        if not tls.cert:
            return (
                f"cannot connect to {target}: the server refused the TLS handshake: passtctl sent no client "
                "certificate (give --tls-cert and --tls-key) and the server requires one"
            )
        return (
            f"cannot connect to {target}: the server refused our client certificate --tls-cert {tls.cert}: "
            "it does not chain to the server's --control-client-ca"
        )
    return None


class ControlClient:
    """Calls on passt.v1.Control and grpc.health.v1.Health over one channel to `unix:PATH` or TCP."""

    def __init__(self, address: str, *, timeout: float = DEFAULT_TIMEOUT, tls: Tls | None = None) -> None:
        self.path = socket_path(address)
        self.timeout = timeout
        self._address = address
        self._tls = tls
        self._tcp = tcp_target(address) is not None
        self._open()

    def _open(self) -> None:
        self._channel = _channel(self._address, self._tls)
        self._control = passt_pb2_grpc.ControlStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def reconnect(self) -> None:
        """A fresh channel: grpc's own reconnect backs off for up to minutes, a restarted daemon is there
        at once."""
        self._channel.close()
        self._open()

    def _describe(self, exc: grpc.RpcError) -> str:
        if self._tcp and exc.code() == grpc.StatusCode.UNAVAILABLE:
            tls_text = describe_tls_error(exc.details() or "", self.path, self._tls)
            if tls_text is not None:
                return tls_text
        return describe_rpc_error(exc, self.path, self.timeout)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _unary(self, method: Any, request: Any) -> Any:
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            raise ControlError(self._describe(exc)) from None

    def call(self, method: str, request: Any) -> Any:
        """Any unary passt.v1.Control call by name (the sub-command modules, e.g. passtctl/egress.py)."""
        return self._unary(getattr(self._control, method), request)

    def status(self) -> passt_pb2.Status:
        reply: passt_pb2.Status = self._unary(self._control.GetStatus, passt_pb2.GetStatusRequest())
        return reply

    def connections(
        self, flt: passt_pb2.ConnectionFilter, page_size: int = 0
    ) -> Iterator[passt_pb2.Connection]:
        """Every matching connection, page after page."""
        token = ""
        while True:
            request = passt_pb2.ListConnectionsRequest(filter=flt, page_size=page_size, page_token=token)
            reply: passt_pb2.ListConnectionsResponse = self._unary(self._control.ListConnections, request)
            yield from reply.connections
            token = reply.next_page_token
            if not token:
                return

    def watch(
        self,
        flt: passt_pb2.ConnectionFilter,
        *,
        existing: bool = False,
        duration: float | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> Generator[passt_pb2.ConnectionEvent, None, None]:
        """Events until `duration` seconds have passed (then it just ends) or the caller stops iterating
        (the call is cancelled). The daemon ending the stream (it is stopping) or dropping the connection is a
        ControlError: a script watching must learn that it no longer sees anything."""
        subscribed = False
        call = self._control.WatchConnections(
            passt_pb2.WatchConnectionsRequest(filter=flt, include_existing=existing), timeout=duration
        )
        try:
            call.initial_metadata()  # the server sends it once subscribed: nothing after this is missed
            subscribed = True
            if on_ready is not None:
                on_ready()
            yield from call
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE and subscribed:
                raise ControlError(f"{self.path}: the daemon went away (connection lost)") from None
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and duration is not None:
                return
            raise ControlError(self._describe(exc)) from None
        finally:
            call.cancel()
        # The server ended the stream by itself: it does that only when it stops (stop_control_server).
        raise ControlError(f"{self.path}: the daemon ended the watch (it is stopping)")

    def reset(self, connection_id: int) -> list[passt_pb2.Connection]:
        reply = self._unary(self._control.ResetConnection, passt_pb2.ResetConnectionRequest(id=connection_id))
        return list(reply.connections)

    def reset_matching(
        self, flt: passt_pb2.ConnectionFilter, *, everything: bool
    ) -> list[passt_pb2.Connection]:
        request = passt_pb2.ResetConnectionsRequest(filter=flt, all=everything)
        reply = self._unary(self._control.ResetConnections, request)
        return list(reply.connections)

    def port_policy(self) -> passt_pb2.PortPolicy:
        reply: passt_pb2.PortPolicy = self._unary(
            self._control.GetPortPolicy, passt_pb2.GetPortPolicyRequest()
        )
        return reply

    def change_forward(
        self,
        op: str,
        direction: passt_pb2.ForwardDirection.ValueType,
        spec: str,
        *,
        dry_run: bool = False,
        ids: Sequence[int] = (),
    ) -> passt_pb2.PortPolicyChange:
        """op: "set" (replace the table), "add" or "remove" (by spec, or by rule `ids`); one transaction."""
        request: passt_pb2.SetPortPolicyRequest | passt_pb2.AddForwardRequest | passt_pb2.RemoveForwardRequest
        if op == "set":
            request = passt_pb2.SetPortPolicyRequest(direction=direction, spec=spec, dry_run=dry_run)
            method = self._control.SetPortPolicy
        elif op == "add":
            request = passt_pb2.AddForwardRequest(direction=direction, spec=spec, dry_run=dry_run)
            method = self._control.AddForward
        else:
            request = passt_pb2.RemoveForwardRequest(direction=direction, spec=spec, dry_run=dry_run, ids=ids)
            method = self._control.RemoveForward
        reply: passt_pb2.PortPolicyChange = self._unary(method, request)
        return reply

    def timeouts(self) -> passt_pb2.Timeouts:
        reply: passt_pb2.Timeouts = self._unary(self._control.GetTimeouts, passt_pb2.GetTimeoutsRequest())
        return reply

    def set_timeouts(self, values: Mapping[str, float]) -> passt_pb2.Timeouts:
        message = passt_pb2.Timeouts()
        for name, value in values.items():
            setattr(message, name, int(value) if name == "tcp_max_retransmits" else value)
        request = passt_pb2.SetTimeoutsRequest(timeouts=message)
        request.update_mask.paths.extend(values)
        reply: passt_pb2.Timeouts = self._unary(self._control.SetTimeouts, request)
        return reply

    def rate_limits(self) -> passt_pb2.RateLimits:
        reply: passt_pb2.RateLimits = self._unary(
            self._control.GetRateLimits, passt_pb2.GetRateLimitsRequest()
        )
        return reply

    def set_rate_limits(self, request: passt_pb2.SetRateLimitsRequest) -> passt_pb2.RateLimits:
        reply: passt_pb2.RateLimits = self._unary(self._control.SetRateLimits, request)
        return reply

    def health(self, service: str = "") -> str:
        """The serving status name of `service` ("" is the whole server): "SERVING", "NOT_SERVING" ..."""
        try:
            reply = self._health.Check(health_pb2.HealthCheckRequest(service=service), timeout=self.timeout)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise ControlError(f"unknown service {service!r}") from None
            raise ControlError(self._describe(exc)) from None
        name: str = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        return name
