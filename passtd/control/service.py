"""passt.v1.Control for grpc.aio: translate each RPC into one ControlAPI call and back, nothing more.

Errors the daemon raises on purpose (`PasstError`) become a status code with their message, so passtctl can
print it; anything else is a bug and reaches the client as grpc's generic UNKNOWN.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Final, NoReturn, TypeVar

import grpc

from passtd.control.api import (
    ConnectionEventView,
    ConnectionFilter,
    ConnectionView,
    ControlAPI,
    EventQueue,
    ForwardDirection,
    InvalidArgument,
    LimitView,
    LoopShare,
    NotFound,
    ResourceExhausted,
    clip,
)
from passtd.control.convert import (
    connection_to_pb,
    egress_action_from_pb,
    egress_rule_from_pb,
    egress_rules_from_pb,
    egress_to_pb,
    event_to_pb,
    filter_from_pb,
    forward_direction_from_pb,
    forward_table_to_pb,
    page_token_from_pb,
    page_token_to_pb,
    policy_change_to_pb,
    rate_limit_from_pb,
    rate_limits_to_pb,
    rule_ids_from_pb,
    spec_from_pb,
    status_to_pb,
    timeouts_from_pb,
    timeouts_to_pb,
)
from passtd.control.pb import passt_pb2, passt_pb2_grpc
from passtd.errors import BackendError, ConfigError, PasstError

SERVICE_NAME: Final = passt_pb2.DESCRIPTOR.services_by_name["Control"].full_name  # "passt.v1.Control"
PAGE_SIZE_DEFAULT: Final = 1000
PAGE_SIZE_MAX: Final = 10000
EXISTING_PAGE: Final = 1000
MAX_RPCS: Final = 128  # Control calls served at once, watch streams included; more get RESOURCE_EXHAUSTED
MESSAGE_MAX: Final = 1000  # characters of an error message (values in it are already cut to 100)
CONVERT_SHARE: Final = 0.1  # of the loop a reply's conversion to protobuf may take while frames wait

# Most specific first: the first isinstance match decides.
_STATUS_CODES: Final[tuple[tuple[type[PasstError], grpc.StatusCode], ...]] = (
    (InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT),
    (ConfigError, grpc.StatusCode.INVALID_ARGUMENT),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (BackendError, grpc.StatusCode.UNAVAILABLE),
    (PasstError, grpc.StatusCode.FAILED_PRECONDITION),
)

T = TypeVar("T")
_ChangeRequest = passt_pb2.SetPortPolicyRequest | passt_pb2.AddForwardRequest | passt_pb2.RemoveForwardRequest


def status_code_for(exc: PasstError) -> grpc.StatusCode:
    return next(code for kind, code in _STATUS_CODES if isinstance(exc, kind))


async def _abort(context: grpc.aio.ServicerContext, exc: PasstError) -> NoReturn:
    # The message starts with the field's name, so a cut keeps it; the cut is the last guard against a
    # message that quotes a huge request value whole.
    await context.abort(status_code_for(exc), clip(str(exc) or type(exc).__name__, MESSAGE_MAX))
    raise AssertionError("context.abort returned")  # it always raises


async def _sync(fn: Callable[[], T]) -> T:
    return fn()


class ControlServicer(passt_pb2_grpc.ControlServicer):
    def __init__(self, api: ControlAPI) -> None:
        self._api = api
        self._watches: set[EventQueue] = set()
        self.active = 0  # calls being served now
        self.share = LoopShare(CONVERT_SHARE)

    def _take_slot(self) -> None:
        """One of MAX_RPCS for the length of a call; RESOURCE_EXHAUSTED when none is free, so a client
        opening calls without end costs a refusal each, not memory and loop time."""
        if self.active >= MAX_RPCS:
            raise ResourceExhausted(f"too many control calls at once (limit {MAX_RPCS})")
        self.active += 1

    async def _call(self, context: grpc.aio.ServicerContext, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            self._take_slot()
            try:
                return await fn()
            finally:
                self.active -= 1
        except PasstError as exc:
            await _abort(context, exc)

    def shutdown(self) -> None:
        """End every open watch stream cleanly (the client sees OK, not CANCELLED)."""
        for queue in list(self._watches):
            queue.close()

    async def GetStatus(
        self, request: passt_pb2.GetStatusRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.Status:
        view = await self._call(context, self._api.status)
        rpcs = LimitView(max=MAX_RPCS, in_use=self.active + 1)  # + this call, whose slot is given back
        return status_to_pb(replace(view, limits=replace(view.limits, concurrent_rpcs=rpcs)))

    async def ListConnections(
        self, request: passt_pb2.ListConnectionsRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.ListConnectionsResponse:
        async def run() -> passt_pb2.ListConnectionsResponse:
            flt = filter_from_pb(request.filter)
            after = page_token_from_pb(request.page_token)
            size = min(request.page_size or PAGE_SIZE_DEFAULT, PAGE_SIZE_MAX)
            views, last = await self._api.list_connections(flt, after, size)
            return passt_pb2.ListConnectionsResponse(
                connections=await self._converted(views), next_page_token=page_token_to_pb(last)
            )

        return await self._call(context, run)

    async def _converted(self, views: list[ConnectionView]) -> list[passt_pb2.Connection]:
        """The views as messages, in slices (~5 µs each: 2 000 of them would hold the loop for 10 ms)."""
        out: list[passt_pb2.Connection] = []
        self.share.start()
        for view in views:
            await self.share.pause()
            out.append(connection_to_pb(view))
        return out

    async def WatchConnections(
        self, request: passt_pb2.WatchConnectionsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[passt_pb2.ConnectionEvent]:
        flt = await self._call(context, lambda: _sync(lambda: filter_from_pb(request.filter)))
        queue = await self._call(context, lambda: _sync(lambda: self._api.watch(flt)))
        try:
            self._take_slot()
        except ResourceExhausted as exc:
            queue.close()
            await _abort(context, exc)
        self._watches.add(queue)
        try:
            await context.send_initial_metadata(())  # tells the client it is subscribed
            # Subscribed first, listed second: a flow opening in between shows up twice, never not at all.
            after = 0
            while request.include_existing:
                views, after = await self._api.list_connections(flt, after, EXISTING_PAGE)
                for view in views:
                    yield event_to_pb(
                        ConnectionEventView(kind="existing", time=view.last_activity_time, connection=view)
                    )
                if not after:
                    break
            while (event := await queue.get()) is not None:
                yield event_to_pb(event)
        finally:
            self._watches.discard(queue)
            queue.close()
            self.active -= 1

    async def ResetConnection(
        self, request: passt_pb2.ResetConnectionRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.ResetConnectionsResponse:
        async def run() -> passt_pb2.ResetConnectionsResponse:
            if not request.id:
                raise InvalidArgument("id: 0 is not a flow id")
            views = await self._api.reset_connections([request.id], ConnectionFilter())
            return passt_pb2.ResetConnectionsResponse(connections=[connection_to_pb(v) for v in views])

        return await self._call(context, run)

    async def ResetConnections(
        self, request: passt_pb2.ResetConnectionsRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.ResetConnectionsResponse:
        async def run() -> passt_pb2.ResetConnectionsResponse:
            flt = filter_from_pb(request.filter)
            if flt.empty and not request.all:
                raise InvalidArgument("filter: empty; set 'all' to reset every connection")
            views = await self._api.reset_connections(None, flt)
            return passt_pb2.ResetConnectionsResponse(connections=[connection_to_pb(v) for v in views])

        return await self._call(context, run)

    async def GetPortPolicy(
        self, request: passt_pb2.GetPortPolicyRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.PortPolicy:
        tables = await self._call(context, lambda: _sync(self._api.port_policy))
        return passt_pb2.PortPolicy(tables=[forward_table_to_pb(t) for t in tables])

    async def _change(
        self,
        op: str,
        request: passt_pb2.SetPortPolicyRequest
        | passt_pb2.AddForwardRequest
        | passt_pb2.RemoveForwardRequest,
        context: grpc.aio.ServicerContext,
    ) -> passt_pb2.PortPolicyChange:
        async def run() -> passt_pb2.PortPolicyChange:
            ids = rule_ids_from_pb(request.ids, request.spec) if op == "delete" else ()  # type: ignore[union-attr]
            direction: ForwardDirection = "tcp_in" if ids else forward_direction_from_pb(request.direction)
            spec = "" if ids else spec_from_pb(request.spec)
            change = await self._api.change_forward(
                op,  # type: ignore[arg-type]
                direction,
                spec,
                dry_run=request.dry_run,
                ids=ids,
            )
            return policy_change_to_pb(change)

        return await self._call(context, run)

    async def SetPortPolicy(
        self, request: passt_pb2.SetPortPolicyRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.PortPolicyChange:
        return await self._change("replace", request, context)

    async def AddForward(
        self, request: passt_pb2.AddForwardRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.PortPolicyChange:
        return await self._change("add", request, context)

    async def RemoveForward(
        self, request: passt_pb2.RemoveForwardRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.PortPolicyChange:
        return await self._change("delete", request, context)

    async def GetTimeouts(
        self, request: passt_pb2.GetTimeoutsRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.Timeouts:
        view = await self._call(context, lambda: _sync(self._api.timeouts))
        return timeouts_to_pb(view)

    async def SetTimeouts(
        self, request: passt_pb2.SetTimeoutsRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.Timeouts:
        def run() -> passt_pb2.Timeouts:
            values = timeouts_from_pb(request.timeouts, list(request.update_mask.paths))
            return timeouts_to_pb(self._api.set_timeouts(values))

        return await self._call(context, lambda: _sync(run))

    # -- egress -------------------------------------------------------------------------------------------

    async def GetEgress(
        self, request: passt_pb2.GetEgressRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.EgressPolicy:
        return await self._call(context, lambda: _sync(lambda: egress_to_pb(self._api.egress())))

    async def SetEgress(
        self, request: passt_pb2.SetEgressRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.EgressPolicy:
        def run() -> passt_pb2.EgressPolicy:
            rules = egress_rules_from_pb(request.rules)
            default = egress_action_from_pb(request.default_action, "default_action", "allow")
            return egress_to_pb(self._api.set_egress(rules, default, request.reset_existing))

        return await self._call(context, lambda: _sync(run))

    async def AddEgressRule(
        self, request: passt_pb2.AddEgressRuleRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.EgressPolicy:
        def run() -> passt_pb2.EgressPolicy:
            if not request.HasField("rule"):
                raise InvalidArgument("rule: missing")
            rule = egress_rule_from_pb(request.rule, "rule")
            return egress_to_pb(self._api.add_egress_rule(rule, request.position, request.reset_existing))

        return await self._call(context, lambda: _sync(run))

    async def RemoveEgressRule(
        self, request: passt_pb2.RemoveEgressRuleRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.EgressPolicy:
        def run() -> passt_pb2.EgressPolicy:
            if not request.id:
                raise InvalidArgument("id: 0 is not a rule id")
            return egress_to_pb(self._api.remove_egress_rule(request.id))

        return await self._call(context, lambda: _sync(run))

    async def SetEgressDefault(
        self, request: passt_pb2.SetEgressDefaultRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.EgressPolicy:
        def run() -> passt_pb2.EgressPolicy:
            action = egress_action_from_pb(request.action, "action")
            return egress_to_pb(self._api.set_egress_default(action, request.reset_existing))

        return await self._call(context, lambda: _sync(run))

    # --- rate limits ---

    async def GetRateLimits(
        self, request: passt_pb2.GetRateLimitsRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.RateLimits:
        view = await self._call(context, lambda: _sync(self._api.rate_limits))
        return rate_limits_to_pb(view)

    async def SetRateLimits(
        self, request: passt_pb2.SetRateLimitsRequest, context: grpc.aio.ServicerContext
    ) -> passt_pb2.RateLimits:
        def run() -> passt_pb2.RateLimits:
            egress = rate_limit_from_pb(request, "egress")
            ingress = rate_limit_from_pb(request, "ingress")
            return rate_limits_to_pb(self._api.set_rate_limits(egress, ingress))

        return await self._call(context, lambda: _sync(run))
