"""A bearer token on every endpoint of the MONAI Label server (``serve --token-file``).

MONAI Label's own authentication needs a Keycloak server. A hospital that has none, or a lab
reaching its workstation over the network, still must not let strangers read its studies, run
models or start training. ``python -m medimg.label serve`` therefore refuses to bind beyond
loopback without either a token or Keycloak (``--insecure`` is the explicit way out).

The token reaches the server process only as its SHA-256 digest (``MEDIMG_LABEL_TOKEN_SHA256``),
so the training subprocesses MONAI Label starts never hold it. :class:`BearerTokenMiddleware`
checks ``Authorization: Bearer <token>`` on every HTTP request, CORS pre-flights excepted (a
browser sends those without credentials; they answer nothing but CORS headers), in constant time.
MONAI Label's own client sends the header after ``client.update_auth({"token_type": "Bearer",
"access_token": TOKEN})``; 3D Slicer and OHIF send it when given a token.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Any

from medimg.errors import ConfigError

TOKEN_ENV = "MEDIMG_LABEL_TOKEN"  # the token itself, for users who keep secrets in the environment
DIGEST_ENV = "MEDIMG_LABEL_TOKEN_SHA256"  # what serve hands the server process
MIN_LENGTH = 16


def digest(token: str) -> str:
    """The SHA-256 hex digest of a token (surrounding whitespace ignored)."""
    return hashlib.sha256(token.strip().encode()).hexdigest()


def read_token(token_file: str | None) -> str | None:
    """The token from ``--token-file`` or ``$MEDIMG_LABEL_TOKEN``; ``None`` when neither is given.

    Raises:
        ConfigError: the file is missing, empty, too short a secret, or readable by other users.
    """
    if token_file is None:
        token = os.environ.get(TOKEN_ENV, "").strip()  # unset or empty: no token
        if token and len(token) < MIN_LENGTH:
            raise ConfigError(TOKEN_ENV, f"a token needs at least {MIN_LENGTH} characters")
        return token or None
    path = Path(token_file)
    if not path.is_file():
        raise ConfigError(path, "--token-file: no such file")
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(path, "--token-file is readable by other users; chmod 600 it")
    token = path.read_text().strip()
    if len(token) < MIN_LENGTH:
        raise ConfigError(path, f"--token-file: a token needs at least {MIN_LENGTH} characters")
    return token


class BearerTokenMiddleware:
    """Pure ASGI middleware: 401 for any request without the right bearer token.

    Args:
        app: the ASGI app to protect.
        token_sha256: the hex SHA-256 digest of the accepted token.
    """

    def __init__(self, app: Any, token_sha256: str) -> None:
        self.app, self.expected = app, token_sha256.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Pass the request on when its token is right; otherwise answer 401 (HTTP) or close (websocket)."""
        if scope["type"] not in ("http", "websocket") or (scope["type"] == "http" and scope["method"] == "OPTIONS"):
            await self.app(scope, receive, send)
            return
        header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(digest(token).encode(), self.expected):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import JSONResponse

        response = JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)
