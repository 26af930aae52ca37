"""The MONAI Label server answers only its own names, and works only for its own (and ``--cors``) pages.

A web page the annotator has open can reach a server on loopback. Two attacks follow, with or
without a token:

- **DNS rebinding.** The page's own name (``attacker.example``) is re-pointed at 127.0.0.1; the
  browser then treats the server as the page's own origin and lets the page read its answers
  (studies, labels) and send ``DELETE /datastore/image``. The request's ``Host`` header still says
  ``attacker.example``: every HTTP and websocket request with a ``Host`` the server does not
  answer to gets 421 with one line naming it.
- **Cross-site requests (CSRF).** A page may *send* a request it cannot read, such as a bodiless
  ``POST /train/<model>`` from a form, which retrains and republishes the served model, or an
  ``<img src>`` GET of ``/datastore/dataset`` (a ZIP of every image and label, written to disk) or
  of ``/datastore/?output=train`` (in PACS mode, every labelled series fetched). Every request
  from a browser page of another origin gets 403 (a websocket is closed with 1008), whatever its
  method, except CORS pre-flights (OPTIONS) and GET / HEAD of the pages a link from another site
  may open: ``/``, ``/docs``, ``/favicon.ico``, ``/static/...``, ``/ohif/...`` (the viewer) and
  ``/info/`` (:data:`PAGES`, :data:`PAGE_FOLDERS`). A read of anything else (the datastore, the
  DICOM proxy, models, logs, training and inference status) is refused: a foreign page could not
  read the answer anyway (CORS), so the only effect refused is the work it causes.

Hosts answered (:func:`allowed_hosts` computes the list ``serve`` passes in ``MEDIMG_LABEL_ALLOWED_HOSTS``):

- always the loopback names: ``localhost``, any ``127.x.y.z`` and ``[::1]``, with any port (an
  SSH tunnel or a local proxy on another port keeps them);
- the ``--host`` the server binds, when it is a name or a non-loopback address;
- every ``serve --allowed-host NAME`` (repeatable; ``NAME:PORT`` accepts that port only; ``*``
  any host);
- a wildcard bind (``0.0.0.0``, ``::``) cannot tell which names reach it. Without
  ``--allowed-host`` it accepts any ``Host`` when a bearer token or Keycloak is on, because a
  rebound page cannot carry the token (the browser sends no ``Authorization`` header of its own,
  and the page has no way to learn the token). Without authentication (``--insecure``) it refuses
  to start until ``--allowed-host`` names them (``--allowed-host '*'`` is the explicit way out).

Origins allowed: the server's own and the ``--cors`` ones (``MEDIMG_LABEL_CORS_ORIGINS``, the
list CORS uses; ``*`` there allows any but ``null``), and the request's own origin (its scheme
plus its checked ``Host``: the pages the server itself serves, under any name it answers). A
request is refused when its ``Origin`` is another one, ``null`` included (sandboxed frames,
``file:`` pages), or when it carries no ``Origin`` but ``Sec-Fetch-Site: cross-site`` or
``same-site``. A request with neither
header comes from no browser page (3D Slicer's and MONAI Label's Python clients, ``curl``) and
passes, and so does a page typed or bookmarked (``Sec-Fetch-Site: none``). Allowed origins (OHIF
at a ``--cors`` origin) pass for every method and path. Pre-flights pass the origin check (they
must reach the CORS middleware), never the host check.

:class:`OriginGuardMiddleware` runs outermost (:mod:`medimg.label.asgi`), ahead of the bearer
token: a foreign Host or a cross-site request is refused whatever the credentials.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable
from typing import Any

from medimg.errors import ConfigError

HOSTS_ENV = "MEDIMG_LABEL_ALLOWED_HOSTS"  # JSON list of hosts besides loopback; "*" is any host
ORIGINS_ENV = "MEDIMG_LABEL_CORS_ORIGINS"  # JSON list of origins (the server's own and --cors)
WILDCARD_BINDS = ("0.0.0.0", "::", "")
# what a page of another site may GET (a link to the server's pages); MONAI Label's API prefix comes first
PAGES = ("/", "/docs", "/favicon.ico", "{api}/info", "{api}/info/", "{api}/ohif")
PAGE_FOLDERS = ("/static/", "{api}/ohif/")
_NAME = re.compile(r"[a-z0-9_.-]+|\[[0-9a-f:.]+\]")  # a DNS name, IPv4 address or [IPv6] address


def split_host(value: str) -> tuple[str, str | None] | None:
    """``(name, port)`` of a ``Host`` value or ``--allowed-host`` entry, lower-cased; ``None`` if malformed.

    The name loses its IPv6 brackets and a trailing dot; a bare IPv6 address has no port.
    """
    value = value.strip().lower()
    try:
        return str(ipaddress.ip_address(value)), None  # a bare IPv6 address: its colons are no port
    except ValueError:
        pass
    name, port = value, None
    if ":" in value and not value.endswith("]"):
        name, _, port = value.rpartition(":")
        if not port.isdigit():
            return None
    if not _NAME.fullmatch(name):
        return None
    name = name[1:-1] if name.startswith("[") else name.rstrip(".")
    return (name, port) if name else None


def is_loopback_name(name: str) -> bool:
    """``localhost``, 127.0.0.0/8 or ::1 (a name as :func:`split_host` returns it)."""
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def keycloak_on() -> bool:
    """MONAI Label's own (Keycloak) authentication is enabled."""
    return os.environ.get("MONAI_LABEL_AUTH_ENABLE", "").lower() in ("1", "true")


def allowed_hosts(bind: str, extra: Iterable[str], authenticated: bool) -> list[str]:
    """The hosts besides loopback a server bound to ``bind`` answers (``serve --host``, ``--allowed-host``).

    Args:
        bind: the address or name the server binds.
        extra: the ``--allowed-host`` values.
        authenticated: a bearer token is required (Keycloak is read from the environment).

    Returns:
        The list for ``MEDIMG_LABEL_ALLOWED_HOSTS``; ``["*"]`` for a wildcard bind with
        authentication and no ``--allowed-host``.

    Raises:
        ConfigError: a malformed ``--allowed-host``, or a wildcard bind without authentication
            and without ``--allowed-host``.
    """
    extra = list(extra)
    for value in extra:
        if value != "*" and split_host(value) is None:
            raise ConfigError("--allowed-host", f"{value!r} is not a host name or address (NAME or NAME:PORT)")
    if bind.strip().lower() in WILDCARD_BINDS:
        if extra:
            return extra
        if authenticated or keycloak_on():
            return ["*"]
        raise ConfigError("--host", f"{bind or 'every address'} without authentication: name the hosts users "
                                    "reach the server by with --allowed-host NAME (repeatable; '*' accepts any "
                                    "Host and so lets web pages in through DNS rebinding)")
    bound = split_host(bind)
    own = [] if bound is None or is_loopback_name(bound[0]) else [bind]
    return own + [value for value in extra if value not in own]


def _origin(value: str) -> str:
    """An origin as compared: lower-case, no trailing slash."""
    return value.strip().lower().rstrip("/")


class OriginGuardMiddleware:
    """Pure ASGI middleware: 421 for a foreign ``Host``, 403 for a cross-site request (module docstring).

    Args:
        app: the ASGI app to protect.
        allowed_hosts: hosts answered besides loopback (``NAME`` or ``NAME:PORT``; ``*`` for any).
        allowed_origins: origins (``scheme://host[:port]``) allowed to write besides the request's
            own; ``*`` for any but ``null``.
        api_prefix: MONAI Label's API prefix (``MONAI_LABEL_API_STR``) before ``/info/`` and ``/ohif/``.
    """

    def __init__(self, app: Any, allowed_hosts: Iterable[str] = (), allowed_origins: Iterable[str] = (),
                 api_prefix: str = "") -> None:
        self.app = app
        self.pages = {p.format(api=api_prefix) for p in PAGES}
        self.page_folders = tuple(p.format(api=api_prefix) for p in PAGE_FOLDERS)
        hosts = list(allowed_hosts)
        self.any_host = "*" in hosts
        self.hosts = {parsed for parsed in (split_host(h) for h in hosts if h != "*") if parsed is not None}
        origins = {_origin(o) for o in allowed_origins}
        self.any_origin, self.origins = "*" in origins, origins - {"*"}

    def host_allowed(self, host: str) -> bool:
        """Whether the server answers this ``Host`` value."""
        parsed = split_host(host)
        if parsed is None:
            return False
        name, port = parsed
        return self.any_host or is_loopback_name(name) or (name, None) in self.hosts or (name, port) in self.hosts

    def origin_allowed(self, origin: str, own: str) -> bool:
        """Whether a page of ``origin`` may write; ``own`` is the request's own origin."""
        origin = _origin(origin)
        if origin == "null":
            return False
        return origin == own or self.any_origin or origin in self.origins

    def exempt(self, scope: dict) -> bool:
        """Whether any origin may send this request: a CORS pre-flight, or a GET / HEAD of a page a link may open."""
        if scope["type"] != "http":
            return False
        method, path = scope.get("method", "GET").upper(), scope.get("path", "")
        return method == "OPTIONS" or (method in ("GET", "HEAD") and (path in self.pages
                                                                      or path.startswith(self.page_folders)))

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        """Pass the request on when its Host and Origin are allowed; otherwise answer 421/403 (HTTP) or close."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers: dict[bytes, list[str]] = {}
        for key, value in scope.get("headers") or []:
            headers.setdefault(key.lower(), []).append(value.decode("latin-1"))
        hosts = headers.get(b"host", [])
        host = hosts[0] if len(hosts) == 1 else ", ".join(hosts)  # none or several: refused below
        if len(hosts) != 1 or not self.host_allowed(host):
            await self._refuse(scope, receive, send, 421, f"host {host!r} is not one this server answers to "
                                                          "(DNS rebinding?); serve --allowed-host NAME adds one")
            return
        checked = not self.exempt(scope)
        origins, fetch_site = headers.get(b"origin", []), headers.get(b"sec-fetch-site", [""])[0].strip().lower()
        scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
        own = _origin(f"{scheme}://{host}")
        if checked and origins and not all(self.origin_allowed(o, own) for o in origins):
            await self._refuse(scope, receive, send, 403, f"cross-site request from origin {origins[0]!r} refused; "
                                                          "serve --cors ORIGIN allows a page's origin")
            return
        if checked and not origins and fetch_site in ("cross-site", "same-site"):
            await self._refuse(scope, receive, send, 403, f"cross-site request (Sec-Fetch-Site: {fetch_site}, "
                                                          "no Origin) refused")
            return
        await self.app(scope, receive, send)

    @staticmethod
    async def _refuse(scope: dict, receive: Any, send: Any, status: int, detail: str) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        from starlette.responses import JSONResponse

        await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
