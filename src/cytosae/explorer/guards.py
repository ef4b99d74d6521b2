"""Who may talk to the explorer: a Host/Origin allow-list (DNS rebinding), an access token for non-loopback
addresses, and OPTIONS / 405 answers that list every method a path has.

A page on attacker.example can make a browser send requests to 127.0.0.1 by re-pointing its own name there
(DNS rebinding); the request then carries `Host: attacker.example`, which we refuse. Cross-site requests carry
their page's `Origin`, which must be one of ours too. When the explorer listens on a non-loopback address,
anyone on the network can reach it, so every request must also present a random token printed at start:
`?token=` on the first page load sets an HttpOnly, SameSite=Strict cookie that the browser then sends with
every request (images included), or a client sends it as the X-Cytosae-Token header.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import socket
from http.cookies import SimpleCookie
from urllib.parse import parse_qs, urlsplit

from fastapi.routing import iter_route_contexts
from starlette.routing import Match, Mount

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
TOKEN_HEADER = b"x-cytosae-token"
TOKEN_COOKIE = "cytosae_token"


def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(host: str, extra: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """Loopback names, the address given with --host, and names added with --allow-host; for 0.0.0.0 / :: also
    this machine's own names and addresses (what a colleague would type)."""
    names = set(LOOPBACK_NAMES) | {h.lower().strip("[]") for h in extra if h}
    h = host.lower().strip("[]")
    if h in ("0.0.0.0", "::", ""):
        try:
            names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
            names |= set(socket.gethostbyname_ex(socket.gethostname())[2])
        except OSError:
            pass
    else:
        names.add(h)
    return frozenset(names)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _hostname(value: str) -> str:
    value = value.strip().lower()
    if value.startswith("["):
        return value[1:value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


async def _answer(send, status: int, detail: str, headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


class HostGuard:
    def __init__(self, app, hosts: frozenset[str], token: str | None = None) -> None:
        self.app, self.hosts, self.token = app, hosts, token

    def _token_ok(self, headers: dict, query: str) -> tuple[bool, bool]:
        """(request has the token, it came in the query string)."""
        given = headers.get(TOKEN_HEADER, b"").decode("latin-1")
        if not given and b"cookie" in headers:
            c = SimpleCookie()
            try:
                c.load(headers[b"cookie"].decode("latin-1"))
            except Exception:  # a malformed cookie header is just no token
                pass
            given = c[TOKEN_COOKIE].value if TOKEN_COOKIE in c else ""
        if given and hmac.compare_digest(given.encode(), self.token.encode()):
            return True, False
        q = parse_qs(query).get("token", [""])[0]
        return bool(q) and hmac.compare_digest(q.encode(), self.token.encode()), True

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        host = headers.get(b"host", b"").decode("latin-1")
        # an IP literal cannot be rebound (rebinding needs a name the attacker controls); names must be on the list
        if _hostname(host) not in self.hosts and not _is_ip(_hostname(host)):
            return await _answer(send, 403, f"Host {host!r} is not one this explorer answers to ({', '.join(sorted(self.hosts))}): "
                                            "refused to guard against DNS rebinding; add a name with --allow-host")
        origin = headers.get(b"origin")
        if origin is not None:
            o = urlsplit(origin.decode("latin-1")).hostname or ""
            # our own page (same host as the request) or a listed name; another site's page, even at an IP, is refused
            if o.lower() not in self.hosts and o.lower() != _hostname(host):
                return await _answer(send, 403, f"Origin {origin.decode('latin-1')!r} is not this explorer's page: "
                                                "cross-site requests are refused")
        if self.token:
            ok, from_query = self._token_ok(headers, scope.get("query_string", b"").decode("latin-1"))
            if not ok:
                return await _answer(send, 401, "this explorer listens on a network address and needs its access token: "
                                                "open the URL with ?token= printed when it started")
            if from_query and scope["path"] == "/":
                cookie = f"{TOKEN_COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict".encode()
                await send({"type": "http.response.start", "status": 303,
                            "headers": [(b"location", b"/"), (b"set-cookie", cookie), (b"content-length", b"0")]})
                return await send({"type": "http.response.body", "body": b""})
        await self.app(scope, receive, send)


class MethodGuard:
    """OPTIONS answers with every method of the path (FastAPI lists only the first route's); a wrong method gets 405
    with the same list. Paths no route knows go on to the app (its 404)."""

    def __init__(self, app, routes) -> None:
        self.app, self.routes = app, routes

    def _allowed(self, scope) -> set[str]:
        allowed: set[str] = set()
        # app.routes holds one node per included router (FastAPI >= 0.137): iter_route_contexts lists their routes
        for route in iter_route_contexts(self.routes()):
            if isinstance(route.original_route, Mount):
                if route.matches(scope)[0] != Match.NONE:
                    allowed |= {"GET", "HEAD"}
                continue
            if route.matches(scope)[0] != Match.NONE and getattr(route, "methods", None):
                allowed |= set(route.methods)
        return allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method = scope["method"]
        if method in ("GET", "HEAD") and method != "OPTIONS":
            return await self.app(scope, receive, send)  # fast path: every route answers GET
        allowed = self._allowed(scope)
        allow = [(b"allow", ", ".join(sorted(allowed | {"OPTIONS"})).encode())]
        if method == "OPTIONS":
            if not allowed:
                return await _answer(send, 404, "Not Found")
            await send({"type": "http.response.start", "status": 204, "headers": allow})
            return await send({"type": "http.response.body", "body": b""})
        if allowed and method not in allowed:
            return await _answer(send, 405, f"{method} is not allowed here; allowed: {', '.join(sorted(allowed))}", allow)
        await self.app(scope, receive, send)
