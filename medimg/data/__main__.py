"""``python -m medimg.data import SOURCE --out manifest.json``: datasets as users keep them -> a manifest.

SOURCE is an nnU-Net v2 raw dataset (``dataset.json``, ``imagesTr/`` with ``_0000`` channel
suffixes, ``labelsTr/``), a Medical Segmentation Decathlon task folder, or a folder of images with
``--labels`` naming the folder of labels paired with them by file name. Every pair is checked first;
the first problem is one line naming the file, with exit code 2, and no manifest is written.
"""

from __future__ import annotations

import argparse
import sys

from medimg.errors import run_cli

LAYOUT_NAMES = {"nnunet": "nnU-Net v2 raw dataset", "msd": "Decathlon folder", "folders": "image/label folders"}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m medimg.data", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="write a manifest for an nnU-Net, Decathlon or paired-folder dataset")
    imp.add_argument("source", help="dataset folder (nnU-Net v2 / Decathlon), or the image folder with --labels")
    imp.add_argument("--out", required=True, help="manifest JSON to write (paths relative to its folder)")
    imp.add_argument("--layout", default="auto", choices=("auto", "nnunet", "msd", "folders"))
    imp.add_argument("--labels", default=None, help="label folder, paired with SOURCE's images by file name")
    imp.add_argument("--channel", default=None, help="channel index or name of a multi-channel nnU-Net dataset")
    imp.add_argument("--classes", default=None, help="folders layout: class names by value, comma-separated, "
                                                     "background first (default label_1, label_2, ...)")
    imp.add_argument("--val-fraction", type=float, default=None, help="share of cases written as the validation split")
    imp.add_argument("--seed", type=int, default=0, help="seed of the validation draw")
    imp.add_argument("--headers-only", action="store_true", help="check shapes and affines from headers only")
    args = parser.parse_args(argv)

    def body() -> None:
        from medimg.data.importers import import_dataset

        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        out, found = import_dataset(args.source, args.out, args.layout, args.labels, args.channel, classes,
                                    args.val_fraction, args.seed, read_data=not args.headers_only)
        names = ", ".join(found.labels[k] for k in sorted(found.labels, key=int))
        print(f"{LAYOUT_NAMES[found.layout]} {found.name}: {len(found.training)} labelled cases, "
              f"{len(found.test)} test images, classes {names} -> {out}")
        hint = "" if args.val_fraction else " data.val_fraction=0.2"
        print(f"train: python -m medimg.train bundle=swin_unetr data.dataset=null data.manifest={out}{hint}")

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
