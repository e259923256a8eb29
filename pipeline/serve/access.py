"""Who may use the service: loopback is open unless a token is set; any other address needs one.

The page and ``/image/{id}`` expose the database's images and ``/classify`` spends the server's
CPU, so a server reachable from other machines must check a shared token on every request
(except ``/healthz``, which load balancers poll). The token travels as ``Authorization: Bearer
<token>`` or, for ``<img>`` tags and the page's own URL, ``?token=<token>``; it is compared in
constant time (``hmac.compare_digest``)."""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
from pathlib import Path
from urllib.parse import parse_qs

from fastapi.responses import JSONResponse

from pipeline.config import ConfigError

TOKEN_ENV = "KNN_DEFENSE_SERVE_TOKEN"
OPEN_PATHS = ("/healthz",)


class AccessError(ConfigError):
    """The server would start unprotected on a non-loopback address, or the token is unusable."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost may resolve anywhere
        return False


def resolve_token(host: str, token_file: str | os.PathLike | None = None) -> str | None:
    """The token from ``token_file`` or $KNN_DEFENSE_SERVE_TOKEN (None: no token). Refuses a
    non-loopback ``host`` without one, and an empty or short token."""
    token = None
    if token_file is not None:
        path = Path(token_file)
        if not path.is_file():
            raise AccessError(f"--token-file {path}: no such file")
        token = path.read_text().strip()
    elif os.environ.get(TOKEN_ENV):
        token = os.environ[TOKEN_ENV].strip()
    if token is not None and len(token) < 16:
        raise AccessError(f"the serve token ({token_file or '$' + TOKEN_ENV}) has {len(token)} "
                          "characters; use at least 16 (e.g. `python -c 'import secrets; "
                          "print(secrets.token_urlsafe())'`)")
    if token is None and not is_loopback(host):
        raise AccessError(f"serve --host {host} would expose the database's images and this "
                          f"machine's CPU to the network: give a token with --token-file FILE or "
                          f"${TOKEN_ENV}, or bind 127.0.0.1")
    return token


class TokenCheck:
    """Pure ASGI middleware: 401 unless the request carries ``token`` (header or query)."""

    def __init__(self, app, token: str):
        self.app, self.token = app, token.encode("utf-8")

    def _presented(self, scope) -> bytes:
        for name, value in scope.get("headers", ()):
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                return value[7:].strip()
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        return query.get("token", [""])[0].encode("utf-8", "replace")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        if not hmac.compare_digest(self._presented(scope), self.token):
            response = JSONResponse(
                {"detail": "missing or wrong token: send 'Authorization: Bearer <token>' or "
                           "open the page as /?token=<token>"}, 401,
                headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class RedactToken(logging.Filter):
    """Keeps ``?token=`` out of uvicorn's access log (the page's image links carry it)."""

    PATTERN = re.compile(r"(token=)[^&\s]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.PATTERN.sub(r"\1***", a) if isinstance(a, str) else a
                                for a in record.args)
        return True
