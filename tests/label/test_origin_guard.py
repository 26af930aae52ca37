"""The Host and Origin guard of the MONAI Label server (DNS rebinding, CSRF), without starting a server."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket, WebSocketDisconnect

from medimg.errors import ConfigError
from medimg.label.origin import OriginGuardMiddleware, allowed_hosts
from medimg.label.serve import parse_args
from tests.helpers import run_module

OHIF = "http://ohif.lab:3000"  # a --cors origin
OWN = ["http://127.0.0.1:8000", "http://localhost:8000", OHIF]  # what serve passes in MEDIMG_LABEL_CORS_ORIGINS
LOCAL = "http://127.0.0.1:8000"


def _guarded(hosts: list[str] | None = None) -> tuple[TestClient, list[str]]:
    """A client for an app behind the guard (and CORS, as in MONAI Label), and the list of calls that reached it."""
    calls: list[str] = []

    async def endpoint(request):
        calls.append(f"{request.method} {request.url.path}")
        return PlainTextResponse("done")

    async def socket(websocket: WebSocket):
        calls.append("websocket")
        await websocket.accept()
        await websocket.send_text("hello")
        await websocket.close()

    app = Starlette(routes=[WebSocketRoute("/ws", socket),
                            Route("/{path:path}", endpoint, methods=["GET", "POST", "PUT", "DELETE", "PATCH"])],
                    middleware=[Middleware(OriginGuardMiddleware, allowed_hosts=hosts or [], allowed_origins=OWN),
                                Middleware(CORSMiddleware, allow_origins=OWN, allow_credentials=True,
                                           allow_methods=["*"], allow_headers=["*"])])
    return TestClient(app, base_url=LOCAL), calls


def test_a_foreign_host_is_refused_for_every_method_before_the_app():
    client, calls = _guarded()
    for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example", "127.0.0.1.nip.io",
                 "127.0.0.1:8000@attacker.example", "0.0.0.0:8000", "[::2]:8000", ""):
        for method in ("GET", "DELETE", "POST", "OPTIONS"):
            r = client.request(method, "/datastore/image?id=scan", headers={"Host": host})
            assert r.status_code == 421, (host, method, r.status_code)
            detail = r.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail and repr(host) in detail
            assert "--allowed-host" in detail
    assert calls == []


def test_loopback_hosts_pass_with_or_without_a_port():
    client, calls = _guarded()
    hosts = ("127.0.0.1:8000", "localhost:8000", "127.0.0.1", "localhost", "LocalHost:9000", "[::1]:8000", "[::1]",
             "127.1.2.3:8000", "localhost.:8000")
    for host in hosts:
        r = client.get("/info/", headers={"Host": host})
        assert r.status_code == 200 and r.text == "done", host
    r = client.delete("/datastore/image?id=scan", headers={"Host": "localhost:8000"})
    assert r.status_code == 200
    assert len(calls) == len(hosts) + 1


def test_allowed_hosts_add_names_ports_or_everything():
    client, calls = _guarded(["workstation.lab", "10.0.0.7:8000"])
    for host, status in (("workstation.lab", 200), ("WORKSTATION.LAB:8000", 200), ("10.0.0.7:8000", 200),
                         ("10.0.0.7:9000", 421), ("10.0.0.7", 421), ("attacker.example", 421), ("127.0.0.1", 200)):
        assert client.get("/info/", headers={"Host": host}).status_code == status, host
    client, _ = _guarded(["*"])
    assert client.get("/info/", headers={"Host": "anything.example:1234"}).status_code == 200


def test_a_bodiless_cross_site_post_never_reaches_the_app():
    client, calls = _guarded()
    for headers in ({"Origin": "http://evil.example"}, {"Origin": "http://127.0.0.1:8000.evil.example"},
                    {"Origin": "https://127.0.0.1:8000"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"},
                    {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://evil.example", "Sec-Fetch-Site": "same-origin"}):
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            r = client.request(method, "/train/x", headers=headers)
            assert r.status_code == 403, (headers, method, r.status_code)
            detail = r.json()["detail"]
            assert isinstance(detail, str) and "\n" not in detail and "cross-site" in detail
    assert calls == []
    r = client.post("/train/x", headers={"Origin": "null"})
    assert "'null'" in r.json()["detail"]


def test_allowed_origins_clients_without_one_and_gets_pass():
    client, calls = _guarded()
    for headers in ({"Origin": OHIF, "Sec-Fetch-Site": "same-site"}, {"Origin": "http://localhost:8000"},
                    {"Origin": LOCAL, "Sec-Fetch-Site": "same-origin"}, {},  # no Origin: 3D Slicer, curl
                    {"Sec-Fetch-Site": "same-origin"}, {"Sec-Fetch-Site": "none"}):
        assert client.post("/train/x", headers=headers).status_code == 200, headers
    # the server's own page reached by another loopback name is same-origin, listed or not
    r = client.put("/datastore/label", headers={"Host": "[::1]:8000", "Origin": "http://[::1]:8000"})
    assert r.status_code == 200
    # GET is not state-changing: CORS keeps a foreign page from reading the answer
    r = client.get("/info/", headers={"Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers
    assert len(calls) == 8


def test_cors_preflights_from_allowed_origins_still_work():
    client, calls = _guarded()
    pre = client.options("/infer/m", headers={"Origin": OHIF, "Access-Control-Request-Method": "POST",
                                              "Access-Control-Request-Headers": "authorization"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == OHIF
    r = client.post("/infer/m", headers={"Origin": OHIF})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == OHIF
    assert calls == ["POST /infer/m"]


def test_websockets_with_a_foreign_host_or_origin_are_closed():
    client, calls = _guarded()
    with client.websocket_connect("/ws", headers={"Host": "localhost:8000"}) as ws:
        assert ws.receive_text() == "hello"
    for headers in ({"Host": "attacker.example"}, {"Host": "localhost:8000", "Origin": "http://evil.example"}):
        with pytest.raises(WebSocketDisconnect) as closed, client.websocket_connect("/ws", headers=headers):
            pass
        assert closed.value.code == 1008
    assert calls == ["websocket"]


def test_which_hosts_serve_accepts():
    assert allowed_hosts("127.0.0.1", [], authenticated=False) == []
    assert allowed_hosts("localhost", ["proxy.lab"], authenticated=False) == ["proxy.lab"]
    assert allowed_hosts("192.168.1.20", [], authenticated=True) == ["192.168.1.20"]
    assert allowed_hosts("fe80::1", ["ws.lab"], authenticated=False) == ["fe80::1", "ws.lab"]
    # a wildcard bind cannot name the hosts users reach it by: any, when a token or Keycloak is required
    assert allowed_hosts("0.0.0.0", [], authenticated=True) == ["*"]
    assert allowed_hosts("::", ["ws.lab", "10.0.0.7"], authenticated=True) == ["ws.lab", "10.0.0.7"]
    assert allowed_hosts("0.0.0.0", ["ws.lab"], authenticated=False) == ["ws.lab"]
    with pytest.raises(ConfigError, match="--allowed-host"):
        allowed_hosts("0.0.0.0", [], authenticated=False)
    for bad in ("http://ws.lab", "ws.lab/path", "a b", "ws.lab:port"):
        with pytest.raises(ConfigError, match="--allowed-host"):
            allowed_hosts("127.0.0.1", [bad], authenticated=False)


def test_keycloak_counts_as_authentication_for_a_wildcard_bind(monkeypatch):
    monkeypatch.setenv("MONAI_LABEL_AUTH_ENABLE", "true")
    assert allowed_hosts("0.0.0.0", [], authenticated=False) == ["*"]


def test_allowed_host_is_a_repeatable_serve_option():
    args = parse_args(["serve", "--studies", "s", "--allowed-host", "ws.lab", "--allowed-host", "10.0.0.7:8000"])
    assert args.allowed_host == ["ws.lab", "10.0.0.7:8000"]
    assert parse_args(["serve", "--studies", "s"]).allowed_host == []


def test_an_insecure_wildcard_bind_without_allowed_hosts_refuses_to_start(tmp_path):
    proc = run_module("medimg.label", "serve", "--studies", str(tmp_path), "--host", "0.0.0.0", "--insecure",
                      env={"MEDIMG_LABEL_TOKEN": "", "MONAI_LABEL_AUTH_ENABLE": "false"}, timeout=360)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --host: ") and "--allowed-host" in last
