"""Tests that read Debian packages skip without them, naming the package; under CI's switch they fail."""

from __future__ import annotations

import subprocess
import sys

from tests.helpers import REPO

PROBE = '''
from pathlib import Path
import tests.oracles as o
o.DEBIAN["mricron-data"] = Path("/nonexistent/ch2.nii.gz")
def test_reads_colin():
    o.need_debian("mricron-data", "orthanc")
'''


def _run(tmp_path, switch: str | None) -> subprocess.CompletedProcess:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in __import__("os").environ.items() if k != "MEDIMG_REQUIRE_ORACLES"}
    if switch is not None:
        env["MEDIMG_REQUIRE_ORACLES"] = switch
    env["PYTHONPATH"] = str(REPO)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "-rs",
                           "--rootdir", str(tmp_path), "-c", "/dev/null", str(tmp_path / "test_probe.py")],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_missing_package_is_one_skip_line_naming_it(tmp_path):
    proc = _run(tmp_path, None)
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout[-2000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SKIPPED")]
    assert len(lines) == 1 and "needs Debian mricron-data: apt-get install mricron-data" in lines[0], lines


def test_under_the_ci_switch_a_missing_package_fails(tmp_path):
    proc = _run(tmp_path, "1")
    assert proc.returncode == 1 and "1 failed" in proc.stdout, proc.stdout[-2000:]
    assert "apt-get install mricron-data" in proc.stdout and "MEDIMG_REQUIRE_ORACLES" in proc.stdout
    assert "Traceback" not in proc.stdout
