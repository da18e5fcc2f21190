"""The README's examples, run as a reader would run them, and its sample outputs against what the
commands print (so they cannot go stale)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dinb.cli import NOISE, mpiexec_path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def block_after(marker: str, lang: str, nth: int = 0) -> str:
    """The ``nth`` fenced block of ``lang`` after ``marker`` (an empty ``lang``: an output block)."""
    blocks, fence = [], None
    for line in README[README.index(marker):].splitlines(keepends=True):
        if fence is None and line.startswith("```"):
            fence = (line[3:].strip(), [])
        elif fence is not None and line.startswith("```"):
            blocks.append((fence[0], "".join(fence[1])))
            fence = None
        elif fence is not None:
            fence[1].append(line)
    return [text for kind, text in blocks if kind == lang][nth]


def run(args: list[str], cwd: Path, timeout_s: float = 300) -> str:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout_s, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "\n".join(ln for ln in proc.stdout.splitlines() if not NOISE.search(ln))


def shell_line(block: str, starts: str) -> list[str]:
    """The command of ``block`` that starts with ``starts``, as arguments (the venv's own tools)."""
    line = next(ln for ln in block.splitlines() if ln.startswith(starts))
    args = line.split("#")[0].split()
    return [sys.executable if a == ".venv/bin/python" else mpiexec_path() if a == ".venv/bin/mpiexec"
            else a for a in args]


def test_the_downloaded_folder_example_prints_what_the_readme_shows(tmp_path):
    command = shell_line(block_after("**A model you downloaded**", "bash"), ".venv/bin/python -m dinb export")
    out = command.index("--out") + 1
    command[out] = str(tmp_path / "out" / "qwen3")
    printed = run(command, ROOT).replace(str(tmp_path / "out"), "out")
    shown = block_after("**A model you downloaded**", "", 0).strip()

    def sizes_out(text: str) -> str:  # a slice file's size follows the compiler's program bytes
        return re.sub(r"\.dinb  \d+ bytes", ".dinb  N bytes", text.strip())

    assert sizes_out(printed) == sizes_out(shown)


def test_the_checkpoint_example_runs_and_exports(tmp_path):
    (tmp_path / "example.py").write_text(block_after("**Sharded checkpoints**", "python"))
    run([sys.executable, "example.py"], tmp_path)
    assert sorted(p.name for p in (tmp_path / "out" / "mlp").glob("*.dinb")) == ["mlp0.dinb", "mlp1.dinb"]
    assert sorted(p.name for p in (tmp_path / "tp2").iterdir()) == ["rank_0", "rank_1", "strategy.json"]


@pytest.mark.mpi
def test_the_lite_example_runs_on_two_mpiexec_ranks(tmp_path):
    bash = block_after("**Per-rank slices**", "bash")
    run(shell_line(bash, ".venv/bin/python -m dinb export"), tmp_path)
    (tmp_path / "lite.py").write_text(block_after("**Per-rank slices**", "python"))
    printed = run([mpiexec_path(), "-n", "2", sys.executable, "lite.py"], tmp_path)
    # one line from each rank; mpiexec may pass on the two ranks' writes interleaved
    row = "[-48. -48. -48. -48.]"
    assert printed.count(row) == 2 and not printed.replace(row, "").strip(), printed
