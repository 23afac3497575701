"""The settings whose values have structure or rules of their own.

Parsers (``setting(parse=...)``): ICE servers, video codecs, secrets, CORS origins, trusted
proxies. Checks (``setting(check=...)``): one value's extra rule. Cross-checks: rules between
keys of one section (``render.min_fps <= render.max_fps``, the forwarding settings).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, get_args
from urllib.parse import urlsplit

from config.fields import REDACTED, Section, describe, suggest

VideoCodec = Literal["VP8", "H264"]

ICE_URL_SCHEMES = ("stun", "turn", "turns")
RTP_VIDEO_CLOCK_HZ = 90000
H264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow")
MIN_SECRET_CHARS = 16
MAX_FORWARDED_HOPS = 16
_ORIGIN_HOST_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")


# --------------------------------------------------------------------------- checks


def even(value: int) -> str | None:
    return f"must be even, got {value}" if value % 2 else None


def divides_rtp_clock(fps: int) -> str | None:
    if RTP_VIDEO_CLOCK_HZ % fps:
        return f"must divide {RTP_VIDEO_CLOCK_HZ} exactly, got {fps}"
    return None


def http_url(url: str) -> str | None:
    if url.startswith(("http://", "https://")):
        return None
    return f"must be an http:// or https:// URL, got {url!r}"


def redis_url(url: str) -> str | None:
    if url.startswith(("redis://", "rediss://", "unix://")):
        return None
    return "must start with redis://, rediss:// or unix://"


# --------------------------------------------------------------------------- ICE servers


@dataclass(frozen=True, slots=True)
class IceServer:
    urls: tuple[str, ...]
    username: str | None = None
    # Kept out of repr so logging a Settings object never prints the secret.
    credential: str | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form with the credential redacted."""
        return {
            "urls": list(self.urls),
            "username": self.username,
            "credential": None if self.credential is None else REDACTED,
        }


_ICE_SERVER_KEYS = tuple(f.name for f in fields(IceServer))


def ice_servers(s: Section, key: str) -> tuple[IceServer, ...]:
    raw = s.raw(key)
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise s.error(key, f"expected a list of ICE servers, got {describe(raw)}")
    secret = optional_secret(s, "turn_secret")
    return tuple(
        _ice_server(s, f"{key}[{i}]", item, turn_secret=secret is not None)
        for i, item in enumerate(raw)
    )


def _ice_server(s: Section, key: str, item: object, *, turn_secret: bool) -> IceServer:
    if not isinstance(item, Mapping):
        raise s.error(key, f"expected a mapping with 'urls', got {describe(item)}")
    for k in item:
        if k not in _ICE_SERVER_KEYS:
            hint = suggest(k, _ICE_SERVER_KEYS, "") if isinstance(k, str) else ""
            raise s.error(f"{key}.{k}", "unknown key" + hint)
    if "urls" not in item:
        raise s.error(f"{key}.urls", "missing (required)")
    urls = item["urls"]
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls:
        raise s.error(
            f"{key}.urls", f"expected a url or a non-empty list of urls, got {describe(urls)}"
        )
    for j, url in enumerate(urls):
        if not isinstance(url, str):
            raise s.error(f"{key}.urls[{j}]", f"expected str, got {describe(url)}")
        scheme, _, rest = url.partition(":")
        if scheme.lower() not in ICE_URL_SCHEMES or not rest.strip():
            raise s.error(
                f"{key}.urls[{j}]",
                f"must be a stun:, turn: or turns: url, got {url!r}",
            )
    creds: dict[str, str | None] = {}
    for k in ("username", "credential"):
        v = item.get(k)
        if v is not None and not isinstance(v, str):
            shown = describe(v) if k == "username" else type(v).__name__
            raise s.error(f"{key}.{k}", f"expected str or null, got {shown}")
        creds[k] = v
    if (
        not turn_secret
        and any(u.partition(":")[0].lower() in ("turn", "turns") for u in urls)
        and (creds["username"] is None or creds["credential"] is None)
    ):
        raise s.error(
            key, "turn:/turns: urls need both username and credential (or webrtc.turn_secret)"
        )
    return IceServer(urls=tuple(urls), username=creds["username"], credential=creds["credential"])


def video_codecs(s: Section, key: str) -> tuple[VideoCodec, ...]:
    names = s.get_str_list(key)
    allowed = get_args(VideoCodec)
    out: list[VideoCodec] = []
    for i, name in enumerate(names):
        match = next((c for c in allowed if c.lower() == name.strip().lower()), None)
        if match is None:
            choices = ", ".join(allowed)
            raise s.error(key, f"[{i}] must be one of {choices}; got {name!r}")
        if match in out:
            raise s.error(key, f"[{i}]: {match} is listed twice")
        out.append(match)
    if not out:
        raise s.error(key, "list at least one video codec (VP8, H264)")
    return tuple(out)


# --------------------------------------------------------------------------- plain strings


def str_or_empty(s: Section, key: str) -> str:
    """A str where null means "" (nothing)."""
    return s.get_optional_str(key) or ""


# --------------------------------------------------------------------------- secrets


def optional_secret(s: Section, key: str) -> str | None:
    """A non-empty str or null; its value is never echoed."""
    value = s.raw(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise s.error(key, "expected a non-empty str or null")
    return value


def _access_secret(s: Section, key: str, value: str) -> None:
    """A key or token long enough to be a secret; its value is never echoed."""
    if value != value.strip():
        raise s.error(key, "must not start or end with whitespace (headers are read without it)")
    if len(value) < MIN_SECRET_CHARS:
        raise s.error(
            key,
            f"must be at least {MIN_SECRET_CHARS} characters, got {len(value)}: a short secret "
            "is easy to guess, and the log redactor would mask its text in every log line",
        )


def offer_token(s: Section, key: str) -> str | None:
    value = optional_secret(s, key)
    if value is not None:
        _access_secret(s, key, value)
    return value


def api_keys(s: Section, key: str) -> tuple[str, ...]:
    keys = s.get_str_list(key)
    for i, api_key in enumerate(keys):
        _access_secret(s, f"{key}[{i}]", api_key)
    return keys


# --------------------------------------------------------------------------- addresses


def cors_origins(s: Section, key: str) -> tuple[str, ...]:
    return tuple(
        _cors_origin(s, f"{key}[{i}]", origin) for i, origin in enumerate(s.get_str_list(key))
    )


def _cors_origin(s: Section, key: str, origin: str) -> str:
    """``*`` or ``scheme://host[:port]`` (one trailing slash dropped)."""
    if origin == "*":
        return origin
    shape = "must be * or an origin, http(s)://host[:port]"
    if any(c.isspace() for c in origin):
        raise s.error(key, f"{shape} with no spaces; got {origin!r}")
    trimmed = origin[:-1] if origin.endswith("/") else origin
    try:
        parts = urlsplit(trimmed)
        port = parts.port
    except ValueError:  # a port that is no number or out of range, a broken [IPv6]
        raise s.error(key, f"{shape}; got {origin!r}") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.netloc:
        raise s.error(key, f"{shape}; got {origin!r}")
    if "@" in parts.netloc:
        raise s.error(key, f"{shape}, without user info; got {origin!r}")
    if parts.path or parts.query or parts.fragment or "?" in trimmed or "#" in trimmed:
        raise s.error(key, f"{shape}, without a path, query or fragment; got {origin!r}")
    host = parts.hostname or ""
    if parts.netloc.startswith("["):
        host_ok = _is_ip(host, version=6)
    else:
        host_ok = _ORIGIN_HOST_RE.fullmatch(host) is not None
    if not host_ok:
        raise s.error(key, f"{shape}; {host!r} is not a host name or address")
    if port == 0 or parts.netloc.endswith(":"):
        raise s.error(key, f"{shape}; the port of {origin!r} is not 1..65535")
    return trimmed


def _is_ip(text: str, *, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def trusted_proxies(s: Section, key: str) -> tuple[str, ...]:
    out: list[str] = []
    for i, item in enumerate(s.get_str_list(key)):
        try:
            network = ipaddress.ip_network(item.strip(), strict=False)
        except ValueError:
            raise s.error(
                f"{key}[{i}]",
                f"must be an IP address or a network such as 10.0.0.0/8 or fd00::/8, got {item!r}",
            ) from None
        if str(network) not in out:
            out.append(str(network))
    return tuple(out)


# --------------------------------------------------------------------------- cross-checks


def render_cross_check(s: Section, v: dict[str, Any]) -> None:
    if v["min_fps"] > v["max_fps"]:
        raise s.error("min_fps", f"must not exceed max_fps ({v['max_fps']})")


def access_cross_check(s: Section, v: dict[str, Any]) -> None:
    proxies, hops, header = v["trusted_proxies"], v["forwarded_hops"], v["forwarded_header"]
    if not v["trust_forwarded_for"]:
        for key, unused in (
            ("trusted_proxies", bool(proxies)),
            ("forwarded_hops", hops != 1),
            ("forwarded_header", header != "x-forwarded-for"),
        ):
            if unused:
                raise s.error(
                    key, "has no effect while access.trust_forwarded_for is false; set that to "
                    "true to read the client address from your proxy's header"
                )
    if proxies and hops != 1:
        raise s.error(
            "forwarded_hops",
            "set either access.trusted_proxies (proxies known by address) or "
            "access.forwarded_hops (proxies counted), not both",
        )
    if header == "x-real-ip" and hops != 1:
        raise s.error("forwarded_hops", "must be 1 with forwarded_header x-real-ip (one address)")


def cluster_cross_check(s: Section, v: dict[str, Any]) -> None:
    if v["node_timeout_s"] <= 2 * v["heartbeat_s"]:
        raise s.error("node_timeout_s",
                      f"must be more than two heartbeats (heartbeat_s {v['heartbeat_s']})")


def lipsync_cross_check(s: Section, v: dict[str, Any]) -> None:
    if v["device"] == "remote" and not v["pool_url"]:
        raise s.error("pool_url", "device remote needs the pool's URL (python -m "
                      "pipeline.lipsync.serve prints it)")


def turns_cross_check(s: Section, v: dict[str, Any]) -> None:
    if v["short_ms"] > v["long_ms"]:
        raise s.error("short_ms", f"must not exceed long_ms ({v['long_ms']})")
    if v["detector"] == "model" and not v["model"]:
        raise s.error("model", "detector model needs the classifier's path")
