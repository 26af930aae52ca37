"""Run every CPU benchmark, print one table and append it to BENCHMARKS.md.

    python benchmarks/run_all.py [--swin-bundle DIR] [--lite-bundle DIR] [--no-append]

Each benchmark runs in its own process and times medimg against its reference in that same
process (see each script). Without bundles, two are made first: ``swin_unetr`` and ``litemedsam``
exported untrained (``bundle.max_epochs=0``): timings do not depend on the weights' values.
About 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from timing import load_results, machine, markdown, print_results

HERE = Path(__file__).resolve().parent


def _bundle(name: str, runs: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "medimg.train", f"bundle={name}", "bundle.max_epochs=0",
                           f"runs_dir={runs}", "trainer.enable_progress_bar=false"], capture_output=True, text=True)
    match = re.search(r"bundle written(?: and verified)?: (\S+)", proc.stdout + proc.stderr)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"could not make a {name} bundle:\n{(proc.stdout + proc.stderr)[-3000:]}")
    return match.group(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--swin-bundle", default=None)
    parser.add_argument("--lite-bundle", default=None)
    parser.add_argument("--no-append", action="store_true", help="print only; leave BENCHMARKS.md alone")
    args = parser.parse_args()
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        swin = args.swin_bundle or _bundle("swin_unetr", tmp / "runs")
        lite = args.lite_bundle or _bundle("litemedsam", tmp / "runs")
        jobs = {
            "load": ["load.py", "--repeats", "15"],
            "promptable": ["promptable.py", "--repeats", "30"],
            "sliding_window": ["sliding_window.py", "--bundle", swin, "--repeats", "3"],
            "data_epoch": ["data_epoch.py", "--epochs", "3"],
            "cold_start": ["cold_start.py", "--bundle", swin, "--bundle", lite, "--repeats", "3"],
        }
        results = []
        for name, cmd in jobs.items():
            out = tmp / f"{name}.json"
            t = time.time()
            proc = subprocess.run([sys.executable, str(HERE / cmd[0]), *cmd[1:], "--json", str(out)],
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results += load_results(str(out))
            print(f"{name}: {time.time() - t:.0f} s", flush=True)
    head = machine()
    print(head)
    print_results(results)
    print(f"all CPU benchmarks: {time.time() - start:.0f} s")
    if not args.no_append:
        notes = "\n".join(f"- {r.measure}: {n}" for r in results for n in r.notes)
        section = (f"\n## `python benchmarks/run_all.py` — {head}\n\nRatio = medimg p50 / reference p50 "
                   f"(below 1: medimg faster).\n\n{markdown(results)}\n\n{notes}\n")
        with open(HERE.parent / "BENCHMARKS.md", "a") as fh:
            fh.write(section)
        print("appended to BENCHMARKS.md")


if __name__ == "__main__":
    main()
