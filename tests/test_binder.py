"""Binder builds what binder/ says, and the notebooks run there.

Binder is repo2docker: it reads ``binder/runtime.txt`` (the Python), ``binder/requirements.txt``
if present (there is none: dinb's dependencies live in ``pyproject.toml`` alone), then runs
``binder/postBuild``, which installs dinb with its ``notebooks`` extra. Without Docker, the
test (1) has repo2docker read the configuration and write its Dockerfile (``--no-build``), and
(2) builds the environment the same way, a fresh venv of runtime.txt's Python and postBuild,
then runs every notebook in it with nbval.
"""

import glob
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"


def binder_python() -> str | None:
    """An interpreter of the version runtime.txt names (``python-3.12``), or None."""
    version = re.fullmatch(r"python-(\d+\.\d+)", (BINDER / "runtime.txt").read_text().strip()).group(1)
    names = [shutil.which(f"python{version}"),
             *sorted(glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}*/bin/python{version}")))]
    # pyenv's shims exist for versions it has not enabled, and then fail: try each
    works = [n for n in names if n and subprocess.run([n, "-c", "pass"], capture_output=True).returncode == 0]
    return works[0] if works else None


def test_repo2docker_reads_the_binder_folder():
    r2d = Path(sys.executable).parent / "jupyter-repo2docker"
    out = subprocess.run([str(r2d), "--no-build", "--debug", str(ROOT)], capture_output=True, text=True,
                         timeout=300)
    dockerfile = out.stdout + out.stderr
    assert out.returncode == 0, dockerfile[-3000:]
    version = (BINDER / "runtime.txt").read_text().strip().removeprefix("python-")
    assert f"python={version}" in dockerfile
    assert "RUN ./binder/postBuild" in dockerfile
    assert not (BINDER / "requirements.txt").exists()  # pyproject.toml is the one list


def test_the_notebooks_run_in_the_environment_binder_builds(tmp_path):
    python = binder_python()
    if python is None:
        pytest.skip(f"no interpreter for binder/runtime.txt ({(BINDER / 'runtime.txt').read_text().strip()})")
    venv = tmp_path / "binder-env"
    subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
    env = dict(os.environ, PATH=f"{venv / 'bin'}:{os.environ['PATH']}", VIRTUAL_ENV=str(venv))
    env.pop("PYTHONPATH", None)
    built = subprocess.run(["bash", str(BINDER / "postBuild")], cwd=ROOT, env=env, capture_output=True,
                           text=True, timeout=1500)
    assert built.returncode == 0, built.stdout[-2000:] + built.stderr[-3000:]
    # what checks the notebooks (not part of Binder's image)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "pytest>=8",
                    "nbval>=0.11"], env=env, check=True, capture_output=True, timeout=600)
    run = subprocess.run([str(venv / "bin" / "python"), "-m", "pytest", "--nbval-lax", "-p",
                          "no:cacheprovider", "-q", "notebooks"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=1500)
    print(run.stdout[-2500:])  # the seconds per notebook
    assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-2000:]
    assert "passed" in run.stdout and "failed" not in run.stdout
