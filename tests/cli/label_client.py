"""A MONAI Label server for tests: started on 127.0.0.1 in its own process group, stopped without leftovers."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests
from requests_toolbelt.multipart.decoder import MultipartDecoder

from tests.helpers import REPO, group_alive


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LabelServer:
    """``python -m medimg.label serve`` on a free loopback port."""

    def __init__(self, models: Path | None, studies: Path | str, work: Path, token: str | None = None,
                 extra: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "server.log"
        self.app_dir, self.runs = work / "app", work / "runs"
        self.session = requests.Session()  # every call carries the token, as Slicer's client does
        cmd = [sys.executable, "-m", "medimg.label", "serve", "--studies", str(studies), "--port", str(self.port),
               "--device", "cpu", *(extra or [])]
        if models is not None:  # None: the shipped bundles in the default app folder, as a new user starts it
            cmd += ["--models", str(models), "--app-dir", str(self.app_dir), "--runs", str(self.runs)]
        if token:
            token_file = work / "token"
            token_file.write_text(token)
            token_file.chmod(0o600)
            cmd += ["--token-file", str(token_file)]
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.cmd, self.env = cmd, env or {}
        self.start()

    def start(self) -> None:
        """Start the server (again: same models, studies, app folder, port and token) and wait for it."""
        env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2", **self.env}
        self.proc = subprocess.Popen(self.cmd, stdout=self.log.open("a"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        self.pgid = self.proc.pid
        deadline = time.monotonic() + 540
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                if self.session.get(f"{self.url}/info/", timeout=5).ok:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"server did not answer in 540 s:\n{self.tail()}")

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text()[-n:] if self.log.is_file() else ""

    def get(self, path: str, **kw: Any) -> Any:
        r = self.session.get(f"{self.url}{path}", timeout=60, **kw)
        r.raise_for_status()
        return r.json()

    def infer(self, model: str, image: str, params: dict, out_dir: Path) -> tuple[int, Any, Path | None]:
        """``POST /infer/{model}``: ``(status, result JSON or error text, label file or None)``."""
        r = self.session.post(f"{self.url}/infer/{model}", params={"image": image, "output": "all"},
                          data={"params": json.dumps(params)}, timeout=600)
        if r.status_code != 200:
            return r.status_code, r.text, None
        if r.headers["content-type"].startswith("application/json"):
            return 200, r.json(), None
        result, path = {}, None
        for part in MultipartDecoder.from_response(r).parts:
            disp = part.headers[b"Content-Disposition"].decode()
            if 'name="params"' in disp:
                result = json.loads(part.content)
            else:
                name = disp.split('filename="')[1].rstrip('"')
                out_dir.mkdir(parents=True, exist_ok=True)
                path = out_dir / f"{model}-{image}-{time.monotonic_ns()}-{name}"
                path.write_bytes(part.content)
        return 200, result, path

    def alive(self) -> bool:
        """Whether any process of the server's group is left."""
        return group_alive(self.pgid)

    def temp_files(self) -> set[str]:
        """Files in the server's temporary folder (``TMPDIR`` in ``env``): where MONAI Label copies uploads."""
        time.sleep(1)  # a successful answer removes its copies in a background task, just after the response
        return {p.name for p in Path(self.env["TMPDIR"]).iterdir() if p.is_file()}

    def stop(self, timeout: float = 60) -> None:
        """SIGINT (uvicorn's graceful stop), then SIGKILL for whatever is left in the group."""
        if self.alive():
            os.killpg(self.pgid, signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + 10
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.2)
        if self.alive():
            os.killpg(self.pgid, signal.SIGKILL)
            self.proc.wait(10)


def pacs_server(tmp_path_factory, dicomweb: str, runs: dict[str, Path], token: str) -> LabelServer:
    """A token-guarded server over a PACS (``dicomweb``) serving ``runs``' bundles (``{name: run}``), with
    its DICOMweb cache and TMPDIR in its own folder (checked for leftovers)."""
    import shutil

    models = tmp_path_factory.mktemp("models")
    for name, run in runs.items():
        shutil.copytree(run / "bundle", models / name)
    work = tmp_path_factory.mktemp("label")
    (work / "tmp").mkdir()
    return LabelServer(models, dicomweb, work, token=token,
                       env={"MONAI_LABEL_DICOMWEB_CACHE_PATH": str(work / "cache"), "TMPDIR": str(work / "tmp")})
