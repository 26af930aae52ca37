"""JSON documents users give us (manifests, prompts): one reader, one error line on failure."""

from __future__ import annotations

import json
from pathlib import Path

from medimg.errors import DataError


def read_json_object(path: str | Path, what: str) -> dict:
    """Read a JSON object from ``path``; a missing file, bad JSON or a non-object is a :class:`DataError`.

    Args:
        path: the JSON file.
        what: what the file is, for the error line (``manifest``, ``prompts``).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(path, f"{what} not found")
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(path, f"{what} is not valid JSON ({exc})") from exc
    if not isinstance(doc, dict):
        raise DataError(path, f"{what} must be a JSON object")
    return doc
