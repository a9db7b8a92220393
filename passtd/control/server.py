"""The control server: grpc.aio on a UNIX socket, on the dataplane's own loop (STYLE 1.9: no threads).

The socket file is the access control: mode 0600 (only passtd's user), or 0660 plus a group when one is
given. It is created under a 0177 umask and opened to the group only after chgrp, so there is no window
in which anyone else could connect. gRPC itself would silently unlink whatever sits at the path before
binding, which would hijack a running daemon's socket; so the path is probed first and the start refused if
something answers.

Optionally the same server also listens on TCP (`--control-listen HOST:PORT`). Over TCP the socket file's
permissions no longer protect anything, so TLS with client certificates is mandatory: the server presents
its certificate and accepts only clients whose certificate chains to the configured CA (mutual TLS).
Plaintext TCP exists only for tests and local tooling, and only on a loopback address with an explicit
`--control-insecure`.

Besides passt.v1.Control the server carries the standard health service (grpc.health.v1.Health, SERVING for
"" and "passt.v1.Control", NOT_SERVING once shutdown starts) and server reflection, so grpcurl and generic
probes work without the .proto file.
"""

from __future__ import annotations

import asyncio
import grp
import ipaddress
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from passtd.control.api import ControlAPI
from passtd.control.pb import passt_pb2_grpc
from passtd.control.service import MAX_RPCS, SERVICE_NAME, ControlServicer
from passtd.errors import BackendError, ConfigError
from passtd.unixsock import claim_unix_path

if TYPE_CHECKING:
    from passtd.control.metrics import RpcCounters

HEALTH_SERVICE_NAME: Final = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
MODE_PRIVATE: Final = 0o600
MODE_GROUP: Final = 0o660


@dataclass(frozen=True, slots=True)
class _Bound:
    """What stop_control_server needs to undo: the health servicer to flip, the file to remove."""

    health: Any  # grpc_health.v1.health.aio.HealthServicer (untyped)
    servicer: ControlServicer
    path: str | None
    ino: int
    tcp_port: int | None


_bound: weakref.WeakKeyDictionary[Any, _Bound] = weakref.WeakKeyDictionary()


def _gid_of(group: str) -> int:
    """A group name or a numeric gid, as chgrp(1) accepts."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise BackendError(f"control socket: unknown group {group!r}") from None


def _bind(server: Any, path: str, mode: int) -> None:
    """Bind with a umask that yields at most `mode`; the loop's thread does nothing else meanwhile."""
    old = os.umask(0o777 & ~mode)
    try:
        server.add_insecure_port(f"unix:{path}")
    except RuntimeError:  # grpc's text only says "failed to bind"; the errno goes to its own log line
        raise BackendError(f"control socket {path}: cannot bind (see the grpc error above)") from None
    finally:
        os.umask(old)


@dataclass(frozen=True, slots=True)
class TcpListen:
    """`--control-listen HOST:PORT` and its TLS files (PEM). Port 0 picks a free port (see control_port)."""

    host: str
    port: int
    cert: str | None = None  # --control-cert: the server's certificate chain
    key: str | None = None  # --control-key: its private key
    client_ca: str | None = None  # --control-client-ca: CA bundle client certificates must chain to
    insecure: bool = False  # --control-insecure: plaintext, loopback only

    @property
    def target(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str, option: str = "--control-listen") -> tuple[str, int]:
    """`HOST:PORT` or `[IPV6]:PORT` → (host, port); ConfigError naming `option` otherwise."""
    host, colon, port_text = text.rpartition(":")
    if not colon or not host:
        raise ConfigError(f"{option}: {text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ConfigError(f"{option}: write IPv6 addresses in brackets, e.g. [::1]:{port_text}")
    if not port_text.isascii() or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{option}: bad port {port_text!r} (0..65535)")
    return host, int(port_text)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror}") from None


def tcp_credentials(tcp: TcpListen) -> grpc.ServerCredentials | None:
    """The TLS credentials for `tcp` (None for an allowed --control-insecure); ConfigError when the
    combination is not allowed: plaintext off loopback, or TLS without all three files."""
    if tcp.insecure:
        if not _is_loopback(tcp.host):
            raise ConfigError(
                f"--control-insecure: only allowed on a loopback address, not {tcp.host!r} "
                "(use --control-cert, --control-key and --control-client-ca)"
            )
        if tcp.cert or tcp.key or tcp.client_ca:
            raise ConfigError("--control-insecure: cannot be combined with --control-cert/-key/-client-ca")
        return None
    missing = [
        name
        for name, value in (
            ("--control-cert", tcp.cert),
            ("--control-key", tcp.key),
            ("--control-client-ca", tcp.client_ca),
        )
        if not value
    ]
    if missing:
        raise ConfigError(
            f"--control-listen: TLS with client certificates is required; missing {', '.join(missing)} "
            "(or --control-insecure on a loopback address)"
        )
    assert tcp.cert and tcp.key and tcp.client_ca
    return grpc.ssl_server_credentials(
        [(_read(tcp.key, "--control-key"), _read(tcp.cert, "--control-cert"))],
        root_certificates=_read(tcp.client_ca, "--control-client-ca"),
        require_client_auth=True,
    )


def _code_name(context: Any, default: str) -> str:
    """The status the call ended with, as its name (OK, INVALID_ARGUMENT, ...)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int):
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return str(member.name)
    return default


class _CountingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts every call by method and final status code into RpcCounters (the metrics' control_calls):
    one wrapper per handler, so the servicer's own error mapping stays the one place that picks codes."""

    def __init__(self, rpcs: RpcCounters) -> None:
        self.rpcs = rpcs

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = str(details.method).rsplit("/", 1)[-1]
        record = self.rpcs.record
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                try:
                    reply = await inner(request, context)
                except asyncio.CancelledError:
                    record(method, "CANCELLED")
                    raise
                except BaseException:
                    record(method, _code_name(context, "UNKNOWN"))
                    raise
                record(method, _code_name(context, "OK"))
                return reply

            return grpc.unary_unary_rpc_method_handler(
                unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def streaming(request: Any, context: Any) -> AsyncIterator[Any]:
                try:
                    async for reply in stream(request, context):
                        yield reply
                except (asyncio.CancelledError, GeneratorExit):
                    record(method, "CANCELLED")
                    raise
                except BaseException:
                    record(method, _code_name(context, "UNKNOWN"))
                    raise
                record(method, _code_name(context, "OK"))

            return grpc.unary_stream_rpc_method_handler(
                streaming, handler.request_deserializer, handler.response_serializer
            )
        return handler  # stream-stream (reflection): not counted


async def start_control_server(
    api: ControlAPI,
    path: str | None,
    *,
    group: str | None = None,
    tcp: TcpListen | None = None,
    rpcs: RpcCounters | None = None,
) -> grpc.aio.Server:
    """Serve passt.v1.Control, health and reflection on `unix:{path}` and/or TCP; BackendError (or
    ConfigError for a TLS setup that is not allowed) if it cannot.

    The socket file gets mode 0600, or 0660 and the given group (name or gid). A stale socket file is
    replaced; a live one (something accepts connections on it) is left alone and the start refused.
    With `rpcs`, every call is counted by method and status code (for --metrics-listen).
    """
    if path is None and tcp is None:
        raise ConfigError("control server: neither a socket path nor a TCP address")
    gid = _gid_of(group) if group is not None else None
    mode = MODE_PRIVATE if gid is None else MODE_GROUP
    credentials = tcp_credentials(tcp) if tcp is not None else None
    if path is not None:
        claim_unix_path(path, "control socket")

    # grpc's own cap is the backstop for calls the servicer does not count (health, reflection).
    interceptors = [_CountingInterceptor(rpcs)] if rpcs is not None else []
    server = grpc.aio.server(maximum_concurrent_rpcs=MAX_RPCS + 32, interceptors=interceptors)
    servicer = ControlServicer(api)
    passt_pb2_grpc.add_ControlServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)
    ino = 0
    tcp_port: int | None = None
    try:
        if path is not None:
            _bind(server, path, MODE_PRIVATE)  # the group gets in only once the file is its own
            try:
                if gid is not None:
                    os.chown(path, -1, gid)
                os.chmod(path, mode)
                ino = os.stat(path).st_ino
            except OSError as exc:
                raise BackendError(f"control socket {path}: cannot set owner/mode: {exc.strerror}") from None
        if tcp is not None:
            try:
                if credentials is None:
                    tcp_port = server.add_insecure_port(tcp.target)
                else:
                    tcp_port = server.add_secure_port(tcp.target, credentials)
            except RuntimeError:
                tcp_port = 0
            if not tcp_port:
                raise BackendError(f"control listen {tcp.target}: cannot bind (see the grpc error above)")
        await server.start()
        for service in ("", SERVICE_NAME):
            await health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    except BaseException:
        await server.stop(None)
        raise
    _bound[server] = _Bound(health=health_servicer, servicer=servicer, path=path, ino=ino, tcp_port=tcp_port)
    return server


def control_port(server: grpc.aio.Server) -> int | None:
    """The TCP port `server` listens on (the one picked for port 0), or None without TCP."""
    bound = _bound.get(server)
    return bound.tcp_port if bound is not None else None


async def stop_control_server(server: grpc.aio.Server, grace: float | None) -> None:
    """Report NOT_SERVING, let in-flight RPCs finish for up to `grace` seconds, then remove the socket file.

    The file is removed only if it is still the one this server created, never a successor's.
    """
    bound = _bound.pop(server, None)
    if bound is not None:
        await bound.health.enter_graceful_shutdown()
        bound.servicer.shutdown()  # watch streams end with OK instead of waiting out the grace period
    await server.stop(grace)
    if bound is None or bound.path is None:
        return
    try:
        if os.lstat(bound.path).st_ino == bound.ino:
            os.unlink(bound.path)
    except FileNotFoundError:
        pass  # grpc removes the socket file itself on stop
