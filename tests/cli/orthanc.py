"""A real Orthanc PACS with its DICOMweb plugin for tests: reached on 127.0.0.1, stopped without leftovers.

Orthanc 1.10 has no bind-address setting; ``RemoteAccessAllowed: false`` makes it refuse every
request that does not come from this machine, and its DICOM port stays closed.

:func:`capped_qido_session` makes Orthanc answer QIDO-RS like a PACS with a per-query limit
(dcm4chee's ``qidoMaxNumberOfResults``, Google's 5000): at most ``cap`` results per query, however
many are asked. Orthanc's own ``LimitFindResults`` cannot stand in for one: Orthanc 1.10.1 applies
it before ``offset``, so results past the limit cannot be paged to at all.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import requests
from requests.adapters import HTTPAdapter

from tests.cli.label_client import free_port
from tests.oracles import DICOMWEB_PLUGIN, ORTHANC, need_debian


class OrthancServer:
    """``Orthanc`` (Debian ``orthanc`` + ``orthanc-dicomweb``) on a free loopback port, storage in ``work``."""

    def __init__(self, work: Path, users: dict[str, str] | None = None) -> None:
        need_debian("orthanc", "orthanc-dicomweb")  # a reference PACS: CI installs it (.ci/run)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.dicomweb = f"{self.url}/dicom-web"
        (work / "db").mkdir(parents=True, exist_ok=True)
        conf = {"Name": "medimg-suite", "HttpPort": self.port, "DicomServerEnabled": False,
                "RemoteAccessAllowed": False, "AuthenticationEnabled": bool(users), "RegisteredUsers": users or {},
                "HttpsVerifyPeers": False,
                "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
                "Plugins": [str(DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
        (work / "orthanc.json").write_text(json.dumps(conf))
        self.auth = next(iter(users.items())) if users else None  # the suite's own calls log in
        self.log = work / "orthanc.log"
        self.proc = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=self.log.open("w"),
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=2, auth=self.auth).ok:
                    return
            except requests.ConnectionError:
                time.sleep(0.3)
        self.stop()
        raise RuntimeError("Orthanc did not start within 60 s")

    def upload(self, files: list[Path]) -> None:
        """Store DICOM files through Orthanc's REST API."""
        for f in files:
            requests.post(f"{self.url}/instances", data=f.read_bytes(), timeout=60, auth=self.auth).raise_for_status()

    def series(self, modality: str | None = None) -> list[dict]:
        """QIDO-RS: every series (optionally one modality), as DICOM JSON."""
        params = {"Modality": modality} if modality else {}
        return requests.get(f"{self.dicomweb}/series", params=params, timeout=30, auth=self.auth).json()

    def stop(self) -> None:
        """Stop Orthanc and its whole process group."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


class _CappedQido(HTTPAdapter):
    """Rewrites every QIDO-RS query (``GET .../series``, ``/studies``, ``/instances``) to ``limit <= cap``."""

    def __init__(self, cap: int) -> None:
        super().__init__()
        self.cap, self.queries = cap, []

    def send(self, request, **kwargs):  # noqa: ANN001, ANN201 - requests' signature
        from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

        parts = urlsplit(request.url)
        if request.method == "GET" and parts.path.rstrip("/").endswith(("/series", "/studies", "/instances")):
            query = dict(parse_qsl(parts.query))
            query["limit"] = str(min(int(query.get("limit") or self.cap), self.cap))
            request.url = urlunsplit(parts._replace(query=urlencode(query)))
            self.queries.append(request.url)
        return super().send(request, **kwargs)


def capped_qido_session(cap: int) -> tuple[requests.Session, _CappedQido]:
    """A session whose QIDO-RS queries get at most ``cap`` results each (module docstring), and its adapter."""
    session, adapter = requests.Session(), _CappedQido(cap)
    session.mount("http://", adapter)
    return session, adapter
