"""Attributes of a package imported on first use (PEP 562), so importing the package stays cheap."""

from __future__ import annotations

import sys
from collections.abc import Callable
from importlib import import_module
from typing import Any


def lazy_attributes(package: str, api: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``api[name]`` (a module path) when ``name`` is first read.

    Args:
        package: the package's ``__name__``.
        api: attribute name -> the module that defines it.
    """

    def __getattr__(name: str) -> Any:
        if name in api:
            value = getattr(import_module(api[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
