"""The layering of docs/architecture.md is a contract (pyproject.toml, ``lint-imports``): it holds
for the package as it is, and it fails when a lower layer imports a higher one."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT = str(Path(sys.executable).parent / "lint-imports")


def lint(where: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(where))  # this copy of dinb, not the installed one
    return subprocess.run([LINT, "--no-cache"], cwd=where, capture_output=True, text=True, timeout=300,
                          env=env)


def test_the_layers_hold_and_an_upward_import_breaks_them(tmp_path):
    shutil.copytree(ROOT / "dinb", tmp_path / "dinb",
                    ignore=shutil.ignore_patterns("__pycache__", "*.safetensors"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    kept = lint(tmp_path)
    assert kept.returncode == 0 and "1 kept, 0 broken" in kept.stdout, kept.stdout + kept.stderr
    wire = tmp_path / "dinb" / "job" / "wire.py"
    wire.write_text(wire.read_text() + "\nimport dinb.serving.worker  # the job layer reaching up\n")
    broken = lint(tmp_path)
    assert broken.returncode != 0 and "BROKEN" in broken.stdout, broken.stdout + broken.stderr
    assert "dinb.job.wire -> dinb.serving.worker" in broken.stdout, broken.stdout
