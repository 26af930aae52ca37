"""``python -m medimg.infer --bundle DIR --input PATH --output PATH``.

``--input`` is an image file (NIfTI, NRRD, MHA), a DICOM series folder, or a folder of such
inputs (then ``--output`` is a folder and each prediction is ``<name>_seg.nii.gz``). Predictions
are written as NIfTI in exactly the input's geometry. GPU with AMP when available, else CPU.

``--format dicom-seg`` writes a DICOM Segmentation instead (``.dcm``; one per DICOM series input),
referencing the input series, with one segment per label named from the bundle's metadata.

A folder of inputs under ``torchrun --nproc_per_node=N -m medimg.infer ...``, or with
``--keep-going`` in one process, is sharded over the ranks, skips outputs already written, goes on
past a failed input and ends with ``OUTPUT/summary.csv`` (see :mod:`medimg.batch`).

Classification bundles write one JSON file (``--output probs.json``) with the class
probabilities of every input (images may also be PNG / JPEG).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

import medimg.cpu  # noqa: F401 - OpenMP spin default, before PyTorch loads
from medimg.batch import Shard, check_distinct_targets, run_batch
from medimg.bundle.loader import segment_names
from medimg.errors import ConfigError, DataError, check_output_location, console_main, run_cli
from medimg.io.dicom import folder_has_dicom
from medimg.io.image import IMAGE_SUFFIXES, Image, has_suffix, probe_image, read_image, strip_suffix, write_like
from medimg.io.preview import write_preview

FORMATS = {"nifti": (".nii.gz", ".nii"), "dicom-seg": (".dcm",), "png": (".png",)}


def output_name(path: Path, fmt: str = "nifti") -> str:
    """``scan.nii.gz`` -> ``scan_seg.nii.gz``; a DICOM folder ``series/`` -> ``series_seg.nii.gz`` (or ``.dcm``)."""
    return f"{strip_suffix(path.name) or path.name}_seg{FORMATS[fmt][0]}"


def check_preview(preview: str | None, many: bool) -> Path | None:
    """The ``--preview`` target: a ``.png`` file for one input, a folder for several (created when written)."""
    if preview is None:
        return None
    path = Path(preview)
    if many:
        return check_output_location(path, folder=True)
    if path.suffix.lower() != ".png" or path.is_dir():
        raise ConfigError(path, "--preview writes a PNG: give a file name ending in .png")
    return check_output_location(path)


def write_labels(labels: np.ndarray, image: Image, target: Path, fmt: str, seg_info: tuple | None) -> Path:
    """Write a label map as NIfTI in the image's geometry, or as a DICOM SEG referencing its series."""
    if fmt == "dicom-seg":
        from medimg.io.dicomseg import write_dicom_seg

        names, algorithm, version = seg_info
        return write_dicom_seg(labels, image.path, target, names, algorithm, version)
    return write_like(labels, image, target)


def collect_inputs(path: Path, suffixes: tuple[str, ...] = IMAGE_SUFFIXES) -> tuple[list[Path], bool]:
    """The inputs under ``path`` and whether ``path`` names a folder of several inputs."""
    if not path.exists():
        raise DataError(path, "no such file or folder")
    if path.is_file() or folder_has_dicom(path):
        return [path], False
    items = sorted(p for p in path.iterdir()
                   if (p.is_file() and has_suffix(p, suffixes)) or (p.is_dir() and folder_has_dicom(p)))
    if not items:
        raise DataError(path, "folder holds no images (NIfTI, NRRD, MHA) and no DICOM series")
    return items, True


def parse_settings(items: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` items as bundle overrides; a value is read as JSON (``false``, ``0.5``), else text."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError("--set", f"{item!r} is not KEY=VALUE (for example intensity_refinement=false)")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _load_bundle(bundle: str, device: str | None, overrides: dict[str, Any] | None = None):  # noqa: ANN202
    """The bundle's predictor, MONAI imported lean (:mod:`medimg.fastimport`): the CLI's fast start."""
    from medimg.bundle.loader import load_bundle
    from medimg.fastimport import import_monai_lean

    import_monai_lean()
    return load_bundle(bundle, device, overrides)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(prog="python -m medimg.infer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True,
                        help="exported MONAI bundle folder, or a shipped bundle's name (python -m medimg.bundles)")
    parser.add_argument("--input", required=True, help="image file, DICOM series folder, or folder of inputs")
    parser.add_argument("--output", required=True, help="output .nii.gz (or folder for several inputs)")
    parser.add_argument("--prompts", default=None, help="prompts JSON (promptable bundles): boxes / points")
    parser.add_argument("--intensity", default=None,
                        help="promptable bundles: intensity window (ct_abdomen, ct_lung, ct_bone, ct_brain, mr, none); "
                             "default: the bundle's own")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--preview", default=None,
                        help="also write a PNG: three planes through the structure, labels as coloured contours "
                             "with the bundle's names, prompts drawn (a folder of inputs: a folder of PNGs)")
    parser.add_argument("--format", default="nifti", choices=("nifti", "dicom-seg"),
                        help="nifti (default) or dicom-seg: a DICOM Segmentation referencing the input DICOM series")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of the bundle's inference.json for this run, as monai.bundle "
                             "run does (intensity_refinement=false, keep_main_component=false, overlap=0.5)")
    parser.add_argument("--keep-going", action="store_true",
                        help="a folder of inputs: go on past a failed input, skip outputs already written, and write "
                             "OUTPUT/summary.csv (always so under torchrun, which also shards the inputs)")
    args = parser.parse_args(argv)

    def body() -> None:
        from medimg.bundle.loader import bundle_task
        from medimg.bundles import resolve_bundle

        args.settings = parse_settings(args.set)
        if args.intensity is not None and args.prompts is None:
            raise ConfigError("--intensity", "applies to promptable bundles only (their volume window)")

        out = Path(args.output)
        args.bundle = str(resolve_bundle(args.bundle))  # a folder, or a shipped bundle's short name
        kind = bundle_task(args.bundle)
        if kind == "classification":
            classify(args, out)
            return
        inputs, many = collect_inputs(Path(args.input))
        check_distinct_targets(inputs, lambda item: out / output_name(item, args.format))  # every rank, first
        shard = Shard.from_env()
        if not many and (args.keep_going or shard.world > 1):
            raise ConfigError(args.input, "--keep-going and torchrun sharding take a folder of inputs")
        preview = check_preview(args.preview, many)
        if not many and out.is_dir():
            raise ConfigError(out, "is a folder; give an output file name for a single input")
        if not many and not out.name.lower().endswith(FORMATS[args.format]):
            raise ConfigError(out, f"{args.format} output must end in {' or '.join(FORMATS[args.format])}")
        check_output_location(out, folder=many)  # before the network loads and the inputs are read
        if args.format == "dicom-seg":
            for item in inputs:
                if not (item.is_dir() and folder_has_dicom(item)):
                    raise ConfigError(item, "--format dicom-seg needs DICOM series inputs (it references them)")
        if many and (args.keep_going or shard.world > 1) and kind != "promptable":
            return batch(args, inputs, out, preview, shard)
        # every input mistake is reported before the bundle's network is built and loaded
        if many:
            for item in inputs:
                probe_image(item)
        else:
            image = read_image(inputs[0], spatial_dims=None)
        if kind == "promptable":
            if not args.prompts:
                raise ConfigError(args.bundle, "is a promptable bundle; give --prompts prompts.json")
            if many:
                raise ConfigError(args.input, "a promptable bundle takes one image (its prompts are per image)")
            from medimg.io.prompts import load_prompts
            from medimg.predictors.prompting import prompt_shape

            if args.intensity is not None:
                from medimg.data.slicing import check_intensity

                check_intensity(args.intensity)
            prompts = load_prompts(args.prompts, prompt_shape(image.array), image.affine)
            seg_info = segment_names(args.bundle, True) if args.format == "dicom-seg" else None
            labels = _load_bundle(args.bundle, args.device, args.settings).segment_prompts(
                image, prompts, args.intensity, args.prompts)
            write_labels(labels, image, out, args.format, seg_info)
            print(f"{inputs[0]} -> {out}")
            if preview is not None:
                write_preview(image.array, image.affine, labels, segment_names(args.bundle, True)[0], preview, prompts)
                print(f"preview -> {preview}")
            return
        if args.prompts:
            raise ConfigError(args.prompts, "this bundle is not promptable; drop --prompts")
        seg_info = segment_names(args.bundle, False) if args.format == "dicom-seg" else None
        predictor = _load_bundle(args.bundle, args.device, args.settings)
        written: list[Path] = []
        try:
            for item in inputs:
                target = out / output_name(item, args.format) if many else out
                result = predictor.predict(item if many else image)
                written.append(write_labels(result.array, result, target, args.format, seg_info))
                print(f"{item} -> {target}")
                if preview is not None:
                    source = read_image(item, spatial_dims=None) if many else image
                    picture = preview / output_name(item, "png") if many else preview
                    written.append(write_preview(source.array, source.affine, result.array,
                                                 segment_names(args.bundle, False)[0], picture))
                    print(f"preview -> {picture}")
        except BaseException:
            for path in written:  # all or nothing: no partial set of outputs
                path.unlink(missing_ok=True)
            raise

    return run_cli(body)


def batch(args: argparse.Namespace, inputs: list[Path], out: Path, preview: Path | None, shard: Shard) -> int:
    """A folder of inputs the :mod:`medimg.batch` way: this rank's share, resumable, failures recorded."""
    info = segment_names(args.bundle, False)  # metadata read once: names, algorithm, version
    names, seg_info = info[0], (info if args.format == "dicom-seg" else None)
    predictor = _load_bundle(args.bundle, shard.device(args.device), args.settings)

    def predict_one(item: Path, target: Path) -> list[Path]:
        result = predictor.predict(item)
        written = [write_labels(result.array, result, target, args.format, seg_info)]
        if preview is not None:
            source = read_image(item, spatial_dims=None)
            written.append(write_preview(source.array, source.affine, result.array, names,
                                         preview / output_name(item, "png")))
        return written

    return run_batch(inputs, out, lambda item: out / output_name(item, args.format), predict_one, shard)


def classify(args: argparse.Namespace, out: Path) -> None:
    """Class probabilities of every input, as one JSON file."""
    from medimg.data.classification import PICTURE_SUFFIXES

    if args.prompts:
        raise ConfigError(args.prompts, "a classification bundle takes no prompts; drop --prompts")
    if out.suffix.lower() != ".json" or out.is_dir():
        raise ConfigError(out, "a classification bundle writes JSON: give an output file ending in .json")
    check_output_location(out)
    inputs, _ = collect_inputs(Path(args.input), IMAGE_SUFFIXES + PICTURE_SUFFIXES)
    predictor = _load_bundle(args.bundle, args.device, args.settings)
    predictor.write_json([str(p) for p in inputs], out)
    print(f"{len(inputs)} input(s) -> {out}")


def cli() -> int:
    """The ``medimg-infer`` console script and ``python -m medimg.infer``: SIGTERM leaves through the clean-ups."""
    return console_main(main)


if __name__ == "__main__":
    sys.exit(cli())
