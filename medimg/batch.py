"""Folder inference at scale: sharded over ``torchrun`` ranks, resumable, one failed input never stops the rest.

``torchrun --nproc_per_node=N [--nnodes ...] -m medimg.infer --bundle B --input DIR --output OUT``
(or ``python -m medimg.infer ... --keep-going`` in one process) runs in this mode:

- rank ``r`` of ``W`` takes every ``W``-th input from the ``r``-th of the sorted input list, so the
  shards are disjoint and stable across re-runs;
- each prediction is written atomically (a temporary file renamed into place), so an output that
  exists is complete: a re-run skips it (status ``exists``) and resumes where a killed run stopped;
- an input that fails (unreadable, wrong geometry, out of memory) gets status ``failed`` and its
  one-line error, and the rank goes on;
- every rank writes its rows, then rank 0 merges them into ``OUT/summary.csv`` (input, output,
  seconds, status, error), after a barrier of the ranks' ``gloo`` process group.

On GPUs each rank uses ``cuda:LOCAL_RANK``. The exit code is 2 when any input failed (on every
rank), so a pipeline notices; the good outputs are kept.
"""

from __future__ import annotations

import csv
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medimg.errors import EXIT_USER_ERROR, DataError, atomic_output, find_medimg_error

SUMMARY = "summary.csv"
FIELDS = ("input", "output", "seconds", "status", "error")


@dataclass(frozen=True)
class Shard:
    """The place of this process among the ``torchrun`` ranks (``rank 0 of 1`` without torchrun)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        """Read ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` as torchrun sets them."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))

    def take(self, items: Sequence[Path]) -> list[Path]:
        """The inputs of this rank: every ``world``-th, starting at ``rank``."""
        return list(items[self.rank::self.world])

    def device(self, requested: str | None) -> str | None:
        """``requested``, else ``cuda:LOCAL_RANK`` when CUDA is there and several ranks share the node."""
        if requested is not None or self.world == 1:
            return requested
        import torch

        return f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"


def check_distinct_targets(items: Sequence[Path], target_of: Callable[[Path], Path]) -> None:
    """Refuse inputs whose outputs would be one file, before any work.

    A DICOM series folder ``case01/`` and ``case01.nii.gz`` both give ``case01_seg.nii.gz``: one would
    overwrite the other, or be skipped as already done. Names that differ only in case count as one,
    as they are on macOS, Windows and SMB file systems.

    Args:
        items: every input (all ranks').
        target_of: the output file of an input.

    Raises:
        DataError: naming both inputs and the output they share.
    """
    seen: dict[str, Path] = {}
    for item in items:
        target = target_of(item)
        first = seen.setdefault(str(target).casefold(), item)
        if first != item:
            raise DataError(item, f"writes the same output {target.name} as {first}; rename one of them")


def error_line(exc: BaseException) -> str:
    """One line for the summary: a medimg error as the user sees it, anything else with its type."""
    err = find_medimg_error(exc)
    text = str(err) if err is not None else f"{type(exc).__name__}: {exc}"
    return " ".join(text.split())


def run_shard(items: Sequence[Path], target_of: Callable[[Path], Path],
              predict_one: Callable[[Path, Path], list[Path]]) -> list[dict[str, Any]]:
    """Predict this rank's inputs one by one; a failure is recorded and the loop goes on.

    Args:
        items: this rank's inputs.
        target_of: the output file of an input.
        predict_one: writes the output (and any extra file, such as a preview) of one input,
            returning every path it wrote.

    Returns:
        One summary row per input.
    """
    rows = []
    for item in items:
        target = target_of(item)
        row = {"input": str(item), "output": str(target), "seconds": "", "status": "exists", "error": ""}
        if not target.exists():
            start = time.perf_counter()
            written: list[Path] = []
            try:
                written = predict_one(item, target)
                row["status"] = "ok"
                print(f"{item} -> {target}", flush=True)
            except Exception as exc:  # noqa: BLE001 - recorded per input; the others go on
                for path in written:
                    path.unlink(missing_ok=True)
                target.unlink(missing_ok=True)
                row.update(status="failed", error=error_line(exc), output="")
                print(f"failed: {item}: {row['error']}", flush=True)
            row["seconds"] = f"{time.perf_counter() - start:.3f}"
        rows.append(row)
    return rows


def write_rows(rows: list[dict[str, Any]], path: Path) -> None:
    """The summary rows as CSV, atomically."""
    with atomic_output(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def read_rows(path: Path) -> list[dict[str, str]]:
    """Rows of a summary CSV."""
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def run_batch(items: Sequence[Path], out_dir: Path, target_of: Callable[[Path], Path],
              predict_one: Callable[[Path, Path], list[Path]], shard: Shard | None = None) -> int:
    """Sharded, resumable folder inference with a merged ``summary.csv``; the exit code.

    Args:
        items: every input, sorted (each rank takes its own share).
        out_dir: the output folder (``summary.csv`` goes there).
        target_of: the output file of an input.
        predict_one: see :func:`run_shard`.
        shard: this process's rank (default: from torchrun's environment).

    Returns:
        0 when no input failed, else 2 (on every rank).

    Raises:
        DataError: two inputs would write the same output (:func:`check_distinct_targets`).
    """
    check_distinct_targets(items, target_of)
    shard = shard or Shard.from_env()
    out_dir.mkdir(parents=True, exist_ok=True)
    dist = _process_group(shard)
    try:
        rows = run_shard(shard.take(items), target_of, predict_one)
        part = out_dir / f".summary.rank{shard.rank}.csv"
        write_rows(rows, part)
        failed = sum(r["status"] == "failed" for r in rows)
        if dist is not None:
            import torch

            count = torch.tensor([failed])
            dist.all_reduce(count)  # also the barrier: every rank's part is written
            failed = int(count.item())
        if shard.rank == 0:
            parts = [out_dir / f".summary.rank{r}.csv" for r in range(shard.world)]
            merged = sorted((row for p in parts for row in read_rows(p)), key=lambda r: r["input"])
            write_rows(merged, out_dir / SUMMARY)
            for p in parts:
                p.unlink()
            counts = {s: sum(r["status"] == s for r in merged) for s in ("ok", "exists", "failed")}
            print(f"{len(merged)} inputs on {shard.world} rank(s): {counts['ok']} predicted, "
                  f"{counts['exists']} already there, {counts['failed']} failed -> {out_dir / SUMMARY}", flush=True)
        if dist is not None:
            dist.barrier()  # rank 0 has merged before any rank exits
    finally:
        if dist is not None:
            dist.destroy_process_group()
    return EXIT_USER_ERROR if failed else 0


def _process_group(shard: Shard) -> Any:
    """``torch.distributed`` with a ``gloo`` group (CPU collectives on any machine), or ``None`` alone."""
    if shard.world == 1:
        return None
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    return dist
