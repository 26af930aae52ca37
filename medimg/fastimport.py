"""A fast start for the command-line tools: MONAI imported without the optional packages it never uses here.

``import monai`` imports every MONAI submodule, and each one probes its optional dependencies with
``optional_import``, which imports them when installed: Transformers (for TransChex), ITK and
IPython (for the ITK writer), pandas (for profiling tables), Ignite (for engines and handlers),
torchvision models (for RetinaNet backbones), matplotlib and scikit-learn. Together about three
seconds before ``medimg.infer`` could touch its input. None of them is on the path from a bundle's
``predictor`` to its output: medimg reads and writes images itself, and the predictor runs no
Ignite engine.

:func:`import_monai_lean` imports MONAI once with those packages hidden, so MONAI records them as
unavailable and carries on, exactly as on a machine without them. The packages stay importable
afterwards for anything that needs them (segment-anything imports torchvision, for one).
Only the command-line entry points call it; ``import medimg`` in a user's program imports MONAI
normally.
"""

from __future__ import annotations

import importlib.abc
import sys

HIDDEN = ("transformers", "itk", "IPython", "pandas", "ignite", "torchvision", "matplotlib", "sklearn")


class _Hide(importlib.abc.MetaPathFinder):
    """Answers "not installed" for the hidden top-level packages (and their submodules)."""

    def find_spec(self, name, path=None, target=None):  # noqa: ANN001, ANN201 - importlib's protocol
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {name!r} (hidden while MONAI imports)", name=name)
        return None


def import_monai_lean() -> None:
    """Import MONAI without its unused optional packages (a no-op once MONAI or any of them is loaded)."""
    if "monai" in sys.modules or any(name in sys.modules for name in HIDDEN):
        return
    finder = _Hide()
    sys.meta_path.insert(0, finder)
    try:
        import monai  # noqa: F401
    finally:
        sys.meta_path.remove(finder)
