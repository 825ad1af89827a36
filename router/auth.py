"""Bearer-token auth of the HTTP API: one shared token, from the environment or a mounted Kubernetes Secret."""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

TOKEN_ENV = "MOE_SERVE_API_TOKEN"
TOKEN_FILE_ENV = "MOE_SERVE_API_TOKEN_FILE"


def load_api_token(environ: Mapping[str, str] = os.environ) -> str | None:
    """The API token, or None when neither variable is set (auth off).

    A token file that is named but missing or empty is an error, not "auth off": a Secret that failed to
    mount must not leave the API open.
    """
    if TOKEN_ENV in environ:  # set but blank (an empty Secret value) fails closed, it does not turn auth off
        token = environ[TOKEN_ENV].strip()
        if not token:
            raise RuntimeError(f"{TOKEN_ENV} is set but empty: it must hold the API token (unset it for no auth)")
        return token
    path = environ.get(TOKEN_FILE_ENV, "").strip()
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()  # Secrets are often written with a newline
    except OSError as e:
        raise RuntimeError(f"{TOKEN_FILE_ENV}={path!r} cannot be read: {e.strerror or e}") from None
    if not token:
        raise RuntimeError(f"{TOKEN_FILE_ENV}={path!r} is empty: it must hold the API token")
    return token


def check_bearer(header_value: str | None, token: str | None) -> bool:
    """Whether an ``Authorization`` header carries ``token``; always True when auth is off (token None)."""
    if token is None:
        return True
    scheme, _, given = (header_value or "").strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    # compare_digest: the time taken must not tell an attacker how many leading characters were right.
    return hmac.compare_digest(given.strip().encode(), token.encode())
