"""The DICOMweb requests :class:`~medimg.label.dicomweb.PacsDatastore` makes beyond MONAI Label's client.

- :func:`search_series`: QIDO-RS in pages (``limit`` / ``offset``). PACS answer at most their own
  limit per query (dcm4chee, Google's, Orthanc behind a proxy), often without saying so; a single
  query would silently drop the rest. Pages are asked until one comes back empty, shorter than an
  earlier one, or holding only series already seen (a server that ignores ``offset``).
- :func:`fetch_series`: a series' instances into a cache folder, whole or not at all: downloaded
  into a hidden sibling folder and renamed into place once complete, and fetched again whenever
  the folder holds another number of instances than the PACS reports
  (``NumberOfSeriesRelatedInstances``), so an interrupted download never passes for the series.
  The hidden folders carry their process id (``.<series>.pid<pid>.<random>.partial`` / ``.old``);
  :func:`remove_stale` deletes those whose process is gone (a killed download), when the datastore
  starts and before each download. A cache belongs to one machine: a process id names a process there.
- :func:`seg_series`: the SEG series in the PACS with the image series each references, when it
  was made (its content date and time), who made it (``Manufacturer``), whether it is a final label
  the PACS datastore stored (``ContentLabel`` :data:`FINAL_MARK` from ``medimg``), and its
  segments' labels and medimg's stored values; their metadata asked once per SEG.
- :func:`delete_series`: DICOMweb has no standard delete. The non-standard ``DELETE
  .../studies/{study}/series/{series}`` (dcm4chee, Google Healthcare) is tried first, then
  Orthanc's REST API next to its DICOMweb root (``/tools/lookup``, ``DELETE /series/{id}``);
  a PACS that offers neither gets a :class:`~medimg.errors.DataError` naming the series.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from medimg.errors import DataError
from medimg.io.dicomseg import MANUFACTURER, stored_value

PAGE = 500  # series asked per QIDO page (servers may answer fewer)
FINAL_MARK = "MEDIMG_FINAL"  # ContentLabel of the final labels the PACS datastore stores
_OWNER = re.compile(r"\.pid(\d+)\.[^.]+\.(?:partial|old)$")
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _uid(item: dict[str, Any]) -> str:
    return str((item.get("0020000E", {}).get("Value") or [""])[0])


def search_series(client: Any, filters: dict[str, Any] | None = None, fields: list[str] | None = None,
                  page: int = PAGE) -> list[dict[str, Any]]:
    """Every series matching ``filters`` (DICOM JSON), asked page by page (module docstring)."""
    found: list[dict[str, Any]] = []
    seen: set[str] = set()
    offset, longest = 0, 0
    while True:
        batch = client.search_for_series(search_filters=dict(filters or {}), fields=fields, limit=page, offset=offset)
        fresh = [item for item in batch if _uid(item) not in seen]
        found += fresh
        seen |= {_uid(item) for item in fresh}
        if not batch or not fresh or len(batch) < longest:
            return found
        longest, offset = max(longest, len(batch)), offset + len(batch)


def series_record(client: Any, series_uid: str) -> Dataset:
    """The QIDO-RS record of one series (study, instance count); :class:`DataError` when the PACS has none."""
    rows = [d for d in client.search_for_series(search_filters={"SeriesInstanceUID": series_uid},
                                                fields=["NumberOfSeriesRelatedInstances"])
            if _uid(d) == series_uid]
    if not rows:
        raise DataError(series_uid, "no such series in the PACS")
    return Dataset.from_json(rows[0])


def count_instances(folder: Path) -> int:
    """The DICOM files of a cached series folder (``<SOPInstanceUID>.dcm``)."""
    return sum(1 for p in folder.glob("*.dcm") if p.is_file() and not p.name.startswith("."))


def _lock(folder: Path) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(folder), threading.Lock())


def fetch_series(client: Any, series_uid: str, folder: Path) -> Path:
    """``folder`` holding every instance of the series, fetched (again) unless it already does.

    Raises:
        DataError: the PACS has no such series, or sent another number of instances than it reports.
    """
    record = series_record(client, series_uid)
    study = str(record.StudyInstanceUID)
    expected = record.get("NumberOfSeriesRelatedInstances")
    if expected is None:  # not every PACS returns it: count the instances
        expected = len(client.search_for_instances(study, series_uid, get_remaining=True))
    expected = int(expected)
    if folder.is_dir() and count_instances(folder) == expected:
        return folder
    with _lock(folder):
        if folder.is_dir() and count_instances(folder) == expected:
            return folder  # another request fetched it meanwhile
        folder.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(folder.parent)
        partial = _hidden(folder, ".partial")
        try:
            for instance in client.retrieve_series(study, series_uid):
                instance.save_as(partial / f"{instance.SOPInstanceUID}.dcm")
            got = count_instances(partial)
            if got != expected:
                raise DataError(series_uid, f"the PACS sent {got} of the series' {expected} instances")
            _replace_folder(partial, folder)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return folder


def _replace_folder(new: Path, folder: Path) -> None:
    """Put ``new`` at ``folder`` by renames; a previous (partial) folder is moved aside and deleted."""
    old = None
    if folder.exists():
        old = _hidden(folder, ".old")
        os.rename(folder, old / "series")
    try:
        os.rename(new, folder)
    except OSError:
        if not folder.is_dir():  # not a concurrent fetch's complete copy: a real failure
            raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _hidden(folder: Path, suffix: str) -> Path:
    """A new hidden sibling of ``folder`` named with this process's id (module docstring)."""
    return Path(tempfile.mkdtemp(prefix=f".{folder.name}.pid{os.getpid()}.", suffix=suffix, dir=folder.parent))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale(parent: Path) -> list[str]:
    """Delete the hidden ``.partial`` / ``.old`` folders in ``parent`` whose process is gone; their names.

    A folder named without a process id (an older medimg's) counts as stale.
    """
    removed = []
    for entry in parent.iterdir() if parent.is_dir() else ():
        if not (entry.name.startswith(".") and entry.name.endswith((".partial", ".old")) and entry.is_dir()):
            continue
        owner = _OWNER.search(entry.name)
        if owner is None or not _alive(int(owner.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry.name)
    return removed


@dataclass(frozen=True)
class SegSeries:
    """A SEG series in the PACS (module docstring).

    Attributes:
        study: its StudyInstanceUID.
        uid: its SeriesInstanceUID.
        references: the image series it references.
        made: its content date and time (``YYYYMMDDHHMMSS...``).
        maker: its ``Manufacturer``.
        final: a final label the PACS datastore stored (medimg's, marked :data:`FINAL_MARK`).
        segments: ``(label, label value medimg stored or None)`` of each segment.
    """

    study: str
    uid: str
    references: frozenset[str]
    made: str
    maker: str = ""
    final: bool = False
    segments: tuple[tuple[str, int | None], ...] = ()


def seg_series(client: Any, known: dict[str, SegSeries] | None = None) -> list[SegSeries]:
    """Every SEG series in the PACS (``known``: those already described, by UID; kept to the PACS's, in place)."""
    known = {} if known is None else known
    out = []
    for item in search_series(client, {"Modality": "SEG"}):
        d = Dataset.from_json(item)
        uid = str(d.SeriesInstanceUID)
        if uid not in known:
            meta = [Dataset.from_json(m) for m in client.retrieve_series_metadata(str(d.StudyInstanceUID), uid)]
            refs = frozenset(str(r.SeriesInstanceUID) for m in meta for r in m.get("ReferencedSeriesSequence", []))
            made = max((f"{m.get('ContentDate', '')}{m.get('ContentTime', '')}" for m in meta), default="")
            first = meta[0] if meta else Dataset()
            maker = str(first.get("Manufacturer", ""))
            final = maker == MANUFACTURER and str(first.get("ContentLabel", "")) == FINAL_MARK
            segments = tuple((str(s.get("SegmentLabel", "")), stored_value(s) if maker == MANUFACTURER else None)
                             for s in first.get("SegmentSequence", []))
            known[uid] = SegSeries(str(d.StudyInstanceUID), uid, refs, made, maker, final, segments)
        out.append(known[uid])
    for uid in set(known) - {seg.uid for seg in out}:  # deleted from the PACS since
        del known[uid]
    return out


def delete_series(client: Any, study: str, series_uid: str) -> None:
    """Delete a series from the PACS (module docstring); :class:`DataError` when it offers no way to."""
    import requests

    try:
        client.delete_series(study, series_uid)
        return
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status not in (400, 404, 405, 501):
            raise
    root = client.base_url.rstrip("/").rsplit("/", 1)[0]  # Orthanc: its REST API next to /dicom-web
    session = client._session  # noqa: SLF001 - the client's credentials
    try:
        found = session.post(f"{root}/tools/lookup", data=series_uid, timeout=60)
        found.raise_for_status()
        ids = [r["ID"] for r in found.json() if r.get("Type") == "Series"]
        for orthanc_id in ids:
            session.delete(f"{root}/series/{orthanc_id}", timeout=60).raise_for_status()
    except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
        raise DataError(series_uid, f"the PACS does not let this series be deleted ({exc}); "
                                    "delete it in the PACS") from exc
    if not ids:
        raise DataError(series_uid, "the PACS does not let this series be deleted; delete it in the PACS")
