"""``python -m medimg.label serve``: the real MONAI Label server with the medimg app.

    python -m medimg.label serve --studies STUDIES [--models MODELS] [--host 127.0.0.1] [--port 8000]

- It binds 127.0.0.1 unless ``--host`` says otherwise. Bound elsewhere, it refuses to start
  without authentication: a bearer token (``--token-file``, or ``$MEDIMG_LABEL_TOKEN``; checked on
  every endpoint, :mod:`medimg.label.auth`) or MONAI Label's Keycloak (``MONAI_LABEL_AUTH_ENABLE``).
  ``--insecure`` is the explicit way out, and it prints the warning box. A token works on
  loopback too.
- Cross-origin requests are allowed only from the server's own origin and the ``--cors`` origins
  (MONAI Label's default is every origin). Writes from other web pages (CSRF) and requests with a
  ``Host`` that is not loopback, ``--host`` or an ``--allowed-host`` (DNS rebinding) are refused,
  token or not; a wildcard ``--host`` without authentication needs ``--allowed-host``
  (:mod:`medimg.label.origin`).
- It needs no network: nothing is downloaded (bundles load from ``--models``; no DICOMweb tools).
- Without ``--models`` it serves copies of every bundle shipped with medimg (``python -m medimg.bundles``).
- The app folder MONAI Label wants (``main.py`` plus its ``logs`` folder), the served copies of
  the shipped bundles and the fine-tuning runs live under ``--app-dir``, by default a lasting
  folder per studies source: ``$MEDIMG_LABEL_HOME`` or ``$XDG_DATA_HOME/medimg/label`` (else
  ``~/.local/share/medimg/label``), then ``<studies name>-<hash>``. A fine-tuned model published
  there survives a restart, ``docker stop`` and a reboot; a restart copies a shipped bundle only
  where no served copy of it exists, so it never overwrites a published model.
- SIGTERM (``docker stop``, systemd) or Ctrl-C stops a running training (MONAI Label's train
  subprocess and the ``medimg.train`` it runs) before the server exits; the train subprocess also
  ends when the server is killed outright (:mod:`medimg.label.train`).

MONAI Label itself comes from the ``[label]`` extra (see the README).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

from medimg.errors import ConfigError, exit_on_sigterm, run_cli
from medimg.label.origin import HOSTS_ENV, allowed_hosts, is_loopback_name

APP_MAIN = ('"""MONAI Label app folder written by python -m medimg.label serve."""\n'
            "from medimg.label.main import MedimgApp  # noqa: F401\n")
# MONAI Label's train subprocess imports monailabel before any app code: this runs first (see compat)
SITE_CUSTOMIZE = "from medimg.label.compat import install\n\ninstall()\n"
WARNING = """
################################################################################
#  WARNING: MONAI Label is listening on {host}:{port} WITHOUT AUTHENTICATION.
#  Anyone who can reach this machine can read the studies, run the models and
#  start training. Bind 127.0.0.1 (the default), give --token-file, or enable
#  MONAI_LABEL_AUTH_ENABLE with Keycloak.
################################################################################"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line of ``python -m medimg.label``."""
    parser = argparse.ArgumentParser(prog="python -m medimg.label", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the MONAI Label server with the medimg app")
    serve.add_argument("--models", default=None,
                       help="folder of medimg bundles (default: copies of every bundle shipped with medimg, "
                            "under the app folder; python -m medimg.bundles lists them)")
    serve.add_argument("--studies", required=True, help="studies folder (NIfTI/NRRD files, DICOM series folders) "
                                                        "or a DICOMweb URL (http://HOST:PORT/dicom-web)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--token-file", default=None,
                       help="file holding the bearer token every request must carry (chmod 600; "
                            "or set MEDIMG_LABEL_TOKEN); required when --host is not loopback")
    serve.add_argument("--max-upload-mb", type=float, default=None,
                       help="largest request body (image or label upload) in MB (default: 2048)")
    serve.add_argument("--insecure", action="store_true",
                       help="bind beyond loopback without authentication (prints a warning)")
    serve.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when available)")
    serve.add_argument("--runs", default=None, help="folder for fine-tuning runs (default: <app-dir>/runs)")
    serve.add_argument("--app-dir", default=None,
                       help="MONAI Label app folder (served models, runs, logs; kept across restarts; default: "
                            "a folder per studies source under $MEDIMG_LABEL_HOME or ~/.local/share/medimg/label)")
    serve.add_argument("--cors", action="append", default=[], metavar="ORIGIN",
                       help="an extra origin allowed to call the server from a browser (OHIF), repeatable")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a Host name (or NAME:PORT) the server answers besides loopback and --host, "
                            "repeatable; needed with --host 0.0.0.0 --insecure ('*': any)")
    serve.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="more app conf values (see medimg.label.main)")
    serve.add_argument("--log-level", default="info")
    return parser.parse_args(argv)


def check(args: argparse.Namespace) -> None:
    """Fail with one line on a bad folder or a missing MONAI Label, before anything starts."""
    from medimg.bundles import shipped_bundles
    from medimg.label.compat import install

    studies = Path(args.studies)
    if args.models is None:
        if not shipped_bundles():
            raise ConfigError("--models", "not given, and no bundle is shipped with this installation")
    else:
        models = Path(args.models)
        if not models.is_dir():
            raise ConfigError(models, "--models: no such folder")
        if not any((p / "configs" / "metadata.json").is_file() for p in models.iterdir() if p.is_dir()):
            raise ConfigError(models, "--models: no medimg bundle (a folder with configs/metadata.json) in it")
    if is_dicomweb(args.studies):
        host = urlsplit(args.studies).hostname or ""
        if not host:
            raise ConfigError(args.studies, "--studies: a DICOMweb URL needs a host (http://HOST:PORT/dicom-web)")
    elif not studies.is_dir():
        raise ConfigError(studies, "--studies: no such folder (or give a DICOMweb URL, http://HOST:PORT/dicom-web)")
    if not 0 < args.port < 65536:
        raise ConfigError("--port", f"{args.port} is not a TCP port")
    install()
    try:
        import monailabel  # noqa: F401
    except ImportError as exc:
        raise ConfigError("monailabel", "MONAI Label is not installed; see the README's MONAI Label section "
                                        "(pip install -e '.[label]' and monailabel --no-deps)") from exc


def is_dicomweb(studies: str) -> bool:
    """``--studies`` names a DICOMweb service (a PACS such as Orthanc), not a folder."""
    return studies.startswith(("http://", "https://"))


def prepare_app_dir(app_dir: Path) -> Path:
    """Write the app's ``main.py``, the ``sitecustomize`` for MONAI Label's subprocesses and the logging config.

    Returns:
        The logging config for ``--log_config``: MONAI Label's default with its log folder set to
        the app's ``logs`` (left to itself, MONAI Label writes this file to a new temporary file
        at every start and never deletes it).
    """
    import monailabel

    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "main.py").write_text(APP_MAIN)
    (app_dir / "sitecustomize.py").write_text(SITE_CUSTOMIZE)
    logs = app_dir / "logs"
    logs.mkdir(exist_ok=True)
    text = (Path(monailabel.__file__).parent / "logging.json").read_text()
    path = app_dir / "logging.json"  # MONAI Label's ${LOGFILE} set to the app's log file, JSON-escaped
    path.write_text(text.replace("${LOGFILE}", json.dumps(str(logs / "app.log"))[1:-1]))
    return path


def default_app_dir(studies: str) -> Path:
    """The lasting app folder of a studies source (a folder or a DICOMweb URL); see the module docstring."""
    home = os.environ.get("MEDIMG_LABEL_HOME") or os.path.join(
        os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"), "medimg", "label")
    if is_dicomweb(studies):  # credentials in the URL name no folder: host, port and path only
        url = urlsplit(studies)
        where = f"{url.hostname or ''}:{url.port}" if url.port else (url.hostname or "")
        source, label = f"{url.scheme}://{where}{url.path.rstrip('/')}", where
    else:
        source = str(Path(studies).resolve())
        label = Path(source).name
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-.") or "studies"
    return Path(home) / f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def copy_shipped(folder: Path) -> Path:
    """Copy each shipped bundle into ``folder`` where it has no served copy yet (never over one).

    Training publishes into the served copies, never into the package. A served copy, fine-tuned or
    not, is left as it is: a restart must not replace a published model, nor mix a shipped
    ``model.pt`` with a fine-tuned one's OpenVINO IR. Each copy is made beside its place and
    renamed in, under the bundle's publication lock, so a copy interrupted by a kill is never served.
    """
    from medimg.bundles import shipped_bundles
    from medimg.label.publish import bundle_lock, recover

    folder.mkdir(parents=True, exist_ok=True)
    for name, src in shipped_bundles().items():
        served = folder / name
        with bundle_lock(served):
            recover(served)  # a publication a kill left half done is finished first
            partial = served.with_name(f".{name}.shipped.partial")
            shutil.rmtree(partial, ignore_errors=True)  # a copy a kill left half done
            if served.exists():
                card = Path("configs") / "metadata.json"
                if (served / card).read_text() != (src / card).read_text():
                    print(f"medimg: serving {served} as it is (fine-tuned or from another medimg version; "
                          f"delete it to serve the shipped {name} again)", file=sys.stderr, flush=True)
                continue
            shutil.copytree(src, partial)
            partial.rename(served)
    return folder


def stop_descendants(grace_s: float = 20.0) -> None:
    """End every process this one started (MONAI Label's train subprocess and its ``medimg.train``).

    SIGTERM first (the train task then stops its run and publishes nothing), SIGKILL for whatever
    is left after ``grace_s``. MONAI Label itself leaves them running when its server stops.
    """
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.terminate()
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    psutil.wait_procs(alive, timeout=5)


def check_auth(args: argparse.Namespace) -> str | None:
    """The token the server will demand, after the refusal rules; the warning box when insecure.

    Returns:
        The token, or ``None`` (loopback, Keycloak, or ``--insecure``).
    """
    from medimg.label.auth import read_token

    token = read_token(args.token_file)
    keycloak = os.environ.get("MONAI_LABEL_AUTH_ENABLE", "").lower() in ("1", "true")
    if token and keycloak:
        raise ConfigError("--token-file", "MONAI_LABEL_AUTH_ENABLE (Keycloak) is on as well; choose one")
    if token or keycloak or is_loopback_name(args.host):
        return token
    if not args.insecure:
        raise ConfigError("--host", f"{args.host} is reachable from other machines and no authentication is set: "
                                    "give --token-file FILE (or MEDIMG_LABEL_TOKEN), enable MONAI_LABEL_AUTH_ENABLE "
                                    "(Keycloak), or pass --insecure")
    print(WARNING.format(host=args.host, port=args.port), file=sys.stderr, flush=True)
    return None


def serve(args: argparse.Namespace) -> int:
    """Check the folders, write the app folder, and run MONAI Label's server until it stops."""
    from medimg.label.auth import DIGEST_ENV, TOKEN_ENV, digest
    from medimg.label.limits import UPLOAD_ENV

    token = check_auth(args)
    check(args)
    os.environ.pop(TOKEN_ENV, None)  # the server and its training subprocesses hold the digest only
    os.environ.pop(DIGEST_ENV, None)
    if token:
        os.environ[DIGEST_ENV] = digest(token)
    os.environ[HOSTS_ENV] = json.dumps(allowed_hosts(args.host, args.allowed_host, authenticated=token is not None))
    if args.max_upload_mb is not None:
        if not args.max_upload_mb > 0:
            raise ConfigError("--max-upload-mb", f"{args.max_upload_mb} is not a positive size")
        os.environ[UPLOAD_ENV] = str(args.max_upload_mb)
    app_dir = (Path(args.app_dir) if args.app_dir else default_app_dir(args.studies)).resolve()
    print(f"medimg: app folder {app_dir} (served models, runs, logs)", file=sys.stderr, flush=True)
    try:
        log_config = prepare_app_dir(app_dir)
        shown = "127.0.0.1" if args.host in ("0.0.0.0", "::") else args.host
        origins = [f"http://{shown}:{args.port}", f"http://localhost:{args.port}", *args.cors]
        os.environ["MEDIMG_LABEL_CORS_ORIGINS"] = json.dumps(origins)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(app_dir), os.environ.get("PYTHONPATH")) if p)
        models = Path(args.models).resolve() if args.models else copy_shipped(app_dir / "models")
        conf = [["models", str(models)], *args.conf]
        if args.device:
            conf.append(["device", args.device])
        conf.append(["runs", str(Path(args.runs).resolve()) if args.runs else str(app_dir / "runs")])
        studies = args.studies if is_dicomweb(args.studies) else str(Path(args.studies).resolve())
        argv = ["monailabel", "start_server", "--app", str(app_dir), "--studies", studies,
                "--host", args.host, "--port", str(args.port), "--uvicorn_app", "medimg.label.asgi:app",
                "--log_level", args.log_level, "--log_config", str(log_config)]
        for key, value in conf:
            argv += ["--conf", key, value]
        from monailabel.main import Main

        sys.argv = argv
        exit_on_sigterm()  # uvicorn re-raises SIGTERM after its graceful stop: leave through finally
        Main().run()
        return 0
    finally:
        stop_descendants()


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m medimg.label``."""
    args = parse_args(argv)
    return run_cli(lambda: serve(args))
