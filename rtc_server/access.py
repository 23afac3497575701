"""Access control: API keys for admin routes, the optional offer token, CORS and per-client
rate limits, and early refusal of oversized bodies.

Rules (the route is the router's canonical path, so ``/metrics`` and ``/health/detailed``
count wherever they are added):

- Admin routes (``ADMIN_ROUTES``) need a key from ``access.api_keys``, sent as
  ``Authorization: Bearer KEY`` or ``X-API-Key: KEY``: missing is 401 (with
  ``WWW-Authenticate: Bearer``), wrong is 403. With no keys configured they answer loopback
  clients only (127.0.0.0/8, ::1); anyone else gets 403.
- ``POST /offer``, ``POST /v1/render`` (it spends CPU like a call) and ``GET /ice-servers``
  (it hands out TURN credentials) need ``Authorization: Bearer <access.offer_token>`` when
  that is set (an admin key also does); otherwise 401.
- CORS: for an Origin in ``access.cors_origins`` (``"*"``: any) preflights are answered (204)
  and every answer, errors and 429s included, carries ``Access-Control-Allow-Origin``.
- Rate limits: a token bucket per client and route group (``RATE_GROUPS``) holding the
  per-minute number and refilling continuously; past it 429 ``rate_limited`` with
  ``Retry-After`` in whole seconds (>= 1).
- A ``Content-Length`` over ``server.max_body_bytes`` is 413 before the body is read (uploads
  to ``POST /avatars`` and multipart ``POST /v1/render`` have their own, larger limits, which
  their handlers enforce while streaming).

The client is ``request.remote``. With ``access.trust_forwarded_for``, a connection from a
trusted proxy (one in ``access.trusted_proxies``; any peer when that list is empty) is taken
to be for the client named in ``access.forwarded_header`` (X-Forwarded-For, RFC 7239
Forwarded ``for=``, or X-Real-IP). The entries of every line of that header are read from the
right, where the proxies append: the ``access.forwarded_hops``-th from the right, or, with
``trusted_proxies``, the rightmost that is not one of them. What a client writes to the left
of the proxies' entries never counts; an entry that is no address (``unknown``, ``_hidden``,
garbage) is a client of its own, never loopback. Keys and tokens are never logged or echoed.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from config import Settings

__all__ = [
    "ADMIN_ROUTES",
    "RATE_GROUPS",
    "TOKEN_ROUTES",
    "AccessControl",
    "RateLimiter",
    "install_access",
    "redact_query_secrets",
]

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
RouteKey = tuple[str, str]  # (method, canonical route path)

ADMIN_ROUTES: frozenset[RouteKey] = frozenset(
    {
        ("GET", "/sessions"),
        ("DELETE", "/sessions/{session_id}"),
        ("POST", "/avatars"),
        ("DELETE", "/avatars/{avatar_id}"),
        ("GET", "/cache/stats"),
        ("DELETE", "/cache"),
        ("POST", "/cache/cleanup"),
        ("GET", "/metrics"),
        ("GET", "/health/detailed"),
        ("POST", "/cluster/drain"),
        ("GET", "/cluster/nodes"),
        ("POST", "/cluster/nodes/{node_id}/drain"),
    }
)
# Routes that need access.offer_token when it is set.
TOKEN_ROUTES: frozenset[RouteKey] = frozenset(
    {("POST", "/offer"), ("POST", "/v1/render"), ("GET", "/ice-servers")}
)
RATE_GROUPS: dict[RouteKey, str] = {
    ("POST", "/offer"): "offer",
    ("POST", "/avatars"): "avatars",
    ("DELETE", "/avatars/{avatar_id}"): "avatars",
    ("POST", "/v1/render"): "render",
}
# Multipart uploads whose handlers stream the body under their own, larger limit.
UPLOAD_ROUTES: frozenset[RouteKey] = frozenset({("POST", "/avatars"), ("POST", "/v1/render")})

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, X-API-Key, Content-Type"
EXPOSE_HEADERS = "Retry-After, WWW-Authenticate, Location"
PREFLIGHT_MAX_AGE_S = 600
MAX_TRACKED_CLIENTS = 10_000
MAX_CLIENT_CHARS = 64
# access.forwarded_header -> the header read
FORWARDED_HEADERS = {
    "x-forwarded-for": "X-Forwarded-For",
    "forwarded": "Forwarded",
    "x-real-ip": "X-Real-IP",
}

_QUERY_SECRET_RE = re.compile(
    r"(?i)\b(token|api_key|apikey|key|access_token)=([^&#\s\"']+)"
)


def redact_query_secrets(text: str) -> str:
    """``text`` with the values of token-like query parameters replaced by ``***``."""
    return _QUERY_SECRET_RE.sub(r"\1=***", text)


class _RedactAccessLog(logging.Filter):
    """Hides ``?token=...`` (the call page's own address, also sent as the Referer of every
    request it makes) in aiohttp's access log lines and their structured extras."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_query_secrets(record.msg)
        for name, value in list(vars(record).items()):
            if name in ("msg", "args"):
                continue
            if isinstance(value, str) and "=" in value:
                setattr(record, name, redact_query_secrets(value))
            elif isinstance(value, dict):
                setattr(
                    record,
                    name,
                    {
                        k: redact_query_secrets(v) if isinstance(v, str) else v
                        for k, v in value.items()
                    },
                )
        return True


_ACCESS_LOG_FILTER = _RedactAccessLog()


def _install_log_filter() -> None:
    access_log = logging.getLogger("aiohttp.access")
    if _ACCESS_LOG_FILTER not in access_log.filters:
        access_log.addFilter(_ACCESS_LOG_FILTER)


# --------------------------------------------------------------------------- rate limits


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_s: float


class RateLimiter:
    """Token buckets per client: ``per_min`` tokens at most, refilled at ``per_min`` a minute.

    ``clock`` returns seconds (monotonic). A bucket idle for a minute is full again, so it is
    dropped (a new client starts full anyway); at most ``max_clients`` are kept, the least
    recently seen dropped first."""

    def __init__(
        self,
        per_min: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = MAX_TRACKED_CLIENTS,
    ) -> None:
        self.per_min = per_min
        self.clock = clock
        self.max_clients = max_clients
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.per_min > 0

    @property
    def refill_s(self) -> float:
        """Seconds an empty bucket takes to fill up."""
        return 60.0

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, client: str) -> float:
        """Take a token for ``client``: 0.0 when allowed, else the seconds until one is there."""
        if not self.enabled:
            return 0.0
        now = self.clock()
        self._forget_idle(now)
        rate_per_s = self.per_min / 60.0
        bucket = self._buckets.get(client)
        if bucket is None:
            bucket = _Bucket(float(self.per_min), now)
            self._buckets[client] = bucket
            while len(self._buckets) > self.max_clients:
                self._buckets.popitem(last=False)
        else:
            elapsed = max(0.0, now - bucket.updated_s)
            bucket.tokens = min(float(self.per_min), bucket.tokens + elapsed * rate_per_s)
            bucket.updated_s = now
            self._buckets.move_to_end(client)
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / rate_per_s

    def _forget_idle(self, now: float) -> None:
        # oldest first: the first bucket not idle for refill_s ends the sweep
        while self._buckets:
            bucket = next(iter(self._buckets.values()))
            if now - bucket.updated_s < self.refill_s:
                return
            self._buckets.popitem(last=False)


def retry_after_header(wait_s: float) -> str:
    """Whole seconds, at least 1, never less than the real wait."""
    return str(max(1, math.ceil(wait_s - 1e-9)))


# --------------------------------------------------------------------------- the controller


def _route_key(request: web.Request) -> RouteKey | None:
    resource = request.match_info.route.resource
    if resource is None:  # no route matched: 404 / 405 follow
        return None
    method = "GET" if request.method == "HEAD" else request.method
    return method, resource.canonical


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """An address (an IPv4-mapped IPv6 one as IPv4), or None."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _node_ip(node: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The address of a forwarded node: ``1.2.3.4``, ``1.2.3.4:80``, ``::1``, ``[::1]``,
    ``[::1]:80``; None for anything else (``unknown``, ``_hidden``, garbage)."""
    if node.startswith("["):
        host, bracket, rest = node[1:].partition("]")
        if not bracket or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
            return None
        if ":" not in host:  # brackets hold IPv6 only
            return None
        return _parse_ip(host)
    if node.count(":") == 1:
        host, _, port = node.partition(":")
        return _parse_ip(host) if port.isdigit() else None
    return _parse_ip(node)


def _client_name(node: str) -> str:
    """A forwarded node as a client name: its address, else an opaque name (never loopback)."""
    ip = _node_ip(node)
    if ip is not None:
        return str(ip)
    return f"forwarded:{node[:MAX_CLIENT_CHARS]}"


def _split_quoted(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` outside double quotes (backslash escapes inside them). A
    quote left open splits at every ``sep``: a client's stray quote must not swallow the
    elements a proxy appended after it."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == sep and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return text.split(sep) if quoted else parts


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return re.sub(r"\\(.)", r"\1", value[1:-1])
    return value


def _forwarded_for(element: str) -> str:
    """The ``for=`` node of one RFC 7239 element; ``unknown`` when it has none."""
    for pair in _split_quoted(element, ";"):
        name, eq, value = pair.partition("=")
        if eq and name.strip().lower() == "for":
            return _unquote(value.strip()) or "unknown"
    return "unknown"


def _forwarded_entries(kind: str, lines: list[str]) -> list[str]:
    """The nodes the lines of a forwarding header name, left to right, every line in order
    (several lines are one comma-separated list). ``kind``: access.forwarded_header."""
    entries: list[str] = []
    for line in lines:
        if kind == "forwarded":
            entries.extend(_forwarded_for(e) for e in _split_quoted(line, ",") if e.strip())
        else:
            entries.extend(e.strip() for e in line.split(",") if e.strip())
    return entries


def _is_loopback(address: str) -> bool:
    ip = _parse_ip(address.split("%", 1)[0])
    return ip is not None and ip.is_loopback


def _json_error(
    status: int, error: str, detail: str, headers: dict[str, str] | None = None
) -> web.Response:
    return web.json_response({"error": error, "detail": detail}, status=status, headers=headers)


def _secret_bytes(value: str) -> bytes:
    return value.encode("utf-8", "backslashreplace")


class AccessControl:
    """The access rules of one app (see the module docstring). ``clock`` (seconds, monotonic)
    drives the rate limits; tests replace it with a manual clock."""

    def __init__(self, settings: Settings, *, clock: Callable[[], float] = time.monotonic) -> None:
        a = settings.access
        self.settings = settings
        self.clock = clock
        self._keys = tuple(_secret_bytes(k) for k in a.api_keys)
        self._offer_token = None if a.offer_token is None else _secret_bytes(a.offer_token)
        self._any_origin = "*" in a.cors_origins
        self._origins = frozenset(o.rstrip("/").lower() for o in a.cors_origins if o != "*")
        self._trust_forwarded_for = a.trust_forwarded_for
        self._proxies = tuple(ipaddress.ip_network(n) for n in a.trusted_proxies)
        self._hops = a.forwarded_hops
        self._header_kind = a.forwarded_header
        self._header = FORWARDED_HEADERS[a.forwarded_header]
        self.limiters: dict[str, RateLimiter] = {
            "offer": RateLimiter(a.offer_per_min, clock=self._now),
            "avatars": RateLimiter(a.avatars_per_min, clock=self._now),
            "render": RateLimiter(a.render_per_min, clock=self._now),
        }

    def _now(self) -> float:
        return self.clock()

    # --- who is asking ---------------------------------------------------------------------
    def client(self, request: web.Request) -> str:
        """The client's address, or an opaque name (see the module docstring)."""
        peer = request.remote or "unknown"
        if self._trust_forwarded_for and self._is_trusted_peer(peer):
            lines = request.headers.getall(self._header, [])
            entries = _forwarded_entries(self._header_kind, lines)
            if entries:
                return _client_name(self._pick(entries))
        return peer[:MAX_CLIENT_CHARS]

    def _is_proxy(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None) -> bool:
        return ip is not None and any(ip in network for network in self._proxies)

    def _is_trusted_peer(self, peer: str) -> bool:
        if not self._proxies:
            return True  # trust_forwarded_for alone: whoever connects is the proxy
        return self._is_proxy(_parse_ip(peer.split("%", 1)[0]))

    def _pick(self, entries: list[str]) -> str:
        """The client's entry: only entries the trusted proxies wrote are looked at."""
        if self._proxies:
            i = len(entries) - 1
            while i > 0 and self._is_proxy(_node_ip(entries[i])):
                i -= 1
            return entries[i]
        return entries[max(0, len(entries) - self._hops)]

    def origin_allowed(self, origin: str) -> bool:
        if self._any_origin:
            return True
        return origin.rstrip("/").lower() in self._origins

    @staticmethod
    def _presented(request: web.Request) -> tuple[bytes | None, bytes | None]:
        """The credentials a request carries: (the Bearer value, the X-API-Key value)."""
        bearer: bytes | None = None
        scheme, _, value = request.headers.get("Authorization", "").strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            bearer = _secret_bytes(value.strip())
        api_key = request.headers.get("X-API-Key", "").strip()
        return bearer, _secret_bytes(api_key) if api_key else None

    def _matches_key(self, given: bytes) -> bool:
        ok = False
        for key in self._keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(key, given)
        return ok

    # --- the checks ----------------------------------------------------------------------------
    def is_admin(self, request: web.Request) -> bool:
        """Whether ``request`` may act as an admin (a valid API key; with none configured, a
        client on this machine), without logging or answering anything."""
        if not self._keys:
            return _is_loopback(self.client(request))
        return any(self._matches_key(p) for p in self._presented(request) if p is not None)

    def check_admin(self, request: web.Request, route: RouteKey) -> web.Response | None:
        client = self.client(request)
        what = f"{route[0]} {route[1]}"
        if not self._keys:
            if _is_loopback(client):
                return None
            logger.info("admin route %s refused to %s: no API keys configured", what, client)
            return _json_error(
                403,
                "forbidden",
                "admin routes answer only clients on the server's own machine; set "
                "access.api_keys (AVATAR_ACCESS__API_KEYS) to use them from elsewhere",
            )
        presented = [p for p in self._presented(request) if p is not None]
        if not presented:
            logger.info("admin route %s refused to %s: no API key", what, client)
            return _json_error(
                401,
                "unauthorized",
                "this route needs an API key: send 'Authorization: Bearer KEY' or "
                "'X-API-Key: KEY'",
                headers={"WWW-Authenticate": 'Bearer realm="admin"'},
            )
        if any(self._matches_key(p) for p in presented):
            return None
        logger.warning("rejected API key from %s on %s", client, what)
        return _json_error(403, "forbidden", "the API key is not valid")

    def check_token(self, request: web.Request, route: RouteKey) -> web.Response | None:
        if self._offer_token is None:
            return None
        bearer, api_key = self._presented(request)
        if bearer is not None and hmac.compare_digest(self._offer_token, bearer):
            return None
        presented = [p for p in (bearer, api_key) if p is not None]
        if any(self._matches_key(p) for p in presented):  # an admin key also opens these
            return None
        client = self.client(request)
        if presented:
            logger.warning("rejected token from %s on %s %s", client, *route)
            detail = "the token is not valid"
        else:
            logger.info("%s %s refused to %s: no token", *route, client)
            detail = (
                "this server needs a token: send 'Authorization: Bearer TOKEN' (the call page "
                "takes it from its address: /?token=TOKEN)"
            )
        return _json_error(
            401, "unauthorized", detail, headers={"WWW-Authenticate": 'Bearer realm="offer"'}
        )

    def check_rate(self, request: web.Request, route: RouteKey) -> web.Response | None:
        group = RATE_GROUPS.get(route)
        if group is None:
            return None
        limiter = self.limiters[group]
        client = self.client(request)
        wait_s = limiter.take(client)
        if wait_s <= 0:
            return None
        retry = retry_after_header(wait_s)
        logger.info("rate limit (%s, %d/min) reached by %s", group, limiter.per_min, client)
        return _json_error(
            429,
            "rate_limited",
            f"too many {group} requests from this client (at most {limiter.per_min} a "
            f"minute); try again in {retry} s",
            headers={"Retry-After": retry},
        )

    def check_body(self, request: web.Request, route: RouteKey | None) -> web.Response | None:
        length = request.content_length
        limit = self.settings.server.max_body_bytes
        if length is None or length <= limit:
            return None
        if route in UPLOAD_ROUTES and request.content_type == "multipart/form-data":
            return None  # the handler streams it under its own limit
        return _json_error(
            413,
            "body_too_large",
            f"the request body is {length} bytes; at most {limit} are accepted "
            "(server.max_body_bytes)",
        )

    def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "")
        if not self.origin_allowed(origin):
            return _json_error(
                403, "forbidden", "this origin may not call the API (access.cors_origins)"
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Origin": origin,
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
                "Vary": "Origin",
            },
        )

    # --- aiohttp hooks ---------------------------------------------------------------------------
    async def handle(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The middleware's work: preflight, body size, rate limit, key, token, handler."""
        if (
            request.method == "OPTIONS"
            and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers
        ):
            return self.preflight(request)
        route = _route_key(request)
        refusal = self.check_body(request, route)
        if refusal is None and route is not None:
            refusal = (
                self.check_rate(request, route)
                or (self.check_admin(request, route) if route in ADMIN_ROUTES else None)
                or (self.check_token(request, route) if route in TOKEN_ROUTES else None)
            )
        if refusal is not None:
            return refusal
        return await handler(request)

    async def on_response_prepare(
        self, request: web.Request, response: web.StreamResponse
    ) -> None:
        """CORS headers on every answer to an allowed origin, errors and 429s included."""
        origin = request.headers.get("Origin")
        if not origin or not self.origin_allowed(origin):
            return
        headers = response.headers
        headers["Access-Control-Allow-Origin"] = origin
        headers.setdefault("Access-Control-Expose-Headers", EXPOSE_HEADERS)
        vary = headers.get("Vary", "")
        if "origin" not in vary.lower():
            headers["Vary"] = f"{vary}, Origin" if vary else "Origin"


def install_access(app: web.Application, settings: Settings) -> AccessControl:
    """Add the access middleware (inside the error middleware) and the CORS signal; returns
    the controller."""
    control = AccessControl(settings)

    @web.middleware
    async def access_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        return await control.handle(request, handler)

    app.middlewares.append(access_middleware)
    app.on_response_prepare.append(control.on_response_prepare)
    _install_log_filter()
    a = settings.access
    if not a.api_keys:
        logger.info(
            "no API keys (access.api_keys): admin routes answer loopback clients only; behind a "
            "reverse proxy on this machine set access.api_keys or access.trust_forwarded_for"
        )
    if a.trust_forwarded_for and not a.trusted_proxies:
        logger.info(
            "access.trust_forwarded_for without access.trusted_proxies: %s is believed from "
            "any peer; only your proxy may be able to reach this server",
            FORWARDED_HEADERS[a.forwarded_header],
        )
    if a.offer_token is None:
        logger.debug("no access.offer_token: POST /offer and POST /v1/render are open")
    return control
