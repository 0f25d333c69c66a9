"""Who may talk to the web server: its own origin, with the launch's random token; and how much at once.

The server listens on 127.0.0.1, but any web page the user visits can make the browser send requests
to 127.0.0.1 (and a DNS-rebinding page can even read the answers). So every HTTP request and the
WebSocket handshake pass :meth:`AccessGuard.check` (an aiohttp middleware installed on wslink's
server before it starts):

- the ``Host`` header must name this server: a loopback name (``127.0.0.1``, ``localhost``, ``[::1]``)
  or the address given with ``--host``, with the server's port (defeats DNS rebinding);
- an ``Origin`` header, when the browser sends one, must be this same host and port; the WebSocket
  handshake must carry one (browsers always do);
- the request must carry the launch's random token: in the URL the command prints
  (``?secret=TOKEN``, as notebook servers do; trame's client reads ``secret`` and sends it in wslink's
  hello) or in the cookie the server sets on that first answer (``HttpOnly``, ``SameSite=Strict``), so
  the page's own assets, the WebSocket and a reload work without the token in the address bar.

Anything else is answered ``403 Forbidden`` (for a WebSocket: refused before the upgrade). wslink's
hello must then present the token, or come on a connection whose handshake carried the cookie.

:class:`CappedUnChunker` caps each WebSocket message (an upload is one message) at the upload limit:
wslink otherwise lets an authenticated client announce up to 4 GB and allocates it blindly. A message
whose announced size is over the cap is refused at its first chunk; its remaining chunks are dropped
unread into memory.

Free of trame and Slicer (aiohttp only where the middleware is made), so tests call it directly.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from typing import Any, Callable, Iterable, Optional
from urllib.parse import urlsplit

TOKEN_PARAMETER = "secret"  # the URL parameter trame's client reads (and removes from the address bar)
LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
MESSAGE_OVERHEAD = 1024 * 1024  # wslink/msgpack envelope of an upload, beyond the file itself
CHUNK_HEADER = 12  # wslink's chunk header: message id, offset, total size (uint32 little endian each)

_log = logging.getLogger(__name__)


def new_token() -> str:
    """A fresh random token for one launch (256 bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def _host_name(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


class AccessGuard:
    """The rules above for one server: its token and the address it was asked to listen on."""

    def __init__(self, token: str, bind_host: str = "127.0.0.1") -> None:
        self.token = token
        self.bind_host = bind_host
        self.authorised_clients: set[str] = set()  # wslink client ids whose handshake carried the cookie/token

    def cookie_name(self, port: int) -> str:
        return f"unet3d_web_{port}"  # cookies ignore the port: one name per server

    def url(self, port: int, host: Optional[str] = None) -> str:
        """The address to open: with the token, for the browser's first request."""
        host = host or self.bind_host
        shown = "127.0.0.1" if host in WILDCARD_HOSTS else _host_name(host)
        return f"http://{shown}:{port}/?{TOKEN_PARAMETER}={self.token}"

    def token_matches(self, value: Any) -> bool:
        return isinstance(value, str) and hmac.compare_digest(value.encode(), self.token.encode())

    def host_allowed(self, host_header: str, port: int) -> bool:
        """``Host: name:port`` names this server (any name when it listens on every interface)."""
        name, _, given_port = host_header.rpartition(":")
        if not name or given_port != str(port):
            return False
        if self.bind_host in WILDCARD_HOSTS:
            return True
        return name.lower() in {*LOOPBACK_NAMES, _host_name(self.bind_host).lower()}

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        """``Origin`` is ``http(s)://`` plus exactly the (allowed) host and port the request went to."""
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc.lower() == host_header.lower() and not parts.path

    def check(self, headers: Any, query: Any, cookies: Any, port: int) -> tuple[bool, str]:
        """``(allowed, why not)`` for one request's headers, query parameters and cookies."""
        host = headers.get("Host", "")
        if not self.host_allowed(host, port):
            return False, f"unknown host {host!r}"
        origin = headers.get("Origin")
        websocket = headers.get("Upgrade", "").lower() == "websocket"
        if origin is None and websocket:
            return False, "a WebSocket without Origin"
        if origin is not None and not self.origin_allowed(origin, host):
            return False, f"foreign origin {origin!r}"
        if self.token_matches(query.get(TOKEN_PARAMETER)) or self.token_matches(cookies.get(self.cookie_name(port))):
            return True, ""
        return False, "no token"

    def middleware(self) -> Callable:
        """The aiohttp middleware applying :meth:`check` to every request (static files and the WebSocket)."""
        from aiohttp import web

        guard = self

        @web.middleware
        async def access_guard(request: "web.Request", handler):
            port = _local_port(request)
            allowed, why = guard.check(request.headers, request.query, request.cookies, port)
            if not allowed:
                _log.warning("refused %s %s: %s", request.method, request.path, why)
                raise web.HTTPForbidden(text="Forbidden: open the address printed by 'unet3d-segment web' "
                                             f"(it carries the ?{TOKEN_PARAMETER}= token of this launch).\n")
            response = await handler(request)
            if guard.token_matches(request.query.get(TOKEN_PARAMETER)) and not response.prepared:
                response.set_cookie(guard.cookie_name(port), guard.token, httponly=True, samesite="Strict", path="/")
            return response

        return access_guard

    # --- wiring into trame / wslink ------------------------------------------------------------------
    def install(self, wslink_server: Any, protocol: Any, max_message_bytes: int,
                on_refused: Optional[Callable[[int], None]] = None) -> None:
        """Guard a wslink aiohttp server before it starts: middleware, hello check, message cap.

        ``wslink_server`` is what trame's ``on_server_bind`` passes (wslink's ``WebAppServer``);
        ``protocol`` trame's root protocol (``server.protocol``).
        """
        wslink_server.app.middlewares.append(self.middleware())
        guard = self
        connect, close = protocol.onConnect, protocol.onClose

        def on_connect(request: Any, client_id: str) -> None:
            # The handshake passed the middleware, so it carried the token or the cookie.
            cookies = getattr(request, "cookies", {})
            port = _local_port(request)
            if guard.token_matches(cookies.get(guard.cookie_name(port))) or guard.token_matches(
                    getattr(request, "query", {}).get(TOKEN_PARAMETER)):
                guard.authorised_clients.add(client_id)
            connect(request, client_id)

        def on_close(client_id: str) -> None:
            guard.authorised_clients.discard(client_id)
            close(client_id)

        async def validate_token(token: Any, client_id: str) -> bool:  # wslink's hello
            return guard.token_matches(token) or client_id in guard.authorised_clients

        protocol.onConnect, protocol.onClose, protocol.validateToken = on_connect, on_close, validate_token
        for handler in getattr(wslink_server, "_ws_handlers", []):
            handler.unchunkers = CappedUnChunkers(max_message_bytes, on_refused)


def _local_port(request: Any) -> int:
    transport = getattr(request, "transport", None)
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if sockname:
        return int(sockname[1])
    return int(request.url.port or 0)


class CappedUnChunker:
    """wslink's un-chunker with a ceiling on each message's announced size (see the module docstring)."""

    def __init__(self, inner: Any, cap: int, on_refused: Optional[Callable[[int], None]] = None) -> None:
        self.inner = inner
        self.cap = int(cap)
        self.on_refused = on_refused
        self.refused: dict[int, int] = {}  # message id -> bytes still to drop
        inner.set_max_message_size(min(getattr(inner, "max_message_size", self.cap), self.cap))

    def set_max_message_size(self, size: int) -> None:
        self.inner.set_max_message_size(min(int(size), self.cap))  # wslink raises it to 4 GB after the hello

    def release_pending_messages(self) -> None:
        self.refused.clear()
        self.inner.release_pending_messages()

    def process_chunk(self, chunk: bytes) -> Any:
        header = bytes(chunk[:CHUNK_HEADER])
        if len(header) == CHUNK_HEADER:
            message = int.from_bytes(header[0:4], "little")
            total = int.from_bytes(header[8:12], "little")
            content = len(chunk) - CHUNK_HEADER
            if message in self.refused:
                self.refused[message] -= content
                if self.refused[message] <= 0:
                    del self.refused[message]
                return None
            if total > self.cap and message not in getattr(self.inner, "pending_messages", {}):
                self.refused[message] = total - content
                _log.warning("refused a %d-byte message over the %d-byte limit", total, self.cap)
                if self.on_refused is not None:
                    self.on_refused(total)
                return None
        return self.inner.process_chunk(chunk)


class CappedUnChunkers(dict):
    """wslink's ``unchunkers`` map (client id -> un-chunker) whose entries are :class:`CappedUnChunker`."""

    def __init__(self, cap: int, on_refused: Optional[Callable[[int], None]] = None,
                 items: Iterable = ()) -> None:
        super().__init__(items)
        self.cap = cap
        self.on_refused = on_refused

    def __setitem__(self, client_id: str, unchunker: Any) -> None:
        if not isinstance(unchunker, CappedUnChunker):
            unchunker = CappedUnChunker(unchunker, self.cap, self.on_refused)
        super().__setitem__(client_id, unchunker)


def message_cap(max_upload_mb: float) -> int:
    """Largest WebSocket message accepted: the upload limit plus the message envelope."""
    return int(max_upload_mb * 1024 * 1024) + MESSAGE_OVERHEAD
