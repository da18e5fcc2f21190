"""Every reader of outside bytes, fed mutated files for a few seconds: only typed errors come out.

The mutation loop is ``tools/fuzz_readers.py`` (its docstring lists the readers and mutations);
the long run is ``python tools/fuzz_readers.py --seconds 600``. A failure prints ``KIND:SEED``;
``python tools/fuzz_readers.py --replay KIND:SEED`` repeats that one mutation with its traceback.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tools"))

import fuzz_readers  # noqa: E402


def test_mutated_files_give_only_typed_errors(tmp_path):
    report = fuzz_readers.run(seconds=6, seed=7, work=tmp_path)
    print(report.table())
    assert set(report.trials) == {"ckpt", "strategy_pb", "strategy_json", "slice", "dinb_ckpt", "ini"}
    assert sum(report.trials.values()) > 300
    assert report.untyped == [], report.table()
    assert report.oversized == [], report.table()
    assert report.hangs == [], report.table()
    assert all(report.typed[k] > 0 for k in report.trials)  # the mutations do reach the checks
