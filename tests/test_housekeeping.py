"""What any pytest run leaves behind: nothing, also when it runs no test."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_collecting_only_leaves_no_session_folder(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "DINB_TEST_SESSION_TMP"}
    env["TMPDIR"] = str(tmp_path)
    run = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "tests/test_layout.py"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "left in the temporary folder"
