"""``python -m medimg.export RUN_DIR_OR_CKPT --out DIR``: trained run -> verified MONAI bundle."""

from __future__ import annotations

import argparse
import sys

import medimg.cpu  # noqa: F401 - OpenMP spin default, before PyTorch loads
from medimg.bundle.export import export_run
from medimg.errors import console_main, run_cli

__all__ = ["cli", "export_run", "main"]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m medimg.export", description=__doc__)
    parser.add_argument("source", help="run folder or checkpoint (.ckpt)")
    parser.add_argument("--out", required=True, help="bundle folder to create")
    parser.add_argument("--schema", default=None, help="local MONAI metadata schema JSON (offline)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--no-verify", action="store_true", help="skip MONAI's bundle verification")
    parser.add_argument("--no-standard", action="store_true", help="skip the checked ONNX and torch.export files")
    args = parser.parse_args(argv)

    def body() -> None:
        path = export_run(args.source, args.out, args.schema, args.overwrite, not args.no_verify,
                          not args.no_standard)
        print(f"bundle written and verified: {path}" if not args.no_verify else f"bundle written: {path}")

    return run_cli(body)


def cli() -> int:
    """The ``medimg-export`` console script and ``python -m medimg.export``: SIGTERM leaves through the clean-ups."""
    return console_main(main)


if __name__ == "__main__":
    sys.exit(cli())
