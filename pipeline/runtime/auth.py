"""Ray's token authentication from the client side: find the cluster's token where Ray keeps it
and hand it on, or say clearly that it is missing.

Ray 2.60 looks for the token in ``RAY_AUTH_TOKEN``, then the file ``RAY_AUTH_TOKEN_PATH``,
then ``~/.ray/auth_token`` (written by ``ray start --head`` / ``ray get-auth-token --generate``),
but a client sends it only when ``RAY_AUTH_MODE=token`` is set; without it a submission fails
with "Missing authentication token". So the CLI finds the token itself and sends it.
"""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.config import ConfigError

TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
MODE_ENV = "RAY_AUTH_MODE"


class AuthTokenMissing(ConfigError):
    """No Ray authentication token where Ray keeps it."""


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def find_token(environ: dict | None = None) -> tuple[str, str] | None:
    """(token, where it came from), in Ray's order of precedence; None when there is none."""
    env = os.environ if environ is None else environ
    if env.get(TOKEN_ENV, "").strip():
        return env[TOKEN_ENV].strip(), f"${TOKEN_ENV}"
    if env.get(TOKEN_PATH_ENV):
        path = Path(env[TOKEN_PATH_ENV]).expanduser()
        if not path.is_file():
            raise AuthTokenMissing(f"${TOKEN_PATH_ENV}={env[TOKEN_PATH_ENV]}: no such file; point it at "
                                   "the cluster's token (on the head node: ray get-auth-token)")
        token = path.read_text().strip()
        return (token, str(path)) if token else None
    path = default_token_path()
    if path.is_file() and path.read_text().strip():
        return path.read_text().strip(), str(path)
    return None


def require_token(environ: dict | None = None) -> str:
    found = find_token(environ)
    if found is None:
        raise AuthTokenMissing(
            f"no Ray authentication token: set ${TOKEN_ENV}, or ${TOKEN_PATH_ENV} to a file holding "
            f"it, or copy it to {default_token_path()} (print it on the head node with "
            "`ray get-auth-token`)")
    return found[0]


def auth_headers(environ: dict | None = None) -> dict[str, str]:
    """HTTP headers for the Ray dashboard / Jobs API of a token-protected cluster."""
    return {"Authorization": f"Bearer {require_token(environ)}"}


def enable_token_auth() -> None:
    """Before ``ray.init(address=...)``: turn token mode on when a token is at hand, so the driver
    sends it (an explicit ``RAY_AUTH_MODE`` is left alone)."""
    if MODE_ENV not in os.environ and find_token() is not None:
        os.environ[MODE_ENV] = "token"
