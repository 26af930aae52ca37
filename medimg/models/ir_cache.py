"""The user's cache of converted OpenVINO IR: keyed, hashed, locked, written atomically.

A bundle that ships without its IR (or whose IR does not fit the input it is given) has the IR
converted from its weights on first use and kept in ``$MEDIMG_IR_CACHE`` (else
``~/.cache/medimg/ir``). One folder holds one conversion, named after its key: the weights' digest,
the IR names, the input shapes it was converted for, and the medimg, OpenVINO and PyTorch versions
that made it. A run with another ROI size, or after an upgrade, therefore never reads a graph made for
something else.

Each folder has a ``manifest.json`` with the key and a SHA-256 of every file. Loading reads the
files into memory, checks the key and the hashes, and builds the models from exactly the bytes it
checked; a corrupt or truncated file is removed and converted again, never served.

Conversions run under a per-key file lock into a ``.partial`` folder renamed into place in one
step, so two processes converting the same IR both end with one complete folder. A ``.partial``
folder whose key is not locked by anyone belongs to a process that died (``kill -9``) and is
removed. A cache that cannot be written (read-only home, full disk) leaves the checked conversion
in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from medimg.errors import BundleError

try:  # POSIX; elsewhere only the atomic rename guards concurrent conversions
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)
CACHE_ENV = "MEDIMG_IR_CACHE"
MANIFEST = "manifest.json"
LAYOUT = 2  # the cache layout; version 1 folders were named by the weights' digest alone
LOCK_TIMEOUT_S = 900.0


def cache_root() -> Path:
    """``$MEDIMG_IR_CACHE``, else ``~/.cache/medimg/ir``."""
    return Path(os.environ.get(CACHE_ENV, str(Path.home() / ".cache" / "medimg" / "ir")))


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


def cache_key(weights: str, names: Sequence[str], input_shapes: Sequence[Sequence[int]],
              fp16: bool = False) -> dict[str, Any]:
    """What a cached conversion depends on, stored in its manifest and hashed into its folder name.

    Args:
        weights: the weights' digest (:func:`medimg.models.openvino_ir.weights_digest`).
        names: the IR files (without suffix) the conversion writes.
        input_shapes: the input shapes the graphs were converted for (``-1``: dynamic).
        fp16: weights stored in half precision.
    """
    import openvino as ov

    return {"layout": LAYOUT, "weights": weights, "ir": list(names),
            "inputs": [[int(s) for s in shape] for shape in input_shapes], "fp16": bool(fp16),
            "medimg": _version("medimg"), "openvino": ov.get_version(), "torch": _version("torch")}


def key_name(key: dict[str, Any]) -> str:
    """The folder name of a key: a digest of its canonical JSON."""
    return hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=16).hexdigest()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(folder: Path, names: Sequence[str], key: dict[str, Any] | None = None) -> None:
    """Record the SHA-256 of every ``<name>.xml`` / ``.bin`` in ``folder`` (and the cache key, if any)."""
    files = {f"{n}.{ext}": _sha256((folder / f"{n}.{ext}").read_bytes()) for n in names for ext in ("xml", "bin")}
    text = json.dumps({"key": key, "sha256": files}, indent=1, sort_keys=True)
    tmp = folder / f".{MANIFEST}.partial"
    tmp.write_text(text)
    os.replace(tmp, folder / MANIFEST)


def read_checked(folder: Path, names: Sequence[str], key: dict[str, Any] | None = None,
                 require_manifest: bool = True) -> list[tuple[bytes, bytes]]:
    """The ``(xml, bin)`` bytes of each named IR, checked against the folder's manifest.

    Args:
        folder: the IR folder.
        names: the IR files to read.
        key: the cache key the manifest must hold (``None``: any).
        require_manifest: refuse a folder without a manifest (a bundle written before manifests
            existed passes ``False`` and is read unhashed).

    Raises:
        FileNotFoundError: a named file (or a required manifest) is missing.
        BundleError: another key, or a file whose hash differs (corrupt or truncated).
    """
    manifest_path = folder / MANIFEST
    manifest = None
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise BundleError(manifest_path, f"unreadable ({exc})") from exc
    elif require_manifest:
        raise FileNotFoundError(manifest_path)
    if manifest is not None and key is not None and manifest.get("key") != key:
        raise BundleError(manifest_path, "records another conversion key")
    out = []
    for name in names:
        pair = []
        for ext in ("xml", "bin"):
            path = folder / f"{name}.{ext}"
            data = path.read_bytes()
            if manifest is not None and manifest.get("sha256", {}).get(path.name) != _sha256(data):
                raise BundleError(path, "does not match the SHA-256 its manifest records (corrupt or truncated)")
            pair.append(data)
        out.append((pair[0], pair[1]))
    return out


def models_from_bytes(files: Sequence[tuple[bytes, bytes]]) -> list[Any]:
    """OpenVINO models built from checked ``(xml, bin)`` bytes (nothing re-read from disk)."""
    import openvino as ov

    core = ov.Core()
    return [core.read_model(xml, weights) for xml, weights in files]


@contextlib.contextmanager
def _locked(path: Path, blocking: bool = True) -> Iterator[bool]:
    """Hold an exclusive lock on ``path`` (yields ``False`` when not blocking and it is held elsewhere)."""
    with open(path, "a+b") as handle:
        if fcntl is None:
            yield True
            return
        deadline = time.monotonic() + LOCK_TIMEOUT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{path} held for over {LOCK_TIMEOUT_S:.0f} s") from None
                time.sleep(0.05)
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clean_stale_partials(root: Path, own: str | None = None) -> list[Path]:
    """Remove ``.partial`` folders no process is writing: their key's lock is free (or is ours).

    Args:
        root: the cache folder.
        own: the key name whose lock the caller holds (its partials are all stale).

    Returns:
        The folders removed.
    """
    removed = []
    for partial in root.glob(".*.partial"):
        if not partial.is_dir():
            continue
        name = partial.name[1:].split(".", 1)[0]
        if name == own:
            free = True
        else:
            try:
                with _locked(root / f".{name}.lock", blocking=False) as free:
                    pass
            except OSError:
                continue
        if free:
            shutil.rmtree(partial, ignore_errors=True)
            removed.append(partial)
    if removed:
        log.info("removed %d interrupted OpenVINO conversion(s) from %s", len(removed), root)
    return removed


def cached_models(names: Sequence[str], key: dict[str, Any], convert: Callable[[], list[Any]],
                  write: Callable[[list[Any], Path], None], where: str = "the network") -> list[Any]:
    """The IR models for ``key``: read from the cache when present and intact, else converted once.

    Args:
        names: the IR files, in the order ``convert`` returns the models.
        key: :func:`cache_key`.
        convert: converts and checks the models in memory (raises when they disagree with eager).
        write: saves the models into a folder (``<name>.xml`` / ``.bin``).
        where: what the models are of, for log lines.

    Returns:
        The models, checked: read back from a verified cache folder, or the in-memory conversion
        when the cache cannot be written.
    """
    root = cache_root()
    folder = root / key_name(key)
    with contextlib.suppress(FileNotFoundError, BundleError, OSError, RuntimeError):
        return models_from_bytes(read_checked(folder, names, key))  # fast path: no lock
    with contextlib.ExitStack() as stack:
        try:
            root.mkdir(parents=True, exist_ok=True)
            stack.enter_context(_locked(root / f".{folder.name}.lock"))
        except OSError as exc:
            log.info("OpenVINO IR cache %s cannot be written (%s); converting %s in memory", root, exc, where)
            return convert()
        clean_stale_partials(root, own=folder.name)
        try:
            return models_from_bytes(read_checked(folder, names, key))  # another process converted it
        except FileNotFoundError:
            pass
        except (BundleError, RuntimeError) as exc:
            log.warning("cached OpenVINO IR of %s is damaged (%s); converting it again", where, exc)
            shutil.rmtree(folder, ignore_errors=True)
        log.info("converting the OpenVINO IR of %s from its weights once into %s", where, folder)
        tmp = root / f".{folder.name}.{os.getpid()}.partial"
        try:
            tmp.mkdir()
        except OSError as exc:
            log.info("OpenVINO IR cache %s cannot be written (%s); converting %s in memory", root, exc, where)
            return convert()
        try:
            models = convert()
            try:
                write(models, tmp)
                write_manifest(tmp, names, key)
                tmp.rename(folder)
            except Exception as exc:  # noqa: BLE001 - a full disk fails inside OpenVINO's writer too
                log.info("OpenVINO IR cache %s cannot be written (%s); using the conversion of %s from memory",
                         root, " ".join(str(exc).split())[:160], where)
                return models
            return models_from_bytes(read_checked(folder, names, key))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
