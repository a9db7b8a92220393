"""passt.v1.Control for grpc.aio: translate each RPC into one ControlAPI call and back, nothing more.

Errors the daemon raises on purpose (`PasstError`) become a status code with their message, so passtctl can
print it; anything else is a bug and reaches the client as grpc's generic UNKNOWN.
"""

from __future__ import annotations

from typing import Final, NoReturn

import grpc

from passtd.control.api import ControlAPI
from passtd.control.convert import status_to_pb
from passtd.control.pb import passt_pb2, passt_pb2_grpc
from passtd.errors import BackendError, ConfigError, PasstError

SERVICE_NAME: Final = passt_pb2.DESCRIPTOR.services_by_name["Control"].full_name  # "passt.v1.Control"

# Most specific first: the first isinstance match decides.
_STATUS_CODES: Final[tuple[tuple[type[PasstError], grpc.StatusCode], ...]] = (
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (BackendError, grpc.StatusCode.UNAVAILABLE),
    (PasstError, grpc.StatusCode.FAILED_PRECONDITION),
)


def status_code_for(exc: PasstError) -> grpc.StatusCode:
    return next(code for kind, code in _STATUS_CODES if isinstance(exc, kind))


async def _abort(context: grpc.aio.ServicerContext, exc: PasstError) -> NoReturn:
    await context.abort(status_code_for(exc), str(exc) or type(exc).__name__)
    raise AssertionError("context.abort returned")  # it always raises


class ControlServicer(passt_pb2_grpc.ControlServicer):
    def __init__(self, api: ControlAPI) -> None:
        self._api = api

    async def GetStatus(
        self, request: passt_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.Status:
        try:
            view = self._api.status()
        except PasstError as exc:
            await _abort(context, exc)
        return status_to_pb(view)
