"""Who may talk to the API at all, checked before any route: a request's ``Host`` must name this server (400
otherwise), and an ``Origin``, when a browser sends one, must be this server's own (403 otherwise).

Without a token (the default on loopback) these are what keep web pages out: a page on another site could
otherwise POST jobs to http://127.0.0.1:8765 (its Origin gives it away), and a DNS-rebinding page, whose own name
resolves to 127.0.0.1, could read the answers too (its Host gives it away). The dashboard is served by this
server (same origin) and the SDK and CLI send no Origin, so neither is affected.
"""

from __future__ import annotations

from collections.abc import Iterable

from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
ANY_HOST = "*"


def host_name(host: str) -> str:
    """The name in a Host header, without its port: ``[::1]:8765`` is ``::1``, ``localhost:80`` is ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def refusal(scope: Scope, allowed: frozenset[str]) -> tuple[int, str] | None:
    """(status, why) when the request is not for this server or comes from another site's page; None if fine."""
    headers = Headers(scope=scope)
    host = headers.get("host", "")
    if ANY_HOST not in allowed and host_name(host) not in allowed:
        return 400, f"invalid Host header {host!r}: this server answers to {', '.join(sorted(allowed))} " \
                    "(polyak serve --allowed-host adds names)"
    origin = headers.get("origin")
    if origin is not None and origin.rstrip("/").lower() != f"{scope['scheme']}://{host}".lower():
        return 403, f"cross-origin request from {origin!r} refused: only this server's own pages may call it"
    return None


class HostAndOrigin:
    """ASGI middleware: ``refusal`` for every HTTP request, answered as an ErrorBody."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str]):
        self.app = app
        self.allowed = frozenset(host_name(h) if h != ANY_HOST else h for h in allowed_hosts)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = refusal(scope, self.allowed) if scope["type"] == "http" else None
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, detail = refused
        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
