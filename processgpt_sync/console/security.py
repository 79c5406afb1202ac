"""The console's guard: loopback Host check, access token, CSRF token, security headers.

A plain ASGI middleware so it also covers the Server-Sent Events streams and static files.
"""

from __future__ import annotations

import ipaddress
import secrets
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import PlainTextResponse, RedirectResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOKEN_COOKIE = "processgpt_console_token"
CSRF_COOKIE = "processgpt_console_csrf"
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
SECURITY_HEADERS = {
    # Everything the page runs is ours: an agent's text can never run as script.
    "content-security-policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
                               "img-src 'self' data:; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "same-origin",  # no-referrer would make browsers send Origin: null
    "cache-control": "no-store",
}


def same_secret(supplied: str, expected: str) -> bool:
    """Compare in constant time; a supplied value of any characters is simply not the secret
    (``compare_digest`` refuses non-ASCII text with TypeError)."""
    return secrets.compare_digest(supplied.encode("utf-8", "surrogateescape"),
                                  expected.encode("utf-8", "surrogateescape"))


def is_loopback(host: str) -> bool:
    """True for a name or address that only this machine reaches."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_name(header: str) -> str:
    """The host part of a Host header (IPv6 brackets kept off, port dropped)."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def csrf_token(scope: Scope) -> str:
    """This browser's CSRF token (set by the guard on every request)."""
    return str(scope.setdefault("state", {})["csrf_token"])


def cookie_name(scope: Scope, name: str) -> str:
    """``name`` for the console on this port: browsers keep one cookie jar per host, whatever
    the port, so consoles on one host (one per environment) must not overwrite each other's
    access token."""
    server = scope.get("server")
    return f"{name}_{server[1]}" if server and server[1] else name


def csrf_ok(scope: Scope, supplied: str | None) -> bool:
    """The form field or header matches the cookie, and the request comes from this origin."""
    headers = Headers(scope=scope)
    site = headers.get("sec-fetch-site")
    if site is not None and site not in ("same-origin", "none"):
        return False
    origin = headers.get("origin")  # "null" (a sandboxed or file page) never matches
    if origin is not None and origin.split("://", 1)[-1] != headers.get("host", ""):
        return False
    cookie = _cookies(headers).get(cookie_name(scope, CSRF_COOKIE))
    return bool(cookie and supplied and same_secret(cookie, supplied))


def _cookies(headers: Headers) -> Mapping[str, str]:
    """The request's cookies, read as browsers send them: another app on this host (a cookie
    is sent to every port of its host) may set values ``http.cookies`` gives up on, JSON or
    non-ASCII, and the console's own cookies must still be read."""
    return cookie_parser(headers.get("cookie", ""))


class Guard:
    """Refuses requests the console must not serve; sets the cookies and headers it needs.

    - Without a token (loopback only) the Host header must name the loopback interface, so a
      web page elsewhere cannot reach the console through DNS rebinding.
    - With a token every request must carry it: the ``processgpt_console_token_<port>``
      cookie, an ``Authorization: Bearer`` header, or ``?token=`` (which sets the cookie and
      redirects).
    """

    def __init__(self, app: ASGIApp, *, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        cookies = _cookies(headers)
        refusal = self._refusal(scope, headers, cookies)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        csrf = cookies.get(cookie_name(scope, CSRF_COOKIE)) or ""
        # Static files load alongside the first page: a cookie from them would race its own.
        new_csrf = len(csrf) < 32 and not scope["path"].startswith("/static/")
        if new_csrf:
            csrf = secrets.token_urlsafe(32)
        scope.setdefault("state", {})["csrf_token"] = csrf

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                raw = list(message.get("headers", []))
                present = {name.lower() for name, _ in raw}
                raw += [(k.encode(), v.encode()) for k, v in SECURITY_HEADERS.items()
                        if k.encode() not in present]
                if new_csrf:
                    raw.append((b"set-cookie", _cookie(cookie_name(scope, CSRF_COOKIE), csrf)))
                message["headers"] = raw
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope, headers: Headers,
                 cookies: Mapping[str, str]) -> Any | None:
        if self.token is None:
            if not is_loopback(host_name(headers.get("host", ""))):  # a DNS rebinding name
                return PlainTextResponse("unexpected Host header: open the console through "
                                         "127.0.0.1 or localhost", status_code=403)
            return None
        auth = headers.get("authorization", "")
        supplied = (cookies.get(cookie_name(scope, TOKEN_COOKIE))
                    or (auth[7:] if auth.startswith("Bearer ") else ""))
        if supplied and same_secret(supplied, self.token):
            return None
        query = parse_qsl(scope.get("query_string", b"").decode("latin-1"))
        given = dict(query).get("token", "")
        if given and same_secret(given, self.token) and scope["method"] == "GET":
            rest = urlencode([(k, v) for k, v in query if k != "token"])
            response = RedirectResponse(scope["path"] + (f"?{rest}" if rest else ""), 303)
            response.headers.append(
                "set-cookie", _cookie(cookie_name(scope, TOKEN_COOKIE), self.token).decode())
            return response
        return PlainTextResponse("access token required: open the URL that "
                                 "`processgpt-sync console` printed, adding ?token=... when the "
                                 "token came from PROCESSGPT_CONSOLE_TOKEN", status_code=401)


def _cookie(name: str, value: str) -> bytes:
    return f"{name}={value}; Path=/; HttpOnly; SameSite=Strict".encode()
