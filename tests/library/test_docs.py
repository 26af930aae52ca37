"""The README's commands are CI's, the README stays short, the docs build strictly, and the tutorials run."""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.helpers import REPO, group_alive, run_module

RUN_BLOCK = re.compile(r"<!-- run(?:: (\w+))? -->\s*```(bash|python)\n(.*?)```", re.S)
TUTORIALS = ("own-data", "finetune-litemedsam", "monai-label-slicer")
# the only change to the tutorials' commands: training gets the suite's tiny overrides
TINY_TRAIN = {"swin_unetr": ["trainer=debug", *TINY],
              "litemedsam": ["trainer=debug", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                             "trainer.max_epochs=1", "data.train_slices=3", "data.val_slices=3", "data.batch_size=2",
                             "task.zero_shot_eval=false", "task.click_rounds=1", "export.standard=false"]}


def readme_commands() -> list[str]:
    quick = REPO.joinpath("README.md").read_text().split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", quick, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_ci_runs_exactly_the_readme_commands():
    commands = readme_commands()
    assert len(commands) == 2 and commands[0].startswith("pip install") and "pytest" in commands[1]
    ci = [line for line in REPO.joinpath(".ci", "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci[1:] == commands
    assert "export MEDIMG_REQUIRE_ORACLES=1" in REPO.joinpath(".ci", "run").read_text()  # CI never skips one
    # the one line before them installs the Debian data the README names as the suite's prerequisite
    packages = re.search(r"apt-get install -y -qq ([\w\- ]+?) >", ci[0]).group(1)
    assert ci[0].startswith("apt-get update") and f"apt-get install {packages}" in readme_prerequisites()


def readme_prerequisites() -> str:
    return REPO.joinpath("README.md").read_text().split("## Quick start", 1)[1].split("```bash", 1)[0]


def test_the_readme_is_a_first_visit_not_a_manual():
    assert len(REPO.joinpath("README.md").read_text().splitlines()) <= 250


def test_mkdocs_builds_strictly(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    api = (tmp_path / "site" / "reference" / "data" / "index.html").read_text()
    assert "import_dataset" in api and "nnU-Net" in api  # the API reference comes from the docstrings


def serve(command: str, cwd: Path, env: dict) -> None:
    """Start a long-running server command, wait until its /info/ lists the models, stop it."""
    import requests

    port = re.search(r"--port (\d+)", command).group(1)
    tmp = cwd / "server-tmp"  # the server's temporary app folder lands here and must be gone after SIGTERM
    tmp.mkdir(exist_ok=True)
    env = {**env, "TMPDIR": str(tmp), "MEDIMG_LABEL_HOME": str(cwd / "label-home")}  # its lasting app folder
    proc = subprocess.Popen(command, shell=True, cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 540
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                info = requests.get(f"http://127.0.0.1:{port}/info/", timeout=5)
                if info.ok:
                    assert {"toy_seg", "core2d"} <= set(info.json()["models"]), info.json()["models"]
                    break
            except requests.ConnectionError:
                pass
            time.sleep(1)
        else:
            pytest.fail("the tutorial's server did not answer")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        deadline = time.monotonic() + 60  # the shell may end first: wait for the server itself to finish
        while group_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not group_alive(proc.pid), "the server outlived SIGTERM by a minute"
    left = [p.name for p in (*tmp.glob("medimg-label-app-*"), *tmp.glob("tmp*.json"))]
    assert not left, f"SIGTERM left the server's temporary files behind: {left}"  # log config
    assert [p.name for p in (cwd / "label-home").glob("*/main.py")] == ["main.py"]  # the app folder lasts


def run_line(line: str, cwd: Path, env: dict) -> subprocess.CompletedProcess:
    """One line of a tutorial's bash block: ``python -m MODULE ARGS`` in the warm runner, anything else in bash."""
    words = shlex.split(line)
    if words[:2] == ["python", "-m"] and not set("|&;<>$`") & set(line.replace("'", "").replace('"', "")):
        return run_module(words[2], *words[3:], cwd=cwd, env=env, timeout=1800)
    return subprocess.run(line, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=1800)


def run_block(kind: str, lang: str, code: str, cwd: Path, env: dict, where: str) -> None:
    if kind == "server":
        serve(code.strip(), cwd, env)
        return
    if lang == "python":
        proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=1800)
        assert proc.returncode == 0, f"{where}\n{proc.stderr[-3000:]}"
        return
    for line in code.strip().splitlines():
        bundle = re.search(r"medimg\.train bundle=(\w+)", line)
        if bundle:
            line += " " + " ".join(f"'{o}'" for o in TINY_TRAIN[bundle.group(1)])
        proc = run_line(line, cwd, env)
        assert proc.returncode == 0, f"{where}: {line}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_the_tutorials_run_as_written(tmp_path, schema):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    for name in TUTORIALS:
        text = REPO.joinpath("docs", "tutorials", f"{name}.md").read_text()
        blocks = RUN_BLOCK.findall(text)
        assert blocks, name
        for i, (kind, lang, code) in enumerate(blocks):
            run_block(kind, lang, code, tmp_path, env, f"{name} block {i}")
    assert (tmp_path / "case3_seg.png").stat().st_size > 10_000 and (tmp_path / "core.png").is_file()
    assert (tmp_path / "runs" / "toy" / "bundle" / "models" / "model.onnx").is_file()
