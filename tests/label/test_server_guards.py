"""``serve``'s refusal rules and the bearer-token middleware, without starting a server."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from medimg.errors import ConfigError, DataError
from medimg.label.auth import TOKEN_ENV, BearerTokenMiddleware, digest, read_token
from medimg.label.serve import check_auth
from tests.helpers import run_module

TOKEN = "medimg-unit-token-0123456789"


def _args(host: str, token_file: str | None = None, insecure: bool = False) -> argparse.Namespace:
    return argparse.Namespace(host=host, port=8000, token_file=token_file, insecure=insecure)


def _token_file(tmp_path, text: str = TOKEN, mode: int = 0o600):
    path = tmp_path / "token"
    path.write_text(text + "\n")
    path.chmod(mode)
    return path


def test_beyond_loopback_needs_a_token_keycloak_or_insecure(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    monkeypatch.delenv("MONAI_LABEL_AUTH_ENABLE", raising=False)
    assert check_auth(_args("127.0.0.1")) is None and check_auth(_args("::1")) is None
    with pytest.raises(ConfigError, match="no authentication is set.*--token-file.*--insecure"):
        check_auth(_args("0.0.0.0"))
    assert check_auth(_args("0.0.0.0", str(_token_file(tmp_path)))) == TOKEN
    assert "WARNING" not in capsys.readouterr().err
    assert check_auth(_args("192.168.1.20", insecure=True)) is None
    assert "WITHOUT AUTHENTICATION" in capsys.readouterr().err  # --insecure still prints the box
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    assert check_auth(_args("0.0.0.0")) == TOKEN
    monkeypatch.setenv("MONAI_LABEL_AUTH_ENABLE", "true")
    with pytest.raises(ConfigError, match="choose one"):
        check_auth(_args("0.0.0.0"))
    monkeypatch.delenv(TOKEN_ENV)
    assert check_auth(_args("0.0.0.0")) is None  # Keycloak alone


def test_token_files_that_leak_or_guess_are_refused(tmp_path, monkeypatch):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ConfigError, match="readable by other users; chmod 600"):
        read_token(str(_token_file(tmp_path, mode=0o644)))
    with pytest.raises(ConfigError, match="at least 16 characters"):
        read_token(str(_token_file(tmp_path, "short")))
    with pytest.raises(ConfigError, match="no such file"):
        read_token(str(tmp_path / "missing"))
    monkeypatch.setenv(TOKEN_ENV, "short")
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(None)


def test_the_cli_refuses_with_one_line_and_exit_2(tmp_path):
    proc = run_module("medimg.label", "serve", "--studies", str(tmp_path), "--host", "0.0.0.0",
                      env={TOKEN_ENV: "", "MONAI_LABEL_AUTH_ENABLE": ""})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: --host: 0.0.0.0 is reachable from other machines")


def test_middleware_checks_every_request_in_constant_time_and_lets_preflights_through():
    async def hello(request):
        return PlainTextResponse("hello")

    app = Starlette(routes=[Route("/{path:path}", hello, methods=["GET", "POST", "PUT"])], middleware=[
        Middleware(BearerTokenMiddleware, token_sha256=digest(TOKEN)),
        Middleware(CORSMiddleware, allow_origins=["http://ohif"], allow_methods=["*"], allow_headers=["*"])])
    client = TestClient(app)
    for path in ("/info/", "/datastore/label", "/anything/at/all"):
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": f"Bearer {TOKEN}x"}):
            r = client.post(path, headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
        r = client.get(path, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 200 and r.text == "hello"
    pre = client.options("/info/", headers={"Origin": "http://ohif", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == "http://ohif"


def test_body_limit_refuses_declared_and_streamed_bodies():
    from starlette.requests import Request

    from medimg.label.limits import BodyLimitMiddleware

    async def echo(request: Request):
        return PlainTextResponse(str(len(await request.body())))

    client = TestClient(Starlette(routes=[Route("/up", echo, methods=["PUT"])],
                                  middleware=[Middleware(BodyLimitMiddleware, max_bytes=1000)]))
    assert client.put("/up", content=b"x" * 1000).text == "1000"
    declared = client.put("/up", content=b"x" * 1001)
    assert declared.status_code == 413 and "upload limit" in declared.json()["detail"]
    streamed = client.put("/up", content=(b"x" * 400 for _ in range(5)))  # chunked: no Content-Length
    assert streamed.status_code == 413
    # FastAPI turns an interrupted form read into its own 400: the answer must still be 413
    from fastapi import FastAPI, File, UploadFile

    api = FastAPI()

    @api.put("/form")
    def form(file: UploadFile = File(...)):  # noqa: B008 - FastAPI
        return {"size": len(file.file.read())}

    api.add_middleware(BodyLimitMiddleware, max_bytes=1000)
    part = (b'--xx\r\nContent-Disposition: form-data; name="file"; filename="a.bin"\r\n\r\n' + b"x" * 2000
            + b"\r\n--xx--\r\n")
    answer = TestClient(api).put("/form", content=(part[i:i + 300] for i in range(0, len(part), 300)),
                                 headers={"Content-Type": "multipart/form-data; boundary=xx"})
    assert answer.status_code == 413


def _datastore(tmp_path):
    import nibabel as nib

    from medimg.label.compat import install

    install()
    from medimg.label.datastore import SeriesDatastore

    studies, outside = tmp_path / "studies", tmp_path / "outside"
    studies.mkdir()
    outside.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((6, 7, 8), np.float32), np.eye(4)), studies / "scan.nii.gz")
    nib.save(nib.Nifti1Image(np.ones((6, 7, 8), np.float32), np.eye(4)), outside / "secret.nii.gz")
    (studies / "leak.nii.gz").symlink_to(outside / "secret.nii.gz")
    return SeriesDatastore(str(studies), extensions=["*.nii.gz"], auto_reload=False), studies, outside


def test_ids_tags_and_links_stay_inside_the_studies_folder(tmp_path):
    import nibabel as nib

    from medimg.label.datastore import StudiesPathError

    store, studies, outside = _datastore(tmp_path)
    assert store.list_images() == ["scan"]  # the link that leads outside is never listed
    label = tmp_path / "label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((6, 7, 8), np.uint8), np.eye(4)), label)
    for bad in ("../outside/secret", "/etc/passwd", str(outside / "secret"), "..", "a/b", "a\\b"):
        with pytest.raises(StudiesPathError, match="plain name"):
            store.get_image_uri(bad)
        with pytest.raises(StudiesPathError, match="plain name"):
            store.add_image(bad, str(label), {})
        with pytest.raises(StudiesPathError, match="plain name"):
            store.save_label("scan", str(label), bad, {})
    store._datastore.objects["leak"] = store._datastore.objects["scan"].model_copy(deep=True)
    with pytest.raises(StudiesPathError, match="outside the studies folder"):
        store.get_image_uri("leak")  # a datastore entry whose file is a link out
    assert not list(outside.glob("*label*")) and sorted(p.name for p in outside.iterdir()) == ["secret.nii.gz"]


def test_a_corrupt_or_misfit_label_upload_is_refused_and_the_stored_one_kept(tmp_path):
    import nibabel as nib

    store, studies, _ = _datastore(tmp_path)
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.full((6, 7, 8), 3, np.uint8), np.eye(4)), good)
    store.save_label("scan", str(good), "final", {})
    stored = Path(store.get_label_uri("scan", "final"))
    before = stored.read_bytes()
    corrupt, misfit = tmp_path / "corrupt.nii.gz", tmp_path / "misfit.nii.gz"
    corrupt.write_bytes(good.read_bytes()[:60])
    nib.save(nib.Nifti1Image(np.ones((6, 7, 9), np.uint8), np.eye(4)), misfit)
    with pytest.raises(DataError, match="label upload for 'scan'"):
        store.save_label("scan", str(corrupt), "final", {})
    with pytest.raises(DataError, match=r"shape \(6, 7, 9\) differs from the image's \(6, 7, 8\)"):
        store.save_label("scan", str(misfit), "final", {})
    assert stored.read_bytes() == before
    import pydicom

    not_seg = tmp_path / "ct.dcm"
    pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm")).save_as(not_seg)
    with pytest.raises(DataError, match="must be a SEG, not 'CT'"):
        store.save_label("scan", str(not_seg), "final", {})
    (tmp_path / "junk.dcm").write_bytes(b"junk")
    with pytest.raises(DataError, match="not a readable DICOM file"):
        store.save_label("scan", str(tmp_path / "junk.dcm"), "final", {})
    assert stored.read_bytes() == before
