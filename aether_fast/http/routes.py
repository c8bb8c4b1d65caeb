"""The REST routes of docs/operations.md §4: status, health, channels, broadcast and the
JSON metrics.

What it owns: the route table, admin authentication of the admin routes, request body
validation and the JSON error answers. Rule: a route reads or changes state only through
`Operations` (operations.py) and reads figures only through `Status` (status.py) or the
Metrics view; no route touches a session or the Node.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from aether_fast import logs
from aether_fast.auth import Authenticator, AuthError
from aether_fast.brokers.base import BrokerUnavailable
from aether_fast.config import Config
from aether_fast.http.front import Request, Response
from aether_fast.http.static import FILES as STATIC_FILES
from aether_fast.http.static import StaticFiles
from aether_fast.metrics import Metrics
from aether_fast.operations import Operations
from aether_fast.protocol import SEVERITIES, ErrorCode, error_body, name_error, valid_channel
from aether_fast.status import Status
from aether_fast.stores.base import FieldError, parse_channel_config

Handler = Callable[[Request, str], Response | Awaitable[Response]]


class Router:
    def __init__(
        self,
        config: Config,
        operations: Operations,
        status: Status,
        auth: Authenticator,
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._operations = operations
        self._status = status
        self._auth = auth
        self._metrics = metrics
        self._static = StaticFiles()
        #: path (or prefix ending in "/") -> {method: handler}
        self._exact: dict[str, dict[str, Handler]] = {
            "/health": {"GET": self.health},
            "/ws/status": {"GET": self.status},
            "/ws/channels": {"GET": self.list_channels, "POST": self.put_channel},
            "/ws/broadcast": {"POST": self.broadcast},
            "/metrics/connections": {"GET": self.metric("connections")},
            "/metrics/messages": {"GET": self.metric("messages")},
            "/metrics/channels": {"GET": self.metric_channels},
            "/metrics/errors": {"GET": self.metric("errors")},
            # the JS client (clients/js/), /dashboard, /demo and their assets (aether_fast/static/)
            **{path: {"GET": self._static.serve} for path in STATIC_FILES},
        }
        self._prefixed: dict[str, dict[str, Handler]] = {
            "/ws/channels/": {"GET": self.get_channel, "DELETE": self.delete_channel},
        }

    def handle(self, request: Request) -> Response | Awaitable[Response]:
        methods = self._exact.get(request.path)
        arg = ""
        if methods is None:
            for prefix, table in self._prefixed.items():
                if request.path.startswith(prefix) and len(request.path) > len(prefix):
                    methods, arg = table, request.path[len(prefix) :]
                    break
        if methods is None:
            if request.path == self._config.ws_path:
                return Response.error(
                    426,
                    ErrorCode.INVALID_MESSAGE,
                    "WebSocket upgrade required",
                    "send a WebSocket upgrade request",
                    (("Upgrade", "websocket"),),
                )
            return Response.error(
                404, ErrorCode.INVALID_MESSAGE, "not found", "no such route", path=request.path
            )
        method = "GET" if request.method == "HEAD" else request.method
        handler = methods.get(method)
        if handler is None:
            return Response.method_not_allowed(request.method, methods)
        try:
            answer = handler(request, arg)
        except _Refused as refused:
            return refused.response
        if isinstance(answer, Response):
            return answer
        return _awaited(answer)

    # -- auth ------------------------------------------------------------------------------

    def _require_admin(self, request: Request) -> None:
        """Returns when the request carries admin credentials, else raises the error to
        answer (logged at warn: a refused admin request is a security event)."""
        refused = self._check_admin(request)
        if refused is not None:
            logs.security(
                "admin_auth_failed",
                peer=request.peer,
                path=request.path,
                status=refused.status,
            )
            raise _Refused(refused)

    def _check_admin(self, request: Request) -> Response | None:
        header = request.header("authorization") or ""
        if header[:7].lower() != "bearer " or not header[7:].strip():
            return _unauthorized(
                ErrorCode.AUTH_REQUIRED,
                "admin credentials required",
                "send Authorization: Bearer <admin token>",
            )
        token = header[7:].strip()
        admin_token = self._config.admin_token
        if admin_token and hmac.compare_digest(token.encode(), admin_token.encode()):
            return None
        try:
            claims = self._auth.verify(token)
        except AuthError as err:
            return _unauthorized(err.code, "invalid credentials", err.reason)
        if not claims.admin:
            return Response.error(
                403, ErrorCode.FORBIDDEN, "admin rights required", "token is not an admin token"
            )
        return None

    @staticmethod
    def _json_body(request: Request) -> Any:
        try:
            return orjson.loads(request.body)
        except orjson.JSONDecodeError as exc:
            raise _Refused(
                Response.error(
                    400, ErrorCode.INVALID_JSON, "body is not valid JSON", str(exc).split(":")[0]
                )
            ) from None

    # -- routes ----------------------------------------------------------------------------

    def health(self, request: Request, _: str) -> Response:
        state, reason = self._status.health()
        body: dict[str, Any] = {"status": state}
        if reason:
            body["reason"] = reason
        return Response.json(200 if state == "healthy" else 503, body)

    def status(self, request: Request, _: str) -> Response:
        return Response.json(200, self._status.status())

    async def list_channels(self, request: Request, _: str) -> Response:
        self._require_admin(request)
        return Response.json(200, {"channels": await self._operations.channel_views()})

    async def get_channel(self, request: Request, name: str) -> Response:
        self._require_admin(request)
        view = await self._operations.channel_view(name) if valid_channel(name) else None
        if view is None:
            return _no_channel(name)
        return Response.json(200, view)

    async def put_channel(self, request: Request, _: str) -> Response:
        self._require_admin(request)
        body = self._json_body(request)
        existing = None
        if isinstance(body, dict) and isinstance(body.get("name"), str):
            existing = self._operations.store.get(body["name"])
        try:
            cfg = parse_channel_config(body, self._config, existing)
        except FieldError as err:
            return Response.error(
                400,
                ErrorCode.INVALID_MESSAGE,
                "invalid channel config",
                err.reason,
                field=err.field,
            )
        created = await self._operations.configure_channel(cfg)
        return Response.json(201 if created else 200, cfg.to_json())

    async def delete_channel(self, request: Request, name: str) -> Response:
        self._require_admin(request)
        if not valid_channel(name) or not await self._operations.delete_channel(name):
            return _no_channel(name)
        return Response.json(200, {"deleted": name})

    def broadcast(self, request: Request, _: str) -> Response:
        self._require_admin(request)
        body = self._json_body(request)
        if not isinstance(body, dict):
            return _field_error("body", "body must be a JSON object")
        message = body.get("message")
        if not isinstance(message, str) or not message:
            return _field_error("message", "message must be a non-empty string")
        severity = body.get("severity", "info")
        if severity not in SEVERITIES:
            return _field_error("severity", "severity must be info, warning or error")
        channel = body.get("channel")
        if channel is not None and not valid_channel(channel):
            return _field_error("channel", name_error("channel"))
        unknown = set(body) - {"message", "severity", "channel"}
        if unknown:
            return _field_error(sorted(unknown)[0], "unknown field")
        sent = self._operations.broadcast(message, severity, channel)
        return Response.json(200, {"sent": sent, "channel": channel})

    def metric(self, name: str) -> Handler:
        def handler(request: Request, _: str) -> Response:
            return Response.json(200, self._metrics.view(name))

        return handler

    def metric_channels(self, request: Request, _: str) -> Response:
        """Counts for anyone; with admin credentials also the per-channel list (names
        such as `user.alice.inbox` are not public). Bad credentials are refused, not
        silently answered with the public view."""
        if request.header("authorization") is None:
            return Response.json(200, self._metrics.view("channels"))
        self._require_admin(request)
        return Response.json(200, self._metrics.view("channels", admin=True))


async def _awaited(pending: Awaitable[Response]) -> Response:
    """An async route's answer, its refusal (`_Refused`), or 503 while the broker it needs is
    unreachable."""
    try:
        return await pending
    except _Refused as refused:
        return refused.response
    except BrokerUnavailable as exc:
        body = error_body(
            ErrorCode.SERVER_BUSY, "broker unavailable, try again", "broker", str(exc)
        )
        return Response.json(503, body, (("Retry-After", "1"),))


def _no_channel(name: str) -> Response:
    return Response.error(
        404, ErrorCode.CHANNEL_NOT_FOUND, "no such channel", "not found", channel=name
    )


def _unauthorized(code: str, message: str, reason: str) -> Response:
    """401 with the Bearer challenge: no admin credentials, or credentials refused."""
    return Response.error(401, code, message, reason, (("WWW-Authenticate", "Bearer"),))


def _field_error(field: str, reason: str) -> Response:
    return Response.error(
        400, ErrorCode.INVALID_MESSAGE, "invalid request body", reason, field=field
    )


class _Refused(Exception):
    """A route's check failed (admin credentials, the JSON body): `response` is the answer."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.status)
        self.response = response
