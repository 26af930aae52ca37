"""Bundle verification with MONAI's own ``verify_metadata`` and ``verify_net_in_out``."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from medimg.errors import BundleError

log = logging.getLogger(__name__)
SCHEMA_NAME = "meta_schema_20240725.json"


def find_schema(explicit: str | os.PathLike | None = None) -> Path | None:
    """Locate a local copy of the MONAI metadata schema.

    Looks at ``explicit``, ``$MEDIMG_MONAI_SCHEMA``, ``../shared/monai/`` beside the working
    directory and beside the checkout, and ``~/.cache/medimg/``. Returns ``None`` when none is
    found (online users can then let MONAI download it).
    """
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise BundleError(path, "metadata schema file not found")
        return path
    here = Path(__file__).resolve()
    candidates = [os.environ.get("MEDIMG_MONAI_SCHEMA"),
                  Path.cwd().parent / "shared" / "monai" / SCHEMA_NAME,
                  Path.cwd() / "shared" / "monai" / SCHEMA_NAME,
                  here.parents[3] / "shared" / "monai" / SCHEMA_NAME,
                  Path.home() / ".cache" / "medimg" / SCHEMA_NAME]
    for cand in candidates:
        if cand and Path(cand).is_file():
            return Path(cand)
    return None


def verify_bundle(bundle_dir: str | os.PathLike, schema: str | os.PathLike | None = None) -> None:
    """Run ``monai.bundle.verify_metadata`` and ``verify_net_in_out`` on a bundle.

    Args:
        bundle_dir: the bundle folder.
        schema: local schema file (see :func:`find_schema`); without one MONAI downloads it.

    Raises:
        BundleError: when either check fails (or the schema cannot be had offline).
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    bundle_dir = Path(bundle_dir)
    meta = bundle_dir / "configs" / "metadata.json"
    config = bundle_dir / "configs" / "inference.json"
    schema_path = find_schema(schema)
    target = schema_path or (Path.home() / ".cache" / "medimg" / SCHEMA_NAME)
    try:
        verify_metadata(meta_file=str(meta), filepath=str(target))
    except Exception as exc:  # noqa: BLE001 - MONAI raises ValueError or download errors
        hint = "" if schema_path else " (no local schema: pass export.schema=PATH or set MEDIMG_MONAI_SCHEMA)"
        raise BundleError(meta, f"verify_metadata failed: {str(exc).splitlines()[0][:300]}{hint}") from exc
    try:
        verify_net_in_out(net_id="network_def", meta_file=str(meta), config_file=str(config), device="cpu",
                          n=2, any=1, bundle_root=str(bundle_dir))
    except Exception as exc:  # noqa: BLE001
        raise BundleError(config, f"verify_net_in_out failed: {str(exc).splitlines()[0][:300]}") from exc
    log.info("bundle %s verified (metadata schema, network input/output)", bundle_dir)
