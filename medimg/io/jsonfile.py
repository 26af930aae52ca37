"""JSON documents: the ones users give us, and strict JSON for the ones we write.

Manifests and prompts have one reader with one error line on failure; bundle cards are written
without ``NaN`` or ``Infinity``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

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


def finite(value: Any) -> Any:
    """``value`` with every NaN or infinite float (NumPy's too) replaced by ``None``, recursively.

    A metric that could not be computed must not make a document non-JSON: ``json.dumps`` writes
    ``NaN`` by default, which JavaScript's ``JSON.parse`` (OHIF), strict parsers and Starlette's
    JSON responses refuse.
    """
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def dumps_strict(doc: Any, **kwargs: Any) -> str:
    """``json.dumps`` of :func:`finite` ``(doc)``: always strict JSON (no ``NaN`` / ``Infinity``)."""
    return json.dumps(finite(doc), allow_nan=False, **kwargs)


def loads_finite(text: str) -> Any:
    """``json.loads`` that reads a ``NaN`` / ``Infinity`` an older writer left as ``None``."""
    return json.loads(text, parse_constant=lambda _: None)
