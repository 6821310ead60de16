"""One bounded JSON-over-HTTP call (stdlib only), shared by the web-search and txt2img clients.

Bounds: a socket timeout, an overall deadline checked between reads (`read1`, so a server that
drips one byte at a time cannot hold the call open much past the deadline), and a response size
cap checked against Content-Length up front and against the bytes actually read. Errors are
ToolErrors that name the host but never the full URL, which may carry an API key.

Redirects are followed (urllib's rules), but the caller's own headers, which carry credentials
such as a web-search API key, and any Authorization, Proxy-Authorization or Cookie header are
dropped when a redirect leaves the original origin (scheme, host and port): a search API that
redirects to another host, or from https to http, never receives the key there.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from moss_jax.tools.errors import ToolError

_CHUNK = 64 * 1024
USER_AGENT = "moss_jax-tools/1"
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie"})
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or _DEFAULT_PORTS.get(scheme)


class _OriginBoundRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirect handling, minus credentials on a redirect to another origin.

    Args:
      sensitive: lower-case names of the headers to drop besides CREDENTIAL_HEADERS.
    """

    def __init__(self, sensitive: frozenset[str]):
        super().__init__()
        self.sensitive = CREDENTIAL_HEADERS | sensitive

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and _origin(new.full_url) != _origin(req.full_url):
            for name in [n for n in new.headers if n.lower() in self.sensitive]:
                del new.headers[name]
            for name in [n for n in new.unredirected_hdrs if n.lower() in self.sensitive]:
                del new.unredirected_hdrs[name]
        return new


def request_json(
    url: str,
    *,
    method: str = "GET",
    params: dict[str, Any] | None = None,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout_s: float,
    max_bytes: int,
) -> Any:
    """Sends a request and returns the decoded JSON answer.

    Args:
      url: http(s) URL (validated by the config that holds it).
      method: "GET" or "POST".
      params: added to the URL's query string.
      body: JSON-encoded as the request body (POST).
      headers: extra request headers, e.g. an API key; not sent on after a redirect to another
        origin (scheme, host or port).
      timeout_s: overall deadline for connecting, sending and reading.
      max_bytes: largest accepted response body.

    Raises:
      ToolError: HTTP error status, network error or timeout, oversized or non-JSON answer.
    """
    host = urllib.parse.urlsplit(url).netloc
    if params:
        url += ("&" if urllib.parse.urlsplit(url).query else "?") + urllib.parse.urlencode(params)
    data = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    request.add_header("User-Agent", USER_AGENT)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    opener = urllib.request.build_opener(_OriginBoundRedirects(frozenset(n.lower() for n in headers or {})))
    deadline = time.monotonic() + timeout_s
    try:
        with opener.open(request, timeout=timeout_s) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise ToolError(f"answer from {host} is {length} bytes; the limit is {max_bytes}")
            raw = _read_bounded(response, host, deadline, max_bytes)
    except urllib.error.HTTPError as e:
        raise ToolError(f"{host} answered HTTP {e.code} {e.reason}") from None
    except (OSError, http.client.HTTPException) as e:  # URLError, timeouts, resets are all OSErrors
        reason = getattr(e, "reason", None) or e
        raise ToolError(f"cannot reach {host}: {reason}") from None
    try:
        return json.loads(raw)
    except (ValueError, RecursionError):
        raise ToolError(f"answer from {host} is not JSON") from None


def _read_bounded(response, host: str, deadline: float, max_bytes: int) -> bytes:
    parts, size = [], 0
    while True:
        if time.monotonic() > deadline:
            raise ToolError(f"{host} did not answer in time")
        chunk = response.read1(_CHUNK)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > max_bytes:
            raise ToolError(f"answer from {host} is larger than {max_bytes} bytes")
        parts.append(chunk)
