"""``python -m rtc_server.cluster.drain [--url URL] [--timeout S]``: drain the node at ``URL``
(default ``http://127.0.0.1:<server.port>``) and wait until its calls have ended.

For a Kubernetes ``preStop`` hook: the node stops taking calls at once (``POST
/cluster/drain``), this waits while its calls go on (at most ``--timeout``, default
``cluster.drain_timeout_s``), and returns; the SIGTERM that follows then finds nothing to wait
for. Sends the first of ``access.api_keys`` when the node has keys. Exit status 0 when
drained (or the node is already gone), 1 when calls were still live at the timeout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request

from config import load_settings


def _request(method: str, url: str, key: str | None) -> dict[str, object]:
    headers = {"X-API-Key": key} if key else {}
    req = urllib.request.Request(url, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=5) as resp:
        body = json.loads(resp.read())
    return body if isinstance(body, dict) else {}


def main(argv: list[str] | None = None) -> int:
    settings = load_settings()
    p = argparse.ArgumentParser(prog="python -m rtc_server.cluster.drain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=f"http://127.0.0.1:{settings.server.port}")
    p.add_argument("--timeout", type=float, default=settings.cluster.drain_timeout_s)
    args = p.parse_args(argv)
    url = args.url.rstrip("/")
    key = settings.access.api_keys[0] if settings.access.api_keys else None
    try:
        started = _request("POST", url + "/cluster/drain", key)
    except urllib.error.HTTPError as exc:
        print(f"drain refused: {exc.code} {exc.read()[:200]!r}", file=sys.stderr)
        return 1
    except OSError:
        return 0  # nothing listens there: nothing to drain
    print(f"draining {started.get('id')}: {started.get('sessions')} calls", flush=True)
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            health = _request("GET", url + "/health", None)
        except OSError:
            return 0  # it went away: drained
        if not health.get("sessions"):
            print("drained", flush=True)
            return 0
        time.sleep(1.0)
    print("drain time is up with calls still live", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
