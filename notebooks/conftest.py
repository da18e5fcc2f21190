"""Each notebook's time, printed at the end of ``pytest --nbval-lax notebooks`` (its cells summed).

A tutorial should run in about two minutes on a 2-core machine; the table says where each one
stands, on the machine that ran it. Nothing here fails a test: times differ between machines.
"""

from collections import defaultdict

_seconds: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report):
    _seconds[report.nodeid.split("::", 1)[0]] += report.duration


def pytest_terminal_summary(terminalreporter):
    if not _seconds:
        return
    terminalreporter.section("seconds per notebook")
    for name, seconds in sorted(_seconds.items()):
        terminalreporter.write_line(f"{seconds:7.1f}  {name}")
